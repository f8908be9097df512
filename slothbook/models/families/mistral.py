"""Mistral 7B and Mistral-architecture models (sliding-window attention, Llama-shaped layers)."""

from .base import Family, Wiring

MISTRAL = Family(model_type="mistral", wiring=Wiring.named("Mistral"))
