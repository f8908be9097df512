"""Gated linear units: SwiGLU ``silu(gate) * up`` and GeGLU ``gelu(gate) * up`` (tanh or exact gelu).

The forward is one fused elementwise pass. Autograd saves only ``gate`` and ``up``; the backward recomputes the
activation and its derivative from ``gate``:

    d_up   = dy * act(gate)
    d_gate = dy * up * act'(gate)

gate, up and the outputs may be row-strided views (e.g. the two halves of a fused ``gate_up`` projection): only the
last dim needs a unit stride. Math is fp32; outputs take gate's dtype.

Elementwise helpers for other Triton kernels (stable API): ``silu``, ``silu_grad``, ``gelu_tanh``,
``gelu_tanh_grad``, ``gelu_erf``, ``gelu_erf_grad`` (fp32 in, fp32 out) and ``apply_activation(x, ACT)`` /
``apply_activation_grad(x, ACT)`` dispatching on a constexpr ``ACT`` in (``ACT_SILU``, ``ACT_GELU_TANH``, ``ACT_GELU``);
``activation_id(name)`` maps "silu" / "gelu_tanh" / "gelu" to those ids. ``glu_forward`` and ``glu_backward``
launch the kernels without autograd and take output buffers, so a fused MLP can write gradients into the memory of
gate and up (``dgate=gate, dup=up`` is allowed: each element is read before it is written).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import nn

from slothbook.errors import ConfigError

from ._utils import as_rows, check_device, check_out, num_warps_for, writable_rows

__all__ = [
    "ACT_GELU",
    "ACT_GELU_TANH",
    "ACT_SILU",
    "GatedMLP",
    "GLUFunction",
    "activation_id",
    "apply_activation",
    "apply_activation_grad",
    "geglu",
    "geglu_reference",
    "gelu_erf",
    "gelu_erf_grad",
    "gelu_tanh",
    "gelu_tanh_grad",
    "glu_backward",
    "glu_forward",
    "glu_reference",
    "silu",
    "silu_grad",
    "swiglu",
    "swiglu_reference",
]

ACT_SILU = 0
ACT_GELU_TANH = 1
ACT_GELU = 2
_ACTIVATIONS = {"silu": ACT_SILU, "gelu_tanh": ACT_GELU_TANH, "gelu": ACT_GELU}

# Elements per program along a row; rows longer than this are split over several programs. 1024 elements and 4 warps
# (8 per thread: one 16-byte load per bf16 tensor) is also what torch.compile picks for these elementwise ops.
_MAX_BLOCK = 1024

# Constants are written as literals inside the jit functions (Triton only reads constexpr globals):
# sqrt(2/pi) = 0.7978845608028654, 1/sqrt(2) = 0.7071067811865476, 1/sqrt(2*pi) = 0.3989422804014327.


@triton.jit
def silu(x):
    return x * tl.sigmoid(x)


@triton.jit
def silu_grad(x):
    s = tl.sigmoid(x)
    return s * (1.0 + x * (1.0 - s))


@triton.jit
def gelu_tanh(x):
    # 0.5 * x * (1 + tanh(z)) == x * sigmoid(2z): no tanh intrinsic needed, and no cancellation for x << 0.
    z = 0.7978845608028654 * (x + 0.044715 * x * x * x)
    return x * tl.sigmoid(2.0 * z)


@triton.jit
def gelu_tanh_grad(x):
    z = 0.7978845608028654 * (x + 0.044715 * x * x * x)
    dz = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * x * x)
    s = tl.sigmoid(2.0 * z)
    return s + 2.0 * x * s * (1.0 - s) * dz


@triton.jit
def gelu_erf(x):
    return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))


@triton.jit
def gelu_erf_grad(x):
    cdf = 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476))
    pdf = tl.exp(-0.5 * x * x) * 0.3989422804014327
    return cdf + x * pdf


@triton.jit
def apply_activation(x, ACT: tl.constexpr):
    if ACT == 0:
        y = silu(x)
    elif ACT == 1:
        y = gelu_tanh(x)
    else:
        y = gelu_erf(x)
    return y


@triton.jit
def apply_activation_grad(x, ACT: tl.constexpr):
    if ACT == 0:
        y = silu_grad(x)
    elif ACT == 1:
        y = gelu_tanh_grad(x)
    else:
        y = gelu_erf_grad(x)
    return y


@triton.jit
def _block_of(n_col_blocks, BLOCK_SIZE: tl.constexpr):
    """(row, columns) of this program. Programs are numbered along a row first, so consecutive programs read
    consecutive memory (a grid of (rows, column blocks) would send neighbours one row stride apart)."""
    pid = tl.program_id(0).to(tl.int64)
    row = pid // n_col_blocks
    cols = (pid % n_col_blocks).to(tl.int32) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    return row, cols


@triton.jit
def _glu_fwd_kernel(
    G, g_row_stride,
    U, u_row_stride,
    Y, y_row_stride,
    n_cols, n_col_blocks,
    ACT: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    row, cols = _block_of(n_col_blocks, BLOCK_SIZE)
    mask = cols < n_cols
    g = tl.load(G + row * g_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * u_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    y = apply_activation(g, ACT) * u
    tl.store(Y + row * y_row_stride + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _glu_bwd_kernel(
    DY, dy_row_stride,
    G, g_row_stride,
    U, u_row_stride,
    DG, dg_row_stride,
    DU, du_row_stride,
    n_cols, n_col_blocks,
    ACT: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    row, cols = _block_of(n_col_blocks, BLOCK_SIZE)
    mask = cols < n_cols
    dy = tl.load(DY + row * dy_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + row * g_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * u_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    du = dy * apply_activation(g, ACT)
    dg = dy * u * apply_activation_grad(g, ACT)
    tl.store(DG + row * dg_row_stride + cols, dg.to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + row * du_row_stride + cols, du.to(DU.dtype.element_ty), mask=mask)


def activation_id(name: str) -> int:
    """``"silu"`` -> ACT_SILU, ``"gelu_tanh"`` -> ACT_GELU_TANH, ``"gelu"`` (exact, erf) -> ACT_GELU."""
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        raise ConfigError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {name!r}") from None


def _gelu_name(approximate: str) -> str:
    if approximate == "tanh":
        return "gelu_tanh"
    if approximate == "none":
        return "gelu"
    raise ConfigError(f'approximate must be "tanh" or "none", got {approximate!r}')


def _launch_shape(n_rows: int, n_cols: int) -> tuple[tuple[int], int, int]:
    """(grid, column blocks per row, block): one program per block of ``_MAX_BLOCK`` columns of one row."""
    block = min(triton.next_power_of_2(n_cols), _MAX_BLOCK)
    n_col_blocks = triton.cdiv(n_cols, block)
    return (n_rows * n_col_blocks,), n_col_blocks, block


class _Rows:
    """A row view to write into (``out`` itself when it has one, else a scratch copy to copy back)."""

    def __init__(self, out: torch.Tensor, like_rows: torch.Tensor):
        self.out = out
        self.view = writable_rows(out)
        self.work = self.view if self.view is not None else torch.empty_like(like_rows)

    def finish(self) -> torch.Tensor:
        if self.view is None:
            self.out.copy_(self.work.view(self.out.shape))
        return self.out


def _check_pair(gate: torch.Tensor, up: torch.Tensor) -> None:
    if gate.shape != up.shape:
        raise ConfigError(f"gate and up must have the same shape, got {tuple(gate.shape)} and {tuple(up.shape)}")
    check_device(gate, up)


def glu_forward(
    gate: torch.Tensor, up: torch.Tensor, activation: str = "silu", out: torch.Tensor | None = None
) -> torch.Tensor:
    """``act(gate) * up`` without autograd; ``out`` (optional) must match gate's shape, dtype and device."""
    _check_pair(gate, up)
    act = activation_id(activation)
    g_rows, u_rows = as_rows(gate), as_rows(up)
    if out is None:
        out = torch.empty_like(gate, memory_format=torch.contiguous_format)
    check_out(out, gate)
    y = _Rows(out, g_rows)
    n_rows, n_cols = g_rows.shape
    if out.numel():
        grid, n_col_blocks, block = _launch_shape(n_rows, n_cols)
        _glu_fwd_kernel[grid](
            g_rows, g_rows.stride(0),
            u_rows, u_rows.stride(0),
            y.work, y.work.stride(0),
            n_cols, n_col_blocks,
            ACT=act,
            BLOCK_SIZE=block,
            num_warps=num_warps_for(block),
        )
    return y.finish()


