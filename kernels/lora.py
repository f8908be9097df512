"""Fused LoRA projections: ``y = x W^T + s * (x A^T) B^T`` with a frozen, possibly 4-bit, base weight ``W``.

Three autograd Functions cover a decoder layer (QKV, O, and the gated MLP); all three are built from the
same four helpers below (``_project``, ``_times_b``, ``_grad_input``, ``_grad_lora``), which is also what
``lora_linear`` -- the single projection -- is made of.

Shapes: ``x [..., in]``, ``W [out, in]`` (a tensor for 16-bit LoRA or an ``NF4Weight`` for QLoRA),
``A [r, in]``, ``B [out, r]``, ``s`` a Python float (PEFT's ``lora_alpha / r``).

What the Functions do NOT cover (the models layer keeps PEFT's own forward for those modules):

- LoRA dropout > 0. Dropout would need the dropped ``x`` (or its mask) saved per projection; with
  dropout = 0 the LoRA input is ``x`` itself, which is already saved for the base weight's backward.
- A bias on the base layer. Llama/Mistral/Qwen3/Gemma projections have none; a model with biases
  takes PEFT's path.
- Training ``W``. The base weight is frozen: the Functions give gradients to ``x``, ``A`` and ``B``
  only, and a ``W`` that requires grad is refused.

Memory. The dequantized ``W`` is a temporary: forward dequantizes it, multiplies, and frees it;
backward dequantizes it again. Only the quantized weight (already resident as a model parameter) is
referenced from the autograd context, never saved as a new tensor.

Compute dtype is ``x``'s dtype (under ``torch.autocast``, the autocast dtype). ``A`` and ``B`` are
cast to it for the matmuls (a no-op when they already match) and their gradients are returned in
their own dtype, so fp32 adapter weights with bf16 activations work. Matmuls run on cuBLAS via
torch; Triton does the NF4 dequantization and the gated activation.
"""

from __future__ import annotations

from typing import NamedTuple, Union

import torch
from torch import Tensor

from slothbook.errors import ConfigError

from ._utils import as_rows
from .nf4 import NF4Weight, dequantize_nf4
from .swiglu import glu_backward, glu_forward, glu_reference

__all__ = [
    "LoRAProjection",
    "lora_linear",
    "lora_qkv",
    "lora_o",
    "lora_mlp",
    "ACTIVATIONS",
    "lora_linear_reference",
    "lora_qkv_reference",
    "lora_mlp_reference",
]

BaseWeight = Union[Tensor, NF4Weight]


class LoRAProjection(NamedTuple):
    """One LoRA-wrapped linear layer: frozen base ``weight`` [out, in], ``lora_a`` [r, in],
    ``lora_b`` [out, r] and the float ``scaling``. A plain ``(W, A, B, s)`` tuple converts to it."""

    weight: BaseWeight
    lora_a: Tensor
    lora_b: Tensor
    scaling: float


# --- shared building blocks (2-D inputs: [tokens, features]) -------------------------------------


def _base(weight: BaseWeight, dtype: torch.dtype) -> Tensor:
    """``W`` as a dense [out, in] tensor of ``dtype``: a temporary the caller drops after one matmul."""
    if isinstance(weight, NF4Weight):
        return dequantize_nf4(weight, dtype=dtype)
    return weight.to(dtype)  # no copy when it already has the dtype


def _project(x: Tensor, p: LoRAProjection, lead: tuple[int, ...] | None = None) -> tuple[Tensor, Tensor]:
    """``(x W^T + s (x A^T) B^T, x A^T)``; the second is the [tokens, r] tensor ``dB`` needs.

    With ``lead``, the first is allocated as ``[*lead, out]`` and written through a 2-D view: a
    Function's output must not be a view, or autograd forbids in-place ops on it (RoPE, for one).
    """
    xa = x @ p.lora_a.to(x.dtype).t()
    w = _base(p.weight, x.dtype)
    y = torch.empty(*(x.shape[:1] if lead is None else lead), w.shape[0], dtype=x.dtype, device=x.device)
    y2 = y.view(x.shape[0], w.shape[0])
    torch.mm(x, w.t(), out=y2)
    del w  # the dequantized W is gone before the next projection dequantizes its own
    y2.addmm_(xa, p.lora_b.to(x.dtype).t(), alpha=p.scaling)
    return y, xa


