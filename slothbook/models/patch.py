"""Swap slothbook's Triton kernels into a loaded model by replacing module forwards.

A family's `Wiring` (families/base.py) names the transformers classes of its RMSNorm, attention, MLP and causal-LM
modules. `patch_model` gives every instance of those classes a forward that calls the kernels:

- RMSNorm: `kernels.rms_norm` with the family's offset (Gemma: 1 + weight) and HF's casting convention.
- attention: the q/k/v projections (one fused LoRA call when all three are plain LoRA layers), `kernels.rope`
  (q and k in one launch, in place), the KV cache update, then transformers' own attention function for the
  model's `attn_implementation` (SDPA with `is_causal` or the mask it was given, eager with Gemma-2's soft-capping,
  flash...), then the output projection (fused LoRA).
- MLP: `kernels.lora.lora_mlp` when gate/up/down are plain LoRA layers, else the modules' projections around the
  fused GLU kernel (SwiGLU or GeGLU, as the config's activation says).
- causal LM: given labels in training, `kernels.fused_linear_cross_entropy` on the final hidden states, so the
  [tokens x vocab] logits never exist; the output then has `logits=None`. Any other call runs the original forward.

"Plain LoRA layer": a PEFT LoRA Linear with one active adapter, no dropout, no DoRA or other variant, not merged,
over a frozen 16-bit or NF4 base. Anything else keeps PEFT's own forward inside the kernel forwards.
Originals are kept on each module, so `unpatch` restores them exactly.
"""

from __future__ import annotations

import functools
import logging
import sys
import types

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from slothbook.kernels._utils import is_interpret
from slothbook.kernels.fused_linear_cross_entropy import fused_linear_cross_entropy
from slothbook.kernels.lora import LoRAProjection, lora_linear, lora_mlp, lora_qkv
from slothbook.kernels.nf4 import NF4Weight, nf4_weight_from_quant_state
from slothbook.kernels.rms_norm import rms_norm
from slothbook.kernels.rope import apply_rope
from slothbook.kernels.swiglu import geglu, swiglu

from ..errors import DeviceError
from ..forwards import patch_beneath, patched_over, unpatch_forward
from .families import Family, family_of

log = logging.getLogger("slothbook")

try:
    from torch.distributed.tensor import DTensor as _DTensor
except ImportError:  # a torch build without torch.distributed
    _DTensor = None

_SAVED = "_slothbook_kernel_forward"  # module.__dict__ entry: (forward before patching, ours)

# transformers' activation names -> the gated kernels (lora_mlp's names); others keep the MLP's own forward.
_ACTIVATIONS = {"silu": "swiglu", "swish": "swiglu", "gelu_pytorch_tanh": "geglu_tanh", "gelu_new": "geglu_tanh",
                "gelu": "geglu"}
_GLU = {"swiglu": swiglu, "geglu_tanh": functools.partial(geglu, approximate="tanh"),
        "geglu": functools.partial(geglu, approximate="none")}


# ---------------------------------------------------------------- when

def wants_kernels(model: nn.Module, kernels: bool | None) -> bool:
    """`kernels=None`: on when every parameter is on a CUDA device. True: on (CPU only under TRITON_INTERPRET=1)."""
    if kernels is False:
        return False
    on_cuda = all(p.device.type == "cuda" for p in model.parameters())
    if kernels is None:
        return on_cuda
    if not on_cuda and not is_interpret():
        raise DeviceError("kernels=True needs the whole model on a CUDA GPU. Load it on a GPU, pass kernels=False "
                          "(plain transformers forwards), or set TRITON_INTERPRET=1 before importing slothbook to run "
                          "the kernels in Triton's slow CPU interpreter.")
    return True


# ---------------------------------------------------------------- patching

def patch_model(model: nn.Module, family: Family | None = None) -> dict[str, int]:
    """Give the family's modules kernel forwards; returns how many of each kind were patched.

    Works on a causal LM or a PeftModel around one, before or after LoRA is added (the forwards look the LoRA
    layers up on every call). Patching twice is a no-op.
    """
    family = family or family_of(model.config)
    wiring = family.wiring
    counts = {"norm": 0, "attention": 0, "mlp": 0, "loss": 0}
    if wiring is None:
        return counts
    _switch_off_hub_kernels(model)
    makers = {
        wiring.norm: ("norm", lambda m: _norm_forward(m, family.norm_offset)),
        wiring.attention: ("attention", lambda m: _attention_forward(m, family)),
        wiring.mlp: ("mlp", lambda m: _mlp_forward(m, family)),
        wiring.causal_lm: ("loss", _causal_lm_forward),
    }
    for module in model.modules():
        kind, make = makers.get(type(module).__name__, (None, None))
        if kind is None or _SAVED in module.__dict__:
            continue
        forward = make(module)
        if forward is not None:
            _replace_forward(module, forward)
            counts[kind] += 1
    return counts


