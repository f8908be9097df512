"""Loading a model and its tokenizer: from a local folder, a hub id, a .gguf file or the embedded alias."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from ..device import fsdp_requested, resolve_dtype, training_device
from ..errors import ConfigError, ModelNotFoundError
from .embedded import EMBEDDED_ALIAS, embedded_model_dir, gguf_to_folder
from .families import family_of
from .quantization import quantization_config
from .rope import apply_rope_scaling

log = logging.getLogger("slothbook")

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def resolve_source(model_name: str | os.PathLike | None) -> str:
    """A local folder for the alias, a .gguf file or a folder; a hub id is returned unchanged."""
    if model_name is None or str(model_name).lower() == EMBEDDED_ALIAS:
        return str(embedded_model_dir())
    name = str(model_name)
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return str(gguf_to_folder(path))
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if not (path / "config.json").is_file() and len(ggufs) == 1:
            return str(gguf_to_folder(ggufs[0]))
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"The folder {path} has no config.json: it is not a transformers model folder. "
                                     "Point to the folder that holds config.json and the weights, or to a .gguf file.")
        return str(path)
    if _looks_like_path(name):
        raise ModelNotFoundError(f"No model at '{name}': that path does not exist. Check the path, or use "
                                 f"'{EMBEDDED_ALIAS}' for the embedded model.")
    return name  # a hub id


def _looks_like_path(name: str) -> bool:
    # Hub ids are "name" or "org/name"; anything else that does not exist is a mistyped path.
    return name.startswith((".", "/", "~")) or name.endswith(".gguf") or name.count("/") > 1 or "\\" in name


def _check_weights_are_safe(folder: str, allow_pickle: bool) -> None:
    """Refuse pickled weights (which can run code when loaded) unless the user opts in."""
    path = Path(folder)
    if not path.is_dir() or allow_pickle or any(path.glob("*.safetensors")):
        return
    pickled = [p.name for p in path.iterdir() if p.suffix in _PICKLE_SUFFIXES]
    if pickled:
        raise ConfigError(f"{folder} holds only pickled weights ({', '.join(sorted(pickled))}), which can execute code "
                          "when loaded. Convert them to safetensors, or pass allow_pickle=True if you trust the source.")


def load_config(source: str, token=None, trust_remote_code=False):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source, token=token, trust_remote_code=trust_remote_code)
    except OSError as exc:
        raise ModelNotFoundError(
            f"Could not find '{source}' locally or reach it on the Hugging Face hub ({exc.__class__.__name__}). "
            "If you are offline, download the model elsewhere and pass its local folder, pass a .gguf file, or use "
            f"'{EMBEDDED_ALIAS}' for the embedded model."
        ) from exc


def load_model(
    model_name: str | os.PathLike | None = EMBEDDED_ALIAS,
    max_seq_length: int = 2048,
    dtype=None,
    load_in_4bit: bool = False,
    load_in_8bit: bool = False,
    token=None,
    device_map=None,
    trust_remote_code: bool = False,
    rope_scaling: dict | None = None,
    allow_pickle: bool = False,
    kernels: bool | None = None,
    **kwargs,
):
    """Load (model, tokenizer) ready for LoRA training. See `FastLanguageModel.from_pretrained`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not isinstance(max_seq_length, int) or max_seq_length <= 0:
        raise ConfigError(f"max_seq_length must be a positive integer, got {max_seq_length!r}.")
    dtype = resolve_dtype(dtype)
    source = resolve_source(model_name)
    _check_weights_are_safe(source, allow_pickle)
    config = load_config(source, token=token, trust_remote_code=trust_remote_code)
    family = family_of(config)
    apply_rope_scaling(config, max_seq_length, rope_scaling)
    if device_map is None:
        device_map = {"": training_device()}  # under torchrun / accelerate launch: this rank's own GPU
    kwargs.setdefault("attn_implementation", family.attention)
    model = AutoModelForCausalLM.from_pretrained(
        source,
        config=config,
        dtype=dtype,
        quantization_config=quantization_config(load_in_4bit, load_in_8bit, dtype, shardable=fsdp_requested()),
        device_map=device_map,
        token=token,
        trust_remote_code=trust_remote_code,
        use_safetensors=None if allow_pickle else True,
        **kwargs,
    )
    tokenizer = AutoTokenizer.from_pretrained(source, token=token, trust_remote_code=trust_remote_code)
    tokenizer = prepare_tokenizer(tokenizer, max_seq_length)
    model.max_seq_length = max_seq_length
    model.slothbook_family = family
    from .patch import patch_model, wants_kernels  # here: importing the kernels imports Triton

    if wants_kernels(model, kernels):
        patch_model(model, family)
    if model.generation_config is not None and tokenizer.pad_token_id is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def prepare_tokenizer(tokenizer, max_seq_length: int):
    """A pad token distinct from eos where the vocabulary allows, right padding for training, the length stored."""
    from ..data import heal_tokenizer

    tokenizer = heal_tokenizer(tokenizer)
    tokenizer.padding_side = "right"
    tokenizer.model_max_length = max_seq_length
    return tokenizer