def glu_backward(
    dy: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor,
    activation: str = "silu",
    dgate: torch.Tensor | None = None,
    dup: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients ``(d_gate, d_up)`` of ``act(gate) * up``, recomputing the activation; no autograd.

    ``dgate``/``dup`` (optional) receive the results and may be ``gate``/``up`` themselves.
    """
    _check_pair(gate, up)
    check_device(dy)
    act = activation_id(activation)
    g_rows, u_rows, dy_rows = as_rows(gate), as_rows(up), as_rows(dy)
    if dgate is None:
        dgate = torch.empty_like(gate, memory_format=torch.contiguous_format)
    if dup is None:
        dup = torch.empty_like(up, memory_format=torch.contiguous_format)
    check_out(dgate, gate, "dgate")
    check_out(dup, up, "dup")
    dg, du = _Rows(dgate, g_rows), _Rows(dup, u_rows)
    n_rows, n_cols = g_rows.shape
    if gate.numel():
        grid, n_col_blocks, block = _launch_shape(n_rows, n_cols)
        _glu_bwd_kernel[grid](
            dy_rows, dy_rows.stride(0),
            g_rows, g_rows.stride(0),
            u_rows, u_rows.stride(0),
            dg.work, dg.work.stride(0),
            du.work, du.work.stride(0),
            n_cols, n_col_blocks,
            ACT=act,
            BLOCK_SIZE=block,
            num_warps=num_warps_for(block),
        )
    return dg.finish(), du.finish()


class GLUFunction(torch.autograd.Function):
    """Autograd wrapper: saves gate and up only, recomputes the activation in backward."""

    @staticmethod
    def forward(ctx, gate, up, activation):
        ctx.save_for_backward(gate, up)
        ctx.activation = activation
        return glu_forward(gate, up, activation)

    @staticmethod
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        dgate, dup = glu_backward(dy, gate, up, ctx.activation)
        return dgate, dup, None


def _glu(gate: torch.Tensor, up: torch.Tensor, activation: str, out: torch.Tensor | None) -> torch.Tensor:
    needs_grad = torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad)
    if needs_grad:
        if out is not None:
            raise ConfigError("out=... does not support autograd; call it under torch.no_grad()")
        activation_id(activation)  # validate before autograd records anything
        return GLUFunction.apply(gate, up, activation)
    return glu_forward(gate, up, activation, out=out)


def swiglu(gate: torch.Tensor, up: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """``silu(gate) * up``, autograd-aware. ``out`` is allowed only when no gradient is needed."""
    return _glu(gate, up, "silu", out)


def geglu(
    gate: torch.Tensor, up: torch.Tensor, approximate: str = "tanh", *, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``gelu(gate) * up`` with ``approximate="tanh"`` (gelu_pytorch_tanh) or ``"none"`` (exact erf gelu)."""
    return _glu(gate, up, _gelu_name(approximate), out)


def glu_reference(gate: torch.Tensor, up: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    """Plain-torch ``act(gate) * up`` computed in fp32 (float64 stays float64), cast to gate's dtype."""
    activation_id(activation)
    dtype = torch.promote_types(gate.dtype, torch.float32)
    g, u = gate.to(dtype), up.to(dtype)
    if activation == "silu":
        a = nn.functional.silu(g)
    else:
        a = nn.functional.gelu(g, approximate="tanh" if activation == "gelu_tanh" else "none")
    return (a * u).to(gate.dtype)


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return glu_reference(gate, up, "silu")


def geglu_reference(gate: torch.Tensor, up: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    return glu_reference(gate, up, _gelu_name(approximate))


class GatedMLP(nn.Module):
    """``down(act(gate(x)) * up(x))`` with the fused GLU kernel; the projections are any modules (LoRA-wrapped too).

    ``activation`` is "silu" (Llama, Mistral, Qwen), "gelu_tanh" (Gemma) or "gelu".
    """

    def __init__(self, gate_proj: nn.Module, up_proj: nn.Module, down_proj: nn.Module, activation: str = "silu"):
        super().__init__()
        activation_id(activation)
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj
        self.activation = activation

    @classmethod
    def from_hf(cls, mlp: nn.Module, activation: str = "silu") -> GatedMLP:
        """Reuse (not copy) the ``gate_proj``/``up_proj``/``down_proj`` submodules of an HF MLP."""
        return cls(mlp.gate_proj, mlp.up_proj, mlp.down_proj, activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(_glu(self.gate_proj(x), self.up_proj(x), self.activation, None))

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}"
