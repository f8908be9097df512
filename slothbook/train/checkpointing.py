"""Choosing the gradient checkpointing mode: off, plain, offloaded to pinned host memory, or auto."""

from __future__ import annotations

from ..errors import ConfigError
from .keep import check_budget
from .offload import disable_offloaded_checkpointing, enable_offloaded_checkpointing
from .tiled_mlp import TILED_MLP_ABOVE, TILED_MLP_CHUNK, disable_tiled_mlp, enable_tiled_mlp

OFFLOAD_MODES = ("slothbook", "unsloth")
AUTO = "auto"
DEFAULT_MODE = AUTO  # get_peft_model's and FinetuneConfig's default


def set_gradient_checkpointing(model, mode, memory_budget=None) -> None:
    """`False`: off. `True`: plain checkpointing of every decoder layer.
    `"slothbook"` (alias `"unsloth"`): every layer checkpointed, its saved input in pinned CPU memory, and above
    16K tokens per step the MLP recomputed in chunks: the least GPU memory.
    `"auto"` (the default): on CUDA, the last layers that fit in free GPU memory keep their activations (no
    recompute), re-planned every training forward; the others as in "slothbook". On the CPU: plain checkpointing.
    memory_budget ("auto" only): None measures the free memory each step; an int is the bytes the kept layers'
    activations may take; a float in (0, 1] is that fraction of the measured room (see train/keep.py)."""
    if memory_budget is not None and not (isinstance(mode, str) and mode.lower() == AUTO):
        raise ConfigError(f"memory_budget applies to use_gradient_checkpointing='auto' only, not {mode!r}.")
    check_budget(memory_budget)
    if isinstance(mode, str) and mode.lower() in OFFLOAD_MODES + (AUTO,):
        _disable_hf_checkpointing(model)
        enable_offloaded_checkpointing(model, auto=mode.lower() == AUTO, memory_budget=memory_budget)
        enable_tiled_mlp(model, TILED_MLP_CHUNK, above=TILED_MLP_ABOVE)  # a no-op below that many tokens
        model.config.use_cache = False
        return
    if mode is True or mode is False or mode is None:
        disable_offloaded_checkpointing(model)
        disable_tiled_mlp(model)
        if mode is True:
            # transformers >= 5.2x renames gradient_* to activation_*; the GPU image (5.17) has only the old names.
            enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
            enable({"use_reentrant": False})
            model.config.use_cache = False
        else:
            _disable_hf_checkpointing(model)
        return
    raise ConfigError(f"use_gradient_checkpointing={mode!r} is not understood. Use 'auto' (keep what fits in GPU "
                      "memory, offload the rest), True (plain), False (off) or 'slothbook' (offload every layer's "
                      "activations to CPU memory; alias 'unsloth').")


def _disable_hf_checkpointing(model) -> None:
    if hasattr(model, "activation_checkpointing_disable"):
        if model.is_activation_checkpointing:
            model.activation_checkpointing_disable()
    elif model.is_gradient_checkpointing:
        model.gradient_checkpointing_disable()
