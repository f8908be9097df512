"""transformers + PEFT as in hf.py, with Liger-Kernel patched in first: RoPE, RMSNorm, SwiGLU/GeGLU and the
fused linear cross-entropy (Liger's defaults for each family)."""

from __future__ import annotations

from . import hf
from .base import Job, training_step


def build(job: Job):
    import liger_kernel.transformers as liger
    from transformers import AutoConfig

    model_type = AutoConfig.from_pretrained(job.folder).model_type
    apply = getattr(liger, f"apply_liger_kernel_to_{model_type}")  # e.g. apply_liger_kernel_to_llama
    apply()  # patches the transformers classes before the model is built from them
    model = hf.with_lora(hf.load(job))
    hf.enable_checkpointing(model)
    return training_step(model, job.device)
