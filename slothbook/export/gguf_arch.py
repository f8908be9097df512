"""What llama.cpp expects of each supported family: architecture name, hyperparameter keys, tensor names
and the few tensor transformations between the Hugging Face layout and llama.cpp's.

- Llama-architecture models (Llama, Mistral, SmolLM2): llama.cpp rotates adjacent pairs of q/k dimensions,
  transformers rotates the two halves of each head, so q_proj and k_proj rows are permuted per head.
- Gemma: transformers' RMSNorm multiplies by (1 + weight), llama.cpp's by weight: every norm gets +1.
- Tied embeddings: the output head is left out and llama.cpp reuses token_embd (Phi-3 always needs it).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import ExportError, UnsupportedArchitectureError
from ..models.families import family_of

_LLAMA_LAYER = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_QK_NORM = {"self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"}
# Gemma-2/3 wrap attention and MLP in pre and post norms; "post_attention_layernorm" is the post-attention one.
_GEMMA2_LAYER = {
    **_LLAMA_LAYER,
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
}
_PHI3_LAYER = {
    "input_layernorm": "attn_norm",
    "self_attn.qkv_proj": "attn_qkv",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_up_proj": "ffn_up",  # llama.cpp splits the fused gate|up itself
    "mlp.down_proj": "ffn_down",
}
_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
_LAYER_TENSOR = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)")


@dataclass(frozen=True)
class Arch:
    """One llama.cpp architecture.

    output: "optional" (left out when tied to the embedding), "never" (llama.cpp always reuses the
    embedding) or "always" (must be present, duplicated from the embedding when tied).
    """

    name: str
    layer_tensors: dict[str, str]
    rope_permute: bool = False
    norm_shift: float = 0.0
    output: str = "optional"
    extra_hparams: Callable | None = field(default=None, compare=False)


def _gemma2_hparams(writer, config) -> None:
    writer.add_attn_logit_softcapping(config.attn_logit_softcapping)
    writer.add_final_logit_softcapping(config.final_logit_softcapping)
    writer.add_sliding_window(config.sliding_window)


def _gemma3_hparams(writer, config) -> None:
    if getattr(config, "final_logit_softcapping", None):
        writer.add_final_logit_softcapping(config.final_logit_softcapping)
    layer_types = getattr(config, "layer_types", None) or []
    if getattr(config, "sliding_window", None) and any(t == "sliding_attention" for t in layer_types):
        writer.add_sliding_window(config.sliding_window)


def _phi3_hparams(writer, config) -> None:
    rope = rope_parameters(config)
    writer.add_rope_scaling_orig_ctx_len(rope.get("original_max_position_embeddings")
                                         or getattr(config, "original_max_position_embeddings", None)
                                         or config.max_position_embeddings)
    writer.add_sliding_window(getattr(config, "sliding_window", None) or 0)


ARCHS = {
    "llama": Arch("llama", _LLAMA_LAYER, rope_permute=True),
    "mistral": Arch("llama", _LLAMA_LAYER, rope_permute=True),  # llama.cpp runs Mistral as llama
    "qwen2": Arch("qwen2", _LLAMA_LAYER),
    "qwen3": Arch("qwen3", {**_LLAMA_LAYER, **_QK_NORM}),
    "gemma": Arch("gemma", _LLAMA_LAYER, norm_shift=1.0, output="never"),
    "gemma2": Arch("gemma2", _GEMMA2_LAYER, norm_shift=1.0, output="never", extra_hparams=_gemma2_hparams),
    "gemma3": Arch("gemma3", {**_GEMMA2_LAYER, **_QK_NORM}, norm_shift=1.0, extra_hparams=_gemma3_hparams),
    "phi3": Arch("phi3", _PHI3_LAYER, output="always", extra_hparams=_phi3_hparams),
}


def arch_of(config) -> Arch:
    family = family_of(config)
    if family.model_type not in ARCHS:
        raise UnsupportedArchitectureError(f"GGUF export does not support '{family.model_type}' yet. Supported: "
                                           f"{', '.join(sorted(ARCHS))}. Use save_pretrained_merged instead.")
    return ARCHS[family.model_type]


def rope_parameters(config) -> dict:
    """The rotary settings of the full-attention layers (Gemma-3 keeps one dict per attention type)."""
    params = getattr(config, "rope_parameters", None) or {}
    if params and all(isinstance(v, dict) for v in params.values()):
        params = params.get("full_attention") or next(iter(params.values()))
    params = dict(params)
    if "rope_theta" not in params and getattr(config, "rope_theta", None) is not None:
        params["rope_theta"] = config.rope_theta
    return params


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def rope_dims(config) -> int:
    rope = rope_parameters(config)
    factor = rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)) or 1.0
    return int(head_dim(config) * factor)


def write_hparams(writer, config, arch: Arch) -> None:
    """The architecture's hyperparameter keys from a transformers config."""
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_key_length(head_dim(config))
    writer.add_value_length(head_dim(config))
    writer.add_vocab_size(config.vocab_size)
    rope = rope_parameters(config)
    writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    writer.add_rope_dimension_count(rope_dims(config))
    _write_rope_scaling(writer, config, rope, arch)
    if arch.extra_hparams is not None:
        arch.extra_hparams(writer, config)