def _times_b(dy: Tensor, p: LoRAProjection) -> Tensor:
    """``dy B``: the [tokens, r] gradient that reaches ``x A^T``, before the scaling."""
    return dy @ p.lora_b.to(dy.dtype)


def _grad_input(dy: Tensor, dyb: Tensor, p: LoRAProjection, out: Tensor | None = None) -> Tensor:
    """``dy W + s (dy B) A``, accumulated into ``out`` when given (projections that share an input)."""
    w = _base(p.weight, dy.dtype)
    out = dy @ w if out is None else out.addmm_(dy, w)
    del w
    return out.addmm_(dyb, p.lora_a.to(dy.dtype), alpha=p.scaling)


def _grad_lora(dy: Tensor, dyb: Tensor, x: Tensor, xa: Tensor, p: LoRAProjection) -> tuple[Tensor, Tensor]:
    """``(dA, dB) = (s (dy B)^T x, s dy^T (x A^T))`` in the adapter weights' own dtype."""
    da = (dyb.t() @ x).mul_(p.scaling)
    db = (dy.t() @ xa).mul_(p.scaling)
    return da.to(p.lora_a.dtype), db.to(p.lora_b.dtype)


# --- autograd Functions -------------------------------------------------------------------------
# ``apply`` takes flat arguments, so a projection travels as four: weight, A, B, scaling.
# The weight and scaling are kept on ``ctx`` as plain references (the weight is the model's own
# parameter or quantized storage, so this costs nothing and keeps it out of saved-tensor hooks such
# as offloading); A and B go through ``save_for_backward`` so autograd checks their versions.


def _unflatten(flat: tuple) -> list[LoRAProjection]:
    return [LoRAProjection(*flat[i : i + 4]) for i in range(0, len(flat), 4)]


def _stash(ctx, projections: list[LoRAProjection]) -> list[Tensor]:
    """Keep weights and scalings on ``ctx``; return the adapter tensors for ``save_for_backward``."""
    ctx.bases = [(p.weight, p.scaling) for p in projections]
    return [t for p in projections for t in (p.lora_a, p.lora_b)]


def _unstash(ctx, adapters: tuple[Tensor, ...]) -> list[LoRAProjection]:
    return [LoRAProjection(w, adapters[2 * i], adapters[2 * i + 1], s) for i, (w, s) in enumerate(ctx.bases)]


def _grads_out(ctx, dx: Tensor | None, lora_grads: list[tuple[Tensor, Tensor]], n_before: int = 0) -> tuple:
    """``backward``'s return: dx, ``n_before`` Nones for non-tensor arguments, then
    (None, dA, dB, None) per projection -- None where autograd asked for no gradient."""
    grads: list = [dx] + [None] * n_before
    for da, db in lora_grads:
        k = len(grads)
        grads += [None, da if ctx.needs_input_grad[k + 1] else None, db if ctx.needs_input_grad[k + 2] else None, None]
    return tuple(grads)


class _SharedInputLoRA(torch.autograd.Function):
    """N LoRA projections of one input ``x``: N = 1 for ``lora_linear`` / ``lora_o``, 3 for ``lora_qkv``.

    Saves ``x`` (``in`` elements per token, shared by the N projections) and each ``x A_i^T`` (``r``
    elements per token): ``in + N r`` elements per token, e.g. 4096 + 48 for Llama-3.1-8B QKV at
    r = 16. No output, no dense weight. Backward dequantizes each ``W_i`` again, one at a time, so
    at most one dense weight is alive, and accumulates ``dx`` over the N projections in one buffer.
    """

    @staticmethod
    def forward(ctx, x: Tensor, *flat):
        projections = _unflatten(flat)
        x2 = as_rows(x)
        outs, xas = [], []
        for p in projections:
            y, xa = _project(x2, p, lead=x.shape[:-1])
            outs.append(y)
            xas.append(xa)
        ctx.x_shape = x.shape
        ctx.save_for_backward(x2, *xas, *_stash(ctx, projections))
        return tuple(outs)

    @staticmethod
    def backward(ctx, *dys):
        n = len(ctx.bases)
        saved = ctx.saved_tensors  # read once: checkpointing's saved-tensor hooks allow one unpack per tensor
        x, xas, adapters = saved[0], saved[1 : 1 + n], saved[1 + n :]
        dx, lora_grads = None, []
        for p, xa, dy in zip(_unstash(ctx, adapters), xas, dys):
            dy = as_rows(dy)
            dyb = _times_b(dy, p)
            lora_grads.append(_grad_lora(dy, dyb, x, xa, p))
            if ctx.needs_input_grad[0]:
                dx = _grad_input(dy, dyb, p, out=dx)
        return _grads_out(ctx, None if dx is None else dx.view(ctx.x_shape), lora_grads)


