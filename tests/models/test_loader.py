"""Loading the real embedded model and every bad input the loader must explain."""

from __future__ import annotations

import json

import bitsandbytes as bnb
import pytest
import torch

from slothbook import FastLanguageModel
from slothbook.errors import ConfigError, DeviceError, ModelNotFoundError, UnsupportedArchitectureError
from slothbook.models.embedded import embedded_gguf_path, embedded_model_dir


def test_alias_loads_real_model_fp32_with_fixed_tokenizer():
    model, tok = FastLanguageModel.from_pretrained("smollm2-135m", max_seq_length=512)
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    assert model.dtype == torch.float32  # the CPU default
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    assert tok.padding_side == "right" and tok.model_max_length == 512 and model.max_seq_length == 512
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])


def test_converted_folder_is_plain_safetensors_and_cached():
    folder = embedded_model_dir()
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config
    assert (folder / "model.safetensors").stat().st_size > 100e6
    assert embedded_model_dir() == folder


def test_gguf_file_path_loads_same_weights():
    model, _ = FastLanguageModel.from_pretrained(str(embedded_gguf_path()))
    ref, _ = FastLanguageModel.from_pretrained("smollm2-135m")
    assert torch.equal(model.model.layers[3].mlp.up_proj.weight, ref.model.layers[3].mlp.up_proj.weight)


def test_load_in_4bit_quantizes_decoder_linears_only():
    model, _ = FastLanguageModel.from_pretrained("smollm2-135m", load_in_4bit=True)
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, bnb.nn.Linear4bit)
    assert q_proj.weight.quant_state.quant_type == "nf4" and q_proj.weight.quant_state.nested
    assert not isinstance(model.lm_head, bnb.nn.Linear4bit)
    assert model.model.embed_tokens.weight.dtype == torch.float32


def test_rope_scaling_applied_past_trained_context():
    model, tok = FastLanguageModel.from_pretrained("smollm2-135m", max_seq_length=16384)
    assert model.config.rope_parameters["rope_type"] == "linear"
    assert model.config.rope_parameters["factor"] == pytest.approx(2.0)
    assert model.config.max_position_embeddings >= 16384


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        FastLanguageModel.from_pretrained(str(tmp_path / "nope" / "model"))
    with pytest.raises(ModelNotFoundError, match="GGUF file not found|does not exist"):
        FastLanguageModel.from_pretrained(str(tmp_path / "missing.gguf"))


def test_folder_without_config_is_a_clear_error(tmp_path):
    with pytest.raises(ModelNotFoundError, match="config.json"):
        FastLanguageModel.from_pretrained(str(tmp_path))


def test_offline_hub_id_says_so():
    with pytest.raises(ModelNotFoundError, match="offline|reach"):
        FastLanguageModel.from_pretrained("some-org/not-a-cached-model")


def test_unsupported_architecture_names_supported_ones(tmp_path, embedded_tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100)).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedArchitectureError, match="gpt2.*llama"):
        FastLanguageModel.from_pretrained(str(tmp_path))


def test_4bit_and_8bit_together_is_an_error():
    with pytest.raises(ConfigError, match="choose one"):
        FastLanguageModel.from_pretrained("smollm2-135m", load_in_4bit=True, load_in_8bit=True)


@pytest.mark.parametrize("length", [0, -5])
def test_nonpositive_max_seq_length(length):
    with pytest.raises(ConfigError, match="max_seq_length"):
        FastLanguageModel.from_pretrained("smollm2-135m", max_seq_length=length)


def test_bf16_on_gpu_without_it(monkeypatch):
    from slothbook import device

    monkeypatch.setattr(device.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(device.torch.cuda, "get_device_capability", lambda *a: (7, 5))
    monkeypatch.setattr(device.torch.cuda, "get_device_name", lambda *a: "Tesla T4")
    monkeypatch.setattr(device.torch.cuda, "current_device", lambda: 0)  # bf16_supported asks which GPU is current
    with pytest.raises(DeviceError, match="T4.*float16"):
        device.resolve_dtype("bf16")
    assert device.resolve_dtype(None) == torch.float16


def test_pickled_weights_refused_unless_opted_in(tmp_path):
    from slothbook.models.families.tiny import tiny_config

    (tmp_path / "config.json").write_text(tiny_config("llama", vocab_size=100).to_json_string())
    (tmp_path / "pytorch_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(ConfigError, match="pickled"):
        FastLanguageModel.from_pretrained(str(tmp_path))
