"""Rotary position embedding for q and k in one launch, in place.

Layout is Hugging Face's after the head transpose: q ``[batch, n_heads, seq, head_dim]`` and
k ``[batch, n_kv_heads, seq, head_dim]``, any head counts (GQA/MQA), any strides with a unit stride along
head_dim (the transposed views HF makes are used as they are; anything else goes through a contiguous copy that is
copied back). cos/sin are what the HF rotary module returns, ``[batch or 1, seq, head_dim]`` (or ``[seq, head_dim]``),
in the rotate_half convention::

    out[:half] = x[:half] * cos[:half] - x[half:] * sin[:half]
    out[half:] = x[half:] * cos[half:] + x[:half] * sin[half:]

so every scaling scheme (linear, dynamic, llama3, yarn...) and packed-sequence position ids come in through
cos/sin. One program handles ``tokens_per_program`` (batch, position) tokens (one by default): it loads their
cos/sin once and rotates every q and k head with them, as one [tokens, q heads, head_dim/2] tile and one
[tokens, k heads, head_dim/2] tile per half, all four loaded before anything is stored. Math is fp32.

Backward applies the transposed rotation (x1*cos1 + x2*sin2, x2*cos2 - x1*sin1), which is the inverse rotation
(rotate with -sin) when the halves of cos/sin are equal, as in every HF model, and the exact gradient otherwise.
No gradient flows to cos/sin (HF computes them under no_grad).

In-place contract of ``apply_rope``: q and k are overwritten and returned (as new autograd views of the same
memory when autograd records the op). Autograd's version counters are bumped, so any other op that saved the
un-rotated q or k for its backward raises a clear "modified by an inplace operation" error instead of computing a
wrong gradient. Leaf tensors that require grad cannot be changed in place: they are cloned first. The backward pass
rotates the incoming gradient in place when it is a dense tensor, and a copy of it otherwise.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import nn
from torch.autograd.graph import increment_version

from slothbook.errors import ConfigError

from ._utils import check_device

__all__ = ["RoPEFunction", "RotaryEmbedding", "apply_rope", "rope_", "rope_reference"]

# Elements of one half-head tile (heads x half head_dim) a program rotates at a time: 32 heads of 128 fit.
_TILE_ELEMENTS = 4096


@triton.jit
def _head_tile(head_stride, h0, n_heads, half, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """Offsets of the first halves of heads h0..h0+BLOCK_H of one token, and their mask."""
    heads = h0 + tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    offs = heads[:, None] * head_stride + d[None, :]
    mask = (heads[:, None] < n_heads) & (d[None, :] < half)
    return offs, mask


@triton.jit
def _rotate_tile(base, t_mask, head_stride, h0, n_heads, half, cos1, cos2, sin1, sin2,
                 BACKWARD: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """Load both halves of heads h0..h0+BLOCK_H of every token (``base``: one pointer per token); return the
    rotated halves, their pointers and mask, for the caller to store once every load has been issued."""
    offs, mask = _head_tile(head_stride, h0, n_heads, half, BLOCK_H, BLOCK_D)
    ptrs = base[:, None, None] + offs[None, :, :]
    mask = t_mask[:, None, None] & mask[None, :, :]
    x1 = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(ptrs + half, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:  # the transposed rotation
        y1 = x1 * cos1 + x2 * sin2
        y2 = x2 * cos2 - x1 * sin1
    else:
        y1 = x1 * cos1 - x2 * sin1
        y2 = x2 * cos2 + x1 * sin2
    return y1, y2, ptrs, mask


@triton.jit
def _rope_kernel(
    Q, q_stride_b, q_stride_h, q_stride_s,
    K, k_stride_b, k_stride_h, k_stride_s,
    COS, cos_stride_b, cos_stride_s,
    SIN, sin_stride_b, sin_stride_s,
    n_tokens, seq_len, n_q_heads, n_k_heads, half, n_tiles,
    BACKWARD: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    tokens = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = tokens < n_tokens
    b = tokens // seq_len
    s = tokens % seq_len

    # cos/sin of each token, loaded once and broadcast over its heads: [tokens, 1, half].
    d = tl.arange(0, BLOCK_D)
    dmask = t_mask[:, None] & (d[None, :] < half)
    cos_row = COS + (b * cos_stride_b + s * cos_stride_s)[:, None] + d[None, :]
    sin_row = SIN + (b * sin_stride_b + s * sin_stride_s)[:, None] + d[None, :]
    cos1 = tl.load(cos_row, mask=dmask, other=0.0).to(tl.float32)[:, None, :]
    cos2 = tl.load(cos_row + half, mask=dmask, other=0.0).to(tl.float32)[:, None, :]
    sin1 = tl.load(sin_row, mask=dmask, other=0.0).to(tl.float32)[:, None, :]
    sin2 = tl.load(sin_row + half, mask=dmask, other=0.0).to(tl.float32)[:, None, :]

    q_base = Q + b * q_stride_b + s * q_stride_s
    k_base = K + b * k_stride_b + s * k_stride_s
    # One tile of q heads and one of k heads per step (one step for every common head count): all four half-head
    # loads are issued before the first store, so both tensors' reads are in flight together.
    for t in range(0, n_tiles):
        q1, q2, q_ptrs, q_mask = _rotate_tile(q_base, t_mask, q_stride_h, t * BLOCK_HQ, n_q_heads, half,
                                              cos1, cos2, sin1, sin2, BACKWARD, BLOCK_HQ, BLOCK_D)
        k1, k2, k_ptrs, k_mask = _rotate_tile(k_base, t_mask, k_stride_h, t * BLOCK_HK, n_k_heads, half,
                                              cos1, cos2, sin1, sin2, BACKWARD, BLOCK_HK, BLOCK_D)
        tl.store(q_ptrs, q1.to(Q.dtype.element_ty), mask=q_mask)
        tl.store(q_ptrs + half, q2.to(Q.dtype.element_ty), mask=q_mask)
        tl.store(k_ptrs, k1.to(K.dtype.element_ty), mask=k_mask)
        tl.store(k_ptrs + half, k2.to(K.dtype.element_ty), mask=k_mask)


def _as_table(t: torch.Tensor, batch: int, seq: int, head_dim: int, name: str) -> torch.Tensor:
    """cos/sin as ``[batch or 1, seq, head_dim]`` with a unit last stride."""
    if t.dim() == 2:
        t = t.unsqueeze(0)
    if t.dim() != 3 or t.shape[0] not in (1, batch) or t.shape[1] != seq or t.shape[2] != head_dim:
        raise ConfigError(
            f"{name} must be [batch or 1, seq, head_dim] = [{batch} or 1, {seq}, {head_dim}], got {tuple(t.shape)}"
        )
    return t if t.stride(-1) == 1 else t.contiguous()


def _check_qk(q: torch.Tensor, k: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4:
        raise ConfigError(
            f"q and k must be 4-D [batch, heads, seq, head_dim], got {tuple(q.shape)} and {tuple(k.shape)}"
        )
    if q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ConfigError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must share batch, seq and head_dim")
    if q.shape[-1] % 2:
        raise ConfigError(f"head_dim must be even, got {q.shape[-1]}")


def _check_schedule(tokens_per_program: int, num_warps: int | None) -> None:
    if tokens_per_program < 1 or tokens_per_program & (tokens_per_program - 1):
        raise ConfigError(f"tokens_per_program must be a power of two, got {tokens_per_program}")
    if num_warps is not None and num_warps not in (1, 2, 4, 8, 16, 32):
        raise ConfigError(f"num_warps must be a power of two from 1 to 32, got {num_warps}")


def _launch(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool,
            tokens_per_program: int, num_warps: int | None) -> None:
    """Rotate q and k in place; both must have a unit stride along head_dim."""
    batch, n_q_heads, seq, head_dim = q.shape
    n_k_heads = k.shape[1]
    cos = _as_table(cos, batch, seq, head_dim, "cos")
    sin = _as_table(sin, batch, seq, head_dim, "sin")
    check_device(q, k, cos, sin)
    if batch * seq == 0:
        return
    half = head_dim // 2
    block_d = triton.next_power_of_2(half)
    max_heads = max(1, _TILE_ELEMENTS // block_d)
    # q and k get their own tile heights: 8 kv heads do not pad out to the 32 rows of the q tile.
    block_hq = min(triton.next_power_of_2(n_q_heads), max_heads)
    block_hk = min(triton.next_power_of_2(n_k_heads), max_heads)
    n_tiles = max(triton.cdiv(n_q_heads, block_hq), triton.cdiv(n_k_heads, block_hk))
    if num_warps is None:
        # About 1024 elements per warp and half-tile: 4 warps for one Llama token (32 + 8 heads of 64).
        elements = (block_hq + block_hk) * block_d * tokens_per_program
        num_warps = min(16, max(4, triton.next_power_of_2(elements) // 1024))
    # A batch of 1 in cos/sin is shared by every sequence (stride 0).
    cos_stride_b = cos.stride(0) if cos.shape[0] > 1 else 0
    sin_stride_b = sin.stride(0) if sin.shape[0] > 1 else 0
    _rope_kernel[(triton.cdiv(batch * seq, tokens_per_program),)](
        q, q.stride(0), q.stride(1), q.stride(2),
        k, k.stride(0), k.stride(1), k.stride(2),
        cos, cos_stride_b, cos.stride(1),
        sin, sin_stride_b, sin.stride(1),
        batch * seq, seq, n_q_heads, n_k_heads, half, n_tiles,
        BACKWARD=backward,
        BLOCK_T=tokens_per_program,
        BLOCK_HQ=block_hq,
        BLOCK_HK=block_hk,
        BLOCK_D=block_d,
        num_warps=num_warps,
    )


def rope_(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool = False, *,
          tokens_per_program: int = 1, num_warps: int | None = None):
    """Rotate q and k in place (no autograd), whatever their strides; returns (q, k).

    ``backward=True`` applies the transposed rotation used for gradients. ``tokens_per_program`` (a power of
    two) and ``num_warps`` set the launch shape, for tests and A/B timing; the defaults are one token per program
    and warps from the tile size.
    """
    _check_qk(q, k)
    _check_schedule(tokens_per_program, num_warps)
    q_work = q if q.stride(-1) == 1 else q.contiguous()
    k_work = k if k.stride(-1) == 1 else k.contiguous()
    _launch(q_work, k_work, cos, sin, backward, tokens_per_program, num_warps)
    if q_work is not q:
        q.copy_(q_work)
    if k_work is not k:
        k.copy_(k_work)
    return q, k


def _writable_grad(g: torch.Tensor) -> torch.Tensor:
    """The gradient itself when it is a dense tensor we may overwrite, else a dense copy.

    Gradients can be expanded (stride 0) views, e.g. from ``sum()``; writing into those would alias elements.
    """
    if g.is_contiguous() or g.transpose(1, 2).is_contiguous():
        return g
    return g.contiguous()


def _extent(t: torch.Tensor) -> tuple[int, int]:
    """Byte range [start, end) that t's elements span."""
    span = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride())) + 1
    return t.data_ptr(), t.data_ptr() + span * t.element_size()


