"""Gemma, Gemma-2 (logit soft-capping, sandwich norms) and Gemma-3 text models.

All three scale embeddings by sqrt(hidden), use RMSNorm with (1 + weight) and a tanh-approximated GeGLU MLP.
"""

from .base import Family, Wiring

GEMMA = Family(model_type="gemma", activation="geglu_tanh", norm_offset=1.0, wiring=Wiring.named("Gemma"))
# Attention-logit soft-capping has no SDPA path in transformers: Gemma-2 runs eager attention.
GEMMA2 = Family(model_type="gemma2", activation="geglu_tanh", norm_offset=1.0, attention="eager",
                wiring=Wiring.named("Gemma2", attn_softcap=True))
GEMMA3 = Family(model_type="gemma3", activation="geglu_tanh", norm_offset=1.0,
                wiring=Wiring.named("Gemma3", qk_norm=True))
