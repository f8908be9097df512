"""Phi-3 / Phi-3.5 / Phi-4-mini: q, k, v stored as one `qkv_proj` and gate/up as one `gate_up_proj`."""

from .base import Family, Wiring

PHI3 = Family(
    model_type="phi3",
    target_modules=("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
    fused_qkv=True,
    fused_gate_up=True,
    wiring=Wiring.named("Phi3"),
)
