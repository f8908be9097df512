"""Routing `model.generate` to the graphed path for the calls it handles (instance attribute, undone by
`unroute_generate`); every other call, and every call off CUDA, goes to transformers' own `generate`."""

from __future__ import annotations

from .generate import graphed_generate, supports

_ORIGINAL = "_slothbook_generate"
# Defaults a call leaves out come from the model's generation config, as in transformers.
_FROM_CONFIG = ("do_sample", "temperature", "top_k", "top_p")


def route_generate(model) -> None:
    if _ORIGINAL in model.__dict__:
        return
    original = model.generate

    def generate(*args, **kwargs):
        call = dict(kwargs, input_ids=args[0]) if len(args) == 1 else None if args else kwargs
        if call is not None and next(model.parameters()).device.type == "cuda" and supports(model, call):
            return graphed_generate(model, **_with_config_defaults(model, call))
        return original(*args, **kwargs)

    model.__dict__[_ORIGINAL] = original
    model.generate = generate


def unroute_generate(model) -> None:
    if _ORIGINAL in model.__dict__:
        del model.__dict__[_ORIGINAL]
        model.__dict__.pop("generate", None)


def _with_config_defaults(model, kwargs: dict) -> dict:
    config = getattr(model, "generation_config", None)
    filled = dict(kwargs)
    for name in _FROM_CONFIG:
        if name not in filled and getattr(config, name, None) is not None:
            filled[name] = getattr(config, name)
    return filled
