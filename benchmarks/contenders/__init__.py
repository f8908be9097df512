"""The contenders of benchmarks/train.py: one small module each, building model + LoRA + optimizer.

Every module has ``build(job) -> step`` (one training step on a batch of token ids, returning the loss) and,
where it generates, ``build_generator(job) -> generate``. Nothing heavy is imported here: a worker imports
only its own contender's module (Unsloth must be imported before transformers in its process).
"""

from __future__ import annotations

import importlib

# name -> (module, options the module reads from Job.options)
CONTENDERS = {
    "hf": ("hf", {}),
    "liger": ("liger", {}),
    "unsloth": ("unsloth", {}),
    "slothbook": ("slothbook", {}),  # what a user gets: get_peft_model's default checkpointing ("auto")
    "slothbook-offload": ("slothbook", {"checkpointing": "slothbook"}),  # every layer offloaded: least memory
    "slothbook-plain": ("slothbook", {"checkpointing": True}),  # transformers' checkpointing, same kernels
    "slothbook-eager": ("slothbook", {"cuda_graphs": False}),  # for_inference(model, cuda_graphs=False)
}
GENERATORS = ("hf", "slothbook", "slothbook-eager", "unsloth")  # contenders with a generation path
GENERATION_ONLY = ("slothbook-eager",)  # trains exactly as "slothbook": no training worker of its own


def module_of(contender: str):
    return importlib.import_module(f"{__name__}.{CONTENDERS[contender][0]}")


def options_of(contender: str) -> dict:
    return dict(CONTENDERS[contender][1])
