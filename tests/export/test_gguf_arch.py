"""Every family llama.cpp runs: a tiny random model with a random LoRA, exported to GGUF and run by llama.cpp.

The logits must match the PEFT model's, not merely be finite: with sharpened random weights (larger init, norms
away from 1) a missing Q/K permutation or Gemma norm shift moves the logits by about their own size (checked
while writing these tests), far beyond the tolerance used here.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from slothbook.export import save_pretrained_gguf
from slothbook.export.gguf_arch import ARCHS

llama_cpp = pytest.importorskip("llama_cpp")

TEXT = "The quick brown fox jumps over the lazy dog again and again"


def tiny_lora_model(model_type: str, vocab_size: int, **overrides):
    from transformers import AutoModelForCausalLM

    from slothbook.models.adapters import add_lora
    from slothbook.models.families.tiny import tiny_config

    if model_type in ("gemma2", "gemma3"):
        # llama.cpp scales Gemma-2/3 attention by 1/sqrt(head_dim) (what the released sizes use); transformers
        # reads query_pre_attn_scalar, whose default (256) is not this tiny head_dim.
        overrides.setdefault("query_pre_attn_scalar", 16)
    torch.manual_seed(0)
    config = tiny_config(model_type, vocab_size=vocab_size, initializer_range=0.2, **overrides)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # Gemma norms are stored as (weight - 1)
                p.normal_(0.0 if model_type.startswith("gemma") else 1.0, 0.3)
    # init_lora_weights=False: B is random too, so the merge is exercised on every projection.
    return add_lora(model, r=4, lora_alpha=8, init_lora_weights=False).eval()


def gguf_vs_hf(model, tokenizer, folder, method="f32"):
    path = save_pretrained_gguf(model, folder, tokenizer, method)[0]
    ids = tokenizer(TEXT)["input_ids"]
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=1)
    try:
        llm.eval(ids)
        got = np.array(llm.scores[: len(ids)])
    finally:
        llm.close()
    with torch.no_grad():
        want = model(input_ids=torch.tensor([ids])).logits[0].numpy()
    return got, want


@pytest.mark.parametrize("model_type", sorted(ARCHS))
def test_family_runs_in_llama_cpp_with_the_same_logits(model_type, embedded_tokenizer, tmp_path):
    model = tiny_lora_model(model_type, len(embedded_tokenizer))
    got, want = gguf_vs_hf(model, embedded_tokenizer, tmp_path)
    assert np.isfinite(got).all()
    # f32 weights; llama.cpp keeps its KV cache in f16, hence ~1e-2 on logits of size ~10.
    assert np.abs(got - want).max() < 0.05, np.abs(got - want).max()
    assert (got.argmax(-1) == want.argmax(-1)).all()


@pytest.mark.parametrize("rope", [
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 16},
])
def test_rope_scaling_is_carried_over(rope, embedded_tokenizer, tmp_path):
    model = tiny_lora_model("llama", len(embedded_tokenizer), rope_parameters={"rope_theta": 10000.0, **rope})
    got, want = gguf_vs_hf(model, embedded_tokenizer, tmp_path)
    assert np.abs(got - want).max() < 0.05, np.abs(got - want).max()


def test_untied_output_head_is_written(embedded_tokenizer, tmp_path):
    import gguf

    model = tiny_lora_model("qwen2", len(embedded_tokenizer), tie_word_embeddings=False)
    got, want = gguf_vs_hf(model, embedded_tokenizer, tmp_path)
    assert np.abs(got - want).max() < 0.05
    names = {t.name for t in gguf.GGUFReader(tmp_path / "model.F32.gguf").tensors}
    assert "output.weight" in names and "blk.0.attn_q.bias" in names  # Qwen2 keeps q/k/v biases
