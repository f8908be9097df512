"""bitsandbytes quantization settings for 4-bit (NF4, double-quantized) and 8-bit loading."""

from __future__ import annotations

import logging

import torch

from ..errors import ConfigError

# bitsandbytes warns at import on AVX-512-bf16 CPUs that an optional hub kernel is missing; it falls back to its
# own CPU path, so the warning only alarms users.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

# Kept in the compute dtype: quantizing the output head costs accuracy and saves little.
SKIP_MODULES = ["lm_head"]


def quantization_config(load_in_4bit: bool, load_in_8bit: bool, dtype: torch.dtype, shardable: bool = False):
    """shardable: store the packed 4-bit codes in `dtype` instead of uint8, so that FSDP can shard them beside the
    16-bit weights (it shards floating-point tensors only) and all-gather them in one dtype."""
    if load_in_4bit and load_in_8bit:
        raise ConfigError("load_in_4bit and load_in_8bit were both set; choose one (4-bit is the usual QLoRA choice).")
    if not (load_in_4bit or load_in_8bit):
        return None
    try:
        from transformers import BitsAndBytesConfig
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise ConfigError("4-bit and 8-bit loading need bitsandbytes: pip install bitsandbytes") from exc
    if load_in_4bit:
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_quant_storage=dtype if shardable else torch.uint8,
            llm_int8_skip_modules=SKIP_MODULES,
        )
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=SKIP_MODULES)
