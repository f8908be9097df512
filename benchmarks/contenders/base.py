"""What every contender shares: the job description, the LoRA recipe, the 4-bit settings, the training step.

All contenders load the same random checkpoint folder, put the same LoRA on it and train with the same
step, so that the only differences are the ones each library brings (kernels, checkpointing, loss).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RANK, ALPHA = 16, 16
LEARNING_RATE = 1e-4


@dataclass(frozen=True)
class Job:
    """One contender on one model and quantization.

    folder: the random checkpoint (safetensors + tokenizer) every contender loads.
    attention: transformers' attn_implementation for the contenders that take one ("sdpa"; "eager" for
        Gemma-2, whose soft-capped attention has no SDPA path).
    kernels: slothbook's kernels switch (None: on for a CUDA model; True in the CPU smoke run, under the
        Triton interpreter).
    options: contender-specific settings (slothbook: the checkpointing mode).
    """

    folder: str
    four_bit: bool
    attention: str
    max_seq_length: int
    device: str
    kernels: bool | None = None
    options: dict = field(default_factory=dict)

    @property
    def dtype(self):
        import torch

        return torch.bfloat16 if self.device == "cuda" else torch.float32

    @property
    def device_map(self) -> dict:
        import torch

        return {"": torch.cuda.current_device() if self.device == "cuda" else "cpu"}


def bnb_config(dtype):
    """NF4 with double quantization for the decoder linears, lm_head kept: what slothbook and Unsloth load."""
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=torch.uint8,
                              llm_int8_skip_modules=["lm_head"])


def lora_config():
    from peft import LoraConfig

    return LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, bias="none", target_modules=list(TARGETS),
                      task_type="CAUSAL_LM")


def training_step(model, device: str) -> Callable[[Any], Any]:
    """AdamW (fused on CUDA) over the trainable parameters, and one step: forward with labels under bf16
    autocast (as the Trainer's bf16=True does), backward, optimizer step. Returns the detached loss."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise RuntimeError("the model has no trainable parameters: LoRA was not applied")
    optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE, fused=device == "cuda")
    model.train()

    def step(ids):
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def generator(model) -> Callable[[Any, int], Any]:
    """Greedy generation of exactly ``new_tokens`` tokens after ``ids`` (EOS cannot stop a random model early)."""
    import torch

    def generate(ids, new_tokens: int):
        with torch.inference_mode():
            return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                  min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)

    return generate
