"""The model families slothbook supports: one small file per family, collected here by `model_type`."""

from __future__ import annotations

from ...errors import UnsupportedArchitectureError
from .base import Family
from .gemma import GEMMA, GEMMA2, GEMMA3
from .llama import LLAMA
from .mistral import MISTRAL
from .phi3 import PHI3
from .qwen import QWEN2, QWEN3

FAMILIES: dict[str, Family] = {f.model_type: f for f in (LLAMA, MISTRAL, QWEN2, QWEN3, GEMMA, GEMMA2, GEMMA3, PHI3)}


def family_of(config) -> Family:
    """The Family of a transformers config, or a clear error naming the supported ones."""
    model_type = getattr(config, "model_type", None)
    # Gemma-3 checkpoints with a vision tower carry the text model in text_config.
    if model_type not in FAMILIES and getattr(config, "text_config", None) is not None:
        model_type = getattr(config.text_config, "model_type", model_type)
    if model_type == "gemma3_text":
        model_type = "gemma3"
    if model_type not in FAMILIES:
        raise UnsupportedArchitectureError(
            f"slothbook does not support the architecture '{model_type}'. Supported: "
            f"{', '.join(sorted(FAMILIES))}. Pick a model of one of these families."
        )
    return FAMILIES[model_type]


__all__ = ["FAMILIES", "Family", "family_of"]
