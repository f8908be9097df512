"""Stretching a model's rotary embeddings when the requested context exceeds the one it was trained on."""

from __future__ import annotations

import logging

log = logging.getLogger("slothbook")


def trained_context(config) -> int | None:
    params = getattr(config, "rope_parameters", None) or {}
    for p in _rope_dicts(params):
        if p.get("original_max_position_embeddings"):
            return int(p["original_max_position_embeddings"])
    return getattr(config, "max_position_embeddings", None)


def _rope_dicts(params: dict) -> list[dict]:
    # Gemma-3 keeps one rope dict per attention type; the others keep one flat dict.
    if params and all(isinstance(v, dict) for v in params.values()):
        return list(params.values())
    return [params] if params else []


def apply_rope_scaling(config, max_seq_length: int, rope_scaling: dict | None) -> None:
    """Apply the user's rope_scaling, or linear scaling when max_seq_length exceeds the trained context."""
    trained = trained_context(config)
    if rope_scaling is None:
        if trained is None or max_seq_length <= trained:
            return
        already = [p.get("factor") for p in _rope_dicts(getattr(config, "rope_parameters", None) or {})]
        if any(already):
            return  # the model ships its own long-context scaling (llama3, yarn): trust it
        rope_scaling = {"rope_type": "linear", "factor": max_seq_length / trained}
        log.warning("slothbook: max_seq_length %d exceeds the trained context %d; using linear RoPE scaling x%.2f",
                    max_seq_length, trained, rope_scaling["factor"])
    rope_scaling = dict(rope_scaling)
    if "type" in rope_scaling and "rope_type" not in rope_scaling:
        rope_scaling["rope_type"] = rope_scaling.pop("type")
    params = getattr(config, "rope_parameters", None)
    if params is None:
        config.rope_parameters = rope_scaling
    else:
        for p in _rope_dicts(params):
            p.update(rope_scaling)
    if getattr(config, "max_position_embeddings", 0) < max_seq_length:
        config.max_position_embeddings = max_seq_length
