"""LoRA adapters on the real embedded model: validation, targets, modes."""

from __future__ import annotations

import warnings

import pytest
import torch
from peft import PeftModel

from slothbook import FastLanguageModel
from slothbook.errors import ConfigError


@pytest.fixture(scope="module")
def base():
    return FastLanguageModel.from_pretrained("smollm2-135m", max_seq_length=128)


def test_default_targets_every_projection(base):
    model, _ = FastLanguageModel.from_pretrained("smollm2-135m", max_seq_length=128)
    peft_model = FastLanguageModel.get_peft_model(model, r=4)
    assert isinstance(peft_model, PeftModel)
    assert set(peft_model.peft_config["default"].target_modules) == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert len(trainable) == 30 * 7 * 2


@pytest.mark.parametrize("r", [0, -1])
def test_nonpositive_rank(base, r):
    with pytest.raises(ConfigError, match="rank"):
        FastLanguageModel.get_peft_model(base[0], r=r)


def test_missing_target_lists_available(base):
    with pytest.raises(ConfigError, match="down_proj.*q_proj"):
        FastLanguageModel.get_peft_model(base[0], target_modules=["qkv_proj"])


def test_unknown_checkpointing_mode(base):
    model, _ = FastLanguageModel.from_pretrained("smollm2-135m", max_seq_length=128)
    with pytest.raises(ConfigError, match="use_gradient_checkpointing"):
        FastLanguageModel.get_peft_model(model, use_gradient_checkpointing="sometimes")


def test_inference_and_training_modes_switch_padding_and_cache():
    model, tok = FastLanguageModel.from_pretrained("smollm2-135m", max_seq_length=128)
    model = FastLanguageModel.get_peft_model(model, r=4)
    FastLanguageModel.for_inference(model)
    assert not model.training and model.config.use_cache and tok.padding_side == "left"
    batch = tok(["Hi", "The capital of France is"], return_tensors="pt", padding=True)
    out = model.generate(**batch, max_new_tokens=2, do_sample=False)
    assert out.shape == (2, batch.input_ids.shape[1] + 2)
    FastLanguageModel.for_training(model)
    assert model.training and not model.config.use_cache and tok.padding_side == "right"


def test_same_random_state_same_adapters():
    a = FastLanguageModel.get_peft_model(FastLanguageModel.from_pretrained("smollm2-135m")[0], r=4, random_state=7)
    b = FastLanguageModel.get_peft_model(FastLanguageModel.from_pretrained("smollm2-135m")[0], r=4, random_state=7)
    name = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"
    assert torch.equal(dict(a.named_parameters())[name], dict(b.named_parameters())[name])


def test_export_methods_are_bound_to_the_peft_model(tmp_path):
    model, tok = FastLanguageModel.from_pretrained("smollm2-135m", max_seq_length=64)
    model = FastLanguageModel.get_peft_model(model, r=4)
    out = model.save_pretrained_merged(tmp_path / "lora", tok, save_method="lora")
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    assert callable(model.save_pretrained_gguf)


def test_adding_and_loading_adapters_shows_no_future_warning(tmp_path):
    """transformers >= 5.25 warns on PEFT's read of the renamed is_gradient_checkpointing; a user cannot act on it."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        model = FastLanguageModel.get_peft_model(FastLanguageModel.from_pretrained("smollm2-135m")[0], r=4)
        model.save_pretrained(tmp_path / "adapter")
        FastLanguageModel.from_pretrained(str(tmp_path / "adapter"))
    future = [str(w.message) for w in record if issubclass(w.category, FutureWarning)]
    assert not future, future
