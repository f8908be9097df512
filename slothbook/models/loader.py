"""Loading a model and its tokenizer: from a local folder, a hub id, a .gguf file or the embedded alias."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from ..device import fsdp_requested, resolve_dtype, training_device
from ..errors import ConfigError, ModelNotFoundError
from .adapters import check_adapter_files, load_lora
from .checks import check_no_pickle, check_no_remote_code, check_vocab, check_weight_files, read_json
from .embedded import EMBEDDED_ALIAS, embedded_model_dir, gguf_to_folder
from .families import family_of
from .quantization import quantization_config
from .rope import apply_rope_scaling

log = logging.getLogger("slothbook")

ADAPTER_CONFIG = "adapter_config.json"
_LOAD_FIX = "Use the tokenizer saved with this model, or resize the model with model.resize_token_embeddings."


def resolve_source(model_name: str | os.PathLike | None) -> str:
    """A local folder for the alias, a .gguf file or a folder; a hub id is returned unchanged.

    A LoRA adapter folder resolves to its base model (the one named in its adapter_config.json).
    """
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
        adapter = adapter_folder(path)
        if adapter is not None:
            return resolve_source(adapter_base(adapter))
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


def adapter_folder(model_name) -> Path | None:
    """`model_name` as a folder when it is a saved LoRA adapter (adapter_config.json, no config.json), else None."""
    if model_name is None:
        return None
    path = Path(str(model_name)).expanduser()
    if path.is_dir() and (path / ADAPTER_CONFIG).is_file() and not (path / "config.json").is_file():
        return path
    return None


def adapter_base(folder: Path) -> str:
    """The base model an adapter folder was trained on, as its adapter_config.json names it."""
    config_path = folder / ADAPTER_CONFIG
    base = read_json(config_path).get("base_model_name_or_path")
    if not base:
        raise ConfigError(f"{config_path} does not name its base model (key 'base_model_name_or_path'). Load the base "
                          "with FastLanguageModel.from_pretrained(base), then PeftModel.from_pretrained(model, "
                          f"'{folder}'), or add the key.")
    return str(base)


def check_local_model(source: str, allow_pickle: bool, trust_remote_code: bool) -> None:
    """Refuse a local folder that would run code (custom modeling, pickles) or whose files are damaged."""
    if not Path(source).is_dir():
        return  # a hub id: transformers asks for trust_remote_code itself and downloads safetensors only
    check_no_remote_code(source, trust_remote_code)
    check_no_pickle(source, allow_pickle)
    check_weight_files(source)


def load_config(source: str, token=None, trust_remote_code=False):
    from transformers import AutoConfig

    if Path(source).is_dir():
        read_json(Path(source) / "config.json")  # a damaged config.json: name the file, not "cannot find"
        check_no_remote_code(source, trust_remote_code)
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
    adapter = adapter_folder(model_name)
    if adapter is not None:
        return _load_with_adapter(adapter, max_seq_length=max_seq_length, dtype=dtype, load_in_4bit=load_in_4bit,
                                  load_in_8bit=load_in_8bit, token=token, device_map=device_map,
                                  trust_remote_code=trust_remote_code, rope_scaling=rope_scaling,
                                  allow_pickle=allow_pickle, kernels=kernels, **kwargs)
    dtype = resolve_dtype(dtype)
    source = resolve_source(model_name)
    check_local_model(source, allow_pickle, trust_remote_code)
    config = load_config(source, token=token, trust_remote_code=trust_remote_code)
    family = family_of(config)
    apply_rope_scaling(config, max_seq_length, rope_scaling)
    if device_map is None:
        device_map = {"": training_device()}  # under torchrun / accelerate launch: this rank's own GPU
    kwargs.setdefault("attn_implementation", family.attention)
    # transformers >= 5.25 would fetch Hugging Face Hub kernels for some layers; slothbook's own kernels take those
    # layers (patch_model switches the hub kernels off in any case), so they are not fetched at all.
    kwargs.setdefault("use_kernels", False)
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
    check_vocab(tokenizer, model, _LOAD_FIX, source)
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


def _load_with_adapter(folder: Path, allow_pickle: bool = False, trust_remote_code: bool = False, **kwargs):
    """The base model with the saved adapter of `folder` on it (trainable), and the adapter folder's tokenizer."""
    from transformers import AutoTokenizer

    check_no_remote_code(folder, trust_remote_code)
    check_adapter_files(folder, allow_pickle)  # before the base: a damaged adapter fails in a moment
    model, tokenizer = load_model(adapter_base(folder), allow_pickle=allow_pickle,
                                  trust_remote_code=trust_remote_code, **kwargs)
    if (folder / "tokenizer_config.json").is_file():  # saved with the adapter: it may carry a new chat template
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
        check_vocab(tokenizer, model, _LOAD_FIX, folder)
        tokenizer = prepare_tokenizer(tokenizer, model.max_seq_length)
    model.slothbook_tokenizer = tokenizer  # on the base: exports find it through the PeftModel
    return load_lora(model, folder, allow_pickle=allow_pickle), tokenizer

