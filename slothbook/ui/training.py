"""What a notebook shows while a fine-tune runs: a `TrainerCallback` plugged into `run_finetune(cfg, callbacks=...)`,
which does not know who watches. (The Stop button is train/interrupt.py's GracefulStop.)
"""

from __future__ import annotations

import time

from transformers import TrainerCallback


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes}:{seconds:02d}"


class TrainingView(TrainerCallback):
    """A progress bar, a status line (step, loss, tokens/s, time) and the profiler's live figure in one box.

    `widget` is the box to display. Call `show_profiler(profiler)` from the kernel's main thread (a cell or a
    widget callback) before training; the figure then redraws from wherever training runs.
    """

    def __init__(self, total_steps: int = 1, profiler=None):
        import ipywidgets as w

        self.profiler = profiler
        self.bar = w.IntProgress(value=0, min=0, max=max(1, total_steps), description="training",
                                 bar_style="info", layout=w.Layout(width="320px"))
        self.status = w.HTML("loading the model and the data ...")
        self.figure_box = w.Output()
        self.figure = None  # the profiler's live FigureWidget, once shown
        self.widget = w.VBox([w.HBox([self.bar, self.status]), self.figure_box])
        self.loss: float | None = None
        self.step = 0
        self._t0: float | None = None

    def show_profiler(self, profiler) -> None:
        self.profiler = profiler
        with self.figure_box:
            self.figure = profiler.show()

    # ---- trainer events -----------------------------------------------------------------------------------

    def on_train_begin(self, args, state, control, **kwargs):
        self._t0 = time.perf_counter()
        self.bar.max = max(1, state.max_steps)
        self.status.value = f"step 0/{state.max_steps}"

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.loss = float(logs["loss"])

    def on_step_end(self, args, state, control, **kwargs):
        self.step = state.global_step
        self.bar.value = min(state.global_step, self.bar.max)
        self.status.value = self.status_line(state.global_step, state.max_steps)

    def on_train_end(self, args, state, control, **kwargs):
        self.bar.bar_style = "success"

    # ---- text ---------------------------------------------------------------------------------------------

    def tokens_per_s(self) -> float | None:
        steps = self.profiler.steps if self.profiler is not None else []
        return steps[-1].tokens_per_s if steps else None

    def status_line(self, step: int, total: int) -> str:
        parts = [f"step {step}/{total}"]
        if self.loss is not None:
            parts.append(f"loss {self.loss:.4f}")
        rate = self.tokens_per_s()
        if rate:
            parts.append(f"{rate:,.0f} tokens/s")
        if self._t0 is not None:
            elapsed = time.perf_counter() - self._t0
            parts.append(f"{_duration(elapsed)} elapsed")
            if 0 < step < total:
                parts.append(f"~{_duration(elapsed / step * (total - step))} left")
        return " &middot; ".join(parts)

    def finish(self, text: str, kind: str = "ok") -> None:
        """Show the outcome: ok (done), warning (stopped early) or error (failed)."""
        from .feedback import message_html

        self.bar.bar_style = {"ok": "success", "warning": "warning", "error": "danger"}[kind]
        self.status.value = message_html(text, kind)
