"""RMSNorm kernel against the plain-torch reference (float64) and the real HF norm modules."""

from __future__ import annotations

import importlib

import pytest
import torch

from slothbook.errors import ConfigError
from slothbook.kernels.rms_norm import (
    BackwardSchedule,
    RMSNorm,
    backward_schedule,
    rms_norm,
    rms_norm_backward,
    rms_norm_forward,
    rms_norm_reference,
)

# The module itself: the package re-exports a function of the same name.
rms_norm_module = importlib.import_module("slothbook.kernels.rms_norm")

# (shape, offset, casting): odd hidden sizes, and row counts that do not split evenly over the backward programs.
CASES = [
    ((7, 67), 0.0, "llama"),
    ((2, 5, 129), 0.0, "llama"),
    ((13, 67), 1.0, "gemma"),
    ((3, 3, 96), 0.0, "gemma"),
    ((9, 33), 1.0, "llama"),
]
CASE_IDS = [f"{'x'.join(map(str, s))}-off{o:g}-{c}" for s, o, c in CASES]


def _inputs(shape, offset, dtype, device):
    x = torch.randn(shape, device=device).mul(3).to(dtype)
    # Scales around 1 for either form: weight + offset ~ 1 +- 0.3.
    weight = (torch.randn(shape[-1], device=device) * 0.3 + 1.0 - offset).to(dtype)
    return x, weight


def _reference_grads(x, weight, dy, eps, offset, casting):
    x64 = x.detach().double().requires_grad_()
    w64 = weight.detach().double().requires_grad_()
    y64 = rms_norm_reference(x64, w64, eps, offset, casting)
    y64.backward(dy.double())
    return y64.detach(), x64.grad, w64.grad


def test_interpreter_is_on_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("compiled kernels are used on a GPU")
    from triton.runtime.interpreter import InterpretedFunction

    assert isinstance(rms_norm_module._rms_norm_fwd_kernel, InterpretedFunction)


@pytest.mark.parametrize("shape,offset,casting", CASES, ids=CASE_IDS)
def test_forward_writes_every_element_and_matches_reference(
    shape, offset, casting, dtype, device, poisoned, assert_close
):
    x, weight = _inputs(shape, offset, dtype, device)
    out = poisoned(x)
    y, rstd = rms_norm_forward(x, weight, 1e-6, offset, casting, out=out)
    assert y is out
    assert y.dtype == dtype
    assert_close(y, rms_norm_reference(x.double(), weight.double(), 1e-6, offset, casting), dtype, "y")
    # The HF-style reference in the input dtype (what the model would compute) agrees as well.
    assert_close(y, rms_norm_reference(x, weight, 1e-6, offset, casting), dtype, "y vs native reference")
    expected_rstd = x.double().pow(2).mean(-1).add(1e-6).rsqrt().reshape(-1)
    assert_close(rstd, expected_rstd, torch.float32, "rstd")


@pytest.mark.parametrize("shape,offset,casting", CASES, ids=CASE_IDS)
def test_backward_writes_every_element_and_matches_reference(
    shape, offset, casting, dtype, device, poisoned, assert_close
):
    x, weight = _inputs(shape, offset, dtype, device)
    dy = torch.randn_like(x)
    _, rstd = rms_norm_forward(x, weight, 1e-6, offset, casting)
    dx, dw = rms_norm_backward(dy, x, weight, rstd, offset, dx=poisoned(x))
    _, dx64, dw64 = _reference_grads(x, weight, dy, 1e-6, offset, casting)
    assert dx.dtype == dtype and dw.dtype == dtype
    assert_close(dx, dx64, dtype, "dx")
    assert_close(dw, dw64, dtype, "dw")


