"""Hugging Face transformers + PEFT: SDPA attention, non-reentrant gradient checkpointing, the model's own loss."""

from __future__ import annotations

from .base import Job, bnb_config, generator, lora_config, training_step


def load(job: Job):
    """The checkpoint as transformers loads it (bitsandbytes NF4 for QLoRA), KV cache off for training."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        job.folder, dtype=job.dtype, attn_implementation=job.attention, device_map=job.device_map,
        quantization_config=bnb_config(job.dtype) if job.four_bit else None)
    model.config.use_cache = False
    return model


def with_lora(model):
    from peft import get_peft_model

    return get_peft_model(model, lora_config())


def enable_checkpointing(model) -> None:
    # transformers >= 5.2x also names it activation_checkpointing_enable; the GPU image's 5.17 has this name.
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def build(job: Job):
    model = with_lora(load(job))
    enable_checkpointing(model)
    return training_step(model, job.device)


def build_generator(job: Job):
    """Plain `generate` on the same 16-bit model with the same (unmerged) LoRA adapters."""
    model = with_lora(load(job)).eval()
    model.config.use_cache = True
    return generator(model)
