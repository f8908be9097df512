"""Reading a live model's training setup, in the estimator's terms (for advice after an out-of-memory error)."""

from __future__ import annotations

from torch import nn

from .tensors import unwrap_optimizer

_OFFLOAD_MARK = "_slothbook_checkpoint"  # train/offload.py's patch key on each wrapped decoder layer


def checkpointing_of(model: nn.Module, device_type: str) -> str:
    if any(_OFFLOAD_MARK in m.__dict__ for m in model.modules()):
        if device_type != "cuda":
            return "plain"  # on the CPU the offload wrapper checkpoints plainly
        from ..train.offload import keep_plan

        return "auto" if keep_plan(model) is not None else "offload"
    from transformers import PreTrainedModel

    for m in model.modules():
        if isinstance(m, PreTrainedModel):
            # transformers >= 5.2x renamed the flag; the GPU image (5.17) has only the old name.
            new = hasattr(type(m), "is_activation_checkpointing")
            if getattr(m, "is_activation_checkpointing" if new else "is_gradient_checkpointing"):
                return "plain"
    return "off"


def optimizer_kind(optimizer) -> str:
    name = type(unwrap_optimizer(optimizer)).__name__.lower() if optimizer is not None else "adamw"
    if "8bit" in name:
        return "adamw_8bit"
    if name == "sgd":
        return "sgd"
    return "adamw"


def training_setup(model: nn.Module, optimizer=None, device_type: str = "cuda") -> dict:
    """`estimate` keyword arguments that describe `model` (a PeftModel or plain model) and `optimizer`."""
    from ..models.patch import is_patched

    peft = getattr(model, "peft_config", None)
    lora = next(iter(peft.values()), None) if isinstance(peft, dict) and peft else None
    quantized = any(getattr(p, "quant_state", None) is not None for p in model.parameters())
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    dtype = embeddings.weight.dtype if embeddings is not None else next(model.parameters()).dtype
    return dict(
        r=getattr(lora, "r", 16),
        target_modules=sorted(lora.target_modules) if lora is not None and lora.target_modules else None,
        load_in_4bit=quantized,
        checkpointing=checkpointing_of(model, device_type),
        optimizer=optimizer_kind(optimizer),
        dtype=dtype,
        kernels=is_patched(model),
        device="cuda" if device_type == "cuda" else "cpu",
    )
