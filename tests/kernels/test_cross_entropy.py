"""Cross-entropy kernel against plain torch (float64 reference), on odd vocabularies, in fp32/bf16/fp16."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from slothbook.errors import ConfigError
from slothbook.kernels.cross_entropy import (
    CrossEntropyFunction,
    cross_entropy,
    cross_entropy_reference,
    cross_entropy_rows,
)

IGNORE = -100


def _inputs(n_rows, vocab, dtype, device, ignore_every=4):
    logits = (3 * torch.randn(n_rows, vocab, device=device)).to(dtype)
    labels = torch.randint(0, vocab, (n_rows,), device=device)
    labels[torch.randperm(n_rows, device=device)[: n_rows // ignore_every]] = IGNORE
    return logits, labels


def _reference(logits, labels, softcap, reduction="mean"):
    """Loss and gradient of the float64 reference on the same (already rounded) logits."""
    x = logits.detach().double().requires_grad_()
    loss = cross_entropy_reference(x, labels, softcap=softcap, reduction=reduction)
    loss.backward()
    return loss.detach(), x.grad


@pytest.mark.parametrize("softcap", [None, 30.0], ids=["nocap", "softcap30"])
@pytest.mark.parametrize("vocab,block_size", [(2053, None), (3001, 256)], ids=["one-block", "12-blocks"])
def test_forward_backward_match_reference(dtype, softcap, vocab, block_size, device, assert_close):
    logits, labels = _inputs(37, vocab, dtype, device)
    ref_loss, ref_grad = _reference(logits, labels, softcap)

    x = logits.clone().requires_grad_()
    loss = CrossEntropyFunction.apply(x, labels, IGNORE, softcap, "mean", block_size)
    loss.backward()

    assert loss.dtype == torch.float32
    # The reference sees the same rounded logits, so the loss is fp32-accurate for every input dtype.
    assert_close(loss, ref_loss, dtype=torch.float32, name="loss")
    assert_close(x.grad, ref_grad, dtype=dtype, name="grad")


def test_sum_reduction_and_grad_output(dtype, device, assert_close):
    logits, labels = _inputs(29, 1999, dtype, device)
    ref_loss, ref_grad = _reference(logits, labels, 5.0, reduction="sum")

    x = logits.clone().requires_grad_()
    loss = cross_entropy(x, labels, softcap=5.0, reduction="sum")
    (0.5 * loss).backward()

    assert_close(loss, ref_loss, dtype=dtype, name="loss")
    assert_close(x.grad, 0.5 * ref_grad, dtype=dtype, name="grad")


def test_shifted_3d_view_gets_its_gradient(dtype, device, assert_close):
    """The usual causal-LM call: a strided [B, T-1, V] slice of the logits and shifted labels."""
    batch, seq, vocab = 3, 9, 1001
    base = (3 * torch.randn(batch, seq, vocab, device=device)).to(dtype)
    tokens = torch.randint(0, vocab, (batch, seq), device=device)
    tokens[0, :4] = IGNORE
    labels = tokens[:, 1:]

    ref_base = base.double().requires_grad_()
    cross_entropy_reference(ref_base[:, :-1], labels).backward()

    x = base.clone().requires_grad_()
    loss = cross_entropy(x[:, :-1], labels)
    loss.backward()

    assert_close(x.grad, ref_base.grad, dtype=dtype, name="grad")


def test_all_ignored_gives_zero_loss_and_gradient(dtype, device):
    logits, _ = _inputs(11, 1001, dtype, device)
    labels = torch.full((11,), IGNORE, device=device)
    for reduction in ("mean", "sum"):
        x = logits.clone().requires_grad_()
        loss = cross_entropy(x, labels, reduction=reduction)
        loss.backward()
        assert loss.item() == 0.0
        assert torch.equal(x.grad, torch.zeros_like(x.grad))


@pytest.mark.parametrize("softcap", [None, 30.0], ids=["nocap", "softcap30"])
def test_rows_write_every_output_and_skip_ignored_rows(dtype, softcap, device, poisoned, assert_close):
    """Loss and log-sum-exp go to NaN-poisoned buffers; ignored rows are NaN and must be neither read nor left."""
    logits, labels = _inputs(23, 1533, dtype, device, ignore_every=3)
    logits[labels == IGNORE] = float("nan")
    valid = labels != IGNORE

    scale = 0.25
    x = logits[valid].double().requires_grad_()
    z = softcap * torch.tanh(x / softcap) if softcap is not None else x
    rows = F.cross_entropy(z, labels[valid], reduction="none")
    (scale * rows.sum()).backward()
    ref_rows = torch.zeros(23, dtype=torch.float64, device=device)
    ref_rows[valid] = rows.detach()
    ref_lse = torch.zeros_like(ref_rows)
    ref_lse[valid] = torch.logsumexp(z.detach(), dim=-1)
    ref_grad = torch.zeros(logits.shape, dtype=torch.float64, device=device)
    ref_grad[valid] = x.grad

    loss, lse = cross_entropy_rows(
        logits, labels, softcap=softcap, block_size=512,
        grad_scale=torch.tensor([scale], device=device),
        loss=poisoned(ref_rows.float()), lse=poisoned(ref_rows.float()),
    )
    assert_close(loss, ref_rows, dtype=torch.float32, name="row losses")
    assert_close(lse, ref_lse, dtype=torch.float32, name="row lse")
    assert_close(logits, ref_grad, dtype=dtype, name="in-place grad")
    assert torch.equal(logits[~valid], torch.zeros_like(logits[~valid]))


def test_out_of_range_label_gives_nan_not_a_crash(device):
    logits, labels = _inputs(5, 1001, torch.float32, device)
    labels[2] = 1001
    assert torch.isnan(cross_entropy(logits, labels))


def test_no_gradient_leaves_logits_untouched(device):
    logits, labels = _inputs(7, 1001, torch.bfloat16, device)
    before = logits.clone()
    cross_entropy(logits, labels, softcap=30.0)
    assert torch.equal(logits, before)


def test_rejects_bad_arguments(device):
    logits, labels = _inputs(5, 1001, torch.float32, device)
    with pytest.raises(ConfigError, match="reduction"):
        cross_entropy(logits, labels, reduction="none")
    with pytest.raises(ConfigError, match="shifted"):
        cross_entropy(logits, labels[:-1])
    with pytest.raises(ConfigError, match="softcap"):
        cross_entropy(logits, labels, softcap=0.0)


def test_compiles_for_hopper():
    """Lower every kernel mode to sm_90 machine code (no GPU needed), with the production block size."""
    code = textwrap.dedent("""
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from slothbook.kernels._utils import num_warps_for
        from slothbook.kernels.cross_entropy import MAX_BLOCK_V, _cross_entropy_kernel as kernel
        sig = {"logits_ptr": "*bf16", "logits_row_stride": "i64", "labels_ptr": "*i64", "loss_ptr": "*fp32",
               "lse_ptr": "*fp32", "grad_scale_ptr": "*fp32", "n_cols": "i32", "ignore_index": "i32",
               "softcap": "fp32"}
        for lse, grad in [(True, False), (False, True), (True, True)]:
            consts = {"HAS_SOFTCAP": True, "COMPUTE_LSE": lse, "COMPUTE_GRAD": grad, "BLOCK_V": MAX_BLOCK_V}
            src = ASTSource(fn=kernel, signature={**sig, **{k: "constexpr" for k in consts}}, constexprs=consts)
            triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps_for(MAX_BLOCK_V)})
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


@pytest.mark.gpu
@pytest.mark.parametrize("softcap", [None, 30.0], ids=["nocap", "softcap30"])
def test_llama3_vocab_8k_tokens(softcap, assert_close):
    logits, labels = _inputs(8192, 128256, torch.bfloat16, torch.device("cuda"))
    x = logits.float().requires_grad_()
    ref_loss = cross_entropy_reference(x, labels, softcap=softcap)
    ref_loss.backward()
    ref_grad = x.grad
    del x

    x = logits.requires_grad_()
    loss = cross_entropy(x, labels, softcap=softcap)
    loss.backward()
    assert_close(loss, ref_loss, dtype=torch.bfloat16, name="loss")
    assert_close(x.grad, ref_grad, dtype=torch.bfloat16, name="grad")
