"""Export a fine-tuned model: LoRA adapter, merged 16-bit or 4-bit safetensors, GGUF with an Ollama Modelfile.

Floor 3: imports errors, kernels, models and data only.
"""

from .gguf_export import save_pretrained_gguf
from .merged import save_pretrained_merged

__all__ = ["save_pretrained_gguf", "save_pretrained_merged"]
