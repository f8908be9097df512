"""Turning CUDA's out-of-memory error into one that says where it happened and what would fit.

Trainer has no event for exceptions, so translation happens around the training call::

    with prof.oom_guard():      # or: except torch.OutOfMemoryError as e: raise translate_oom(e, prof) from e
        trainer.train()

while the profiler (its callback or hooks) keeps track of the step and phase the error interrupts.
"""

from __future__ import annotations

import torch

from ..errors import TrainingError
from .samples import LABELS, format_bytes


class TrainingOutOfMemoryError(TrainingError, torch.OutOfMemoryError):
    """Training ran out of device memory. Still a `torch.OutOfMemoryError`, so existing handlers keep working.

    Attributes: step, phase, largest (category name), largest_bytes, fit (a `Fit` from `max_fit`, or None).
    """

    def __init__(self, message, step=None, phase=None, largest=None, largest_bytes=None, fit=None):
        super().__init__(message)
        self.step, self.phase, self.largest, self.largest_bytes, self.fit = step, phase, largest, largest_bytes, fit


def translate_oom(exc: BaseException, profiler=None, *, model=None, optimizer=None, seq_len: int | None = None,
                  batch_size: int | None = None, gpu_memory: int | None = None) -> TrainingOutOfMemoryError:
    """A `TrainingOutOfMemoryError` naming the step, the phase, the largest memory category and what the
    estimator says would fit. Everything is optional: the profiler supplies what it knows."""
    model = model if model is not None else getattr(profiler, "model", None)
    optimizer = optimizer if optimizer is not None else getattr(profiler, "optimizer", None)
    shape = getattr(profiler, "last_shape", None) or (None, None)
    batch_size = batch_size or shape[0]
    seq_len = seq_len or shape[1]
    meter = getattr(profiler, "meter", None)
    gpu_memory = gpu_memory or getattr(meter, "capacity", None) or _device_memory()

    where = []
    step = phase = None
    if profiler is not None and profiler.model is not None:
        step, phase = profiler.current_step, profiler.phase
        where.append(f"at step {step}, during {phase}")
    head = f"Out of {'GPU ' if getattr(meter, 'kind', 'cuda') == 'cuda' else ''}memory {' '.join(where)}".rstrip()
    lines = [head + (f" ({format_bytes(gpu_memory)} in all)." if gpu_memory else ".")]

    largest = largest_bytes = None
    sample = profiler.measure_now() if profiler is not None and profiler.model is not None else None
    if sample is not None:
        largest, largest_bytes = sample.largest, getattr(sample, sample.largest)
        lines.append(f"Largest category: {LABELS[largest]}, {format_bytes(largest_bytes)} of "
                     f"{format_bytes(sample.allocated)} allocated (weights {format_bytes(sample.weights)}, "
                     f"activations {format_bytes(sample.activations)}).")

    fit = _what_fits(model, optimizer, seq_len, batch_size, gpu_memory, getattr(meter, "kind", "cuda"))
    if fit is not None:
        lines.append(f"The estimator says that {fit} fits in {format_bytes(gpu_memory)} with this setup.")
    lines.append("To fit: lower max_seq_length or the batch size (raise gradient_accumulation_steps to keep the "
                 "effective batch), use use_gradient_checkpointing='slothbook' to keep activations in host memory, "
                 "load with load_in_4bit=True, or use a smaller LoRA rank. Original error: "
                 f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
    return TrainingOutOfMemoryError("\n".join(lines), step, phase, largest, largest_bytes, fit)


def _what_fits(model, optimizer, seq_len, batch_size, gpu_memory, device_type):
    if model is None or not gpu_memory or not seq_len or not batch_size:
        return None
    from .estimator import max_fit
    from .setup import training_setup

    try:
        setup = training_setup(model, optimizer, device_type)
        return max_fit(model.config, int(gpu_memory), seq_len=seq_len, batch_size=batch_size, **setup)
    except Exception:  # advice is best effort: an unknown architecture must not hide the real error
        return None


def _device_memory() -> int | None:
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    return None
