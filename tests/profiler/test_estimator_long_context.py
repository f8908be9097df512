"""The estimator against peaks measured on an H200 at long context (benchmarks/results/*-h200*.json).

At 32K-128K tokens with offloaded checkpointing and the tiled MLP, a layer's backward peaks inside attention;
these measurements are what its model (train/activation_bytes.attention_backward) was checked against.
"""

import json
from pathlib import Path

import pytest
from transformers import LlamaConfig

from slothbook.profiler import estimate
from slothbook.train.activation_bytes import Shape, attention_backward

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
GIB = 2**30


def _llama_8b() -> LlamaConfig:
    return LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072)


def _measured(name: str, metric: str) -> dict[str, float]:
    rows = json.loads((RESULTS / name).read_text())["rows"]
    return {r["config"]: r["value"] for r in rows if r["contender"] == "measured" and r["metric"] == metric}


def _sdpa_backward() -> dict[str, int]:
    """attention_memory.py's backward bytes per token, by config ("<contender> <layout> <seq>")."""
    rows = json.loads((RESULTS / "attention_memory-h200.json").read_text())["rows"]
    return {r["config"]: r["value"] for r in rows if r["metric"] == "backward_bytes_per_token"}


def test_sdpa_backward_terms_match_the_measured_workspace():
    # attention_memory.py: cuDNN's (the default backend's) backward over Llama-3.1-8B's heads, grouped-query.
    measured = _sdpa_backward()
    s = Shape.from_config(_llama_8b())
    sdpa_only = attention_backward(s, 2) - 2 * s.hidden - 2 * 2 * s.q  # less the incoming gradients
    for seq in (32768, 131072):
        assert measured[f"transformers gqa {seq}"] == sdpa_only


@pytest.mark.parametrize("config", ["qlora offload 32768x1", "qlora offload 65536x1", "qlora offload 131072x1",
                                    "lora16 offload 65536x1", "lora16 offload 131072x1"])
def test_long_context_peak_is_estimated_within_two_percent_and_not_under(config):
    measured = _measured("estimator_accuracy-h200-long.json", "peak_gib")[config]
    held = _measured("estimator_accuracy-h200-long.json", "held_after_forward_gib")[config]
    kind, mode, tokens = config.split()
    est = estimate(_llama_8b(), int(tokens.split("x")[0]), 1, load_in_4bit=kind == "qlora", checkpointing=mode,
                   kernels=True, device="cuda")
    assert 0.998 <= est.total / GIB / measured <= 1.02
    assert est.detail["held_after_forward"] / GIB == pytest.approx(held, rel=0.01)


def test_flash_backward_term_matches_its_measurement_and_is_chosen_before_hopper():
    from slothbook.profiler.activations import sdpa_runs_flash

    measured = _sdpa_backward()
    s = Shape.from_config(_llama_8b())
    assert measured["flash gqa 131072"] == attention_backward(s, 2, flash=True) - 2 * s.hidden - 2 * 2 * s.q
    assert sdpa_runs_flash((8, 0)) and sdpa_runs_flash((8, 9))
    assert not sdpa_runs_flash((9, 0)) and not sdpa_runs_flash((7, 5)) and not sdpa_runs_flash((10, 0))


def test_the_longest_measured_step_is_not_underestimated():
    # long_context.py's 16-bit LoRA step at 385,024 tokens (H200 held to 79.19 GiB), the allocator's peak: a
    # context the estimate says fits must fit, so at the longest length measured it may be over, not under.
    rows = json.loads((RESULTS / "long_context-h200.json").read_text())["rows"]
    peak = next(r["value"] for r in rows if r["config"] == "lora16 385024x1" and r["metric"] == "peak_alloc_gib")
    est = estimate(_llama_8b(), 385024, 1, load_in_4bit=False, checkpointing="offload", kernels=True, device="cuda")
    assert 1.0 <= est.total / GIB / peak <= 1.08
