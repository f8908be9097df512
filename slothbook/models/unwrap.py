"""What a (possibly PEFT-wrapped) model is underneath: the transformers model and the dtype it computes in."""

from __future__ import annotations

import torch
from torch import nn


def base_model_of(model) -> nn.Module:
    """The transformers model inside a PeftModel (LoRA layers still in place), or the model itself."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def compute_dtype(model) -> torch.dtype:
    """The dtype the model computes in: its (never quantized) input embedding's dtype."""
    return base_model_of(model).get_input_embeddings().weight.dtype
