"""The estimate as shown: which target a plan is for, and the verdict with what would fit instead."""

from __future__ import annotations

import pytest

from slothbook.device import host_memory_available
from slothbook.errors import ConfigError
from slothbook.ui.estimate import estimate_table, plan, resolve_target, verdict


def test_targets_a_gpu_size_or_this_machine():
    gpu = resolve_target(gpu_memory_gib=24)
    assert (gpu.budget, gpu.implementation, gpu.dtype, gpu.cpu) == (24 * 2**30, "kernels", "bf16", False)
    cpu = resolve_target(device="cpu")
    assert (cpu.implementation, cpu.dtype, cpu.cpu) == ("hf", "fp32", True) and cpu.budget > 0
    assert cpu.label.startswith("the ") and cpu.label.endswith(" available on the CPU")
    with pytest.raises(ConfigError, match="positive"):
        resolve_target(gpu_memory_gib=0)


def test_verdict_fits_or_says_what_would(embedded_dir):
    small = resolve_target(gpu_memory_gib=0.5)
    est = plan("smollm2-135m", seq_len=4096, batch_size=4, load_in_4bit=False, offload=False, target=small)
    fits, sentence = verdict(est, small, "smollm2-135m")
    assert not fits and sentence.startswith("Will not fit") and "What fits: seq_len" in sentence
    assert "load in 4-bit" in sentence and "offload activations" in sentence

    big = resolve_target(gpu_memory_gib=80)
    fits, sentence = verdict(plan("smollm2-135m", 512, target=big), big, "smollm2-135m")
    assert fits and sentence.startswith("Fits: predicted peak") and "% of a 80 GiB GPU." in sentence


def test_verdict_says_when_the_offloaded_inputs_exceed_this_machines_memory(embedded_dir):
    # A GPU large enough for the step, but 64 x 1M tokens of SmolLM2's layer inputs (about 2 TiB) in host memory.
    huge = resolve_target(gpu_memory_gib=1e6)
    est = plan("smollm2-135m", seq_len=1 << 20, batch_size=64, target=huge)
    assert est.detail["offloaded"] > host_memory_available() and est.fits(huge.budget)
    fits, sentence = verdict(est, huge, "smollm2-135m")
    assert not fits and sentence.startswith("Will not fit in host memory: offloading keeps ")
    assert "is available" in sentence and "'auto'" in sentence
    fits, _ = verdict(plan("smollm2-135m", 2048, target=huge), huge, "smollm2-135m")  # 68 MiB offloaded: fits
    assert fits


def test_table_lists_categories_and_the_peak(embedded_dir):
    est = plan("smollm2-135m", 256, target=resolve_target(gpu_memory_gib=8))
    table = estimate_table(est)
    assert list(table.index) == ["base weights", "LoRA weights", "gradients", "optimizer state", "activations",
                                 "predicted peak"]
    assert table.loc["predicted peak", "share"] == "100%"