class _LoRAMLP(torch.autograd.Function):
    """``down(act(gate(x)) * up(x))`` with all three projections LoRA-wrapped.

    Saves ``x`` (hidden ``H``), the pre-activation ``gate`` and ``up`` (intermediate ``I`` each) and
    the three ``[tokens, r]`` LoRA intermediates: ``H + 2 I + 3 r`` elements per token (Llama-3.1-8B,
    r = 16: 4096 + 28672 + 48 = 64.1 KiB per token in bf16).

    Trade-off: ``h = act(gate) * up`` is NOT saved. Backward needs it only for the down projection's
    ``dA``, and recomputes it with one elementwise kernel that reads ``gate`` and ``up``; saving it
    would cost another ``I`` elements per token (28 KiB in bf16, +44%). Saving only ``x`` and
    recomputing ``gate`` and ``up`` too would save another ``2 I`` but cost two more large GEMMs and
    two NF4 dequantizations per backward; gradient checkpointing already recomputes the whole layer
    once, so that is not worth it.

    Backward writes the activation's gradients over the saved ``gate`` and ``up`` (no longer needed
    by then), so it peaks at four ``[tokens, I]`` tensors (gate, up, dh, h) rather than five. The
    price: this node's backward runs once; a second ``backward(retain_graph=True)`` through it
    raises autograd's "modified by an inplace operation" error instead of giving wrong gradients.
    """

    @staticmethod
    def forward(ctx, x: Tensor, activation: str, *flat):
        gate_p, up_p, down_p = _unflatten(flat)
        x2 = as_rows(x)
        gate, xa_gate = _project(x2, gate_p)
        up, xa_up = _project(x2, up_p)
        h = glu_forward(gate, up, _ACTIVATIONS[activation])
        out, ha = _project(h, down_p, lead=x.shape[:-1])
        del h
        ctx.x_shape, ctx.activation = x.shape, activation
        ctx.save_for_backward(x2, gate, up, xa_gate, xa_up, ha, *_stash(ctx, [gate_p, up_p, down_p]))
        return out

    @staticmethod
    def backward(ctx, dout: Tensor):
        x, gate, up, xa_gate, xa_up, ha, *adapters = ctx.saved_tensors
        gate_p, up_p, down_p = _unstash(ctx, adapters)
        dout = as_rows(dout)
        doutb = _times_b(dout, down_p)
        dh = _grad_input(dout, doutb, down_p)
        h = glu_forward(gate, up, _ACTIVATIONS[ctx.activation])  # recomputed, see the docstring
        lora_grads = [None, None, _grad_lora(dout, doutb, h, ha, down_p)]
        del h
        # The activation's gradients overwrite gate and up, which are not needed after this. The
        # Triton kernel writes through raw pointers, so tell autograd the saved tensors changed.
        dgate, dup = glu_backward(dh, gate, up, _ACTIVATIONS[ctx.activation], dgate=gate, dup=up)
        for t in (gate, up):
            torch.autograd.graph.increment_version(t)
        del dh
        dx = None
        for i, (p, dy, xa) in enumerate(((gate_p, dgate, xa_gate), (up_p, dup, xa_up))):
            dyb = _times_b(dy, p)
            lora_grads[i] = _grad_lora(dy, dyb, x, xa, p)
            if ctx.needs_input_grad[0]:
                dx = _grad_input(dy, dyb, p, out=dx)
        return _grads_out(ctx, None if dx is None else dx.view(ctx.x_shape), lora_grads, n_before=1)


# --- activations ----------------------------------------------------------------------------------