def _may_overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    (a0, a1), (b0, b1) = _extent(a), _extent(b)
    return a0 < b1 and b0 < a1


class RoPEFunction(torch.autograd.Function):
    """Autograd wrapper: rotates q and k in place, saves only cos and sin."""

    @staticmethod
    def forward(ctx, q, k, cos, sin, tokens_per_program=1, num_warps=None):
        rope_(q, k, cos, sin, tokens_per_program=tokens_per_program, num_warps=num_warps)
        # The kernel's writes are invisible to autograd; bump the version counters so that any other op that
        # saved the un-rotated values fails loudly in backward.
        increment_version(q)
        increment_version(k)
        ctx.save_for_backward(cos, sin)
        ctx.schedule = dict(tokens_per_program=tokens_per_program, num_warps=num_warps)
        return q, k

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        dq = _writable_grad(dq)
        dk = _writable_grad(dk)
        if _may_overlap(dq, dk):  # e.g. `(q + k).sum()` hands both inputs the same gradient tensor
            dk = dk.clone()
        rope_(dq, dk, cos, sin, backward=True, **ctx.schedule)
        return dq, dk, None, None, None, None


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *,
               tokens_per_program: int = 1, num_warps: int | None = None):
    """Apply rotary embeddings to q and k in place, in one launch; returns (q, k). Autograd-aware.

    Use the returned tensors afterwards: they hold the rotated values (and, when autograd records the op, the
    graph edge back to the un-rotated inputs). See the module docstring for the in-place contract.
    ``tokens_per_program`` and ``num_warps`` set the launch shape of forward and backward (see ``rope_``).
    """
    _check_qk(q, k)
    _check_schedule(tokens_per_program, num_warps)
    if not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)):
        return rope_(q, k, cos, sin, tokens_per_program=tokens_per_program, num_warps=num_warps)
    # A leaf that requires grad must keep its values (it is a parameter or a user input): rotate a copy.
    if q.is_leaf and q.requires_grad:
        q = q.clone()
    if k.is_leaf and k.requires_grad:
        k = k.clone()
    return RoPEFunction.apply(q, k, cos, sin, tokens_per_program, num_warps)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_reference(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Plain-torch RoPE (HF's apply_rotary_pos_emb with unsqueeze_dim=1); returns new (q, k)."""
    if cos.dim() == 2:
        cos, sin = cos.unsqueeze(0), sin.unsqueeze(0)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


class RotaryEmbedding(nn.Module):
    """Module form of ``apply_rope``: ``forward(q, k, cos, sin) -> (q, k)``, rotating in place."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        return apply_rope(q, k, cos, sin)
