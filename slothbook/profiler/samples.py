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
    """A scalar on its way to the host: `value(wait=False)` is None until the device has got there."""

    def __init__(self, read, event=None):
        self._read, self._event, self._value = read, event, None

    def value(self, wait: bool = False) -> float | None:
        if self._value is None:
            if self._event is not None:
                if wait:
                    self._event.synchronize()
                elif not self._event.query():
                    return None
            self._value, self._event = self._read(), None
        return self._value


class HostScalars:
    """Reads scalars (the step's loss) back to the host without making the host wait for the device.

    At the read, the value is copied into a slot of a small device buffer (a device-to-device copy, queued like
    any kernel) and an event is recorded. Once the event has passed, the slot is fetched to pinned host memory
    on a stream of its own, which waits for nothing else. A device-to-host copy queued at the read instead
    cost the host milliseconds per step on an H200 (measured inside the forward hook), where the step itself
    is bound by the host. Slots are reused in turn; a slot's previous value is fetched before its reuse.
    """

    def __init__(self, slots: int = 64):
        self._slots = slots
        self._device: torch.Tensor | None = None
        self._host: torch.Tensor | None = None
        self._stream = None
        self._owners: list[PendingScalar | None] = [None] * slots
        self._next = 0

    def read(self, t: torch.Tensor) -> PendingScalar:
        t = t.detach().reshape(())
        if t.device.type != "cuda":
            value = float(t)
            return PendingScalar(lambda: value)
        if self._device is None or self._device.device != t.device:
            self._device = torch.empty(self._slots, dtype=torch.float32, device=t.device)
            self._host = torch.empty(self._slots, dtype=torch.float32, pin_memory=True)
            self._stream = torch.cuda.Stream(t.device)
        i = self._next
        self._next = (i + 1) % self._slots
        if self._owners[i] is not None:
            self._owners[i].value(wait=True)  # normally long fetched: it was read `slots` reads ago
        self._device[i].copy_(t)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(t.device))
        self._owners[i] = PendingScalar(lambda: self._fetch(i, event), event)
        return self._owners[i]

    def _fetch(self, i: int, event) -> float:
        # The event has passed: the copy on our own stream waits only for itself.
        with torch.cuda.stream(self._stream):
            self._stream.wait_event(event)
            self._host[i].copy_(self._device[i], non_blocking=True)
        self._stream.synchronize()
        return float(self._host[i])


def format_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"
