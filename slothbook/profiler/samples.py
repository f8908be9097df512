"""What one measurement holds, the category names, and the loss read back without a synchronisation."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch

# Device categories in stacking order, then the host-side one. Device categories add up to `held`.
DEVICE_CATEGORIES = ("weights", "lora", "gradients", "optimizer", "activations", "rest")
CATEGORIES = DEVICE_CATEGORIES[:-1] + ("offloaded", "rest")
LABELS = {
    "weights": "base weights",
    "lora": "LoRA weights",
    "gradients": "gradients",
    "optimizer": "optimizer state",
    "activations": "activations",
    "offloaded": "offloaded activations (host)",
    "rest": "reserved, not allocated",
}
CPU_REST_LABEL = "rest of the process"
PHASES = ("forward", "backward", "optimizer")
PEAK = "peak"


@dataclass
class Sample:
    """One measurement. `phase` is forward/backward/optimizer (taken after that phase) or `peak`: the step's
    summary row, whose categories split the step's peak and whose timing, tokens and loss cover the step."""

    step: int
    phase: str
    time: float  # seconds since the profiler started
    weights: int
    lora: int
    gradients: int
    optimizer: int
    activations: int
    offloaded: int
    rest: int
    allocated: int  # weights + lora + gradients + optimizer + activations
    held: int  # allocated + rest: the CUDA reserved pool, or the CPU process's resident memory less the offload pool
    peak: int  # the step's highest `allocated` so far
    capacity: int  # the device's memory (CPU: the machine's)
    tokens: int = 0
    seconds: float | None = None
    loss: float | None = None

    @property
    def tokens_per_s(self) -> float | None:
        return self.tokens / self.seconds if self.seconds and self.tokens else None

    @property
    def largest(self) -> str:
        return max(DEVICE_CATEGORIES[:-1], key=lambda c: getattr(self, c))

    def as_row(self) -> dict:
        row = asdict(self)
        row["tokens_per_s"] = self.tokens_per_s
        return row


SAMPLE_COLUMNS = [f.name for f in fields(Sample)] + ["tokens_per_s"]


class PendingScalar:
    """A loss read back to the host without waiting: a non-blocking copy to pinned memory and an event.
    `value(wait=False)` is None until the device has got there."""

    def __init__(self, t: torch.Tensor):
        t = t.detach()
        if t.device.type == "cuda":
            self._host = torch.empty((), dtype=t.dtype, pin_memory=True)
            self._host.copy_(t.reshape(()), non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host, self._event = t.reshape(()).clone(), None

    def value(self, wait: bool = False) -> float | None:
        if self._event is not None:
            if wait:
                self._event.synchronize()
            elif not self._event.query():
                return None
        return float(self._host)


def format_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"
