"""How many activation bytes a training step keeps, per token, for each checkpointing mode.

All figures are bytes per token (multiply by batch x sequence length). `a` is the activation dtype's size; LoRA
adapters are fp32 (PEFT keeps them so over a 16-bit base), so their inputs and intermediates are fp32.

The step's activation memory has three parts:
- held: what stays alive from forward to backward. Checkpointing off: every layer's saved tensors.
  Plain checkpointing: each layer's input. Offloaded: the inputs wait in host memory (on CUDA, the last one
  stays allocated until its copy is seen done).
  Auto: the kept layers' saved tensors, nothing for the offloaded ones.
  Plus the rotary cos/sin tables (shared by all layers) and what the head keeps for the loss.
- one layer's working set in backward: its recomputed saved tensors and the gradients flowing through it, at
  the larger of two moments: the MLP's backward (all saved tensors; with the MLP tiled, one chunk of them) and
  attention's (the MLP's tensors gone, SDPA's backward workspace there: what peaks at long context).
- the head's working set: the logits and their gradients (the whole [tokens x vocab] on transformers' path; one
  chunk with slothbook's fused linear cross-entropy).

The per-layer and head formulas (both implementations, "kernels" and "hf") are in train/activation_bytes.py,
shared with the plan of "auto" checkpointing (train/keep.py).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

# The per-layer and head formulas live in train/ (its plan of kept layers uses them); re-exported here.
from ..train.activation_bytes import (  # noqa: F401
    ATTENTION_TARGETS,
    GATE_UP_TARGETS,
    HF_TRANSIENT,
    LORA_BYTES,
    MLP_TARGETS,
    LayerBytes,
    Shape,
    attention_backward,
    default_ce_chunk,
    head_bytes,
    layer_saved,
    layer_transient,
)
from ..train.tiled_mlp import TILED_MLP_ABOVE, TILED_MLP_CHUNK

IMPLEMENTATIONS = ("kernels", "hf")
CHECKPOINTING = ("offload", "plain", "off", "auto")
DEVICES = ("cuda", "cpu")


@dataclass(frozen=True)
class ActivationEstimate:
    held_after_forward: int  # what forward leaves alive on the device, the returned logits included
    peak: int  # the largest activation footprint of the step
    peak_where: str  # "head" (loss and logits) or "layer" (a decoder layer's backward)
    offloaded: int  # host bytes holding layer inputs (offloaded checkpointing)


def activation_estimate(s: Shape, n_tokens: int, a: int, r: int, targets, checkpointing: str,
                        impl: str = "kernels", grads: int = 0, quantized: bool = False,
                        kept: int = 0, device: str = "cuda", context: int = 0) -> ActivationEstimate:
    """Activation bytes of one step over `n_tokens` tokens (batch x sequence length).

    quantized: NF4 base weights, dequantized one at a time for each matmul (the largest, intermediate x hidden,
    is part of a layer's working set).
    grads: the LoRA gradient bytes, which grow during backward: candidate peaks are compared with the gradients
    that exist at each. `peak` follows the profiler's convention: the step's peak less every named tensor,
    gradients counted in full (so it can be less than the activation bytes alive at the peak).
    kept: with checkpointing "auto", how many of the last layers keep their activations (train/keep.py's plan);
    the others are offloaded. "off" keeps every layer, "plain" and "offload" none.
    device: "cuda" copies offloaded inputs on a side stream (one stays allocated until its copy is seen done);
    on "cpu" the copies are synchronous.
    context: the sequence length the tokens come in (eager attention's scores grow with it; SDPA's do not exist).
    """
    targets = frozenset(targets)
    kept = s.layers if checkpointing == "off" else kept if checkpointing == "auto" else 0
    recomputed = s.layers - kept
    saved = layer_saved(s, a, r, targets, impl, context)
    shared = 2 * a * s.head_dim  # rotary cos and sin, computed once per forward
    head = head_bytes(s, a, n_tokens, impl)

    # A kept layer: its saved tensors are held from forward to backward, its backward adds the gradients in flight.
    kept_transient = n_tokens * layer_transient(s, a, impl, recompute=False).total
    # A recomputed layer: what it holds from forward to backward, and its working set while it is recomputed.
    transient = layer_transient(s, a, impl, recompute=True)
    per_saved, per_transient, chunk_bytes = saved.total, transient.total, 0
    if impl == "kernels":
        per_saved -= a * s.hidden  # the norm kernel saves the layer input itself: the checkpointed input
    offload = checkpointing in ("offload", "auto")
    if offload and n_tokens > TILED_MLP_ABOVE:
        # The tiled MLP keeps only its input, gives its output in one buffer and works one chunk at a time.
        per_saved = saved.other + a * s.hidden
        per_transient = transient.other + a * s.hidden
        chunk_bytes = TILED_MLP_CHUNK * (saved.mlp + transient.mlp)
    # Attention's backward comes after the MLP's, whose saved tensors are gone by then; with the MLP tiled, it is
    # where the layer peaks at long context. Only the norm's saved input (the checkpointed input) is not its own.
    attention_phase = (saved.other - (a * s.hidden if impl == "kernels" else 0)
                       + attention_backward(s, a, flash=device == "cuda" and sdpa_runs_flash(), context=context))
    # Offloading on CUDA: one more layer input stays allocated until the caching allocator sees that its copy to
    # the host (recorded on the side stream) has finished: measured after forward and in backward alike.
    in_flight = a * s.hidden if offload and recomputed and device == "cuda" else 0
    if offload:  # the recomputed layer's input and the prefetched one below it are on the device
        inputs = 2 * a * s.hidden + in_flight
        per_checkpointed = 0
        working = max(n_tokens * (per_saved + per_transient + inputs) + chunk_bytes,
                      n_tokens * (attention_phase + inputs))
    else:
        per_checkpointed = a * s.hidden
        working = n_tokens * max(per_saved + per_transient, attention_phase)

    held = n_tokens * (kept * saved.total + recomputed * per_checkpointed + shared + in_flight)
    at_head = held + head.peak  # backward's first node: no adapter gradient exists yet
    # Backward frees each layer's held tensors once past it while adapter gradients accumulate: the largest layer
    # moments are the top layer (everything held, no gradient) and the bottom one (one layer held, all gradients);
    # with kept layers above recomputed ones, the top recomputed layer no longer has the kept layers' tensors.
    moments = []
    if kept:
        moments.append(held + kept_transient)
        if not recomputed:
            moments.append(n_tokens * (saved.total + shared) + kept_transient + grads)
    if recomputed:
        moments.append(n_tokens * (recomputed * per_checkpointed + shared) + working)
        moments.append(n_tokens * (per_checkpointed + shared) + working + grads)
    at_layer = max(moments) + (a * s.intermediate * s.hidden if quantized else 0)
    where = "head" if at_head >= at_layer else "layer"
    offloaded = n_tokens * recomputed * a * s.hidden if offload else 0
    return ActivationEstimate(held + head.held, max(at_head, at_layer) - grads, where, offloaded)


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


def sdpa_runs_flash(capability: tuple[int, int] | None = None) -> bool:
    """Whether torch's SDPA runs the flash backend (Ampere and Ada, compute capability 8) rather than cuDNN's
    kernels (Hopper and newer; with no GPU visible, Hopper is assumed, as for cuBLAS). Older GPUs run the
    memory-efficient backend, whose backward is no larger than cuDNN's."""
    if capability is None:
        capability = _current_capability()
    return capability is not None and capability[0] == 8


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
