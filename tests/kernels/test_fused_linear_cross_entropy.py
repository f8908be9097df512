"""Fused lm_head + cross-entropy against eager ``F.linear`` + cross-entropy in float64."""

from __future__ import annotations

import pytest
import torch

from slothbook.errors import ConfigError
from slothbook.kernels.fused_linear_cross_entropy import (
    MIN_CHUNK_TOKENS,
    default_chunk_size,
    fused_linear_cross_entropy,
    fused_linear_cross_entropy_reference,
)

IGNORE = -100


@pytest.fixture
def nan_empty():
    """Make every torch.empty in the code under test NaN-filled, so an unwritten gradient row fails."""
    was_on = torch.are_deterministic_algorithms_enabled()
    was_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    was_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.utils.deterministic.fill_uninitialized_memory = was_fill
    torch.use_deterministic_algorithms(was_on, warn_only=was_warn)


def _inputs(n_tokens, hidden_size, vocab, dtype, device, bias=False):
    hidden = torch.randn(n_tokens, hidden_size, device=device).to(dtype)
    weight = (torch.randn(vocab, hidden_size, device=device) / hidden_size**0.5).to(dtype)
    b = torch.randn(vocab, device=device).to(dtype) if bias else None
    labels = torch.randint(0, vocab, (n_tokens,), device=device)
    labels[torch.randperm(n_tokens, device=device)[: n_tokens // 4]] = IGNORE
    return hidden, weight, b, labels


def _leaf(t, dtype=None):
    return None if t is None else t.detach().to(dtype or t.dtype).clone().requires_grad_()


@pytest.mark.parametrize("softcap", [None, 30.0], ids=["nocap", "softcap30"])
@pytest.mark.parametrize("chunk_size", [None, 7], ids=["one-chunk", "chunk7"])
def test_matches_eager_lm_head_and_cross_entropy(dtype, softcap, chunk_size, device, nan_empty, assert_close):
    hidden, weight, bias, labels = _inputs(45, 67, 1001, dtype, device, bias=chunk_size == 7)
    h64, w64, b64 = _leaf(hidden, torch.float64), _leaf(weight, torch.float64), _leaf(bias, torch.float64)
    ref = fused_linear_cross_entropy_reference(h64, w64, labels, b64, softcap=softcap)
    (2.5 * ref).backward()

    h, w, b = _leaf(hidden), _leaf(weight), _leaf(bias)
    loss = fused_linear_cross_entropy(h, w, labels, b, softcap=softcap, chunk_size=chunk_size)
    (2.5 * loss).backward()

    assert loss.dtype == torch.float32
    assert_close(loss, ref, dtype=dtype, name="loss")
    assert_close(h.grad, h64.grad, dtype=dtype, name="grad hidden")
    assert_close(w.grad, w64.grad, dtype=dtype, name="grad weight")
    if bias is not None:
        assert_close(b.grad, b64.grad, dtype=dtype, name="grad bias")


def test_frozen_weight_3d_hidden_and_sum(dtype, device, nan_empty, assert_close):
    """The LoRA case: lm_head frozen, hidden [B, T, H] with labels [B, T], summed loss."""
    hidden, weight, _, labels = _inputs(2 * 19, 67, 2053, dtype, device)
    hidden, labels = hidden.view(2, 19, 67), labels.view(2, 19)
    h64 = _leaf(hidden, torch.float64)
    ref = fused_linear_cross_entropy_reference(h64, weight.double(), labels, reduction="sum")
    ref.backward()

    h = _leaf(hidden)
    loss = fused_linear_cross_entropy(h, weight, labels, chunk_size=10, reduction="sum")
    loss.backward()

    assert weight.grad is None
    assert_close(loss, ref, dtype=dtype, name="loss")
    assert_close(h.grad, h64.grad, dtype=dtype, name="grad hidden")


def test_all_ignored_gives_zero_loss_and_gradients(device, nan_empty):
    hidden, weight, _, _ = _inputs(13, 67, 1001, torch.bfloat16, device)
    labels = torch.full((13,), IGNORE, device=device)
    h, w = _leaf(hidden), _leaf(weight)
    loss = fused_linear_cross_entropy(h, w, labels, chunk_size=5)
    loss.backward()
    assert loss.item() == 0.0
    assert not h.grad.any() and not w.grad.any()


def test_no_grad_mode_returns_the_loss(device, assert_close):
    hidden, weight, _, labels = _inputs(21, 67, 1001, torch.float32, device)
    with torch.no_grad():
        loss = fused_linear_cross_entropy(hidden.requires_grad_(), weight, labels, chunk_size=8)
    ref = fused_linear_cross_entropy_reference(hidden.double(), weight.double(), labels)
    assert_close(loss, ref, dtype=torch.float32, name="loss")


def test_second_backward_is_refused(device):
    hidden, weight, _, labels = _inputs(9, 67, 1001, torch.float32, device)
    loss = fused_linear_cross_entropy(_leaf(hidden), weight, labels)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="once"):
        loss.backward()


def test_default_chunk_size():
    # Llama-3-8B: 8192 tokens x 4096 hidden over 128256 vocab -> 261 rows, rounded down to 256, so a
    # chunk's logits hold no more elements than the hidden states.
    assert default_chunk_size(8192, 4096, 128256) == 256
    assert 256 * 128256 <= 8192 * 4096
    assert default_chunk_size(100, 576, 49152) == MIN_CHUNK_TOKENS
    assert default_chunk_size(10, 576, 49152) == 10
    assert default_chunk_size(4096, 8192, 1000) == 4096


def test_rejects_bad_arguments(device):
    hidden, weight, _, labels = _inputs(9, 67, 1001, torch.float32, device)
    with pytest.raises(ConfigError, match="shifted"):
        fused_linear_cross_entropy(hidden, weight, labels[1:])
    with pytest.raises(ConfigError, match="weight"):
        fused_linear_cross_entropy(hidden, weight.t(), labels)
    with pytest.raises(ConfigError, match="reduction"):
        fused_linear_cross_entropy(hidden, weight, labels, reduction="none")


@pytest.mark.gpu
def test_llama3_sizes_on_gpu(assert_close):
    hidden, weight, _, labels = _inputs(8192, 4096, 128256, torch.bfloat16, torch.device("cuda"))
    h_ref, w_ref = _leaf(hidden), _leaf(weight)
    ref = fused_linear_cross_entropy_reference(h_ref, w_ref, labels)
    ref.backward()

    h, w = _leaf(hidden), _leaf(weight)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = fused_linear_cross_entropy(h, w, labels)
    peak = torch.cuda.max_memory_allocated() - base
    loss.backward()

    assert_close(loss, ref, dtype=torch.bfloat16, name="loss")
    assert_close(h.grad, h_ref.grad, dtype=torch.bfloat16, name="grad hidden")
    assert_close(w.grad, w_ref.grad, dtype=torch.bfloat16, name="grad weight")
    # Full bf16 logits would be 2 GiB; grad_weight (1 GiB) plus one chunk must stay well below that.
    assert peak < 2 * weight.numel() * weight.element_size()
