"""How many activation bytes a training step keeps, per token, for each checkpointing mode.

All figures are bytes per token (multiply by batch x sequence length). `a` is the activation dtype's size; LoRA
adapters are fp32 (PEFT keeps them so over a 16-bit base), so their inputs and intermediates are fp32.

The step's activation memory has three parts:
- held: what stays alive from forward to backward. Checkpointing off: every layer's saved tensors.
  Plain checkpointing: each layer's input. Offloaded: nothing on the device (the inputs wait in host memory).
  Plus the rotary cos/sin tables (shared by all layers) and what the head keeps for the loss.
- one layer's working set in backward: its recomputed saved tensors and the gradients flowing through it.
- the head's working set: the logits and their gradients (the whole [tokens x vocab] on transformers' path; one
  chunk with slothbook's fused linear cross-entropy).

Two implementations are modelled: "kernels" (slothbook's patched forwards: fused LoRA projections and MLP,
RMSNorm and RoPE kernels, fused linear cross-entropy) and "hf" (transformers' modules with PEFT's LoRA layers and
transformers' loss). The "hf" inventories were taken tensor by tensor from saved-tensor hooks; the transient terms
were fitted to exact CPU allocation tracking (see docs/profiler.md).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "qkv_proj")  # Phi-3 fuses q, k and v in qkv_proj
GATE_UP_TARGETS = ("gate_proj", "up_proj", "gate_up_proj")  # and gate and up in gate_up_proj
MLP_TARGETS = frozenset(GATE_UP_TARGETS + ("down_proj",))
TILED_MLP_CHUNK = 4096  # train/tiled_mlp.py's default, which offloaded checkpointing switches on
LORA_BYTES = 4  # PEFT's adapters are fp32 over a 16-bit base
IMPLEMENTATIONS = ("kernels", "hf")
CHECKPOINTING = ("offload", "plain", "off")
DEVICES = ("cuda", "cpu")


@dataclass(frozen=True)
class Shape:
    """The sizes of a decoder-only transformer that activation memory depends on."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @property
    def q(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv(self) -> int:
        return self.kv_heads * self.head_dim

    @classmethod
    def from_config(cls, config) -> Shape:
        text = getattr(config, "text_config", None) or config
        heads = text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        return cls(text.num_hidden_layers, text.hidden_size, text.intermediate_size, heads,
                   getattr(text, "num_key_value_heads", None) or heads, head_dim, text.vocab_size)


def _norm(s: Shape, a: int, impl: str) -> int:
    # transformers' RMSNorm upcasts its input to fp32 and saves that copy; the kernel saves the input as is.
    # Both keep one fp32 inverse rms per token.
    return (4 if impl == "hf" else a) * s.hidden + 4


def _lora_inputs(s: Shape, a: int, targets: frozenset, impl: str, groups) -> int:
    """Inputs the LoRA A matrices of `groups` ((names, input width) pairs) keep for their gradients."""
    if impl == "hf" and a != LORA_BYTES:
        # PEFT casts the input to the adapter's fp32 in every LoRA layer: one fp32 copy per targeted module.
        return sum(LORA_BYTES * width for names, width in groups for name in names if name in targets)
    # One saved input per group, shared by its adapters. o_proj's input is the attention output, which attention
    # saves anyway.
    return sum(a * width for names, width in groups if names != ("o_proj",) and any(n in targets for n in names))


@dataclass(frozen=True)
class LayerBytes:
    """Bytes per token of one decoder layer, the MLP's part apart (a tiled MLP holds it for one chunk only)."""

    other: int
    mlp: int

    @property
    def total(self) -> int:
        return self.other + self.mlp


def layer_saved(s: Shape, a: int, r: int, targets: frozenset, impl: str = "kernels") -> LayerBytes:
    """Bytes per token one decoder layer saves for backward when it is not checkpointed."""
    attention = a * (2 * s.q + 2 * s.kv) + 4 * s.heads  # q, k, v, output, log-sum-exp (flash/efficient SDPA)
    lora_mid = (LORA_BYTES if impl == "hf" else a) * r  # x A^T per adapter
    attention_lora = _lora_inputs(s, a, targets, impl, [(ATTENTION_TARGETS, s.hidden), (("o_proj",), s.q)])
    # The fused MLP recomputes act(gate) * up, down_proj's input, instead of saving it.
    mlp_groups = [(GATE_UP_TARGETS, s.hidden)] + ([(("down_proj",), s.intermediate)] if impl == "hf" else [])
    mlp_lora = _lora_inputs(s, a, targets, impl, mlp_groups)
    mlp_adapters = len(targets & MLP_TARGETS)
    # hf: gate and up outputs plus the activation's output; the fused MLP keeps gate and up and recomputes the rest.
    mlp = (3 if impl == "hf" else 2) * a * s.intermediate + mlp_lora + lora_mid * mlp_adapters
    other = 2 * _norm(s, a, impl) + attention + attention_lora + lora_mid * (len(targets) - mlp_adapters)
    return LayerBytes(other, mlp)


def layer_transient(s: Shape, a: int, impl: str, recompute: bool) -> LayerBytes:
    """Bytes per token that one layer's backward adds on top of its saved tensors (gradients in flight).

    kernels: the fused MLP's backward peaks at dh and the recomputed h beside gate and up (2 I), with the
    incoming gradient and dx (2 H); a recomputed layer also makes its output once (H).
    hf: fitted, see below.
    """
    if impl == "kernels":
        return LayerBytes(a * (3 if recompute else 2) * s.hidden, 2 * a * s.intermediate)
    per_i, per_h = HF_TRANSIENT[(recompute, 4 if a == 4 else 2)]
    return LayerBytes(round(a * per_h * s.hidden), round(a * per_i * s.intermediate))


# The "hf" backward working set, a * (c_i * intermediate + c_h * hidden) bytes per token, keyed by
# (recomputed, activation bytes). Least-squares fits to exact CPU allocation tracking of Llama-shaped layers
# (hidden 576/1152, intermediate 1536/3072, 1024 tokens, LoRA r=16 on all projections); the fp32 and bf16 cases
# differ because PEFT's fp32 adapter path adds fp32 copies and gradients to a bf16 layer.
HF_TRANSIENT = {
    (True, 4): (2.012, 0.007),
    (True, 2): (1.993, 5.982),
    (False, 4): (1.199, 1.459),
    (False, 2): (0.259, 6.073),
}


def default_ce_chunk(n_tokens: int, hidden: int, vocab: int) -> int:
    from slothbook.kernels.fused_linear_cross_entropy import default_chunk_size

    return min(n_tokens, default_chunk_size(n_tokens, hidden, vocab))


@dataclass(frozen=True)
class ActivationEstimate:
    held_after_forward: int  # what forward leaves alive on the device, the returned logits included
    peak: int  # the largest activation footprint of the step
    peak_where: str  # "head" (loss and logits) or "layer" (a decoder layer's backward)
    offloaded: int  # host bytes holding layer inputs (offloaded checkpointing)


def activation_estimate(s: Shape, n_tokens: int, a: int, r: int, targets, checkpointing: str,
                        impl: str = "kernels", grads: int = 0, quantized: bool = False) -> ActivationEstimate:
    """Activation bytes of one step over `n_tokens` tokens (batch x sequence length).

    quantized: NF4 base weights, dequantized one at a time for each matmul (the largest, intermediate x hidden,
    is part of a layer's working set).
    grads: the LoRA gradient bytes, which grow during backward: candidate peaks are compared with the gradients
    that exist at each. `peak` follows the profiler's convention: the step's peak less every named tensor,
    gradients counted in full (so it can be less than the activation bytes alive at the peak).
    """
    targets = frozenset(targets)
    saved = layer_saved(s, a, r, targets, impl)
    transient = layer_transient(s, a, impl, recompute=checkpointing != "off")
    per_saved, per_transient, chunk_bytes = saved.total, transient.total, 0
    if impl == "kernels" and checkpointing != "off":
        per_saved -= a * s.hidden  # the norm kernel saves the layer input itself: the checkpointed input
    if checkpointing == "offload" and n_tokens > TILED_MLP_CHUNK:
        # The tiled MLP keeps only its input, gives its output in one buffer and works one chunk at a time.
        per_saved = saved.other + a * s.hidden
        per_transient = transient.other + a * s.hidden
        chunk_bytes = TILED_MLP_CHUNK * (saved.mlp + transient.mlp)
    dense_weight = a * s.intermediate * s.hidden if quantized else 0
    shared = 2 * a * s.head_dim  # rotary cos and sin, computed once per forward
    if checkpointing == "off":
        per_layer, working = per_saved, n_tokens * per_transient  # a layer's saved tensors are held anyway
    elif checkpointing == "plain":
        per_layer, working = a * s.hidden, n_tokens * (per_saved + per_transient)
    else:  # offload: the recomputed layer's input and the prefetched one below it are on the device
        per_layer, working = 0, n_tokens * (per_saved + per_transient + 2 * a * s.hidden) + chunk_bytes

    if impl == "hf":
        # Final norm (fp32 copy of its input), the logits the model returns (a), their fp32 log-softmax (4),
        # the shifted labels (int64). In backward: log-softmax, its gradient and the logits' gradient, all fp32.
        head_held = 4 * s.hidden + 4 + a * s.vocab + 4 * s.vocab + 8
        head_peak = n_tokens * (4 * s.hidden + 4 + 12 * s.vocab + 8)
    else:
        # Final norm input, the hidden-state gradient the fused loss computes in forward; one chunk of logits.
        head_held = 2 * a * s.hidden + 4
        head_peak = n_tokens * (head_held + 4) + default_ce_chunk(n_tokens, s.hidden, s.vocab) * s.vocab * a

    held = n_tokens * (s.layers * per_layer + shared)
    at_head = held + head_peak  # backward's first node: no adapter gradient exists yet
    # Backward frees each layer's held tensors once past it while adapter gradients accumulate: the largest layer
    # moment is the top layer (everything held, no gradient) or the bottom one (one layer held, all gradients).
    top = held + working
    bottom = n_tokens * (per_layer + shared) + working + grads
    at_layer = max(top, bottom) + dense_weight
    where = "head" if at_head >= at_layer else "layer"
    offloaded = n_tokens * s.layers * a * s.hidden if checkpointing == "offload" else 0
    return ActivationEstimate(held + n_tokens * head_held, max(at_head, at_layer) - grads, where, offloaded)


# ---- what CUDA's runtime adds -------------------------------------------------------------------------------

# cuBLAS gets one workspace per (thread, stream) that runs a matmul, from PyTorch's caching allocator (so it is in
# memory_allocated) and kept for the life of the process. A training step uses two: forward runs on the caller's
# thread, backward (and the checkpointed recomputation) on autograd's device thread. cuBLASLt shares them.
CUBLAS_THREADS = 2
CUBLAS_LARGE = 4096 * 1024 * 8  # Hopper and Blackwell (compute capability 9, 10, 12)
CUBLAS_SMALL = 4096 * 1024 * 2 + 16 * 1024 * 8  # older GPUs


def cublas_workspace_bytes(capability: tuple[int, int] | None = None) -> int:
    """Bytes of one cuBLAS workspace: CUBLAS_WORKSPACE_CONFIG's ":KiB:count" pairs when set, else PyTorch's
    default for `capability` (the current GPU's; with no GPU visible, the larger Hopper size)."""
    config = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    pairs = re.findall(r":(\d+):(\d+)", config or "")
    if pairs:
        return sum(int(kib) * 1024 * int(count) for kib, count in pairs)
    if capability is None:
        capability = _current_capability()
    return CUBLAS_LARGE if capability is None or capability[0] in (9, 10, 12) else CUBLAS_SMALL


def _current_capability() -> tuple[int, int] | None:
    import torch

    return torch.cuda.get_device_capability() if torch.cuda.is_available() else None


def cuda_runtime_bytes(device: str) -> int:
    """Allocator bytes a CUDA training step holds that no tensor of the model or optimizer accounts for."""
    return CUBLAS_THREADS * cublas_workspace_bytes() if device == "cuda" else 0


def optimizer_step_transient(optimizer: str, lora_bytes: int, device: str) -> int:
    """Bytes the optimizer step allocates for itself beside the named tensors.

    torch's AdamW on CUDA defaults to its foreach implementation, which takes the square root of every second
    moment into new tensors at once (one more copy of the adapters); on the CPU it steps one parameter at a
    time. bitsandbytes' 8-bit AdamW and momentum-free SGD update in place.
    """
    return lora_bytes if optimizer == "adamw" and device == "cuda" else 0
