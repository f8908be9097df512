"""Mistral 7B and Mistral-architecture models (sliding-window attention, Llama-shaped layers)."""

from .base import Family

MISTRAL = Family(model_type="mistral")
