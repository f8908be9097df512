"""The weights of a fine-tuned model as it will be exported: base dequantized, LoRA merged in fp32.

`merged_tensors(model)` lists every tensor of the merged model (name, shape, and a function that
computes its value) without computing any of them, so writers can stream one tensor at a time and
never hold the whole merged state dict in memory.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ExportError
from ..models.unwrap import base_model_of, compute_dtype  # noqa: F401  (export's users import them from here)


@dataclass(frozen=True)
class MergedTensor:
    """One tensor of the merged model, named as in the base model's state dict.

    load() returns the value in fp32 on the CPU, computed on each call (drop it once written). An fp32 CPU
    tensor that needs no merging comes back as the model's own tensor, not a copy: never modify it in place.
    linear: True for the weight of a Linear layer (what 4-bit quantization applies to).
    """

    name: str
    shape: tuple[int, ...]
    load: Callable[[], torch.Tensor]
    linear: bool = False

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def merged_tensors(model) -> list[MergedTensor]:
    """Every persistent tensor of the merged model, in module order.

    A tied weight (lm_head sharing the embedding) is listed once, unless one of its uses carries its own LoRA
    update or trained copy: then both are listed and the export is untied (see `is_tied`).
    """
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper

    base = base_model_of(model)
    out: list[MergedTensor] = []
    plain_seen: set[int] = set()  # tensors already listed unchanged
    done_prefixes: list[str] = []

    def add(name: str, tensor: torch.Tensor, load: Callable[[], torch.Tensor], shape=None, linear=False,
            changed=False):
        if not changed and id(tensor) in plain_seen:
            return
        if not changed:
            plain_seen.add(id(tensor))
        out.append(MergedTensor(name, tuple(shape if shape is not None else tensor.shape), load, linear))

    for mod_name, module in base.named_modules():
        if any(mod_name.startswith(p) for p in done_prefixes):
            continue
        prefix = f"{mod_name}." if mod_name else ""
        if isinstance(module, LoraLayer):
            _add_lora_layer(add, prefix, module)
            done_prefixes.append(prefix)
        elif isinstance(module, ModulesToSaveWrapper):
            trained = module.modules_to_save[module.active_adapters[0]]
            for pname, p in trained.named_parameters():
                add(prefix + pname, p, _plain(p), changed=True)
            done_prefixes.append(prefix)
        else:
            for pname, p in module.named_parameters(recurse=False):
                is_linear = isinstance(module, nn.Linear) and pname == "weight"
                shape = (module.out_features, module.in_features) if is_linear else None
                load = _dense_loader(module) if is_linear else _plain(p)
                add(prefix + pname, p, load, shape, is_linear)
            for bname, b in module.named_buffers(recurse=False):
                if bname not in module._non_persistent_buffers_set:
                    add(prefix + bname, b, _plain(b))
    return out


def is_tied(model, tensors: list[MergedTensor]) -> bool:
    """Whether the export keeps the output head tied to the embedding (it is untied when listed separately)."""
    tied = getattr(base_model_of(model).config, "tie_word_embeddings", False)
    return bool(tied) and not any(t.name == "lm_head.weight" for t in tensors)


def _plain(t: torch.Tensor) -> Callable[[], torch.Tensor]:
    return lambda: t.detach().to("cpu", torch.float32)


def _add_lora_layer(add, prefix: str, module) -> None:
    layer = module.get_base_layer()
    adapters = [] if module.disable_adapters or module.merged else list(module.active_adapters)
    for name in adapters:
        if getattr(module, "use_dora", {}).get(name) or getattr(module, "lora_variant", {}).get(name) is not None:
            raise ExportError(f"{prefix.rstrip('.')} uses a LoRA variant (DoRA or similar) that slothbook cannot "
                              "merge yet. Export it with save_method='lora', or train a plain LoRA adapter.")
    if isinstance(layer, nn.Linear):
        add(prefix + "weight", layer.weight, lambda: _merged_linear(module, adapters),
            (layer.out_features, layer.in_features), linear=True, changed=bool(adapters))
    elif isinstance(layer, nn.Embedding):
        add(prefix + "weight", layer.weight, lambda: _merged_embedding(module, adapters), changed=bool(adapters))
    else:
        raise ExportError(f"Cannot merge a LoRA adapter on {type(layer).__name__} ({prefix.rstrip('.')}); "
                          "export with save_method='lora' instead.")
    if getattr(layer, "bias", None) is not None:
        add(prefix + "bias", layer.bias, _plain(layer.bias))


def _merged_linear(module, adapters) -> torch.Tensor:
    """W + sum(scale * B @ A), all in fp32 on the weight's device, returned on the CPU."""
    w = dense_weight(module.get_base_layer())
    for name in adapters:
        a = module.lora_A[name].weight.to(w.device, torch.float32)
        b = module.lora_B[name].weight.to(w.device, torch.float32)
        if getattr(module.lora_B[name], "bias", None) is not None:
            raise ExportError("LoRA adapters with a bias on B (lora_bias=True) cannot be merged yet; "
                              "export with save_method='lora'.")
        delta = b @ a
        if getattr(module, "fan_in_fan_out", False):
            delta = delta.T
        # Scale, then add, as PEFT does: add_(delta, alpha=s) may fuse into one fma on a GPU (one rounding
        # instead of two) and move a few merged values by one ulp.
        w.add_(delta * module.scaling[name])
    return w.cpu()


