"""Every rank's peak in one place: each process profiles its own device, and the summary rank 0 prints shows them all.

    peaks = gather_peaks(profiler)          # every rank calls it (a collective); rank order
    if rank == 0: print(peaks_line(peaks))  # "peak allocated by rank: 0: 11.21 GiB | 1: 11.30 GiB"
"""

from __future__ import annotations

import torch

from .samples import format_bytes


def run_peak(profiler) -> int:
    """The highest step peak a MemoryProfiler recorded (0 before any step has finished)."""
    return max((s.peak for s in profiler.steps), default=0)


def gather_peaks(profiler_or_bytes) -> list[int]:
    """Each rank's peak in bytes, in rank order: a MemoryProfiler's highest step peak or a number of bytes.

    Under torch.distributed every rank must call it (all_gather_object, which works over gloo and NCCL alike);
    without a process group it returns this process's peak alone.
    """
    peak = profiler_or_bytes if isinstance(profiler_or_bytes, int) else run_peak(profiler_or_bytes)
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [int(peak)]
    peaks: list = [None] * dist.get_world_size()
    dist.all_gather_object(peaks, int(peak))
    return [int(p) for p in peaks]


def peaks_line(peaks: list[int]) -> str:
    """One line for the summary: every rank's peak, and the spread when there are several."""
    parts = " | ".join(f"{rank}: {format_bytes(p)}" for rank, p in enumerate(peaks))
    spread = f" (spread {format_bytes(max(peaks) - min(peaks))})" if len(peaks) > 1 else ""
    return f"peak allocated by rank: {parts}{spread}"
