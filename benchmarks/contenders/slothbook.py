"""slothbook: FastLanguageModel.from_pretrained + get_peft_model, kernels on (the default on CUDA).

The loss goes through the fused linear cross-entropy because labels are given. Job.options["checkpointing"],
when set, is get_peft_model's use_gradient_checkpointing ("slothbook": every layer offloaded to pinned host
memory; True: plain); without it get_peft_model's default applies ("auto": the layers that fit in free GPU
memory keep their activations, the rest are offloaded).
"""

from __future__ import annotations

from .base import ALPHA, RANK, TARGETS, Job, generator, training_step


def _load(job: Job, options: dict):
    from slothbook import FastLanguageModel

    model, _ = FastLanguageModel.from_pretrained(job.folder, max_seq_length=job.max_seq_length, dtype=job.dtype,
                                                 load_in_4bit=job.four_bit, kernels=job.kernels)
    chosen = {"use_gradient_checkpointing": options["checkpointing"]} if "checkpointing" in options else {}
    return FastLanguageModel.get_peft_model(model, r=RANK, lora_alpha=ALPHA, lora_dropout=0.0,
                                            target_modules=list(TARGETS), **chosen)


def kernels_on(model) -> bool:
    from slothbook.models.patch import is_patched

    return is_patched(model)


def build(job: Job):
    model = _load(job, job.options)
    step = training_step(model, job.device)
    step.kernels_on = kernels_on(model)  # recorded, so a silent fallback to plain forwards shows in the results
    return step


def build_generator(job: Job):
    from slothbook import FastLanguageModel

    model = FastLanguageModel.for_inference(_load(job, {"checkpointing": False}),
                                            cuda_graphs=job.options.get("cuda_graphs", True))
    generate = generator(model)
    generate.kernels_on = kernels_on(model)
    return generate
