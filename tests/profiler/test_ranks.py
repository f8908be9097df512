"""Every rank's peak gathered for the summary: two real processes over gloo, each profiling its own training steps."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from slothbook.profiler import MemoryProfiler, gather_peaks, peaks_line
from slothbook.profiler.ranks import run_peak


def _rank(rank: int, world: int, out: str) -> None:
    """Train a small MLP for three steps with a batch that grows with the rank, then gather the peaks."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{out}/store", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        batch = 8 * (1 + 7 * rank)  # rank 1 keeps 8x the activations of rank 0
        with MemoryProfiler(model, optimizer, device="cpu", live=False) as prof:
            for _ in range(3):
                model(torch.randn(batch, 64)).square().mean().backward()
                optimizer.step()
                optimizer.zero_grad()
                prof.step()
        with open(f"{out}/rank{rank}.json", "w") as f:
            json.dump({"own": run_peak(prof), "gathered": gather_peaks(prof)}, f)
        torch.distributed.barrier()  # and leave together
    finally:
        torch.distributed.destroy_process_group()
    # Done and written: leave without the interpreter's teardown. A training process that used gloo sometimes
    # aborts in C++ static destruction at exit ("terminate called without an active exception"; about 1 in 30
    # under load, with no slothbook code involved), which mp.spawn reports as a failed rank.
    os._exit(0)


def test_every_rank_gets_every_ranks_peak_in_rank_order(tmp_path):
    mp.spawn(_rank, args=(2, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert r0["gathered"] == r1["gathered"] == [r0["own"], r1["own"]]
    assert r1["own"] > r0["own"] > 0  # the larger batch peaks higher: the gather did not mix ranks up


def test_without_a_process_group_it_is_this_process_alone():
    assert not torch.distributed.is_initialized()
    assert gather_peaks(3 * 2**30) == [3 * 2**30]


@pytest.mark.parametrize("peaks, expected", [
    ([2**30], "peak allocated by rank: 0: 1.00 GiB"),
    ([2**30, 3 * 2**29], "peak allocated by rank: 0: 1.00 GiB | 1: 1.50 GiB (spread 512.00 MiB)"),
])
def test_peaks_line(peaks, expected):
    assert peaks_line(peaks) == expected
