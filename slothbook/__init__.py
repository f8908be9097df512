"""slothbook: fast, memory-lean LoRA and QLoRA fine-tuning, made for notebooks."""

__version__ = "0.1.0"
