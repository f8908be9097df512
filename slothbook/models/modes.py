"""Switching a model between training and generation."""

from __future__ import annotations


def _tokenizer_of(model):
    return getattr(model, "slothbook_tokenizer", None)


def for_inference(model):
    """Eval mode, KV cache on, left padding for batched generation. Returns the model."""
    model.eval()
    model.config.use_cache = True
    tokenizer = _tokenizer_of(model)
    if tokenizer is not None:
        tokenizer.padding_side = "left"
    return model


def for_training(model):
    """Train mode, KV cache off (checkpointing recomputes layers), right padding. Returns the model."""
    model.train()
    model.config.use_cache = False
    tokenizer = _tokenizer_of(model)
    if tokenizer is not None:
        tokenizer.padding_side = "right"
    return model
