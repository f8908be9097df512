"""Export on a GPU: NF4 base in bf16, dequantized by the project's Triton kernel, merged and written as bf16; GGUF
k-quants from the bf16 intermediate."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def qlora(train_model_name):
    from slothbook import FastLanguageModel

    model, tokenizer = FastLanguageModel.from_pretrained(train_model_name, load_in_4bit=True, max_seq_length=256)
    # init_lora_weights=False: B is random, so every merged projection differs from the base.
    model = FastLanguageModel.get_peft_model(model, r=8, init_lora_weights=False, use_gradient_checkpointing=False)
    return model.eval(), tokenizer


def test_merged_16bit_writes_the_exact_bf16_merge(qlora, tmp_path):
    import bitsandbytes.functional as bnbf
    from safetensors import safe_open

    from slothbook.export import save_pretrained_merged

    model, tokenizer = qlora
    assert model.get_base_model().get_input_embeddings().weight.dtype == torch.bfloat16
    out = save_pretrained_merged(model, tmp_path / "m16", tokenizer, max_shard_size="100MB")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    layer = model.get_base_model().model.layers[3].mlp.down_proj
    w = layer.base_layer.weight
    want = bnbf.dequantize_4bit(w.data, w.quant_state).float()
    want += layer.scaling["default"] * (layer.lora_B["default"].weight.float() @ layer.lora_A["default"].weight.float())
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.layers.3.mlp.down_proj.weight"
    with safe_open(out / index[name], "pt") as f:
        got = f.get_tensor(name)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, want.to(torch.bfloat16).cpu(), atol=0, rtol=0)


def test_merged_16bit_generates_like_the_peft_model(qlora, tmp_path):
    from transformers import AutoModelForCausalLM

    from slothbook.export import save_pretrained_merged

    model, tokenizer = qlora
    out = save_pretrained_merged(model, tmp_path / "m16", tokenizer)
    merged = AutoModelForCausalLM.from_pretrained(out, device_map={"": 0}).eval()
    ids = tokenizer("The capital of France is Paris, and the capital of Italy is", return_tensors="pt").input_ids.cuda()
    with torch.no_grad():
        got, want = merged(input_ids=ids).logits.float(), model(input_ids=ids).logits.float()
        with model.disable_adapter():
            base = model(input_ids=ids).logits.float()
    # bf16 weights (merged and rounded once vs base and adapter rounded apart) cannot match to 1e-2: bf16 logits
    # are spaced 2^-7 of their size. The merged model must sit far closer to the PEFT model than the adapter moves
    # it. (Top-1 is not checked: on the GPU box's random-weight stand-in, near-ties are the rule.)
    assert (got - want).abs().mean() < 0.1 * (want - base).abs().mean()


def test_gguf_k_quant_from_a_bf16_model(qlora, tmp_path):
    import gguf

    llama_cpp = pytest.importorskip("llama_cpp")
    from slothbook.export import save_pretrained_gguf

    model, tokenizer = qlora
    paths = save_pretrained_gguf(model, tmp_path, tokenizer, ["bf16", "q4_k_m"])
    assert gguf.GGUFReader(paths[0]).fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_BF16
    llm = llama_cpp.Llama(model_path=str(paths[1]), n_ctx=128, verbose=False, n_gpu_layers=0)
    try:
        ids = tokenizer("The capital of France is")["input_ids"]
        # Eight greedy tokens, whatever they are: a random-weight stand-in may well pick eos or a space.
        out = list(itertools.islice(llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0), 8))
        assert len(out) == 8 and all(0 <= t < llm.n_vocab() for t in out)
    finally:
        llm.close()
