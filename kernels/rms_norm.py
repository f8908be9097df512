"""RMSNorm: y = x / sqrt(mean(x^2) + eps) * (weight + offset), over the last dim.

``offset=0.0`` is the Llama form; ``offset=1.0`` is Gemma's ``(1 + weight)`` form. Math runs in fp32 for any
input dtype and the output has the input's dtype. Two casting conventions match the two Hugging Face families:

- ``"llama"`` (LlamaRMSNorm, Qwen, Mistral...): the normalised row is rounded to the input dtype, then multiplied
  by the weight, then rounded again, as ``weight * hidden.to(input_dtype)`` does.
- ``"gemma"`` (GemmaRMSNorm): the whole product is computed in fp32 and rounded once.

``casting=None`` picks ``"gemma"`` when ``offset != 0`` and ``"llama"`` otherwise. Unlike HF with an fp32 weight
and a bf16 input (which returns fp32), the output is always in the input dtype.

Forward saves the input, the weight and one fp32 inverse RMS per row. Backward is a persistent grid (one
program per SM by default): each program walks a contiguous run of rows in tiles of ``block_rows`` rows, writes dx
per row, prefetches the next tile while it reduces the current one, and accumulates its share of the weight
gradient in fp32 registers. Each program writes its partial once into a ``[programs, hidden]`` fp32 buffer, which a
second small kernel sums per column, in a fixed order, and writes in the weight's dtype: no atomics, deterministic.
The weight gradient is skipped when the weight needs no gradient (frozen norms in LoRA training).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import nn

from slothbook.errors import ConfigError

from ._utils import (
    as_rows,
    check_device,
    check_out,
    num_programs_for,
    row_block_size,
    row_launch_config,
    writable_rows,
)

__all__ = [
    "BackwardSchedule",
    "RMSNorm",
    "RMSNormFunction",
    "backward_schedule",
    "rms_norm",
    "rms_norm_backward",
    "rms_norm_forward",
    "rms_norm_reference",
]

_CASTINGS = ("llama", "gemma")
_DW_REDUCTIONS = ("triton", "torch")

# Backward launch shape: elements per tile (rows x padded hidden); see backward_schedule.
_BWD_TILE = 4096
# The dW partial reduction: columns per program (one 128-byte line of fp32 per partial row) and partial rows per step.
_SUM_COLS = 32
_SUM_ROWS = 64


@triton.jit
def _rms_norm_fwd_kernel(
    X, x_row_stride,
    W,
    Y, y_row_stride,
    RSTD,
    n_cols, eps, offset,
    CAST_BEFORE_WEIGHT: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_SIZE)
    mask = cols < n_cols

    x_raw = tl.load(X + row * x_row_stride + cols, mask=mask, other=0.0)
    x = x_raw.to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) + offset

    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    tl.store(RSTD + row, rstd)

    x_hat = x * rstd
    if CAST_BEFORE_WEIGHT:
        x_hat = x_hat.to(x_raw.dtype).to(tl.float32)
    y = x_hat * w
    tl.store(Y + row * y_row_stride + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_bwd_kernel(
    DY, dy_row_stride,
    X, x_row_stride,
    W,
    RSTD,
    DX, dx_row_stride,
    DW_PARTIAL,
    n_rows, n_cols, offset, rows_per_program,
    COMPUTE_DW: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    # dx = rstd * (dy*w - x_hat * mean(dy*w*x_hat)),  dw = sum_rows(dy * x_hat),  w = weight + offset
    # One persistent program walks a contiguous run of rows, BLOCK_ROWS at a time. The next tile of x and dy is
    # loaded (in their own dtype) before the current one is reduced, so the memory system always has a tile in
    # flight instead of idling while the program reduces.
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_SIZE)
    col_mask = cols[None, :] < n_cols
    w = tl.load(W + cols, mask=cols < n_cols, other=0.0).to(tl.float32)[None, :] + offset
    dw_acc = tl.zeros([BLOCK_ROWS, BLOCK_SIZE], dtype=tl.float32)

    # int64 bounds make the row indices int64, so row offsets cannot overflow on long inputs.
    row_start = pid.to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    rows = row_start + tl.arange(0, BLOCK_ROWS)
    mask = (rows[:, None] < row_end) & col_mask
    x_next = tl.load(X + rows[:, None] * x_row_stride + cols[None, :], mask=mask, other=0.0)
    dy_next = tl.load(DY + rows[:, None] * dy_row_stride + cols[None, :], mask=mask, other=0.0)
    for start in range(row_start, row_end, BLOCK_ROWS):
        rows = start + tl.arange(0, BLOCK_ROWS)
        row_mask = rows < row_end
        mask = row_mask[:, None] & col_mask
        x = x_next.to(tl.float32)
        dy = dy_next.to(tl.float32)
        ahead = rows + BLOCK_ROWS
        ahead_mask = (ahead[:, None] < row_end) & col_mask
        x_next = tl.load(X + ahead[:, None] * x_row_stride + cols[None, :], mask=ahead_mask, other=0.0)
        dy_next = tl.load(DY + ahead[:, None] * dy_row_stride + cols[None, :], mask=ahead_mask, other=0.0)

        rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)[:, None]
        x_hat = x * rstd
        dyw = dy * w
        c = tl.sum(dyw * x_hat, axis=1)[:, None] / n_cols
        dx = (dyw - x_hat * c) * rstd
        tl.store(DX + rows[:, None] * dx_row_stride + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        if COMPUTE_DW:
            dw_acc += dy * x_hat  # masked rows and columns add zeros

    if COMPUTE_DW:
        tl.store(DW_PARTIAL + pid * n_cols + cols, tl.sum(dw_acc, axis=0), mask=cols < n_cols)


@triton.jit
def _sum_partials_kernel(
    PARTIAL, OUT,
    n_partials, n_cols,
    BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # One strip of BLOCK_N columns per program: sums the programs' fp32 partials of those columns in a fixed
    # order and writes them in the output's dtype (the sum and the cast of dw in one launch).
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols[None, :] < n_cols
    acc = tl.zeros([BLOCK_P, BLOCK_N], dtype=tl.float32)
    for start in range(0, n_partials, BLOCK_P):
        rows = start + tl.arange(0, BLOCK_P)
        mask = (rows[:, None] < n_partials) & col_mask
        acc += tl.load(PARTIAL + rows[:, None] * n_cols + cols[None, :], mask=mask, other=0.0)
    tl.store(OUT + cols, tl.sum(acc, axis=0).to(OUT.dtype.element_ty), mask=cols < n_cols)


@dataclass(frozen=True)
class BackwardSchedule:
    """How the backward spreads rows over persistent programs (see ``backward_schedule``)."""

    programs_per_sm: int
    block_rows: int
    num_warps: int


def backward_schedule(
    n_cols: int, programs_per_sm: int | None = None, block_rows: int | None = None, num_warps: int | None = None
) -> BackwardSchedule:
    """The backward's launch shape for rows of ``n_cols``.

    Tiles of at least ``_BWD_TILE`` elements: one row for hidden sizes of 4096 and up, several short rows at a
    time below that (a 576-wide row alone would leave most lanes of a program idle). One warp per 512 elements
    (16 per thread: x, dy, the prefetched next tile and the dW accumulator fit in about 114 registers on sm_90).
    Two programs per SM: timed by CUDA graph replay on an H100 at 8192x4096 bf16, 0.073 ms against 0.085 with one
    (Liger's launch) and 0.082 with four (benchmarks/results/kernels.json): a second resident program hides the
    latency of the next tile's loads that one program's prefetch alone does not.
    Each argument given overrides its part of the choice (for tests and A/B timing in benchmarks/kernel_ops.py).
    """
    block = row_block_size(n_cols)
    block_rows = max(1, _BWD_TILE // block) if block_rows is None else block_rows
    if block_rows < 1 or block_rows & (block_rows - 1):
        raise ConfigError(f"block_rows must be a power of two, got {block_rows}")
    tile = block_rows * block
    if programs_per_sm is None:
        programs_per_sm = 2
    if programs_per_sm < 1:
        raise ConfigError(f"programs_per_sm must be at least 1, got {programs_per_sm}")
    if num_warps is None:
        num_warps = min(32, max(4, tile // 512))
    if num_warps not in (1, 2, 4, 8, 16, 32):
        raise ConfigError(f"num_warps must be a power of two from 1 to 32, got {num_warps}")
    return BackwardSchedule(programs_per_sm, block_rows, num_warps)


def _resolve_casting(casting: str | None, offset: float) -> str:
    if casting is None:
        return "gemma" if offset != 0.0 else "llama"
    if casting not in _CASTINGS:
        raise ConfigError(f"casting must be one of {_CASTINGS} or None, got {casting!r}")
    return casting


def _check_shapes(x: torch.Tensor, weight: torch.Tensor) -> None:
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ConfigError(
            f"weight must be 1-D with {x.shape[-1]} elements (the last dim of x), got shape {tuple(weight.shape)}"
        )


def rms_norm_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    offset: float = 0.0,
    casting: str | None = None,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel. Returns ``(y, rstd)``: y shaped like x, rstd fp32 ``[rows]``.

    ``out`` (optional) receives y; it must match x in shape, dtype and device. No autograd here.
    """
    _check_shapes(x, weight)
    check_device(x, weight)
    casting = _resolve_casting(casting, offset)
    x_rows = as_rows(x)
    n_rows, n_cols = x_rows.shape

    if out is None:
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
    check_out(out, x)
    y_rows = writable_rows(out)
    y_work = y_rows if y_rows is not None else torch.empty_like(x_rows)

    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    if n_rows > 0:
        block, num_warps = row_launch_config(n_cols)
        _rms_norm_fwd_kernel[(n_rows,)](
            x_rows, x_rows.stride(0),
            weight.contiguous(),
            y_work, y_work.stride(0),
            rstd,
            n_cols, float(eps), float(offset),
            CAST_BEFORE_WEIGHT=casting == "llama",
            BLOCK_SIZE=block,
            num_warps=num_warps,
        )
    if y_rows is None:
        out.copy_(y_work.view(out.shape))
    return out, rstd


def rms_norm_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    rstd: torch.Tensor,
    offset: float = 0.0,
    compute_dw: bool = True,
    dx: torch.Tensor | None = None,
    *,
    programs_per_sm: int | None = None,
    block_rows: int | None = None,
    num_warps: int | None = None,
    dw_reduction: str = "triton",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch the backward kernel. Returns ``(dx, dw)``; dw is None when ``compute_dw`` is False.

    ``dx`` (optional) receives the input gradient; it may be ``dy`` itself (each row is read before it is
    written). dw has the weight's dtype, reduced in fp32. ``programs_per_sm``, ``block_rows`` (a power of
    two) and ``num_warps`` override ``backward_schedule``'s choice; ``dw_reduction="torch"`` sums the
    per-program partials with ``torch.sum`` and a cast (two launches) instead of the one-launch Triton
    reduction. For tests and A/B timing.
    """
    if dw_reduction not in _DW_REDUCTIONS:
        raise ConfigError(f"dw_reduction must be one of {_DW_REDUCTIONS}, got {dw_reduction!r}")
    _check_shapes(x, weight)
    check_device(dy, x, weight)
    x_rows = as_rows(x)
    dy_rows = as_rows(dy)
    n_rows, n_cols = x_rows.shape

    if dx is None:
        dx = torch.empty_like(x, memory_format=torch.contiguous_format)
    check_out(dx, x, "dx")
    dx_rows = writable_rows(dx)
    dx_work = dx_rows if dx_rows is not None else torch.empty_like(x_rows)

    sched = backward_schedule(n_cols, programs_per_sm, block_rows, num_warps)
    n_programs = num_programs_for(x.device, n_rows, per_sm=sched.programs_per_sm)
    # Whole tiles per program, so a tile never straddles two programs' row ranges.
    rows_per_program = triton.cdiv(triton.cdiv(n_rows, n_programs), sched.block_rows) * sched.block_rows
    if n_rows:
        n_programs = triton.cdiv(n_rows, rows_per_program)
    dw_partial = (
        torch.empty((n_programs, n_cols), dtype=torch.float32, device=x.device) if compute_dw else rstd
    )
    if n_rows > 0:
        _rms_norm_bwd_kernel[(n_programs,)](
            dy_rows, dy_rows.stride(0),
            x_rows, x_rows.stride(0),
            weight.contiguous(),
            rstd,
            dx_work, dx_work.stride(0),
            dw_partial,
            n_rows, n_cols, float(offset), rows_per_program,
            COMPUTE_DW=compute_dw,
            BLOCK_ROWS=sched.block_rows,
            BLOCK_SIZE=row_block_size(n_cols),
            num_warps=sched.num_warps,
        )
    if dx_rows is None:
        dx.copy_(dx_work.view(dx.shape))
    if not compute_dw:
        return dx, None
    if n_rows == 0:
        return dx, torch.zeros_like(weight)
    return dx, _sum_partials(dw_partial, weight.dtype, dw_reduction)


def _sum_partials(partial: torch.Tensor, dtype: torch.dtype, how: str) -> torch.Tensor:
    """Column sums of the ``[programs, hidden]`` fp32 partials, in ``dtype``."""
    if how == "torch":
        return partial.sum(dim=0).to(dtype)
    n_partials, n_cols = partial.shape
    out = torch.empty(n_cols, dtype=dtype, device=partial.device)
    _sum_partials_kernel[(triton.cdiv(n_cols, _SUM_COLS),)](
        partial, out, n_partials, n_cols, BLOCK_P=_SUM_ROWS, BLOCK_N=_SUM_COLS, num_warps=4,
    )
    return out


class RMSNormFunction(torch.autograd.Function):
    """Autograd wrapper: saves x, weight and the fp32 inverse RMS; no normalised copy of x is kept."""

    @staticmethod
    def forward(ctx, x, weight, eps, offset, casting):
        y, rstd = rms_norm_forward(x, weight, eps, offset, casting)
        ctx.save_for_backward(x, weight, rstd)
        ctx.offset = offset
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        dx, dw = rms_norm_backward(dy, x, weight, rstd, ctx.offset, compute_dw=ctx.needs_input_grad[1])
        return (dx if ctx.needs_input_grad[0] else None), dw, None, None, None


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    offset: float = 0.0,
    *,
    casting: str | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """RMSNorm over the last dim of ``x`` (any leading shape), autograd-aware.

    ``out`` writes the result into a preallocated buffer; it is only allowed when no gradient is needed
    (like torch's ``out=`` arguments).
    """
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    if out is not None:
        if needs_grad:
            raise ConfigError("rms_norm(out=...) does not support autograd; call it under torch.no_grad()")
        return rms_norm_forward(x, weight, eps, offset, casting, out=out)[0]
    if needs_grad:
        return RMSNormFunction.apply(x, weight, eps, offset, _resolve_casting(casting, offset))
    return rms_norm_forward(x, weight, eps, offset, casting)[0]


def rms_norm_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    offset: float = 0.0,
    casting: str | None = None,
) -> torch.Tensor:
    """Plain-torch RMSNorm following the HF formulas (math in fp32, or float64 for float64 inputs)."""
    casting = _resolve_casting(casting, offset)
    input_dtype = x.dtype
    h = x.to(torch.promote_types(x.dtype, torch.float32))
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if casting == "llama":
        return ((weight + offset) * h.to(input_dtype)).to(input_dtype)
    return (h * (weight.to(h.dtype) + offset)).to(input_dtype)


class RMSNorm(nn.Module):
    """Drop-in RMSNorm module backed by the Triton kernel.

    The weight starts at ``1 - offset`` so the effective scale ``weight + offset`` starts at one (ones for
    Llama, zeros for Gemma, as the HF modules initialise them).
    """

    def __init__(
        self,
        hidden_size: int,
        eps: float = 1e-6,
        offset: float = 0.0,
        casting: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.weight = nn.Parameter(torch.full((hidden_size,), 1.0 - offset, device=device, dtype=dtype))
        self.eps = eps
        self.offset = offset
        self.casting = _resolve_casting(casting, offset)

    @classmethod
    def from_hf(cls, module: nn.Module, offset: float = 0.0, casting: str | None = None) -> RMSNorm:
        """Wrap an existing HF norm module, SHARING its weight Parameter (no copy).

        ``eps`` is read from ``variance_epsilon`` (Llama family) or ``eps`` (Gemma family). The offset cannot be
        read from the module: pass ``offset=1.0`` for Gemma-style norms.
        """
        eps = getattr(module, "variance_epsilon", None)
        if eps is None:
            eps = getattr(module, "eps", None)
        if eps is None:
            raise ConfigError(f"{type(module).__name__} has neither `variance_epsilon` nor `eps`; pass a norm module")
        weight = module.weight
        norm = cls(weight.shape[0], eps=float(eps), offset=offset, casting=casting, device="meta")
        norm.weight = weight
        return norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, self.offset, casting=self.casting)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}, offset={self.offset}, casting={self.casting!r}"