# (rows, hidden, programs_per_sm, block_rows, num_warps, dw_reduction): 4 programs in the interpreter; rows that
# leave the last program a partial tile, several tiles per program, one row per tile, a tile wider than all the
# rows; the benchmark's variants (several programs per SM, more warps, torch's sum of the dW partials).
SCHEDULES = [
    (13, 67, 1, 2, None, "triton"),
    (29, 96, 2, 4, None, "torch"),
    (10, 129, 1, 1, 16, "triton"),
    (3, 33, 1, 8, None, "triton"),
    (37, 67, 4, 1, 8, "torch"),
]


@pytest.mark.parametrize("n_rows,hidden,programs_per_sm,block_rows,num_warps,dw_reduction", SCHEDULES)
def test_backward_schedules_cover_every_row(n_rows, hidden, programs_per_sm, block_rows, num_warps, dw_reduction,
                                            dtype, device, assert_close):
    x, weight = _inputs((n_rows, hidden), 1.0, dtype, device)
    dy = torch.randn_like(x)
    _, rstd = rms_norm_forward(x, weight, 1e-6, 1.0)
    _, dx64, dw64 = _reference_grads(x, weight, dy, 1e-6, 1.0, None)
    # dx written over dy itself: the kernel prefetches the next tile of dy before it stores the current one.
    dx, dw = rms_norm_backward(dy, x, weight, rstd, 1.0, dx=dy, programs_per_sm=programs_per_sm,
                               block_rows=block_rows, num_warps=num_warps, dw_reduction=dw_reduction)
    assert dx is dy
    assert dw.dtype == dtype
    assert_close(dx, dx64, dtype, "dx")
    assert_close(dw, dw64, dtype, "dw")


@pytest.mark.parametrize("n_partials,hidden", [(1, 5), (4, 67), (130, 33), (64, 64)])
def test_partial_sums_reduce_every_column_exactly(n_partials, hidden, dtype, device, assert_close):
    """The dW reduction alone: partial counts around its 64-row step, widths around its 32-column strip."""
    partial = torch.randn(n_partials, hidden, device=device)
    dw = rms_norm_module._sum_partials(partial, dtype, "triton")
    assert dw.dtype == dtype and dw.shape == (hidden,)
    assert_close(dw, partial.double().sum(0), dtype, "dw")


def test_backward_schedule_tiles_short_rows():
    assert backward_schedule(4096) == BackwardSchedule(programs_per_sm=2, block_rows=1, num_warps=8)
    assert backward_schedule(576).block_rows == 4  # 1024 padded columns x 4 rows
    assert backward_schedule(8192) == BackwardSchedule(programs_per_sm=2, block_rows=1, num_warps=16)
    assert backward_schedule(4096, programs_per_sm=1, num_warps=16) == BackwardSchedule(1, 1, 16)
    with pytest.raises(ConfigError):
        backward_schedule(64, block_rows=3)
    with pytest.raises(ConfigError):
        backward_schedule(64, num_warps=3)


@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_autograd_matches_reference(offset, dtype, device, assert_close):
    x, weight = _inputs((11, 67), offset, dtype, device)
    x.requires_grad_()
    weight.requires_grad_()
    y = rms_norm(x, weight, 1e-5, offset)
    dy = torch.randn_like(y)
    y.backward(dy)
    y64, dx64, dw64 = _reference_grads(x, weight, dy, 1e-5, offset, None)
    assert_close(y, y64, dtype, "y")
    assert_close(x.grad, dx64, dtype, "dx")
    assert_close(weight.grad, dw64, dtype, "dw")


def test_frozen_weight_gets_no_gradient(device, assert_close):
    x = torch.randn(6, 67, device=device, requires_grad=True)
    weight = torch.randn(67, device=device)
    dy = torch.randn(6, 67, device=device)
    rms_norm(x, weight).backward(dy)
    _, dx64, _ = _reference_grads(x, weight, dy, 1e-6, 0.0, None)
    assert_close(x.grad, dx64, torch.float32, "dx")
    assert weight.grad is None
    rstd = rms_norm_forward(x.detach(), weight)[1]
    assert rms_norm_backward(dy, x.detach(), weight, rstd, compute_dw=False)[1] is None


