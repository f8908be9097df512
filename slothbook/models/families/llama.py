"""Llama (1, 2, 3, 3.1, 3.2) and Llama-architecture models such as SmolLM2."""

from .base import Family

LLAMA = Family(model_type="llama")
