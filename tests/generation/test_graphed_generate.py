"""Decoding over slothbook's static cache gives what transformers' `generate` gives.

On the CPU the decode step runs eagerly (no CUDA graphs) over the same buffers the graph would capture, so these
tests check the static cache, the 4D masks of left-padded batches, the positions and the stopping rules on the
real embedded model in fp32. The GPU tests check the captured graph against the same step run eagerly.
"""

from __future__ import annotations

import pytest
import torch

from slothbook import FastLanguageModel
from slothbook.generation import graphed_generate, supports
from slothbook.models.families import FAMILIES
from slothbook.models.families.tiny import save_tiny_model

PROMPTS = ["The capital of France is", "List three colours:\n1."]


@pytest.fixture(scope="module")
def model_and_batch(train_model_name):
    model, tok = FastLanguageModel.from_pretrained(train_model_name, max_seq_length=256, dtype=torch.float32)
    model = FastLanguageModel.get_peft_model(model, r=8, init_lora_weights=False)  # B non-zero: LoRA counts
    FastLanguageModel.for_inference(model)
    batch = tok(PROMPTS, return_tensors="pt", padding=True)  # left padding after for_inference
    assert (batch["attention_mask"][:, 0] == 0).any(), "the prompts should need left padding"
    return model, tok, batch


def _hf(model, batch, **kwargs):
    with torch.inference_mode():
        return model.generate(**batch, do_sample=False, **kwargs)


def test_greedy_tokens_equal_transformers_for_a_left_padded_batch(model_and_batch):
    model, tok, batch = model_and_batch
    expected = _hf(model, batch, max_new_tokens=24, min_new_tokens=24, pad_token_id=tok.pad_token_id)
    got = graphed_generate(model, batch["input_ids"], batch["attention_mask"], max_new_tokens=24, min_new_tokens=24,
                           pad_token_id=tok.pad_token_id, graphs=False)
    assert got.shape == expected.shape
    assert torch.equal(got, expected), (tok.batch_decode(got), tok.batch_decode(expected))


def test_rows_stop_at_eos_and_are_padded_like_transformers(model_and_batch):
    model, tok, batch = model_and_batch
    # an EOS the model is sure to produce soon: the second row's first greedy token
    first = _hf(model, batch, max_new_tokens=1, pad_token_id=tok.pad_token_id)[:, -1]
    eos = int(first[1])
    expected = _hf(model, batch, max_new_tokens=12, eos_token_id=eos, pad_token_id=tok.pad_token_id)
    got = graphed_generate(model, batch["input_ids"], batch["attention_mask"], max_new_tokens=12, eos_token_id=eos,
                           pad_token_id=tok.pad_token_id, graphs=False)
    assert torch.equal(got, expected), (got, expected)


def test_sampling_is_reproducible_and_respects_top_k(model_and_batch):
    model, tok, batch = model_and_batch
    kwargs = dict(max_new_tokens=8, min_new_tokens=8, do_sample=True, temperature=0.8, top_k=1, graphs=False)
    greedy = graphed_generate(model, batch["input_ids"], batch["attention_mask"], max_new_tokens=8, min_new_tokens=8,
                              graphs=False)
    top1 = graphed_generate(model, batch["input_ids"], batch["attention_mask"], **kwargs)
    assert torch.equal(top1, greedy)  # top_k=1 sampling is greedy
    runs = [graphed_generate(model, batch["input_ids"], batch["attention_mask"], max_new_tokens=8, do_sample=True,
                             top_p=0.9, graphs=False, generator=torch.Generator().manual_seed(3)) for _ in range(2)]
    assert torch.equal(runs[0], runs[1])


def test_supports_only_the_calls_it_handles(model_and_batch):
    model, _, batch = model_and_batch
    ids = batch["input_ids"]
    assert supports(model, {"input_ids": ids, "max_new_tokens": 8, "do_sample": True, "top_p": 0.9})
    assert not supports(model, {"input_ids": ids, "max_new_tokens": 8, "num_beams": 2})
    assert not supports(model, {"input_ids": ids})  # max_new_tokens left to the config: transformers decides
    assert not supports(model, {"input_ids": ids, "max_new_tokens": 8, "use_cache": False})
    assert not supports(model, {"input_ids": ids, "max_new_tokens": 0})
    # a model whose generation config asks for more than this path does goes to transformers
    before = model.generation_config.repetition_penalty
    try:
        model.generation_config.repetition_penalty = 1.3
        assert not supports(model, {"input_ids": ids, "max_new_tokens": 8})
        model.generation_config.repetition_penalty = 1.0  # spelled out at the value that changes nothing
        assert supports(model, {"input_ids": ids, "max_new_tokens": 8})
    finally:
        model.generation_config.repetition_penalty = before


