"""Unsloth's FastLanguageModel with its own checkpointing (use_gradient_checkpointing="unsloth").

The worker imports unsloth before anything else in its process, as Unsloth requires.
"""

from __future__ import annotations

from .base import ALPHA, RANK, TARGETS, Job, generator, training_step


def _load(job: Job):
    from unsloth import FastLanguageModel

    model, _ = FastLanguageModel.from_pretrained(model_name=job.folder, max_seq_length=job.max_seq_length,
                                                 dtype=job.dtype, load_in_4bit=job.four_bit)
    return FastLanguageModel, FastLanguageModel.get_peft_model(
        model, r=RANK, lora_alpha=ALPHA, lora_dropout=0, bias="none", target_modules=list(TARGETS),
        use_gradient_checkpointing="unsloth", random_state=3407)


def build(job: Job):
    _, model = _load(job)
    return training_step(model, job.device)


def build_generator(job: Job):
    fast, model = _load(job)
    return generator(fast.for_inference(model))
