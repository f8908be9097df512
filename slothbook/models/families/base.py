"""What slothbook needs to know about a model family."""

from __future__ import annotations

from dataclasses import dataclass, field

LLAMA_LIKE_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Family:
    """One architecture family.

    model_type: transformers' `config.model_type`.
    target_modules: default LoRA targets (every attention and MLP projection).
    activation: the MLP's gated activation ("swiglu", "geglu_tanh" or "geglu").
    norm_offset: 1.0 where the RMSNorm multiplies by (1 + weight) (Gemma), else 0.0.
    fused_qkv / fused_gate_up: projections stored as one Linear (Phi-3).
    attention: transformers' attn_implementation ("sdpa" unless the family needs another).
    """

    model_type: str
    target_modules: tuple[str, ...] = LLAMA_LIKE_TARGETS
    activation: str = "swiglu"
    norm_offset: float = 0.0
    fused_qkv: bool = False
    fused_gate_up: bool = False
    attention: str = "sdpa"
    notes: tuple[str, ...] = field(default_factory=tuple)