def _switch_off_hub_kernels(model: nn.Module) -> None:
    """transformers >= 5.25 kernelizes a model with Hugging Face Hub kernels when the `kernels` package is installed,
    and kernelizes it again on every train()/eval() switch, which would overwrite the forwards patched here."""
    for module in model.modules():
        if getattr(module, "use_kernels", False) is True:
            log.info("slothbook: switching transformers' hub kernels off for %s; slothbook's kernels replace them",
                     type(module).__name__)
            module.use_kernels = False  # restores the torch forwards (reset_kernels) and stops re-kernelizing


def unpatch(model: nn.Module) -> int:
    """Restore the original forwards; returns how many modules were restored.

    A module whose forward was wrapped again after ours (e.g. by TRL's fused LM head or the tiled MLP) cannot be
    unwound without breaking that wrapper: it keeps its forward and a warning names it.
    """
    restored = 0
    for name, module in model.named_modules():
        saved = module.__dict__.get(_SAVED)
        if saved is None:
            continue
        if patched_over(module, _SAVED):
            log.warning("slothbook: %s (%s) was wrapped after the kernels were patched in; left as it is",
                        name or "model", type(module).__name__)
            continue
        unpatch_forward(module, _SAVED)
        restored += 1
    return restored


def is_patched(model: nn.Module) -> bool:
    return any(_SAVED in m.__dict__ for m in model.modules())


def _replace_forward(module: nn.Module, forward) -> None:
    # Beneath a wrapper that reads its inner forward (an MLP tiled by use_gradient_checkpointing="slothbook"
    # before the kernels came in): replacing it would silently drop the tiling.
    patch_beneath(module, _SAVED, types.MethodType(forward, module))


# ---------------------------------------------------------------- LoRA layers

def lora_parts(module: nn.Module) -> tuple[LoRAProjection, torch.Tensor | None] | None:
    """`(projection, base bias)` of a plain PEFT LoRA Linear (see the module docstring), else None."""
    lora_a, base = getattr(module, "lora_A", None), getattr(module, "base_layer", None)
    if lora_a is None or base is None or module.merged or module.disable_adapters:
        return None
    active = module.active_adapters
    if len(active) != 1 or active[0] not in lora_a:
        return None
    name = active[0]
    a, b = lora_a[name], module.lora_B[name]
    plain = (isinstance(module.lora_dropout[name], nn.Identity) and name not in getattr(module, "lora_variant", {})
             and not getattr(module, "use_dora", {}).get(name, False) and not getattr(module, "fan_in_fan_out", False)
             and type(a) is nn.Linear and type(b) is nn.Linear and a.bias is None and b.bias is None)
    weight = _frozen_base_weight(base) if plain else None
    if weight is None or _sharded(a.weight) or _sharded(b.weight):
        return None
    return LoRAProjection(weight, a.weight, b.weight, module.scaling[name]), base.bias


def _frozen_base_weight(base: nn.Module):
    """The base Linear's weight as the LoRA kernels take it: a tensor, an NF4Weight, or None (unsupported)."""
    weight = getattr(base, "weight", None)
    if weight is None or weight.requires_grad or _sharded(weight):
        return None
    state = getattr(weight, "quant_state", None)
    if state is None:  # FSDP2 gathers a Params4bit back as a plain Parameter; bitsandbytes keeps the state on the layer
        state = getattr(base, "quant_state", None)
    if state is not None:
        # bitsandbytes repacks CPU weights for its own inference kernel (packing_format_for_cpu): not NF4 any more.
        if state.quant_type != "nf4" or getattr(state, "packing_format_for_cpu", False):
            return None
        return nf4_weight_from_quant_state(weight.data, state)
    if type(weight).__name__ != "Parameter" or not weight.is_floating_point():
        return None  # 8-bit, an unquantized bitsandbytes parameter, or something else we cannot read as a matrix
    return weight


