"""A fine-tune as a notebook shows it: live profiler and progress while it runs, a saved figure when done."""

from __future__ import annotations

import contextlib

from ..train.job import FinetuneConfig, FinetuneResult, run_finetune


def profiler_callback(profiler):
    """The TrainerCallback that drives `profiler` (the profiler itself where it is one)."""
    from transformers import TrainerCallback

    return profiler if isinstance(profiler, TrainerCallback) else profiler.callback()


def current_device() -> str:
    import torch

    return f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"


@contextlib.contextmanager
def on_device(device: str):
    """Make `device` this thread's current CUDA device, which is where the loader puts the model."""
    if not device.startswith("cuda"):
        yield
        return
    import torch

    with torch.cuda.device(torch.device(device)):
        yield


@contextlib.contextmanager
def quiet_progress_bars():
    """Hide the loading and dataset-mapping bars of transformers and datasets while our own view shows progress
    (from a background thread they would land in whatever cell runs); restore them after."""
    import datasets.utils.logging as ds_log
    import transformers.utils.logging as tf_log

    states = [(m, m.is_progress_bar_enabled()) for m in (ds_log, tf_log)]
    for module, _ in states:
        module.disable_progress_bar()
    try:
        yield
    finally:
        for module, enabled in states:
            if enabled:
                module.enable_progress_bar()


def outcome(result: FinetuneResult) -> tuple[str, str]:
    """What a run ended with, in one line, and its kind: "ok" (finished) or "warning" (stopped early)."""
    state = result.trainer.state
    loss = f"loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f}, " if result.losses else ""
    if result.stopped:
        return (f"Stopped after step {state.global_step} of {state.max_steps} ({result.stopped}): {loss}"
                f"{result.seconds:.1f} s; checkpoint saved to {result.checkpoint_dir}; "
                f"adapter saved to {result.adapter_dir}", "warning")
    return f"{state.global_step} steps: {loss}{result.seconds:.1f} s; adapter saved to {result.adapter_dir}", "ok"


def notebook_finetune(cfg: FinetuneConfig, device: str | None = None):
    """Train in this thread, showing the live memory figure and a progress bar. When done the live view is
    replaced by the finished figure as a static image (so the saved notebook shows it), then the summary.
    Returns (FinetuneResult, MemoryProfiler)."""
    from IPython.display import display

    from ..profiler import MemoryProfiler
    from .feedback import Message, error_text
    from .static import StaticFigure
    from .training import TrainingView

    device = device or current_device()
    profiler = MemoryProfiler(device=device, live=False)  # shown in our own box instead
    view = TrainingView(cfg.steps, profiler)
    handle = display(view.widget, display_id=True)
    view.show_profiler(profiler)
    try:
        with on_device(device), quiet_progress_bars():
            result = run_finetune(cfg, callbacks=[profiler_callback(profiler), view], progress_bar=False)
    except KeyboardInterrupt:  # the second Ctrl-C: the first one stops after the step, with a checkpoint
        view.finish("interrupted: no adapter was saved", "warning")
        raise
    except BaseException as exc:
        view.finish(error_text(exc), "error")
        raise
    text, kind = outcome(result)
    handle.update(StaticFigure(profiler.figure()))
    display(Message(text, kind))
    print(profiler.summary())
    return result, profiler
