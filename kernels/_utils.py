"""Launch helpers shared by the kernels in slothbook.kernels.

Stable API (other kernel files import these):

- ``is_interpret()``: True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``).
- ``MAX_FUSED_SIZE``: the longest row one program may hold in registers.
- ``row_block_size(n_cols)``: next power of two >= ``n_cols``, checked against ``MAX_FUSED_SIZE``.
- ``num_warps_for(block_size)``: warps for a program that works on ``block_size`` elements at a time.
- ``row_launch_config(n_cols)``: ``(BLOCK_SIZE, num_warps)`` for a kernel that keeps one whole row in registers.
- ``num_programs_for(device, n_rows, per_sm=1)``: persistent programs for a row loop (``per_sm`` x SM count on a GPU).
- ``as_rows(x)``: a 2-D ``[rows, last_dim]`` view of ``x`` with unit stride along the last dim (copies only if needed).
- ``writable_rows(out)``: a ``[rows, last_dim]`` VIEW of ``out`` (unit last stride) or None when no such view exists.
- ``check_out(out, like, name)``: validates a caller-provided output buffer (same shape, dtype, device).
- ``check_device(*tensors)``: raises DeviceError for CPU tensors unless the interpreter is on.

Argument errors raise ``slothbook.errors.ConfigError`` (a ValueError).
"""

from __future__ import annotations

import os

import torch
import triton

from slothbook.errors import ConfigError, DeviceError

# 64K elements per row: past this a row no longer fits one program's registers (and no model needs it).
MAX_FUSED_SIZE = 65536

# Persistent-grid size used off the GPU (the interpreter runs programs one after another).
_CPU_PROGRAMS = 4


def is_interpret() -> bool:
    """Whether Triton is in interpret mode (kernels run as numpy on the CPU).

    Read from the environment on every call, as Triton does when a kernel is decorated, so a test
    harness that sets ``TRITON_INTERPRET=1`` before importing the kernels is seen here too.
    """
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def row_block_size(n_cols: int) -> int:
    """Next power of two >= ``n_cols``; raises if a row would not fit one program."""
    block = triton.next_power_of_2(n_cols)
    if block > MAX_FUSED_SIZE:
        raise ConfigError(f"row length {n_cols} exceeds the fused limit of {MAX_FUSED_SIZE} elements")
    return block


def num_warps_for(block_size: int) -> int:
    """More warps for wider blocks, so each thread keeps a bounded number of registers."""
    if block_size >= 32768:
        return 32
    if block_size >= 8192:
        return 16
    if block_size >= 2048:
        return 8
    return 4


def row_launch_config(n_cols: int) -> tuple[int, int]:
    """``(BLOCK_SIZE, num_warps)`` for a kernel that loads a whole row of ``n_cols`` elements at once."""
    block = row_block_size(n_cols)
    return block, num_warps_for(block)


def num_programs_for(device: torch.device, n_rows: int, per_sm: int = 1) -> int:
    """Programs for a persistent row loop: ``per_sm`` per SM on a GPU, a few in the interpreter, never more than
    rows."""
    if device.type == "cuda" and not is_interpret():
        n = per_sm * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        n = _CPU_PROGRAMS
    return max(1, min(n, n_rows))


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` as ``[rows, x.shape[-1]]`` with unit stride along the last dim.

    Rows may be strided (a slice of a wider tensor stays a view); the copy happens only when
    the last dim itself is strided or the leading dims cannot be merged.
    """
    rows = x.reshape(-1, x.shape[-1])
    if rows.shape[1] > 1 and rows.stride(1) != 1:
        rows = rows.contiguous()
    return rows


def writable_rows(out: torch.Tensor) -> torch.Tensor | None:
    """A ``[rows, last_dim]`` view sharing ``out``'s memory with unit last stride, or None if there is none."""
    try:
        rows = out.view(-1, out.shape[-1])
    except RuntimeError:
        return None
    if rows.shape[1] > 1 and rows.stride(1) != 1:
        return None
    return rows


def check_device(*tensors: torch.Tensor) -> None:
    """Triton needs CUDA tensors, or the interpreter (``TRITON_INTERPRET=1``) for CPU ones."""
    for t in tensors:
        if t.device.type != "cuda" and not is_interpret():
            raise DeviceError(
                f"slothbook kernels need CUDA tensors, got one on {t.device}. Move the model to a GPU, "
                "use the *_reference function of the op, or set TRITON_INTERPRET=1 before importing "
                "slothbook.kernels to run the kernels in Triton's (slow) CPU interpreter."
            )


def check_out(out: torch.Tensor, like: torch.Tensor, name: str = "out") -> None:
    """Raise ConfigError unless ``out`` can receive a result shaped, typed and placed like ``like``."""
    if out.shape != like.shape or out.dtype != like.dtype or out.device != like.device:
        raise ConfigError(
            f"{name} must have shape {tuple(like.shape)}, dtype {like.dtype} and device {like.device}; "
            f"got {tuple(out.shape)}, {out.dtype}, {out.device}"
        )