def test_strided_rows_and_non_contiguous_out(device, poisoned, assert_close):
    wide = torch.randn(6, 100, device=device)
    x = wide[:, 10:77]  # rows with stride 100, a view
    weight = torch.randn(67, device=device)
    out = poisoned(torch.empty(67, 6, device=device)).t()  # [6, 67] view with column-major strides
    rms_norm(x, weight, out=out)
    assert_close(out, rms_norm_reference(x.double(), weight.double()), torch.float32, "y")


def test_hidden_dims_of_one_row_each(device, assert_close):
    for hidden in (1, 2, 576, 1000):
        x = torch.randn(3, hidden, device=device)
        weight = torch.randn(hidden, device=device)
        assert_close(rms_norm(x, weight), rms_norm_reference(x.double(), weight.double()), torch.float32, f"h={hidden}")


def test_matches_hf_llama_and_gemma_norms(dtype, device, assert_close):
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    x = torch.randn(5, 67, device=device).to(dtype)
    llama = LlamaRMSNorm(67, eps=1e-5).to(device=device, dtype=dtype)
    gemma = GemmaRMSNorm(67, eps=1e-6).to(device=device, dtype=dtype)
    with torch.no_grad():
        llama.weight.normal_(1.0, 0.3)
        gemma.weight.normal_(0.0, 0.3)
    ours_llama = RMSNorm.from_hf(llama)
    ours_gemma = RMSNorm.from_hf(gemma, offset=1.0)
    assert ours_llama.weight is llama.weight and ours_gemma.weight is gemma.weight
    assert ours_llama.eps == 1e-5 and ours_gemma.eps == 1e-6
    with torch.no_grad():
        assert_close(ours_llama(x), llama(x), dtype, "llama")
        assert_close(ours_gemma(x), gemma(x), dtype, "gemma")


def test_module_starts_as_identity_scale(device):
    for offset in (0.0, 1.0):
        norm = RMSNorm(67, eps=1e-6, offset=offset, device=device)
        assert torch.equal(norm.weight + offset, torch.ones(67, device=device))
    assert "casting='gemma'" in repr(RMSNorm(8, offset=1.0))


def test_rejects_bad_arguments(device):
    x = torch.randn(4, 8, device=device)
    with pytest.raises(ConfigError):
        rms_norm(x, torch.ones(7, device=device))
    with pytest.raises(ConfigError):
        rms_norm(x, torch.ones(8, device=device), casting="mistral")
    rstd = rms_norm_forward(x, torch.ones(8, device=device))[1]
    with pytest.raises(ConfigError):
        rms_norm_backward(x, x, torch.ones(8, device=device), rstd, dw_reduction="atomic")
    with pytest.raises(ConfigError):
        rms_norm(x.requires_grad_(), torch.ones(8, device=device), out=torch.empty_like(x))


@pytest.mark.gpu
@pytest.mark.parametrize("offset", [0.0, 1.0])
@pytest.mark.parametrize("shape", [(8192, 4096), (4099, 576), (1000, 8192)], ids=["llama8b", "smollm", "wide"])
def test_gpu_realistic_size(shape, offset, assert_close):
    x, weight = _inputs(shape, offset, torch.bfloat16, torch.device("cuda"))
    x.requires_grad_()
    weight.requires_grad_()
    y = rms_norm(x, weight, 1e-6, offset)
    dy = torch.randn_like(y)
    y.backward(dy)
    y64, dx64, dw64 = _reference_grads(x, weight, dy, 1e-6, offset, None)
    assert_close(y, y64, torch.bfloat16, "y")
    assert_close(x.grad, dx64, torch.bfloat16, "dx")
    assert_close(weight.grad, dw64, torch.bfloat16, "dw")
