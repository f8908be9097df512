"""`save_pretrained_merged`: a LoRA adapter folder, or a merged model as plain or NF4 safetensors."""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path

import torch

from ..errors import ConfigError, ExportError
from ..models.checks import check_vocab
from ..models.quantization import SKIP_MODULES
from .atomic import atomic_dir, check_destination, check_free_space
from .safetensors_io import ShardedWriter
from .tensors import MergedTensor, base_model_of, compute_dtype, is_tied, merged_tensors

log = logging.getLogger("slothbook")

SAVE_METHODS = ("lora", "merged_16bit", "merged_4bit")
_EXPORT_VOCAB_FIX = ("Pass the tokenizer the model was trained with, or resize the embedding "
                     "(model.resize_token_embeddings(len(tokenizer))) and train again.")
_NF4_BLOCKSIZE = 64
# Bytes per weight of an NF4 tensor: packed codes, uint8 absmax per block, fp32 per 256 absmax.
_NF4_BYTES_PER_WEIGHT = 0.5 + 1 / _NF4_BLOCKSIZE + 4 / (_NF4_BLOCKSIZE * 256)


def save_pretrained_merged(
    model,
    save_directory: str | os.PathLike,
    tokenizer=None,
    save_method: str = "merged_16bit",
    overwrite: bool = False,
    max_shard_size: int | str = "5GB",
    dtype: torch.dtype | str | None = None,
) -> Path:
    """Save a fine-tuned model to the folder `save_directory` and return that folder.

    save_method:
      "lora": the PEFT adapter (adapter_config.json, adapter_model.safetensors) and the tokenizer.
      "merged_16bit": base weights (dequantized exactly if the model was loaded in 4-bit) with the LoRA
          update W + scale * B @ A added in fp32, cast to `dtype` (default: the model's compute dtype,
          so bf16/fp16 on a GPU and fp32 on the CPU), as sharded safetensors loadable by plain transformers.
      "merged_4bit": the same merged weights re-quantized to NF4 (lossy), loadable by transformers with
          bitsandbytes installed.
    The merged paths stream one tensor at a time: host memory stays near one shard (`max_shard_size`,
    "5GB" by default) plus one layer, whatever the model size.
    The folder is written under a temporary name and renamed when complete; an existing non-empty
    folder is replaced only with overwrite=True.
    """
    if save_method not in SAVE_METHODS:
        raise ConfigError(f"save_method must be one of {', '.join(SAVE_METHODS)}; got {save_method!r}.")
    tokenizer = tokenizer_of(model, tokenizer)
    check_vocab(tokenizer, model, _EXPORT_VOCAB_FIX)
    path = check_destination(save_directory, overwrite, is_dir=True)
    if save_method == "lora":
        return _save_lora(model, path, tokenizer)
    out_dtype = _resolve_dtype(dtype, model)
    tensors = merged_tensors(model)
    if save_method == "merged_16bit":
        estimate = sum(t.numel for t in tensors) * out_dtype.itemsize
        check_free_space(path, estimate, "the merged model")
        return _save_merged(model, path, tokenizer, tensors, out_dtype, max_shard_size, quantize=False)
    estimate = sum(t.numel * (_NF4_BYTES_PER_WEIGHT if _quantizable(t) else out_dtype.itemsize) for t in tensors)
    check_free_space(path, int(estimate), "the merged 4-bit model")
    return _save_merged(model, path, tokenizer, tensors, out_dtype, max_shard_size, quantize=True)


def tokenizer_of(model, tokenizer):
    """The tokenizer passed in, else the one the loader attached to the model (may be None)."""
    return tokenizer if tokenizer is not None else getattr(base_model_of(model), "slothbook_tokenizer", None)


def _resolve_dtype(dtype, model) -> torch.dtype:
    if dtype is None:
        return compute_dtype(model)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.replace("bf16", "bfloat16").replace("fp16", "float16")
                        .replace("fp32", "float32"), None)
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ConfigError(f"dtype must be float32, float16 or bfloat16 (or None for the model's own); got {dtype!r}.")
    return dtype


def _save_lora(model, path: Path, tokenizer) -> Path:
    if not hasattr(model, "peft_config"):
        raise ExportError("save_method='lora' needs a model with LoRA adapters (from FastLanguageModel.get_peft_model). "
                          "For a model without adapters use save_method='merged_16bit'.")
    adapter_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "lora_" in n)
    check_free_space(path, adapter_bytes, "the LoRA adapter")
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp)
        _save_tokenizer(tokenizer, tmp)
    return path


def _save_merged(model, path, tokenizer, tensors: list[MergedTensor], out_dtype, max_shard_size, quantize) -> Path:
    quant_config = _nf4_config(out_dtype) if quantize else None
    with atomic_dir(path) as tmp:
        writer = ShardedWriter(tmp, max_shard_size)
        for t in tensors:
            for name, value in _export_tensors(t, out_dtype, quantize):
                writer.add(name, value)
        writer.close()
        save_config(model, tmp, out_dtype, quant_config, tied=is_tied(model, tensors))
        _save_tokenizer(tokenizer, tmp)
    return path


def _export_tensors(t: MergedTensor, out_dtype, quantize: bool):
    """The (name, tensor) pairs one merged tensor becomes: itself cast, or NF4 codes plus their quant state."""
    value = t.load()
    if not (quantize and _quantizable(t)):
        yield t.name, value.to(out_dtype)
        return
    import bitsandbytes.functional as bnbf

    device = "cuda" if torch.cuda.is_available() else "cpu"
    packed, state = bnbf.quantize_4bit(value.to(device, out_dtype), blocksize=_NF4_BLOCKSIZE, compress_statistics=True,
                                       quant_type="nf4", quant_storage=torch.uint8)
    del value
    yield t.name, packed
    for key, part in state.as_dict(packed=True).items():
        yield f"{t.name}.{key}", part


def _quantizable(t: MergedTensor) -> bool:
    """What the 4-bit loader quantizes: every Linear weight except the skipped modules (the output head)."""
    module = t.name.rsplit(".", 1)[0]
    return t.linear and not any(module == s or module.endswith("." + s) for s in SKIP_MODULES)


def _nf4_config(out_dtype) -> dict:
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=out_dtype, bnb_4bit_quant_storage=torch.uint8, llm_int8_skip_modules=list(SKIP_MODULES),
    ).to_dict()


def save_config(model, folder: Path, dtype: torch.dtype, quantization_config: dict | None = None,
                tied: bool | None = None) -> None:
    """config.json (without the loading-time quantization, or with the export's own) and generation_config.json.

    tied=False unties the output head (a trained lm_head copy, or LoRA on one side of a tied pair).
    """
    base = base_model_of(model)
    config = copy.deepcopy(base.config)
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    if quantization_config is not None:
        config.quantization_config = quantization_config
    config.dtype = dtype
    if tied is not None and hasattr(config, "tie_word_embeddings"):
        config.tie_word_embeddings = tied
    config.use_cache = True  # training turns the KV cache off; the exported model is for generation
    config.architectures = [type(base).__name__]
    config.save_pretrained(folder)
    if getattr(base, "generation_config", None) is not None:
        base.generation_config.save_pretrained(folder)


def _save_tokenizer(tokenizer, folder: Path) -> None:
    if tokenizer is None:
        log.warning("No tokenizer given: %s holds weights and config only. Pass tokenizer= to include it.", folder)
        return
    tokenizer.save_pretrained(folder)
