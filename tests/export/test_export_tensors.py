"""merged_tensors: the merged weights equal PEFT's own merge, for Linear and Embedding adapters and modules_to_save."""

from __future__ import annotations

import copy

import pytest
import torch

from slothbook.errors import ExportError
from slothbook.export.safetensors_io import ShardedWriter, parse_size
from slothbook.export.tensors import merged_tensors


def tiny_peft(**lora):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from slothbook.models.families.tiny import tiny_config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", vocab_size=256))
    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **lora)
    return get_peft_model(model, config)


@pytest.mark.parametrize("lora", [
    dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    dict(target_modules=["q_proj", "embed_tokens"], modules_to_save=["lm_head"]),
    dict(target_modules=["down_proj"], use_rslora=True),
])
def test_merge_equals_peft_merge_and_unload(lora):
    model = tiny_peft(**lora)
    with torch.no_grad():
        for module in model.modules():  # make the modules_to_save copy differ from the original
            if type(module).__name__ == "ModulesToSaveWrapper":
                module.modules_to_save["default"].weight.add_(0.5)
    ours = {t.name: t.load() for t in merged_tensors(model)}
    reference = copy.deepcopy(model).merge_and_unload().state_dict()
    tied = model.get_base_model().config.tie_word_embeddings and "modules_to_save" not in lora
    for name, value in reference.items():
        if name == "lm_head.weight" and tied:
            assert name not in ours  # written once, as the embedding
            continue
        torch.testing.assert_close(ours[name], value.float(), atol=0, rtol=0, msg=name)  # same ops, same bits
    assert set(ours) <= set(reference)


def test_merged_tensors_computes_nothing_until_asked():
    model = tiny_peft(target_modules=["q_proj"])
    tensors = merged_tensors(model)
    q = next(t for t in tensors if t.name.endswith("layers.0.self_attn.q_proj.weight"))
    assert q.linear and q.shape == (64, 64)
    with torch.no_grad():
        model.get_base_model().model.layers[0].self_attn.q_proj.lora_B["default"].weight.zero_()
    base = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight
    torch.testing.assert_close(q.load(), base)  # computed at load(), so it sees the change


def test_dora_is_refused():
    model = tiny_peft(target_modules=["q_proj"], use_dora=True)
    with pytest.raises(ExportError, match="DoRA"):
        merged_tensors(model)


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30
    assert parse_size("100KB") == 10**5 and parse_size(1234) == 1234
    with pytest.raises(Exception, match="max_shard_size"):
        parse_size("lots")


def test_sharded_writer_round_trip(tmp_path):
    from safetensors.torch import load_file

    tensors = {f"t{i}": torch.randn(100, 10, dtype=dtype) for i, dtype in
               enumerate([torch.float32, torch.bfloat16, torch.float16, torch.float32])}
    tensors["u"] = torch.arange(7, dtype=torch.uint8)
    writer = ShardedWriter(tmp_path, max_shard_size=5000)
    for name, t in tensors.items():
        writer.add(name, t)
    files = writer.close()
    assert len(files) == 4  # three shards (4000 B, 2000+2000 B, 4000+7 B) and the index
    loaded = {}
    for f in files[:-1]:
        loaded.update(load_file(f))
    assert loaded.keys() == tensors.keys()
    for name, t in tensors.items():
        assert torch.equal(loaded[name], t)


@pytest.mark.parametrize("lora", [
    dict(target_modules=["q_proj", "embed_tokens"]),  # LoRA on the embedding only: the head keeps the original
    dict(target_modules=["q_proj"], modules_to_save=["lm_head"]),  # a trained copy of the head
])
def test_export_unties_a_tied_head_that_training_separated(lora, tmp_path):
    import json

    from transformers import AutoModelForCausalLM

    from slothbook.export import save_pretrained_merged

    model = tiny_peft(**lora).eval()
    with torch.no_grad():
        for module in model.modules():
            if type(module).__name__ == "ModulesToSaveWrapper":
                module.modules_to_save["default"].weight.add_(0.5)
    out = save_pretrained_merged(model, tmp_path / "m", save_method="merged_16bit")
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    ids = torch.tensor([[1, 5, 9, 200, 17]])
    with torch.no_grad():
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(out)(input_ids=ids).logits,
                                   model(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
