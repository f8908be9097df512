"""Switching a model between training and generation."""

from __future__ import annotations


def _set_mode(model, training: bool):
    # Training: KV cache off (checkpointing recomputes layers), right padding. Generation: cache on, left padding
    # so a batch of prompts ends where generation starts.
    model.train(training)
    model.config.use_cache = not training
    tokenizer = getattr(model, "slothbook_tokenizer", None)
    if tokenizer is not None:
        tokenizer.padding_side = "right" if training else "left"
    return model


def for_inference(model):
    """Eval mode, KV cache on, left padding for batched generation. Returns the model."""
    return _set_mode(model, training=False)


def for_training(model):
    """Train mode, KV cache off, right padding. Returns the model."""
    return _set_mode(model, training=True)
