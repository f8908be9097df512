"""Where the totals come from: CUDA's allocator counters, or the process and a tensor counter on the CPU.

A meter's `read()` answers three questions at once, without a device synchronisation: how many bytes tensors
hold now (`allocated`, None where nothing knows), the most they held since `reset_peak` (`peak`, likewise) and
how much the device or process holds in all (`held`: CUDA's reserved pool, the CPU process's resident memory).
`capacity` is how much the device has; `activations` is what the meter attributes to activations beyond the
named tensors.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..errors import ConfigError
from .cpu import AllocationTracker, SavedTensorCounter

CPU_MODES = ("saved", "exact")


class Reading(NamedTuple):
    allocated: int | None
    peak: int | None
    held: int


class CudaMeter:
    kind = "cuda"

    def __init__(self, device: torch.device):
        self.device = device
        props = torch.cuda.get_device_properties(device)
        self.capacity = props.total_memory
        self.name = f"{device} ({props.name})"

    def read(self) -> Reading:
        # One call for all three: torch.cuda.memory_allocated & co. each build and flatten the allocator's whole
        # statistics dict, which costs host time inside a launch-bound step.
        stats = torch.cuda.memory_stats_as_nested_dict(self.device)
        allocated = stats["allocated_bytes"]["all"]
        return Reading(allocated["current"], allocated["peak"], stats["reserved_bytes"]["all"]["current"])

    def reset_peak(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)

    def activations(self, named: int, reading: Reading) -> int:
        # The allocator's figure less every tensor we can name: what forward/backward keeps alive.
        return max(0, reading.allocated - named)

    # The forward needs nothing from a CUDA meter: the allocator sees every tensor.
    def forward_begin(self, seed) -> None:
        pass

    def forward_end(self, outputs) -> None:
        pass

    def step_begin(self, seed) -> None:
        pass

    def step_end(self) -> None:
        pass

    def close(self) -> None:
        pass


class CpuMeter:
    kind = "cpu"

    def __init__(self, mode: str = "saved", skip_ptrs=()):
        if mode not in CPU_MODES:
            raise ConfigError(f"cpu_mode={mode!r} is not known; use 'saved' (cheap, the graph's saved tensors) or "
                              "'exact' (every allocation, about 20% slower steps).")
        import psutil

        self.mode = mode
        self._process = psutil.Process()
        self.capacity = psutil.virtual_memory().total
        self.name = "cpu"
        self._saved = SavedTensorCounter(skip_ptrs) if mode == "saved" else None
        self._tracker = AllocationTracker() if mode == "exact" else None

    def read(self) -> Reading:
        tracker = self._tracker
        return Reading(tracker.live if tracker else None, tracker.peak if tracker else None,
                       self._process.memory_info().rss)

    def reset_peak(self) -> None:
        (self._tracker or self._saved).reset_peak()

    def activations(self, named: int, reading: Reading) -> int:
        if self._tracker is not None:
            return max(0, self._tracker.live - named)
        return self._saved.live

    def forward_begin(self, seed) -> None:
        if self._saved is not None:
            self._saved.start()

    def forward_end(self, outputs) -> None:
        if self._saved is not None:
            self._saved.stop()
            self._saved.hold(outputs)  # logits and loss are alive after forward too

    def step_begin(self, seed) -> None:
        if self._tracker is not None:
            self._tracker.seed(seed())
            self._tracker.start()

    def step_end(self) -> None:
        if self._tracker is not None:
            self._tracker.stop()

    def close(self) -> None:
        if self._saved is not None:
            self._saved.stop()
        if self._tracker is not None:
            self._tracker.stop()


def make_meter(device: torch.device, cpu_mode: str = "saved", skip_ptrs=()):
    if device.type == "cuda":
        return CudaMeter(device)
    if device.type == "cpu":
        return CpuMeter(cpu_mode, skip_ptrs)
    raise ConfigError(f"The memory profiler supports CUDA and CPU models; this model is on {device}.")