def _write_rope_scaling(writer, config, rope: dict, arch: Arch) -> None:
    import gguf

    kind = rope.get("rope_type") or rope.get("type") or "default"
    if kind == "default" or (arch.name == "phi3" and kind in ("longrope", "su")):
        return  # Phi-3's long-rope factors travel as tensors (extra_tensors)
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif kind == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(rope["factor"]))
        writer.add_rope_scaling_orig_ctx_len(int(rope.get("original_max_position_embeddings")
                                                 or config.max_position_embeddings / rope["factor"]))
    elif kind != "llama3":  # llama3 scaling travels as the rope_freqs tensor
        raise ExportError(f"RoPE scaling '{kind}' has no GGUF equivalent that slothbook writes. "
                          "Export with save_pretrained_merged instead.")


def extra_tensors(config, arch: Arch) -> list[tuple[str, torch.Tensor]]:
    """Tensors llama.cpp needs that the model does not hold: RoPE frequency factors."""
    rope = rope_parameters(config)
    kind = rope.get("rope_type") or rope.get("type")
    if kind == "llama3":
        return [("rope_freqs.weight", _llama3_rope_factors(rope, head_dim(config)))]
    if arch.name == "phi3" and kind in ("longrope", "su"):
        return [("rope_factors_long.weight", torch.tensor(rope["long_factor"], dtype=torch.float32)),
                ("rope_factors_short.weight", torch.tensor(rope["short_factor"], dtype=torch.float32))]
    return []


def _llama3_rope_factors(rope: dict, dim: int) -> torch.Tensor:
    """Llama-3.1's frequency-dependent RoPE stretch, as one divisor per rotary frequency."""
    base, factor = float(rope["rope_theta"]), float(rope["factor"])
    low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    old_ctx = float(rope.get("original_max_position_embeddings", 8192))
    factors = []
    for i in range(0, dim, 2):
        wavelen = 2 * math.pi * base ** (i / dim)
        if wavelen < old_ctx / high:
            factors.append(1.0)
        elif wavelen > old_ctx / low:
            factors.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            factors.append(1.0 / ((1 - smooth) / factor + smooth))
    return torch.tensor(factors, dtype=torch.float32)


def gguf_name(hf_name: str, arch: Arch) -> str:
    """The llama.cpp tensor name of a transformers state-dict name."""
    if hf_name in _GLOBAL:
        return _GLOBAL[hf_name]
    match = _LAYER_TENSOR.fullmatch(hf_name)
    if match and match.group(2) in arch.layer_tensors:
        return f"blk.{match.group(1)}.{arch.layer_tensors[match.group(2)]}.{match.group(3)}"
    raise ExportError(f"Tensor {hf_name} has no place in a GGUF '{arch.name}' model. Is this a modified "
                      "architecture? Export with save_pretrained_merged instead.")


def transform(gguf_tensor: str, arch: Arch, config) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The change a tensor needs between the transformers and llama.cpp layouts, or None."""
    if arch.rope_permute and re.search(r"\.attn_[qk]\.(weight|bias)$", gguf_tensor):
        heads = config.num_attention_heads if ".attn_q." in gguf_tensor else \
            (getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
        return lambda t: _halves_to_pairs(t, heads)
    if arch.norm_shift and gguf_tensor.endswith("norm.weight"):
        return lambda t: t + arch.norm_shift
    return None


def _halves_to_pairs(t: torch.Tensor, heads: int) -> torch.Tensor:
    """Reorder each head's rows from [x0..x(d/2-1), y0..] (rotate-half) to [x0, y0, x1, y1, ..] (pairs)."""
    return t.reshape(heads, 2, t.shape[0] // heads // 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)


def allowed_names(arch: Arch, n_layers: int) -> set[str]:
    """Every tensor name gguf-py declares for the architecture (a check against typos in the tables above)."""
    import gguf

    enum = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[arch.name]
    names = set()
    for kind in gguf.MODEL_TENSORS[enum]:
        pattern = gguf.TENSOR_NAMES[kind]
        for bid in range(n_layers) if "{bid}" in pattern else [None]:
            base = pattern.format(bid=bid)
            names.update({f"{base}.weight", f"{base}.bias"})
    return names


def as_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float32).contiguous().numpy()