# lora_mlp's names -> the names of kernels/swiglu.py.
_ACTIVATIONS = {"swiglu": "silu", "geglu_tanh": "gelu_tanh", "geglu": "gelu"}
ACTIVATIONS = tuple(_ACTIVATIONS)


# --- public API -----------------------------------------------------------------------------------

ProjectionLike = Union[LoRAProjection, tuple]


def _checked(p: ProjectionLike, in_features: int) -> LoRAProjection:
    p = LoRAProjection(*p)
    if isinstance(p.weight, Tensor) and p.weight.requires_grad:
        raise ConfigError(
            "the base weight of a fused LoRA projection must be frozen (requires_grad=False); "
            "to train it, leave the module on PEFT's own forward"
        )
    r = p.lora_a.shape[0]
    if p.lora_a.shape != (r, in_features) or p.lora_b.ndim != 2 or p.lora_b.shape[1] != r:
        raise ConfigError(
            f"LoRA shapes do not fit an input of {in_features} features: A is {tuple(p.lora_a.shape)} "
            f"(want [r, {in_features}]), B is {tuple(p.lora_b.shape)} (want [out, r])"
        )
    return p._replace(scaling=float(p.scaling))


def _apply(fn, x: Tensor, projections: list[LoRAProjection], *extra):
    """Run ``fn`` in ``x``'s dtype; under autocast, in the autocast dtype (autocast is then turned
    off inside so every matmul of forward and backward sees the same dtypes)."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        x = x.to(torch.get_autocast_dtype(device_type))
    with torch.autocast(device_type, enabled=False):
        return fn.apply(x, *extra, *(t for p in projections for t in p))


def lora_linear(x: Tensor, weight: BaseWeight, lora_a: Tensor, lora_b: Tensor, scaling: float) -> Tensor:
    """``x W^T + s (x A^T) B^T`` for ``x [..., in]``; returns ``[..., out]``. Gradients reach x, A, B."""
    (y,) = _apply(_SharedInputLoRA, x, [_checked((weight, lora_a, lora_b, scaling), x.shape[-1])])
    return y


def lora_o(x: Tensor, o: ProjectionLike) -> Tensor:
    """The attention output projection ``o = (W, A, B, s)``; one ``lora_linear``."""
    return lora_linear(x, *o)


def lora_qkv(x: Tensor, q: ProjectionLike, k: ProjectionLike, v: ProjectionLike) -> tuple[Tensor, Tensor, Tensor]:
    """``(q, k, v)`` projections of one ``x``, each ``(W, A, B, s)``; k and v may be narrower (GQA)."""
    return _apply(_SharedInputLoRA, x, [_checked(p, x.shape[-1]) for p in (q, k, v)])


def lora_mlp(
    x: Tensor, gate: ProjectionLike, up: ProjectionLike, down: ProjectionLike, activation: str = "swiglu"
) -> Tensor:
    """``down(act(gate(x)) * up(x))``; ``activation`` is "swiglu" (Llama, Mistral, Qwen), "geglu_tanh"
    (Gemma's gelu_pytorch_tanh) or "geglu" (exact erf GELU)."""
    if activation not in _ACTIVATIONS:
        raise ConfigError(f"unknown activation {activation!r}; choose one of {', '.join(ACTIVATIONS)}")
    gate, up = _checked(gate, x.shape[-1]), _checked(up, x.shape[-1])
    down = _checked(down, gate.lora_b.shape[0])
    return _apply(_LoRAMLP, x, [gate, up, down], activation)


# --- plain-torch references (dense W: dequantize an NF4 weight first) ---------------------------


def lora_linear_reference(x: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor, scaling: float) -> Tensor:
    return x @ weight.t() + scaling * ((x @ lora_a.t()) @ lora_b.t())


def lora_qkv_reference(x: Tensor, q: tuple, k: tuple, v: tuple) -> tuple[Tensor, Tensor, Tensor]:
    return tuple(lora_linear_reference(x, *p) for p in (q, k, v))


def lora_mlp_reference(x: Tensor, gate: tuple, up: tuple, down: tuple, activation: str = "swiglu") -> Tensor:
    h = glu_reference(lora_linear_reference(x, *gate), lora_linear_reference(x, *up), _ACTIVATIONS[activation])
    return lora_linear_reference(h, *down)
