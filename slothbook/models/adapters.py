"""Attaching LoRA adapters through PEFT (a real PeftModel: saved and loaded by PEFT)."""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError, CorruptFileError, ModelNotFoundError
from .checks import check_no_pickle, check_safetensors, check_vocab, read_json
from .families import family_of

ADAPTER_WEIGHTS = "adapter_model.safetensors"


def linear_module_names(model: nn.Module) -> list[str]:
    """The distinct leaf names of the model's Linear layers (bitsandbytes ones included), lm_head excluded."""
    names = set()
    for full_name, module in model.named_modules():
        leaf = full_name.rsplit(".", 1)[-1]
        if isinstance(module, nn.Linear) and leaf != "lm_head":  # bnb Linear4bit/8bitLt subclass nn.Linear
            names.add(leaf)
    return sorted(names)


def _check_targets(model: nn.Module, target_modules) -> list[str]:
    if isinstance(target_modules, str):
        target_modules = [target_modules]
    available = linear_module_names(model)
    missing = [t for t in target_modules if t not in available]
    if missing:
        raise ConfigError(f"target_modules {missing} are not in this model. Its linear layers are: "
                          f"{', '.join(available)}.")
    return list(target_modules)


def add_lora(
    model: nn.Module,
    r: int = 16,
    target_modules=None,
    lora_alpha: int = 16,
    lora_dropout: float = 0.0,
    bias: str = "none",
    random_state: int = 3407,
    use_rslora: bool = False,
    modules_to_save=None,
    **lora_kwargs,
):
    """Freeze the base and wrap it in a PEFT LoRA PeftModel; only adapter weights (and modules_to_save) train."""
    from peft import LoraConfig, get_peft_model

    if not isinstance(r, int) or r <= 0:
        raise ConfigError(f"LoRA rank r must be a positive integer, got {r!r}. Typical values: 8, 16, 32, 64.")
    if lora_alpha <= 0:
        raise ConfigError(f"lora_alpha must be positive, got {lora_alpha!r}.")
    if not 0.0 <= lora_dropout < 1.0:
        raise ConfigError(f"lora_dropout must be in [0, 1), got {lora_dropout!r}.")
    family = family_of(model.config)
    check_vocab(getattr(model, "slothbook_tokenizer", None), model,
                "Call model.resize_token_embeddings(len(tokenizer)) before get_peft_model.")
    targets = _check_targets(model, target_modules or family.target_modules)
    for p in model.parameters():
        p.requires_grad_(False)
    config = LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        bias=bias,
        target_modules=targets,
        use_rslora=use_rslora,
        modules_to_save=modules_to_save,
        task_type="CAUSAL_LM",
        **lora_kwargs,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(random_state)
        # PEFT keeps adapter weights in fp32 over a half-precision base (autocast_adapter_dtype), which keeps
        # Adam's updates of the small A/B matrices stable.
        with _quiet_peft_checkpointing_warning():
            return get_peft_model(model, config)


@contextlib.contextmanager
def _quiet_peft_checkpointing_warning():
    """PEFT still reads `model.is_gradient_checkpointing`, which transformers >= 5.25 renamed and warns about on every
    read: a FutureWarning in the user's notebook they can do nothing about. slothbook reads the new name itself."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def check_adapter_files(folder, allow_pickle: bool = False) -> None:
    """An adapter folder's config parses and its weights are whole safetensors (or, opted in, a pickle)."""
    folder = Path(folder)
    read_json(folder / "adapter_config.json")
    check_no_pickle(folder, allow_pickle, stem="adapter weights")
    weights = folder / ADAPTER_WEIGHTS
    if weights.is_file():
        check_safetensors(weights)
    elif not (allow_pickle and (folder / "adapter_model.bin").is_file()):
        raise ModelNotFoundError(f"{folder} has adapter_config.json but no {ADAPTER_WEIGHTS}: the adapter was not "
                                 "saved completely. Save it again (model.save_pretrained(folder)).")


def load_lora(model: nn.Module, folder, allow_pickle: bool = False, is_trainable: bool = True):
    """Put the LoRA adapter saved in `folder` on `model` (a PeftModel), checking its files before PEFT reads them."""
    from peft import PeftModel

    check_adapter_files(folder, allow_pickle)
    try:
        with _quiet_peft_checkpointing_warning():
            return PeftModel.from_pretrained(model, str(folder), is_trainable=is_trainable)
    except (RuntimeError, ValueError, KeyError) as exc:  # shape mismatches, unknown keys, unreadable tensors
        why = " ".join(str(exc).split())[:300]
        raise CorruptFileError(f"Could not put the adapter in {folder} on the model ({type(exc).__name__}: {why}). "
                               "Was it trained on this base model? Load it onto the model named in its "
                               "adapter_config.json.") from exc
