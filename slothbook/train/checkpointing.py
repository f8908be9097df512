"""Choosing the gradient checkpointing mode: off, plain, or offloaded to pinned host memory."""

from __future__ import annotations

from ..errors import ConfigError
from .offload import disable_offloaded_checkpointing, enable_offloaded_checkpointing
from .tiled_mlp import disable_tiled_mlp, enable_tiled_mlp

OFFLOAD_MODES = ("slothbook", "unsloth")


def set_gradient_checkpointing(model, mode) -> None:
    """`False`: off. `True`: plain checkpointing of every decoder layer.
    `"slothbook"` (alias `"unsloth"`): checkpointing whose saved layer inputs go to pinned CPU memory, and an MLP
    recomputed in sequence chunks, so activation memory stays bounded at long context."""
    if isinstance(mode, str) and mode.lower() in OFFLOAD_MODES:
        _disable_hf_checkpointing(model)
        enable_offloaded_checkpointing(model)
        enable_tiled_mlp(model)  # a no-op for inputs shorter than one chunk
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
    raise ConfigError(f"use_gradient_checkpointing={mode!r} is not understood. Use True (plain), False (off) or "
                      "'slothbook' (offload activations to CPU memory; alias 'unsloth').")


def _disable_hf_checkpointing(model) -> None:
    if hasattr(model, "activation_checkpointing_disable"):
        if model.is_activation_checkpointing:
            model.activation_checkpointing_disable()
    elif model.is_gradient_checkpointing:
        model.gradient_checkpointing_disable()