def test_for_inference_routes_generate_unless_told_not_to_and_for_training_restores_it(model_and_batch):
    model, tok, batch = model_and_batch
    assert "generate" in model.__dict__  # the fixture's for_inference: routed by default
    # on the CPU the routed call is transformers' generate: no decode graph is made for it
    pool = model.__dict__.setdefault("_slothbook_decode_graphs", {})
    pool.clear()
    out = model.generate(**batch, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape == (len(PROMPTS), batch["input_ids"].shape[1] + 4)
    assert not pool
    FastLanguageModel.for_training(model)
    assert "generate" not in model.__dict__
    FastLanguageModel.for_inference(model, cuda_graphs=False)
    assert "generate" not in model.__dict__
    FastLanguageModel.for_inference(model)


def test_decode_graphs_kept_per_model_are_bounded(model_and_batch):
    from slothbook.generation.generate import KEEP, _decoder

    model, _, _ = model_and_batch
    pool = model.__dict__.setdefault("_slothbook_decode_graphs", {})
    pool.clear()
    first = _decoder(model, 2, 100, graphs=False)
    for length in (300, 600, 900):
        _decoder(model, 2, length, graphs=False)
    assert _decoder(model, 2, 200, graphs=False) is first  # same bucket (256): reused, now the most recent
    _decoder(model, 2, 1200, graphs=False)
    assert len(pool) == KEEP
    assert (2, 256, False) in pool and (2, 512, False) not in pool  # the least recently used went
    pool.clear()


@pytest.mark.parametrize("kernels", [False, True], ids=["transformers", "kernels"])
@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_every_family_decodes_like_transformers(model_type, kernels, tmp_path, embedded_tokenizer):
    """Tiny random models of each family (q/k norms, soft-capping, sliding windows, fused projections), fp32,
    with transformers' attention and with slothbook's patched one (Triton interpreter) writing the static cache."""
    save_tiny_model(model_type, tmp_path, embedded_tokenizer)
    model, tok = FastLanguageModel.from_pretrained(str(tmp_path), max_seq_length=64, dtype=torch.float32,
                                                   kernels=kernels)
    model = FastLanguageModel.get_peft_model(model, r=4, init_lora_weights=False)
    FastLanguageModel.for_inference(model)
    ids = torch.randint(3, len(tok), (2, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    ids[1, :2], mask[1, :2] = tok.pad_token_id, 0
    args = dict(max_new_tokens=8, min_new_tokens=8, pad_token_id=tok.pad_token_id)
    assert supports(model, {"input_ids": ids, **args})
    with torch.inference_mode():
        expected = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, **args)
    assert torch.equal(graphed_generate(model, ids, mask, graphs=False, **args), expected)


@pytest.mark.gpu
@pytest.mark.parametrize("kernels", [True, False])
@pytest.mark.parametrize("load_in_4bit", [False, True])
def test_gpu_graph_replay_equals_the_eager_step_and_transformers(train_model_name, embedded_tokenizer, kernels,
                                                                 load_in_4bit):
    model, tok = FastLanguageModel.from_pretrained(train_model_name, max_seq_length=256, dtype=torch.bfloat16,
                                                   load_in_4bit=load_in_4bit, kernels=kernels)
    model = FastLanguageModel.get_peft_model(model, r=8, init_lora_weights=False)
    FastLanguageModel.for_inference(model)  # routes generate by default
    batch = tok(PROMPTS, return_tensors="pt", padding=True).to("cuda")
    args = dict(max_new_tokens=32, min_new_tokens=32, pad_token_id=tok.pad_token_id)
    graphed = graphed_generate(model, batch["input_ids"], batch["attention_mask"], **args)
    assert model._slothbook_decode_graphs[(2, 256, True)].graph is not None, "the step was not captured"
    eager = graphed_generate(model, batch["input_ids"], batch["attention_mask"], graphs=False, **args)
    assert torch.equal(graphed, eager)  # the same kernels on the same buffers
    routed = model.generate(**batch, do_sample=False, **args)  # through the route: the graphed path
    assert torch.equal(routed, graphed)
    FastLanguageModel.for_training(model)
    FastLanguageModel.for_inference(model, cuda_graphs=False)
    with torch.inference_mode():
        reference = model.generate(**batch, do_sample=False, **args)  # transformers, dynamic cache
    # bf16: a near-tie may flip a later token; the first 8 new tokens of each row agree
    new = batch["input_ids"].shape[1]
    assert torch.equal(graphed[:, new:new + 8], reference[:, new:new + 8])
