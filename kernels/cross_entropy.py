"""Cross-entropy over large vocabularies, with Gemma-2 logit soft-capping and an in-place gradient.

One program per token row walks the vocabulary in blocks of ``BLOCK_V`` columns and keeps an online
log-sum-exp (running max and rescaled sum), so any vocabulary size works (128256, 262144...) without
holding a row in registers. Logits may be bf16, fp16 or fp32; all math is fp32.

- ``ignore_index`` rows (default -100) give zero loss and zero gradient, and are never read.
- ``reduction="mean"`` divides by the number of non-ignored tokens (0 when every token is ignored,
  where torch would return NaN); ``"sum"`` does not divide (for callers that normalise themselves,
  e.g. by ``num_items_in_batch`` over gradient-accumulation steps).
- ``softcap``: Gemma-2 ``softcap * tanh(logits / softcap)`` is applied before the softmax, and its
  derivative ``1 - tanh^2`` in the gradient.
- Labels must be already shifted (``labels[i]`` is the target of ``logits[i]``). A label outside
  ``[0, V)`` that is not ``ignore_index`` makes the loss NaN instead of reading out of bounds.

Memory: no second ``[tokens, vocab]`` tensor. Forward reads the logits once and saves one fp32 log-sum-exp
per row; backward overwrites the logits buffer with the gradient and returns it. So after
``loss.backward()`` the logits tensor passed in holds the gradient: do not read it again, and do not
feed the same tensor to another op that saves it for its own backward. The loss is float32.

The kernel has three modes so the fused linear + cross-entropy can reuse it on each chunk of logits:
loss only (forward), gradient only from a saved log-sum-exp (backward), and loss plus gradient in one
launch (:func:`cross_entropy_rows` with ``grad_scale``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from slothbook.errors import ConfigError

from ._utils import as_rows, check_device, num_warps_for

__all__ = [
    "CrossEntropyFunction",
    "cross_entropy",
    "cross_entropy_grad_",
    "cross_entropy_reference",
    "cross_entropy_rows",
]

_REDUCTIONS = ("mean", "sum")

# Columns per step of the vocabulary loop: big enough to stream at full bandwidth, small enough to stay
# in registers with 16 warps.
MAX_BLOCK_V = 16384


@triton.jit
def _tanh(x):
    """tanh from exp (libdevice is unavailable in Triton's interpreter), accurate to a few fp32 ulp.

    Near zero ``(1 - e) / (1 + e)`` loses digits to cancellation, so a short odd series takes over
    below 0.2, where its first dropped term is under 1e-10 relative.
    """
    a = tl.abs(x)
    e = tl.exp(-2.0 * a)
    far = (1.0 - e) / (1.0 + e)
    a2 = a * a
    near = a * (1.0 + a2 * (-1.0 / 3.0 + a2 * (2.0 / 15.0 + a2 * (-17.0 / 315.0 + a2 * (
        62.0 / 2835.0 + a2 * (-1382.0 / 155925.0))))))
    t = tl.where(a < 0.2, near, far)
    return tl.where(x < 0, -t, t)


@triton.jit
def _cross_entropy_kernel(
    logits_ptr, logits_row_stride,
    labels_ptr, loss_ptr, lse_ptr, grad_scale_ptr,
    n_cols, ignore_index, softcap,
    HAS_SOFTCAP: tl.constexpr,
    COMPUTE_LSE: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * logits_row_stride
    label = tl.load(labels_ptr + row)

    if label == ignore_index:
        if COMPUTE_LSE:
            tl.store(loss_ptr + row, 0.0)
            tl.store(lse_ptr + row, 0.0)
        if COMPUTE_GRAD:
            for start in range(0, n_cols, BLOCK_V):
                cols = start + tl.arange(0, BLOCK_V)
                tl.store(row_ptr + cols, tl.zeros([BLOCK_V], dtype=tl.float32).to(logits_ptr.dtype.element_ty),
                         mask=cols < n_cols)
        return

    if COMPUTE_LSE:
        # Online log-sum-exp: m is the running max, d the sum of exp(z - m) so far.
        m = float("-inf")
        d = 0.0
        for start in range(0, n_cols, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            mask = cols < n_cols
            z = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_SOFTCAP:
                z = softcap * _tanh(z / softcap)
            z = tl.where(mask, z, float("-inf"))
            m_new = tl.maximum(m, tl.max(z, axis=0))
            d = d * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
            m = m_new
        lse = m + tl.log(d)
        label_ok = (label >= 0) & (label < n_cols)
        z_label = tl.load(row_ptr + label, mask=label_ok, other=float("nan")).to(tl.float32)
        if HAS_SOFTCAP:
            z_label = softcap * _tanh(z_label / softcap)
        tl.store(loss_ptr + row, lse - z_label)
        tl.store(lse_ptr + row, lse)
    else:
        lse = tl.load(lse_ptr + row)

    if COMPUTE_GRAD:
        # d loss / d z = softmax(z) - onehot(label); times dz/dx = 1 - tanh^2 under soft-capping.
        scale = tl.load(grad_scale_ptr).to(tl.float32)
        for start in range(0, n_cols, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            mask = cols < n_cols
            x = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_SOFTCAP:
                t = _tanh(x / softcap)
                p = tl.exp(softcap * t - lse)
                grad = tl.where(cols == label, p - 1.0, p) * (1.0 - t * t)
            else:
                p = tl.exp(x - lse)
                grad = tl.where(cols == label, p - 1.0, p)
            tl.store(row_ptr + cols, (grad * scale).to(logits_ptr.dtype.element_ty), mask=mask)


def _block_v(n_cols: int, block_size: int | None) -> int:
    if block_size is not None:
        if block_size <= 0 or block_size & (block_size - 1):
            raise ConfigError(f"block_size must be a power of two, got {block_size}")
        return block_size
    return min(triton.next_power_of_2(n_cols), MAX_BLOCK_V)


def _launch(logits, labels, loss, lse, grad_scale, ignore_index, softcap, compute_lse, compute_grad, block_size):
    n_rows, n_cols = logits.shape
    if n_rows == 0:
        return
    check_device(logits, labels)
    block = _block_v(n_cols, block_size)
    # Pointers a mode does not touch still need a tensor; lse is always a valid fp32 buffer.
    _cross_entropy_kernel[(n_rows,)](
        logits, logits.stride(0),
        labels, loss if loss is not None else lse, lse, grad_scale if grad_scale is not None else lse,
        n_cols, ignore_index, float(softcap) if softcap is not None else 1.0,
        HAS_SOFTCAP=softcap is not None,
        COMPUTE_LSE=compute_lse,
        COMPUTE_GRAD=compute_grad,
        BLOCK_V=block,
        num_warps=num_warps_for(block),
    )


def _check_inputs(logits: torch.Tensor, labels: torch.Tensor, softcap: float | None) -> None:
    if logits.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ConfigError(f"logits must be fp32, bf16 or fp16, got {logits.dtype}")
    if logits.shape[:-1] != labels.shape:
        raise ConfigError(f"labels of shape {tuple(labels.shape)} do not match logits of shape "
                          f"{tuple(logits.shape)}; pass labels already shifted, one per logits row")
    if softcap is not None and not softcap > 0:
        raise ConfigError(f"softcap must be positive or None, got {softcap}")


def _out_buffer(buf: torch.Tensor | None, n_rows: int, device: torch.device, name: str) -> torch.Tensor:
    if buf is None:
        return torch.empty(n_rows, dtype=torch.float32, device=device)
    if buf.shape != (n_rows,) or buf.dtype != torch.float32 or not buf.is_contiguous():
        raise ConfigError(f"{name} must be a contiguous float32 tensor of shape ({n_rows},)")
    return buf


def cross_entropy_rows(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    softcap: float | None = None,
    grad_scale: torch.Tensor | None = None,
    loss: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
    block_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row losses and log-sum-exps of 2-D ``logits [N, V]`` (unit column stride) and ``labels [N]``.

    With ``grad_scale`` (a one-element float32 tensor, e.g. ``1 / n_valid``), the same launch also
    overwrites ``logits`` with ``grad_scale * d(sum of row losses)/d logits``. ``loss`` and ``lse`` are
    optional float32 ``[N]`` output buffers. Returns ``(loss, lse)``; ignored rows hold 0 in both.
    """
    n_rows = logits.shape[0]
    loss = _out_buffer(loss, n_rows, logits.device, "loss")
    lse = _out_buffer(lse, n_rows, logits.device, "lse")
    _launch(logits, labels, loss, lse, grad_scale, ignore_index, softcap,
            compute_lse=True, compute_grad=grad_scale is not None, block_size=block_size)
    return loss, lse


def cross_entropy_grad_(
    logits: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    grad_scale: torch.Tensor,
    *,
    ignore_index: int = -100,
    softcap: float | None = None,
    block_size: int | None = None,
) -> torch.Tensor:
    """Overwrite ``logits [N, V]`` with ``grad_scale * d(sum of row losses)/d logits``, given each row's
    log-sum-exp from :func:`cross_entropy_rows`. Returns ``logits``."""
    _launch(logits, labels, None, lse, grad_scale, ignore_index, softcap,
            compute_lse=False, compute_grad=True, block_size=block_size)
    return logits


def _reduce(loss_rows: torch.Tensor, n_valid: torch.Tensor, reduction: str) -> torch.Tensor:
    total = loss_rows.sum()
    return total / n_valid.clamp(min=1) if reduction == "mean" else total


class CrossEntropyFunction(torch.autograd.Function):
    """Autograd wrapper: forward saves one log-sum-exp per row, backward writes the gradient into the logits."""

    @staticmethod
    def forward(ctx, logits, labels, ignore_index=-100, softcap=None, reduction="mean", block_size=None):
        shape = logits.shape
        rows = as_rows(logits)
        labels = labels.reshape(-1).contiguous()
        loss_rows, lse = cross_entropy_rows(rows, labels, ignore_index=ignore_index, softcap=softcap,
                                            block_size=block_size)
        n_valid = (labels != ignore_index).sum()
        ctx.save_for_backward(rows, labels, lse, n_valid)
        ctx.config = (shape, ignore_index, softcap, reduction, block_size)
        return _reduce(loss_rows, n_valid, reduction)

    @staticmethod
    def backward(ctx, grad_output):
        rows, labels, lse, n_valid = ctx.saved_tensors
        shape, ignore_index, softcap, reduction, block_size = ctx.config
        grad_scale = grad_output.reshape(1).float()
        if reduction == "mean":
            grad_scale = grad_scale / n_valid.clamp(min=1)
        cross_entropy_grad_(rows, labels, lse, grad_scale, ignore_index=ignore_index, softcap=softcap,
                            block_size=block_size)
        return rows.view(shape), None, None, None, None, None


def cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    softcap: float | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Cross-entropy of ``logits [..., V]`` against already-shifted ``labels [...]``; a float32 scalar.

    The backward pass writes the gradient into ``logits``' own memory (see the module docstring).
    """
    if reduction not in _REDUCTIONS:
        raise ConfigError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    _check_inputs(logits, labels, softcap)
    return CrossEntropyFunction.apply(logits, labels, ignore_index, softcap, reduction)


def cross_entropy_reference(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    softcap: float | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Plain-torch cross-entropy with the same conventions (fp32 math or wider, 0 when every label is ignored)."""
    z = logits.reshape(-1, logits.shape[-1])
    z = z.to(torch.promote_types(z.dtype, torch.float32))
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    labels = labels.reshape(-1)
    total = torch.nn.functional.cross_entropy(z, labels, ignore_index=ignore_index, reduction="sum")
    return _reduce(total, (labels != ignore_index).sum(), reduction)
