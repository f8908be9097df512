"""`FastLanguageModel`: the Unsloth-compatible entry point, a small facade over models/, train/ and export/."""

from __future__ import annotations

import types

from .export import save_pretrained_gguf, save_pretrained_merged
from .generation import route_generate, unroute_generate
from .models.adapters import add_lora
from .models.embedded import EMBEDDED_ALIAS
from .models.loader import load_model
from .models.modes import for_inference, for_training
from .train.checkpointing import DEFAULT_MODE, set_gradient_checkpointing


class FastLanguageModel:
    """Load a model, add LoRA adapters, switch between training and inference."""

    @staticmethod
    def from_pretrained(
        model_name: str = EMBEDDED_ALIAS,
        max_seq_length: int = 2048,
        dtype=None,
        load_in_4bit: bool = False,
        load_in_8bit: bool = False,
        token=None,
        device_map=None,
        trust_remote_code: bool = False,
        rope_scaling: dict | None = None,
        kernels: bool | None = None,
        **kwargs,
    ):
        """Return `(model, tokenizer)`.

        model_name: a local HF folder, a hub id, a .gguf file, or "smollm2-135m" (the embedded model).
        dtype: None picks bf16 on GPUs that support it, fp16 on older GPUs, fp32 on the CPU.
        load_in_4bit: NF4 with double quantization for every decoder Linear (QLoRA); lm_head and embeddings stay.
        kernels: slothbook's Triton kernels in place of the norm, attention, MLP and loss forwards. None: on when the
            model is on a CUDA GPU; False: plain transformers forwards; True: on (on the CPU only under
            TRITON_INTERPRET=1).
        """
        model, tokenizer = load_model(
            model_name, max_seq_length=max_seq_length, dtype=dtype, load_in_4bit=load_in_4bit,
            load_in_8bit=load_in_8bit, token=token, device_map=device_map, trust_remote_code=trust_remote_code,
            rope_scaling=rope_scaling, kernels=kernels, **kwargs,
        )
        model.slothbook_tokenizer = tokenizer
        if hasattr(model, "peft_config"):  # a saved adapter folder comes back as a PeftModel: export it the same way
            _bind_exports(model)
        return model, tokenizer

    @staticmethod
    def get_peft_model(
        model,
        r: int = 16,
        target_modules=None,
        lora_alpha: int = 16,
        lora_dropout: float = 0.0,
        bias: str = "none",
        use_gradient_checkpointing=DEFAULT_MODE,
        random_state: int = 3407,
        use_rslora: bool = False,
        modules_to_save=None,
        max_seq_length: int | None = None,
        checkpointing_budget=None,
        **kwargs,
    ):
        """Wrap `model` in a PEFT LoRA PeftModel with the family's projections as default targets.

        use_gradient_checkpointing: "auto" (default: on CUDA the last layers that fit in free GPU memory keep their
            activations, the rest are checkpointed with their inputs offloaded to CPU memory; plain checkpointing on
            the CPU), True (plain checkpointing), "slothbook"/"unsloth" (offload every layer: the least memory),
            False (off).
        checkpointing_budget: for "auto" only: the bytes the kept layers' activations may take (int), or a fraction
            in (0, 1] of the free memory measured each step (float); None measures it.
        """
        peft_model = add_lora(
            model, r=r, target_modules=target_modules, lora_alpha=lora_alpha, lora_dropout=lora_dropout, bias=bias,
            random_state=random_state, use_rslora=use_rslora, modules_to_save=modules_to_save, **kwargs,
        )
        if max_seq_length is not None:
            peft_model.max_seq_length = max_seq_length
        set_gradient_checkpointing(peft_model, use_gradient_checkpointing, memory_budget=checkpointing_budget)
        for_training(peft_model)
        _bind_exports(peft_model)
        return peft_model

    @staticmethod
    def for_inference(model, cuda_graphs: bool = True):
        """Eval mode, KV cache on, left padding; and `model.generate` calls it can take (greedy or sampled, no beam
        search or processors) run as decode steps replayed from CUDA graphs over a static cache
        (slothbook.generation). Other calls, calls off CUDA and cuda_graphs=False stay transformers' `generate`."""
        for_inference(model)
        if cuda_graphs:
            route_generate(model)
        return model

    @staticmethod
    def for_training(model):
        """Train mode, KV cache off, right padding; `generate` is transformers' own again."""
        unroute_generate(model)
        return for_training(model)


def _bind_exports(peft_model) -> None:
    """Unsloth's export methods, on the model: model.save_pretrained_merged(path, tokenizer, save_method=...)."""
    peft_model.save_pretrained_merged = types.MethodType(save_pretrained_merged, peft_model)
    peft_model.save_pretrained_gguf = types.MethodType(save_pretrained_gguf, peft_model)
