"""The CPU byte counters: live bytes follow storages' lives, views and parameters are not counted twice."""

from __future__ import annotations

import gc

import torch

from slothbook.profiler.cpu import AllocationTracker, SavedTensorCounter


def test_saved_counter_counts_saved_storage_once_and_releases_it_after_backward():
    w = torch.randn(256, 256, requires_grad=True)
    counter = SavedTensorCounter(skip=[w.untyped_storage().data_ptr()])
    x = torch.randn(64, 256, requires_grad=True)
    counter.start()
    try:
        h = x @ w  # saves x (and w, which is skipped)
        y = (h * h).sum()  # saves h once although it is both operands
    finally:
        counter.stop()
    assert counter.live == x.nbytes + h.nbytes
    assert counter.peak == counter.live
    del h
    y.backward()
    del y
    gc.collect()
    assert counter.live == x.nbytes  # the graph is gone; x itself is still ours


def test_saved_counter_ignores_work_outside_its_hooks():
    counter = SavedTensorCounter()
    a = torch.randn(128, requires_grad=True)
    (a * a).sum().backward()
    assert counter.live == 0


def test_tracker_sees_allocations_and_frees_but_not_views_or_in_place():
    seed = torch.zeros(1000)
    tracker = AllocationTracker()
    tracker.seed([seed])
    base = tracker.live
    assert base == seed.nbytes
    tracker.start()
    try:
        y = torch.ones(2000)  # 8000 bytes
        view = y[10:]  # no allocation
        y.add_(1)  # in place: no allocation
        z = y * 2  # 8000 bytes
        peak = tracker.live
        del z
    finally:
        tracker.stop()
    assert peak == base + 16000
    assert tracker.live == base + 8000
    del y
    assert tracker.live == base + 8000  # the view keeps the storage alive
    del view
    assert tracker.live == base
    del seed
    assert tracker.live == 0
    assert tracker.peak == base + 16000
    tracker.reset_peak()
    assert tracker.peak == 0