def _merged_embedding(module, adapters) -> torch.Tensor:
    w = module.get_base_layer().weight.detach().to(torch.float32, copy=True)
    for name in adapters:
        a = module.lora_embedding_A[name].to(w.device, torch.float32)
        b = module.lora_embedding_B[name].to(w.device, torch.float32)
        w.add_((b @ a).T * module.scaling[name])
    return w.cpu()


def _dense_loader(linear: nn.Linear) -> Callable[[], torch.Tensor]:
    return lambda: dense_weight(linear).cpu()


def dense_weight(linear: nn.Linear) -> torch.Tensor:
    """The Linear's weight in fp32 on its own device (a fresh tensor), dequantized if it is 4- or 8-bit."""
    w = linear.weight
    quant_state = getattr(w, "quant_state", None)
    if quant_state is not None:  # bitsandbytes Params4bit (NF4 / FP4)
        _undo_cpu_packing(w)
        return dequantize_4bit(w.data, w.quant_state).to(torch.float32)
    if w.dtype == torch.int8:  # bitsandbytes Int8Params: row-wise absmax scaled int8
        scb = getattr(w, "SCB", None)
        if scb is None:
            scb = getattr(getattr(linear, "state", None), "SCB", None)
        if scb is None:
            raise ExportError(f"Cannot dequantize the 8-bit weight of {linear}: its scales (SCB) are missing.")
        return w.data.to(torch.float32) * (scb.to(torch.float32).unsqueeze(1) / 127.0)
    return w.detach().to(torch.float32, copy=True)


def _undo_cpu_packing(w) -> None:
    """Restore the standard NF4 layout if bitsandbytes repacked the weight for its CPU inference kernel.

    On CPUs with AVX512-BF16, bitsandbytes rewrites a 4-bit weight in place at the first eval-mode
    forward (its own layout, bf16 block scales). It undoes that itself before saving a state dict; we
    do the same before dequantizing. The round trip re-quantizes the block scales, so the values can
    differ from the original ones in the last bits of each block scale.
    """
    if getattr(w.quant_state, "packing_format_for_cpu", False):
        import bitsandbytes.functional as bnbf

        w.data, w.quant_state = bnbf._convert_weight_packed_for_cpu_inverse(w.data, w.quant_state)


def dequantize_4bit(packed: torch.Tensor, quant_state) -> torch.Tensor:
    """A bitsandbytes 4-bit weight in its own dtype: exactly the values the model computes with.

    NF4 goes through the project's kernel (Triton on the GPU, its plain-torch twin on the CPU; both
    bit-identical to bitsandbytes); FP4 falls back to bitsandbytes.
    """
    if quant_state.quant_type == "nf4":
        from ..kernels.nf4 import dequantize_nf4, dequantize_nf4_reference, nf4_weight_from_quant_state

        weight = nf4_weight_from_quant_state(packed, quant_state)
        return dequantize_nf4(weight) if packed.is_cuda else dequantize_nf4_reference(weight)
    import bitsandbytes.functional as bnbf

    return bnbf.dequantize_4bit(packed, quant_state)