def _fused(module: nn.Module, x: torch.Tensor):
    """`lora_parts(module)`, or None where the module's own forward is faster: decoding a single token over an NF4
    base, which bitsandbytes multiplies straight from the 4-bit weight instead of dequantizing all of it."""
    parts = lora_parts(module)
    if (parts is not None and isinstance(parts[0].weight, NF4Weight) and x.numel() == x.shape[-1]
            and not torch.is_grad_enabled()):
        return None
    return parts


def _project(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`module(x)`, through the fused LoRA kernel when the module is a plain LoRA layer."""
    parts = _fused(module, x)
    if parts is None:
        return module(x)
    projection, bias = parts
    return _plus_bias(lora_linear(x, *projection), bias)


def _plus_bias(y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return y if bias is None else y + bias.to(y.dtype)


# ---------------------------------------------------------------- RMSNorm

def _norm_forward(norm: nn.Module, offset: float):
    eps = getattr(norm, "variance_epsilon", None)
    eps = float(norm.eps if eps is None else eps)

    def forward(self, x):
        return rms_norm(x, self.weight, eps, offset)

    return forward


# ---------------------------------------------------------------- attention

def _attention_forward(attn: nn.Module, family: Family):
    wiring = family.wiring
    # transformers' eager attention for this family (Gemma-2's applies the soft-cap): the default of the interface.
    eager = getattr(sys.modules[type(attn).__module__], "eager_attention_forward", None)
    if eager is None:
        return None

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, **kwargs):
        # transformers 5.24 renamed the layer's `past_key_values` to `cache`; the GPU image's 5.17 uses the old name.
        cache = kwargs.pop("cache", None) if past_key_values is None else past_key_values
        shape = hidden_states.shape[:-1]
        heads = (*shape, -1, self.head_dim)
        q, k, v = (t.view(heads) for t in _qkv(self, hidden_states, family.fused_qkv))
        if wiring.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        cos, sin = position_embeddings
        q, k = _rope(q, k, cos, sin)
        if cache is not None:
            k, v = _update_cache(cache, k, v, self.layer_idx, cos, sin, kwargs)
        extra = {"softcap": self.attn_logit_softcapping} if wiring.attn_softcap else {}
        attend = _attention_function(self.config._attn_implementation, eager)
        out, weights = attend(self, q, k, v, attention_mask, dropout=self.attention_dropout if self.training else 0.0,
                              scaling=self.scaling, sliding_window=_sliding_window(self), **extra, **kwargs)
        return _project(self.o_proj, out.reshape(*shape, -1).contiguous()), weights

    return forward


def _qkv(attn: nn.Module, x: torch.Tensor, fused: bool):
    if fused:  # Phi-3: one qkv_proj, q first, then k and v of equal width
        qkv = _project(attn.qkv_proj, x)
        q_width = attn.config.num_attention_heads * attn.head_dim
        kv_width = (qkv.shape[-1] - q_width) // 2
        # Slices, not split(): RoPE rotates q and k in place, which autograd forbids on split()'s multi-views.
        return qkv[..., :q_width], qkv[..., q_width:q_width + kv_width], qkv[..., q_width + kv_width:]
    modules = (attn.q_proj, attn.k_proj, attn.v_proj)
    parts = [_fused(m, x) for m in modules]
    if any(p is None for p in parts):
        return tuple(_project(m, x) for m in modules)
    outs = lora_qkv(x, *(projection for projection, _ in parts))
    return tuple(_plus_bias(y, bias) for y, (_, bias) in zip(outs, parts))


def _rope(q, k, cos, sin):
    """RoPE on q and k ([batch, heads, seq, head_dim]); a table narrower than head_dim rotates only its width."""
    width = cos.shape[-1]
    if width == q.shape[-1]:
        return apply_rope(q, k, cos, sin)
    q_rot, k_rot = apply_rope(q[..., :width], k[..., :width], cos, sin)
    return torch.cat((q_rot, q[..., width:]), dim=-1), torch.cat((k_rot, k[..., width:]), dim=-1)


def _update_cache(cache, k, v, layer_idx, cos, sin, kwargs):
    # Older transformers (the GPU image's 5.17 may be one) hand the cache position to static caches this way.
    position = kwargs.get("cache_position")
    if position is None:
        return cache.update(k, v, layer_idx)
    return cache.update(k, v, layer_idx, {"sin": sin, "cos": cos, "cache_position": position})


def _attention_function(implementation: str, eager):
    if hasattr(ALL_ATTENTION_FUNCTIONS, "get_interface"):
        return ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager)
    return eager if implementation == "eager" else ALL_ATTENTION_FUNCTIONS[implementation]


def _sliding_window(attn: nn.Module):
    """The window transformers passes: the module's own (per layer type) or else the config's (Mistral, Phi-3)."""
    if hasattr(attn, "sliding_window"):
        return attn.sliding_window
    return getattr(attn.config, "sliding_window", None)


# ---------------------------------------------------------------- MLP

def _mlp_forward(mlp: nn.Module, family: Family):
    config = mlp.config if hasattr(mlp, "config") else None
    name = (getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", None)) if config else None
    activation = _ACTIVATIONS.get(name)
    if activation is None:
        log.info("slothbook: %s uses activation %r, which has no kernel; its MLP is left as it is",
                 type(mlp).__name__, name)
        return None
    glu = _GLU[activation]

    def forward(self, x):
        if family.fused_gate_up:  # Phi-3: gate and up are the two halves of one projection
            gate, up = _project(self.gate_up_proj, x).chunk(2, dim=-1)
            return _project(self.down_proj, glu(gate, up))
        modules = (self.gate_proj, self.up_proj, self.down_proj)
        parts = [_fused(m, x) for m in modules]
        if all(p is not None and p[1] is None for p in parts):
            return lora_mlp(x, *(projection for projection, _ in parts), activation=activation)
        return _project(self.down_proj, glu(_project(self.gate_proj, x), _project(self.up_proj, x)))

    return forward


# ---------------------------------------------------------------- loss

def _causal_lm_forward(model: nn.Module):
    original = model.forward

    @functools.wraps(type(model).forward)
    def forward(self, *args, labels=None, **kwargs):
        head = self.get_output_embeddings()
        if labels is None or not self.training or len(args) > 1 or not _plain_head(head):
            return original(*args, **kwargs) if labels is None else original(*args, labels=labels, **kwargs)
        num_items = kwargs.pop("num_items_in_batch", None)
        shift_labels = kwargs.pop("shift_labels", None)
        ignore_index = kwargs.pop("ignore_index", -100)
        return_dict = kwargs.pop("return_dict", None)
        kwargs.pop("logits_to_keep", None)  # every position is scored
        outputs = self.model(*args, **kwargs)
        hidden = outputs.last_hidden_state.to(head.weight.device)
        if shift_labels is None:  # as transformers does: position i predicts label i + 1, the last predicts nothing
            shift_labels = nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
        loss = fused_linear_cross_entropy(
            hidden, head.weight, shift_labels.to(hidden.device), head.bias, ignore_index=ignore_index,
            softcap=getattr(self.config, "final_logit_softcapping", None),
            reduction="mean" if num_items is None else "sum",
        )
        if num_items is not None:  # gradient accumulation: the Trainer counts the tokens of all micro-batches
            loss = loss / (num_items.to(loss.device) if torch.is_tensor(num_items) else num_items)
        return _causal_lm_output(loss, outputs, return_dict)

    return forward


def _plain_head(head) -> bool:
    """The fused loss reads the head's weight directly: only an ordinary Linear (not LoRA, not quantized)."""
    return type(head) is nn.Linear and head.weight.is_floating_point() and not _sharded(head.weight)


def _sharded(weight) -> bool:
    """An FSDP2 shard (a DTensor): its module is not gathered now, so the kernels leave it to the module's own forward,
    whose FSDP hook gathers it (LoRA layers are FSDP units of their own)."""
    return _DTensor is not None and isinstance(weight, _DTensor)


# The outputs' cache field: `cache` from transformers 5.24 on, `past_key_values` before (the GPU image's 5.17).
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def _causal_lm_output(loss, outputs, return_dict):
    out = CausalLMOutputWithPast(loss=loss, logits=None, hidden_states=outputs.hidden_states,
                                 attentions=outputs.attentions, **{_CACHE_FIELD: getattr(outputs, _CACHE_FIELD)})
    return out.to_tuple() if return_dict is False else out
