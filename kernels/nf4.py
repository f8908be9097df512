"""NF4 dequantization of bitsandbytes 4-bit weights, in one Triton kernel.

bitsandbytes stores a 4-bit weight as packed bytes (two codes per byte, the first element in the
high nibble), one fp32 ``absmax`` per ``blocksize`` elements and a 16-entry NF4 table. With double
quantization ("compress_statistics") the absmax values are themselves 8-bit codes: the real absmax
of block ``b`` is ``nested_code[absmax[b]] * nested_absmax[b // nested_blocksize] + offset``.

The kernel reproduces bitsandbytes' fp32 arithmetic step by step (multiply, then add the offset,
then multiply by the NF4 value, then round once to the output dtype), so its output is
bit-identical to ``bitsandbytes.functional.dequantize_4bit``. Nothing here imports bitsandbytes:
:class:`NF4Weight` holds the raw tensors, and :func:`nf4_weight_from_quant_state` reads them from
a bitsandbytes ``QuantState`` by attribute names only.

Public API (used by ``kernels/lora.py`` and ``slothbook/models``; keep it stable):

- ``NF4Weight``: the raw fields of one quantized weight.
- ``dequantize_nf4(w, out=None, dtype=None) -> Tensor``: the Triton kernel.
- ``dequantize(w) -> Tensor``: a plain tensor is returned as is, an ``NF4Weight`` is dequantized.
- ``dequantize_nf4_reference(w, dtype=None) -> Tensor``: the same result in plain torch.
- ``nf4_weight_from_quant_state(data, quant_state) -> NF4Weight``: duck-typed converter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from slothbook.errors import ConfigError

from ._utils import check_device

# Packed bytes per program: 2048 output elements, a few KiB of loads and stores per program.
_BLOCK_BYTES = 1024

# No fp fusion: bitsandbytes multiplies and then adds the offset in two fp32 roundings; an FMA would
# round once and change the last bit of some absmax values.
_LAUNCH_OPTIONS = {"num_warps": 4, "enable_fp_fusion": False}

_OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@dataclass(frozen=True)
class NF4Weight:
    """A bitsandbytes NF4 weight as raw tensors (all on the same device).

    data:             packed codes, ``ceil(numel / 2)`` bytes in any shape (bitsandbytes uses
                      ``[ceil(numel / 2), 1]``); any dtype (``quant_storage``), read as uint8.
    absmax:           one scale per ``blocksize`` elements: float32, or uint8 codes when nested.
    code:             the 16-entry float32 NF4 table.
    shape, dtype:     the original weight's shape and dtype (the default output dtype).
    blocksize:        elements per absmax block (bitsandbytes: 32 .. 4096, 64 by default).
    nested_absmax:    float32, one per ``nested_blocksize`` absmax codes (nested only).
    nested_code:      float32 256-entry table that decodes the uint8 absmax (nested only).
    nested_blocksize: absmax codes per ``nested_absmax`` entry (bitsandbytes uses 256).
    offset:           float32 scalar added back to every decoded absmax (nested only).
    """

    data: torch.Tensor
    absmax: torch.Tensor
    code: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int
    nested_absmax: torch.Tensor | None = None
    nested_code: torch.Tensor | None = None
    nested_blocksize: int = 256
    offset: torch.Tensor | None = None

    @property
    def nested(self) -> bool:
        return self.nested_absmax is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def device(self) -> torch.device:
        return self.data.device


def nf4_weight_from_quant_state(data: torch.Tensor, quant_state) -> NF4Weight:
    """Build an :class:`NF4Weight` from a bitsandbytes ``Params4bit`` tensor and its ``QuantState``.

    Reads attributes only (``absmax, code, blocksize, nested, state2, offset, shape, dtype,
    quant_type``), so this module never imports bitsandbytes. Typical call:
    ``nf4_weight_from_quant_state(linear.weight.data, linear.weight.quant_state)``.
    """
    quant_type = getattr(quant_state, "quant_type", "nf4")
    if quant_type != "nf4":
        raise ConfigError(f"only NF4 weights are supported, got quant_type={quant_type!r}; load with "
                          "bnb_4bit_quant_type='nf4'")
    nested = bool(getattr(quant_state, "nested", False))
    state2 = quant_state.state2 if nested else None
    return NF4Weight(
        data=data,
        absmax=quant_state.absmax,
        code=quant_state.code,
        shape=torch.Size(quant_state.shape),
        dtype=quant_state.dtype,
        blocksize=int(quant_state.blocksize),
        nested_absmax=state2.absmax if nested else None,
        nested_code=state2.code if nested else None,
        nested_blocksize=int(state2.blocksize) if nested else 256,
        offset=quant_state.offset if nested else None,
    )


@triton.jit
def _round_to_bf16(x):
    """fp32 -> bf16 rounding to nearest even with integer ops.

    Same result as the hardware conversion; spelled out because Triton's CPU interpreter truncates
    fp32 -> bf16 casts, and bit-exactness must hold there too.
    """
    bits = x.to(tl.uint32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _dequantize_nf4_kernel(
    data_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, out_ptr,
    n_elements, n_bytes,
    BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr,
    OUT_BF16: tl.constexpr, BLOCK_BYTES: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    byte = pid * BLOCK_BYTES + tl.arange(0, BLOCK_BYTES)
    in_range = byte < n_bytes
    packed = tl.load(data_ptr + byte, mask=in_range, other=0)
    # Both elements of a byte share one absmax block (blocksize is even).
    block = byte // (BLOCKSIZE // 2)
    if NESTED:
        qabs = tl.load(absmax_ptr + block, mask=in_range, other=0).to(tl.int32)
        scale = tl.load(nested_code_ptr + qabs) * tl.load(nested_absmax_ptr + block // NESTED_BLOCKSIZE,
                                                            mask=in_range, other=0.0)
        # A separate add, as bitsandbytes does it (_LAUNCH_OPTIONS disables fp fusion, so no FMA).
        scale = scale + tl.load(offset_ptr)
    else:
        scale = tl.load(absmax_ptr + block, mask=in_range, other=0.0)
    high = tl.load(code_ptr + (packed >> 4).to(tl.int32)) * scale
    low = tl.load(code_ptr + (packed & 0xF).to(tl.int32)) * scale
    values = tl.reshape(tl.join(high, low), (2 * BLOCK_BYTES,))
    if OUT_BF16:
        values = _round_to_bf16(values)
    else:
        values = values.to(out_ptr.dtype.element_ty)
    idx = pid * (2 * BLOCK_BYTES) + tl.arange(0, 2 * BLOCK_BYTES)
    tl.store(out_ptr + idx, values, mask=idx < n_elements)


def _check_weight(w: NF4Weight) -> None:
    if w.blocksize <= 0 or w.blocksize % 2:
        raise ConfigError(f"NF4 blocksize must be a positive even number, got {w.blocksize}")
    n_blocks = -(-w.numel // w.blocksize)
    if w.data.numel() * w.data.element_size() != (w.numel + 1) // 2:
        raise ConfigError(f"NF4 data holds {w.data.numel() * w.data.element_size()} bytes, "
                          f"expected {(w.numel + 1) // 2} for shape {tuple(w.shape)}")
    if w.absmax.numel() != n_blocks:
        raise ConfigError(f"NF4 absmax has {w.absmax.numel()} entries, expected {n_blocks}")
    if w.code.numel() != 16:
        raise ConfigError(f"NF4 code must have 16 entries, got {w.code.numel()}")
    if w.nested and (w.nested_code is None or w.offset is None):
        raise ConfigError("a nested NF4 weight needs nested_absmax, nested_code and offset")


def _as_bytes(data: torch.Tensor) -> torch.Tensor:
    data = data.contiguous()
    return data if data.dtype == torch.uint8 else data.view(torch.uint8)


def dequantize_nf4(w: NF4Weight, out: torch.Tensor | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Dequantize ``w`` with one Triton kernel; bit-identical to bitsandbytes' ``dequantize_4bit``.

    Returns a tensor of ``w.shape`` in ``dtype`` (default ``w.dtype``; bf16, fp16 or fp32). ``out``,
    when given, must be a contiguous tensor of that shape and dtype and is filled and returned
    (lets a caller reuse one buffer across layers).
    """
    _check_weight(w)
    dtype = dtype or (out.dtype if out is not None else w.dtype)
    if dtype not in _OUT_DTYPES:
        raise ConfigError(f"NF4 dequantizes to bf16, fp16 or fp32, not {dtype}")
    if out is None:
        out = torch.empty(w.shape, dtype=dtype, device=w.device)
    else:
        if tuple(out.shape) != tuple(w.shape) or out.dtype != dtype or out.device != w.device:
            raise ConfigError(f"out must have shape {tuple(w.shape)}, dtype {dtype} and device {w.device}; "
                              f"got {tuple(out.shape)}, {out.dtype}, {out.device}")
        if not out.is_contiguous():
            raise ConfigError("out must be contiguous")
    check_device(w.data, out)
    n = w.numel
    if n == 0:
        return out
    data = _as_bytes(w.data)
    absmax = w.absmax.contiguous()
    # Unused pointers in the flat case: any valid tensor will do, the constexpr branch never reads them.
    nested_absmax = w.nested_absmax.contiguous() if w.nested else absmax
    nested_code = w.nested_code.contiguous() if w.nested else absmax
    offset = w.offset.reshape(1).float() if w.nested else absmax
    n_bytes = data.numel()
    grid = (triton.cdiv(n_bytes, _BLOCK_BYTES),)
    _dequantize_nf4_kernel[grid](
        data, absmax, w.code.contiguous(), nested_absmax, nested_code, offset, out,
        n, n_bytes,
        BLOCKSIZE=w.blocksize, NESTED_BLOCKSIZE=w.nested_blocksize, NESTED=w.nested,
        OUT_BF16=dtype == torch.bfloat16, BLOCK_BYTES=_BLOCK_BYTES,
        **_LAUNCH_OPTIONS,
    )
    return out


def dequantize(w: torch.Tensor | NF4Weight) -> torch.Tensor:
    """A weight as a dense tensor: plain tensors pass through, :class:`NF4Weight` is dequantized."""
    if isinstance(w, NF4Weight):
        return dequantize_nf4(w)
    if isinstance(w, torch.Tensor):
        return w
    raise TypeError(f"expected a torch.Tensor or an NF4Weight, got {type(w).__name__}")


def dequantize_nf4_reference(w: NF4Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Plain-torch dequantization with the same fp32 order of operations as bitsandbytes."""
    n = w.numel
    packed = _as_bytes(w.data).reshape(-1)
    codes = torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1)[:n].long()
    absmax = w.absmax
    if w.nested:
        per_code = w.nested_absmax.repeat_interleave(w.nested_blocksize)[: absmax.numel()]
        absmax = w.nested_code[absmax.long()] * per_code
        absmax = absmax + w.offset
    scale = absmax.float().repeat_interleave(w.blocksize)[:n]
    return (w.code[codes] * scale).to(dtype or w.dtype).reshape(w.shape)
