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


def test_for_inference_routes_generate_only_on_request_and_for_training_restores_it(model_and_batch):
    model, tok, batch = model_and_batch
    FastLanguageModel.for_inference(model, cuda_graphs=True)
    try:
        assert "generate" in model.__dict__
        # on the CPU the routed call is transformers' generate: same tokens as before
        out = model.generate(**batch, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
        assert out.shape == (len(PROMPTS), batch["input_ids"].shape[1] + 4)
    finally:
        FastLanguageModel.for_training(model)
    assert "generate" not in model.__dict__
    FastLanguageModel.for_inference(model)


@pytest.mark.gpu
@pytest.mark.parametrize("kernels", [True, False])
@pytest.mark.parametrize("load_in_4bit", [False, True])
def test_gpu_graph_replay_equals_the_eager_step_and_transformers(train_model_name, embedded_tokenizer, kernels,
                                                                 load_in_4bit):
    model, tok = FastLanguageModel.from_pretrained(train_model_name, max_seq_length=256, dtype=torch.bfloat16,
                                                   load_in_4bit=load_in_4bit, kernels=kernels)
    model = FastLanguageModel.get_peft_model(model, r=8, init_lora_weights=False)
    FastLanguageModel.for_inference(model, cuda_graphs=True)
    batch = tok(PROMPTS, return_tensors="pt", padding=True).to("cuda")
    args = dict(max_new_tokens=32, min_new_tokens=32, pad_token_id=tok.pad_token_id)
    graphed = graphed_generate(model, batch["input_ids"], batch["attention_mask"], **args)
    assert model._slothbook_decode_graphs[(2, 256, True)].graph is not None, "the step was not captured"
    eager = graphed_generate(model, batch["input_ids"], batch["attention_mask"], graphs=False, **args)
    assert torch.equal(graphed, eager)  # the same kernels on the same buffers
    routed = model.generate(**batch, do_sample=False, **args)  # through the route: the graphed path
    assert torch.equal(routed, graphed)
    FastLanguageModel.for_training(model)
    FastLanguageModel.for_inference(model)
    with torch.inference_mode():
        reference = model.generate(**batch, do_sample=False, **args)  # transformers, dynamic cache
    # bf16: a near-tie may flip a later token; the first 8 new tokens of each row agree
    new = batch["input_ids"].shape[1]
    assert torch.equal(graphed[:, new:new + 8], reference[:, new:new + 8])
