"""NF4 dequantization: bit-identical to bitsandbytes on weights quantized by real bitsandbytes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import pytest
import torch

from slothbook.errors import ConfigError
from slothbook.kernels.nf4 import (
    NF4Weight,
    dequantize,
    dequantize_nf4,
    dequantize_nf4_reference,
    nf4_weight_from_quant_state,
)

SHAPES = [(67, 130), (129, 67), (3, 5)]  # odd numbers of elements, odd rows, blocks cut across rows


def _quantize(shape, dtype, blocksize, nested, device="cpu", quant_storage=torch.uint8):
    weight = (0.05 * torch.randn(shape, device=device)).to(dtype)
    data, state = bnbf.quantize_4bit(weight, blocksize=blocksize, compress_statistics=nested, quant_type="nf4",
                                     quant_storage=quant_storage)
    return data, state


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("blocksize", [64, 128])
@pytest.mark.parametrize("nested", [False, True], ids=["flat", "nested"])
def test_bit_identical_to_bitsandbytes(dtype, shape, blocksize, nested, poisoned):
    data, state = _quantize(shape, dtype, blocksize, nested)
    expected = bnbf.dequantize_4bit(data, state, quant_type="nf4")
    w = nf4_weight_from_quant_state(data, state)
    assert w.nested == nested

    out = dequantize_nf4(w, out=poisoned(expected))
    assert torch.equal(out, expected)
    assert torch.equal(dequantize_nf4(w), expected)
    assert torch.equal(dequantize_nf4_reference(w), expected)


def test_other_output_dtypes_round_once(dtype):
    """Asking for another dtype equals bitsandbytes' fp32 result rounded to it (one rounding)."""
    data, state = _quantize((45, 66), dtype, 64, nested=True)
    w = nf4_weight_from_quant_state(data, state)
    as_fp32 = dequantize_nf4(w, dtype=torch.float32)
    state.dtype = torch.float32
    assert torch.equal(as_fp32, bnbf.dequantize_4bit(data, state, quant_type="nf4"))
    for other in (torch.bfloat16, torch.float16):
        assert torch.equal(dequantize_nf4(w, dtype=other), as_fp32.to(other))


@pytest.mark.parametrize("nested", [False, True], ids=["flat", "nested"])
def test_linear4bit_layer_weight(dtype, nested):
    layer = bnb.nn.Linear4bit(67, 130, bias=False, compute_dtype=dtype, compress_statistics=nested,
                              quant_type="nf4")
    layer.weight = bnb.nn.Params4bit((0.05 * torch.randn(130, 67)).to(dtype), requires_grad=False,
                                     compress_statistics=nested, quant_type="nf4")
    layer = layer.to("cpu")  # quantizes
    assert layer.weight.dtype == torch.uint8 and layer.weight.quant_state.dtype == dtype

    w = nf4_weight_from_quant_state(layer.weight.data, layer.weight.quant_state)
    expected = bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    assert expected.shape == (130, 67)
    assert torch.equal(dequantize_nf4(w), expected)


def test_non_uint8_quant_storage():
    data, state = _quantize((33, 64), torch.bfloat16, 64, nested=True, quant_storage=torch.bfloat16)
    assert data.dtype == torch.bfloat16
    w = nf4_weight_from_quant_state(data, state)
    assert torch.equal(dequantize_nf4(w), bnbf.dequantize_4bit(data, state, quant_type="nf4"))


def test_dequantize_passes_plain_tensors_through():
    plain = torch.randn(4, 6)
    assert dequantize(plain) is plain
    data, state = _quantize((4, 6), torch.float16, 64, nested=False)
    w = nf4_weight_from_quant_state(data, state)
    assert torch.equal(dequantize(w), bnbf.dequantize_4bit(data, state, quant_type="nf4"))
    with pytest.raises(TypeError):
        dequantize([1.0, 2.0])


def test_rejects_fp4_and_mismatched_buffers():
    weight = torch.randn(8, 8)
    data, state = bnbf.quantize_4bit(weight, quant_type="fp4")
    with pytest.raises(ConfigError, match="NF4"):
        nf4_weight_from_quant_state(data, state)

    data, state = _quantize((8, 8), torch.float32, 64, nested=False)
    w = nf4_weight_from_quant_state(data, state)
    with pytest.raises(ConfigError, match="out must"):
        dequantize_nf4(w, out=torch.empty(8, 9))
    with pytest.raises(ConfigError, match="bytes"):
        dequantize_nf4(NF4Weight(data[:-1], w.absmax, w.code, w.shape, w.dtype, w.blocksize))


def test_kernels_do_not_import_bitsandbytes():
    code = "import sys, slothbook.kernels.nf4; assert 'bitsandbytes' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_compiles_for_hopper_without_fma():
    """Compile (no GPU needed) for sm_90: the nested absmax must be a separate fp32 multiply and add, as in
    bitsandbytes; an FMA would round once instead of twice and break bit-exactness on the GPU."""
    code = textwrap.dedent("""
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from slothbook.kernels.nf4 import _LAUNCH_OPTIONS, _dequantize_nf4_kernel as kernel
        sig = {"data_ptr": "*u8", "absmax_ptr": "*u8", "code_ptr": "*fp32", "nested_absmax_ptr": "*fp32",
               "nested_code_ptr": "*fp32", "offset_ptr": "*fp32", "out_ptr": "*bf16", "n_elements": "i64",
               "n_bytes": "i64"}
        consts = {"BLOCKSIZE": 64, "NESTED_BLOCKSIZE": 256, "NESTED": True, "OUT_BF16": True, "BLOCK_BYTES": 1024}
        src = ASTSource(fn=kernel, signature={**sig, **{k: "constexpr" for k in consts}}, constexprs=consts)
        ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=_LAUNCH_OPTIONS).asm["ptx"]
        assert "fma." not in ptx and "add.rn.f32" in ptx, "nested absmax must not be fused into an FMA"
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


@pytest.mark.gpu
@pytest.mark.parametrize("nested", [False, True], ids=["flat", "nested"])
def test_llama3_mlp_weight_on_gpu(dtype, nested):
    data, state = _quantize((4096, 14336), dtype, 64, nested, device="cuda")
    expected = bnbf.dequantize_4bit(data, state, quant_type="nf4")
    out = torch.full_like(expected, float("nan"))
    assert torch.equal(dequantize_nf4(nf4_weight_from_quant_state(data, state), out=out), expected)
