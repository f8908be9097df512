"""Llama (1, 2, 3, 3.1, 3.2) and Llama-architecture models such as SmolLM2."""

from .base import Family, Wiring

LLAMA = Family(model_type="llama", wiring=Wiring.named("Llama"))
