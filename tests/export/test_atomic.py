"""Safe writing: no overwrite without overwrite=True, no half file under a final name, a clear disk-space error."""

from __future__ import annotations

import pytest
import torch

from slothbook.errors import ExportError
from slothbook.export import save_pretrained_gguf, save_pretrained_merged
from slothbook.export import atomic, gguf_export, safetensors_io


@pytest.fixture
def tiny(embedded_tokenizer):
    """A two-layer random Llama with a LoRA adapter: these tests are about files, not numbers."""
    from transformers import AutoModelForCausalLM

    from slothbook.models.adapters import add_lora
    from slothbook.models.families.tiny import tiny_config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", vocab_size=len(embedded_tokenizer)))
    return add_lora(model, r=4, init_lora_weights=False), embedded_tokenizer


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("method", ["lora", "merged_16bit", "merged_4bit"])
def test_merged_refuses_a_non_empty_folder_without_overwrite(tiny, tmp_path, method):
    model, tok = tiny
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")
    with pytest.raises(ExportError, match="overwrite=True"):
        save_pretrained_merged(model, out, tok, save_method=method)
    assert (out / "config.json").read_text() == "{}" and len(list(out.iterdir())) == 1
    save_pretrained_merged(model, out, tok, save_method=method, overwrite=True)
    assert any(out.glob("*.safetensors"))  # the folder was replaced as a whole: our stub config is gone
    assert not (out / "config.json").exists() or (out / "config.json").read_text() != "{}"
    assert leftovers(tmp_path) == []


def test_an_empty_folder_is_used_and_a_file_refused(tiny, tmp_path):
    model, tok = tiny
    (tmp_path / "empty").mkdir()
    save_pretrained_merged(model, tmp_path / "empty", tok)
    assert (tmp_path / "empty" / "model.safetensors").is_file()
    (tmp_path / "file").write_text("mine")
    with pytest.raises(ExportError, match="is a file"):
        save_pretrained_merged(model, tmp_path / "file", tok, overwrite=True)
    assert (tmp_path / "file").read_text() == "mine"


def test_overwrite_never_replaces_a_folder_that_is_not_an_export(tiny, tmp_path):
    model, tok = tiny
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "thesis.txt").write_text("years of work")
    with pytest.raises(ExportError, match="does not look like a model export"):
        save_pretrained_merged(model, tmp_path / "notes", tok, overwrite=True)
    assert (tmp_path / "notes" / "thesis.txt").read_text() == "years of work"


def test_gguf_refuses_existing_files_without_overwrite(tiny, tmp_path):
    model, tok = tiny
    (tmp_path / "model.F16.gguf").write_bytes(b"user data")
    with pytest.raises(ExportError, match="overwrite=True"):
        save_pretrained_gguf(model, tmp_path, tok, "f16")
    assert (tmp_path / "model.F16.gguf").read_bytes() == b"user data"
    assert not (tmp_path / "Modelfile.f16").exists()
    save_pretrained_gguf(model, tmp_path, tok, "f16", overwrite=True)
    assert (tmp_path / "model.F16.gguf").read_bytes()[:4] == b"GGUF"
    assert (tmp_path / "Modelfile.f16").read_text().startswith("FROM ./model.F16.gguf")


def test_separate_gguf_calls_share_a_folder(tiny, tmp_path):
    model, tok = tiny
    save_pretrained_gguf(model, tmp_path, tok, "f16")
    save_pretrained_gguf(model, tmp_path, tok, "q8_0")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Modelfile.f16", "Modelfile.q8_0", "model.F16.gguf",
                                                           "model.Q8_0.gguf"]


def _fail_after(n, real):
    calls = []

    def wrapper(*args, **kwargs):
        calls.append(1)
        if len(calls) > n:
            raise KeyboardInterrupt("simulated interruption")
        return real(*args, **kwargs)

    return wrapper


def test_interrupted_merged_export_leaves_nothing(tiny, tmp_path, monkeypatch):
    model, tok = tiny
    monkeypatch.setattr(safetensors_io, "write_tensor_bytes", _fail_after(3, safetensors_io.write_tensor_bytes))
    with pytest.raises(KeyboardInterrupt):
        save_pretrained_merged(model, tmp_path / "out", tok, max_shard_size="100KB")
    assert list(tmp_path.iterdir()) == []


def test_interrupted_overwrite_keeps_the_previous_export(tiny, tmp_path, monkeypatch):
    model, tok = tiny
    out = save_pretrained_merged(model, tmp_path / "out", tok)
    before = (out / "model.safetensors").read_bytes()
    monkeypatch.setattr(safetensors_io, "write_tensor_bytes", _fail_after(3, safetensors_io.write_tensor_bytes))
    with pytest.raises(KeyboardInterrupt):
        save_pretrained_merged(model, out, tok, overwrite=True)
    assert (out / "model.safetensors").read_bytes() == before
    assert leftovers(tmp_path) == []


def test_interrupted_gguf_export_leaves_nothing(tiny, tmp_path, monkeypatch):
    model, tok = tiny
    monkeypatch.setattr(gguf_export.GGUFTensor, "encode", _fail_after(5, gguf_export.GGUFTensor.encode))
    with pytest.raises(KeyboardInterrupt):
        save_pretrained_gguf(model, tmp_path, tok, ["q8_0", "q4_k_m"])
    assert list(tmp_path.iterdir()) == []


def test_interrupted_llama_cpp_quantization_leaves_nothing(tiny, tmp_path, monkeypatch):
    model, tok = tiny

    def failing_quantizer(src, dst, method):
        dst.write_bytes(b"GGUF half")
        raise RuntimeError("simulated crash inside the quantizer")

    monkeypatch.setattr(gguf_export, "llama_cpp_quantize", failing_quantizer)
    with pytest.raises(RuntimeError):
        save_pretrained_gguf(model, tmp_path, tok, "q4_k_m")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("method", ["merged_16bit", "merged_4bit", "lora"])
def test_disk_space_shortfall_is_a_clear_error(tiny, tmp_path, monkeypatch, method):
    model, tok = tiny
    monkeypatch.setattr(atomic, "free_bytes", lambda path: 10 << 20)  # a disk with 10 MiB free
    with pytest.raises(ExportError, match="Not enough disk space.*needed.*free"):
        save_pretrained_merged(model, tmp_path / "out", tok, save_method=method)
    assert list(tmp_path.iterdir()) == []


def test_gguf_disk_space_shortfall_is_a_clear_error(tiny, tmp_path, monkeypatch):
    model, tok = tiny
    monkeypatch.setattr(atomic, "free_bytes", lambda path: 10 << 20)
    with pytest.raises(ExportError, match="Not enough disk space"):
        save_pretrained_gguf(model, tmp_path / "g", tok, "f16")
    assert list(tmp_path.iterdir()) == []


def test_free_bytes_reads_the_real_disk(tmp_path):
    import shutil

    assert abs(atomic.free_bytes(tmp_path / "not" / "yet") - shutil.disk_usage(tmp_path).free) < 1 << 30
