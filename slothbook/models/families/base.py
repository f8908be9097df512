"""What slothbook needs to know about a model family."""

from __future__ import annotations

from dataclasses import dataclass, field

LLAMA_LIKE_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Wiring:
    """Which transformers modules get kernel forwards (see slothbook/models/patch.py), by class name.

    norm: the RMSNorm class (every instance: layer norms, q/k norms, the final norm) -> kernels.rms_norm.
    attention: the attention class -> fused LoRA QKV, kernels.rope, the KV cache, transformers' attention function.
    mlp: the gated MLP class -> fused LoRA MLP, or the GLU kernel between the module's own projections.
    causal_lm: the *ForCausalLM class -> fused linear cross-entropy when it is given labels in training.
    qk_norm: attention normalises q and k per head (`q_norm`, `k_norm`) before RoPE (Qwen3, Gemma-3).
    attn_softcap: attention scores are soft-capped by the module's `attn_logit_softcapping` (Gemma-2).
    """

    norm: str
    attention: str
    mlp: str
    causal_lm: str
    qk_norm: bool = False
    attn_softcap: bool = False

    @classmethod
    def named(cls, prefix: str, **quirks) -> Wiring:
        """Transformers' class names: `<prefix>RMSNorm`, `<prefix>Attention`, `<prefix>MLP`, `<prefix>ForCausalLM`."""
        return cls(f"{prefix}RMSNorm", f"{prefix}Attention", f"{prefix}MLP", f"{prefix}ForCausalLM", **quirks)


@dataclass(frozen=True)
class Family:
    """One architecture family.

    model_type: transformers' `config.model_type`.
    target_modules: default LoRA targets (every attention and MLP projection).
    activation: the MLP's gated activation ("swiglu", "geglu_tanh" or "geglu").
    norm_offset: 1.0 where the RMSNorm multiplies by (1 + weight) (Gemma), else 0.0.
    fused_qkv / fused_gate_up: projections stored as one Linear (Phi-3).
    attention: transformers' attn_implementation ("sdpa" unless the family needs another).
    wiring: the modules whose forwards the kernels replace; None leaves the model as transformers built it.
    """

    model_type: str
    target_modules: tuple[str, ...] = LLAMA_LIKE_TARGETS
    activation: str = "swiglu"
    norm_offset: float = 0.0
    fused_qkv: bool = False
    fused_gate_up: bool = False
    attention: str = "sdpa"
    wiring: Wiring | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)
