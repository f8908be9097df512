"""Qwen2 / Qwen2.5 (q/k/v biases) and Qwen3 (q/k RMSNorm inside attention)."""

from .base import Family, Wiring

QWEN2 = Family(model_type="qwen2", wiring=Wiring.named("Qwen2"))
QWEN3 = Family(model_type="qwen3", wiring=Wiring.named("Qwen3", qk_norm=True))
