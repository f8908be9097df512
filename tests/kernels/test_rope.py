"""RoPE kernel against the plain-torch reference (float64) and HF's rotary module and apply_rotary_pos_emb."""

from __future__ import annotations

import pytest
import torch

from slothbook.errors import ConfigError
from slothbook.kernels.rope import RotaryEmbedding, apply_rope, rope_, rope_reference

HEAD_DIMS = [64, 80, 96, 128, 256]


def _tables(position_ids, head_dim, dtype, base=10000.0):
    """cos/sin as HF computes them: [batch, seq, head_dim], both halves equal."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    freqs = position_ids[..., None].double() * inv_freq.to(position_ids.device)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _positions(batch, seq, device):
    """Positions that do not start at zero, so no row of the table is the identity rotation."""
    start = torch.randint(1, 500, (batch, 1), device=device)
    return start + torch.arange(seq, device=device)


def _hf_layout(batch, seq, n_heads, n_kv_heads, head_dim, dtype, device, requires_grad=False, like=None):
    """q and k as HF makes them: views [b, h, s, d] transposed out of a fused [b, s, (h + kv) * d] projection.

    ``like``: another layout's leaf whose values to copy (to build a float64 twin).
    """
    if like is None:
        fused = torch.randn(batch, seq, (n_heads + n_kv_heads) * head_dim, device=device, dtype=dtype)
    else:
        fused = like.detach().to(dtype).clone()
    leaf = fused.requires_grad_(requires_grad)
    proj = leaf * 1.0 if requires_grad else leaf  # a non-leaf like a linear layer's output
    q = proj[..., : n_heads * head_dim].view(batch, seq, n_heads, head_dim).transpose(1, 2)
    k = proj[..., n_heads * head_dim :].view(batch, seq, n_kv_heads, head_dim).transpose(1, 2)
    return leaf, q, k


def _reference(q, k, cos, sin):
    return rope_reference(q.double(), k.double(), cos.double(), sin.double())


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_forward_in_place_matches_reference(head_dim, dtype, device, assert_close):
    _, q, k = _hf_layout(2, 5, 4, 2, head_dim, dtype, device)
    cos, sin = _tables(_positions(2, 5, device), head_dim, dtype)
    q_ref, k_ref = _reference(q, k, cos, sin)
    with torch.no_grad():
        q_out, k_out = apply_rope(q, k, cos, sin)
    assert q_out is q and k_out is k
    assert_close(q, q_ref, dtype, "q")
    assert_close(k, k_ref, dtype, "k")


# (tokens_per_program, num_warps): the default and the benchmark's launch variants; 2 x 5 tokens leave the last
# program of 4 (and of 8: it holds more slots than there are tokens) partly empty.
SCHEDULES = [(1, None), (1, 8), (2, None), (4, 16), (8, None)]
SCHEDULE_IDS = [f"t{t}-w{w}" for t, w in SCHEDULES]


@pytest.mark.parametrize("tokens_per_program,num_warps", SCHEDULES, ids=SCHEDULE_IDS)
def test_schedules_write_every_token_and_match_reference(tokens_per_program, num_warps, dtype, device, assert_close):
    """Forward (rope_) and backward (through autograd) with each launch shape, on HF's transposed views of one
    buffer; the columns after q and k keep their sentinel (no write past the last head or token)."""
    head_dim, n_heads, n_kv = 80, 5, 2
    schedule = dict(tokens_per_program=tokens_per_program, num_warps=num_warps)
    buf = torch.full((2, 5, (n_heads + n_kv + 1) * head_dim), 7.0, device=device, dtype=dtype)
    width = (n_heads + n_kv) * head_dim
    buf[..., :width] = torch.randn(2, 5, width, device=device).to(dtype)
    q = buf[..., : n_heads * head_dim].view(2, 5, n_heads, head_dim).transpose(1, 2)
    k = buf[..., n_heads * head_dim : width].view(2, 5, n_kv, head_dim).transpose(1, 2)
    cos, sin = _tables(_positions(2, 5, device), head_dim, dtype)
    q64, k64 = q.double().requires_grad_(), k.double().requires_grad_()
    q_ref, k_ref = rope_reference(q64, k64, cos.double(), sin.double())
    rope_(q, k, cos, sin, **schedule)
    assert_close(q, q_ref, dtype, "q")
    assert_close(k, k_ref, dtype, "k")
    assert torch.equal(buf[..., width:], torch.full_like(buf[..., width:], 7.0))

    dq, dk = torch.randn_like(q), torch.randn_like(k)
    dq64, dk64 = torch.autograd.grad((q_ref, k_ref), (q64, k64), (dq.double(), dk.double()))
    q_in, k_in = q64.detach().to(dtype).requires_grad_(), k64.detach().to(dtype).requires_grad_()
    q_out, k_out = apply_rope(q_in, k_in, cos, sin, **schedule)
    torch.autograd.backward((q_out, k_out), (dq, dk))
    assert_close(q_in.grad, dq64, dtype, "dq")
    assert_close(k_in.grad, dk64, dtype, "dk")


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_backward_matches_reference(head_dim, dtype, device, assert_close):
    leaf, q, k = _hf_layout(2, 5, 6, 2, head_dim, dtype, device, requires_grad=True)
    cos, sin = _tables(_positions(2, 5, device), head_dim, dtype)
    q_out, k_out = apply_rope(q, k, cos, sin)
    dq, dk = torch.randn_like(q_out), torch.randn_like(k_out)
    torch.autograd.backward((q_out, k_out), (dq.clone(), dk.clone()))

    leaf64, q64, k64 = _hf_layout(2, 5, 6, 2, head_dim, torch.float64, device, requires_grad=True, like=leaf)
    q_ref, k_ref = rope_reference(q64, k64, cos.double(), sin.double())
    torch.autograd.backward((q_ref, k_ref), (dq.double(), dk.double()))
    assert_close(q_out, q_ref, dtype, "q")
    assert_close(k_out, k_ref, dtype, "k")
    assert_close(leaf.grad, leaf64.grad, dtype, "grad")


@pytest.mark.parametrize("n_heads,n_kv_heads", [(4, 4), (6, 2), (5, 1), (3, 3)])
def test_every_element_written_and_nothing_else(n_heads, n_kv_heads, device):
    """With cos = sin = 0 every rotated element becomes 0; the rest of the buffer keeps its sentinel."""
    head_dim = 80
    buf = torch.full((2, 5, (n_heads + n_kv_heads + 1) * head_dim), 7.0, device=device)
    inner = buf[..., : (n_heads + n_kv_heads) * head_dim]
    q = inner[..., : n_heads * head_dim].view(2, 5, n_heads, head_dim).transpose(1, 2)
    k = inner[..., n_heads * head_dim :].view(2, 5, n_kv_heads, head_dim).transpose(1, 2)
    zeros = torch.zeros(2, 5, head_dim, device=device)
    for backward in (False, True):
        buf[..., : inner.shape[-1]].normal_()
        rope_(q, k, zeros, zeros, backward=backward)
        assert torch.equal(inner, torch.zeros_like(inner))
        assert torch.equal(buf[..., inner.shape[-1] :], torch.full_like(buf[..., inner.shape[-1] :], 7.0))


@pytest.mark.parametrize("n_heads,n_kv_heads", [(5, 3), (2, 7)])
def test_heads_split_over_several_tiles(n_heads, n_kv_heads, monkeypatch, dtype, device, assert_close):
    """Tiles of 2 heads: q and k need different numbers of tiles, the last ones partly masked."""
    import slothbook.kernels.rope as rope_module

    head_dim = 96
    monkeypatch.setattr(rope_module, "_TILE_ELEMENTS", 2 * head_dim // 2)
    _, q, k = _hf_layout(2, 3, n_heads, n_kv_heads, head_dim, dtype, device)
    cos, sin = _tables(_positions(2, 3, device), head_dim, dtype)
    q_ref, k_ref = _reference(q, k, cos, sin)
    rope_(q, k, cos, sin)
    assert_close(q, q_ref, dtype, "q")
    assert_close(k, k_ref, dtype, "k")
    rope_(q, k, cos, sin, backward=True)  # the inverse rotation brings the inputs back
    q_back, k_back = rope_reference(q_ref, k_ref, cos.double(), -sin.double())
    assert_close(q, q_back, dtype, "q back")
    assert_close(k, k_back, dtype, "k back")


def test_packed_positions_with_hf_llama3_scaling(dtype, device, assert_close):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    head_dim = 64
    config = LlamaConfig(
        hidden_size=4 * head_dim,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=head_dim,
        max_position_embeddings=8192,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    )
    rotary = LlamaRotaryEmbedding(config).to(device)
    # Two sequences, each packing several documents whose positions restart at zero.
    position_ids = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1], [0, 1, 2, 3, 4, 5, 0, 1, 2]], device=device) * 97
    _, q, k = _hf_layout(2, 9, 4, 2, head_dim, dtype, device)
    cos, sin = rotary(q, position_ids)
    q_hf, k_hf = apply_rotary_pos_emb(q.clone(), k.clone(), cos, sin)
    q_ref, k_ref = _reference(q, k, cos, sin)
    with torch.no_grad():
        apply_rope(q, k, cos, sin)
    assert_close(q, q_ref, dtype, "q")
    assert_close(k, k_ref, dtype, "k")
    assert_close(q, q_hf, dtype, "q vs HF")
    assert_close(k, k_hf, dtype, "k vs HF")


def test_tables_shared_over_batch_and_2d_tables(device, assert_close):
    cos, sin = _tables(_positions(1, 6, device), 96, torch.float32)
    _, q, k = _hf_layout(3, 6, 2, 1, 96, torch.float32, device)
    q_ref, k_ref = _reference(q, k, cos, sin)
    rope_(q, k, cos, sin)  # cos [1, seq, dim] broadcast over batch 3
    assert_close(q, q_ref, name="q")
    assert_close(k, k_ref, name="k")
    _, q, k = _hf_layout(3, 6, 2, 1, 96, torch.float32, device)
    q_ref, k_ref = _reference(q, k, cos[0], sin[0])
    rope_(q, k, cos[0], sin[0])  # [seq, dim]
    assert_close(q, q_ref, name="q 2-D")
    assert_close(k, k_ref, name="k 2-D")


def test_strided_head_dim_is_copied_back(device, assert_close):
    q = torch.randn(2, 3, 5, 128, device=device)[..., ::2]  # head_dim 64 with stride 2
    k = torch.randn(2, 1, 5, 64, device=device)
    cos, sin = _tables(_positions(2, 5, device), 64, torch.float32)
    q_ref, k_ref = _reference(q, k, cos, sin)
    rope_(q, k, cos, sin)
    assert_close(q, q_ref, name="q")
    assert_close(k, k_ref, name="k")


def test_transposed_rotation_is_exact_gradient_for_unequal_halves(device, assert_close):
    """Tables whose halves differ (not HF's, but allowed): backward is the transpose, not just -sin."""
    q = torch.randn(1, 2, 4, 64, device=device, requires_grad=True)
    k = torch.randn(1, 1, 4, 64, device=device, requires_grad=True)
    cos, sin = torch.randn(1, 4, 64, device=device), torch.randn(1, 4, 64, device=device)
    q_out, k_out = apply_rope(q, k, cos, sin)  # leaves: rotated copies
    dq, dk = torch.randn_like(q_out), torch.randn_like(k_out)
    torch.autograd.backward((q_out, k_out), (dq.clone(), dk.clone()))
    q64, k64 = q.detach().double().requires_grad_(), k.detach().double().requires_grad_()
    torch.autograd.backward(rope_reference(q64, k64, cos.double(), sin.double()), (dq.double(), dk.double()))
    assert_close(q.grad, q64.grad, name="dq")
    assert_close(k.grad, k64.grad, name="dk")


def test_leaf_inputs_are_not_modified(device):
    q = torch.randn(1, 2, 3, 64, device=device, requires_grad=True)
    k = torch.randn(1, 2, 3, 64, device=device, requires_grad=True)
    q_before, k_before = q.detach().clone(), k.detach().clone()
    cos, sin = _tables(_positions(1, 3, device), 64, torch.float32)
    q_out, k_out = apply_rope(q, k, cos, sin)
    assert torch.equal(q, q_before) and torch.equal(k, k_before)
    assert not torch.equal(q_out, q_before)


def test_expanded_and_shared_gradients(device, assert_close):
    """`sum()` sends stride-0 gradients and `q + k` one tensor to both inputs: neither may be rotated in place."""
    cos, sin = _tables(_positions(2, 4, device), 64, torch.float32)
    for loss_fn in (lambda a, b: a.sum() + b.sum(), lambda a, b: (a + b).pow(2).sum()):
        leaf, q, k = _hf_layout(2, 4, 2, 2, 64, torch.float32, device, requires_grad=True)
        loss_fn(*apply_rope(q, k, cos, sin)).backward()
        leaf64, q64, k64 = _hf_layout(2, 4, 2, 2, 64, torch.float64, device, requires_grad=True, like=leaf)
        loss_fn(*rope_reference(q64, k64, cos.double(), sin.double())).backward()
        assert_close(leaf.grad, leaf64.grad, name="grad")


def test_op_that_saved_unrotated_q_fails_loudly(device):
    _, q, k = _hf_layout(1, 3, 2, 2, 64, torch.float32, device, requires_grad=True)
    w = torch.randn(64, device=device, requires_grad=True)
    saved = q * w  # saves q for w's gradient
    cos, sin = _tables(_positions(1, 3, device), 64, torch.float32)
    q_out, k_out = apply_rope(q, k, cos, sin)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (saved.sum() + q_out.sum() + k_out.sum()).backward()


def test_module_and_bad_arguments(device, assert_close):
    _, q, k = _hf_layout(1, 3, 2, 1, 64, torch.float32, device)
    cos, sin = _tables(_positions(1, 3, device), 64, torch.float32)
    q_ref, k_ref = _reference(q, k, cos, sin)
    RotaryEmbedding()(q, k, cos, sin)
    assert_close(q, q_ref, name="q")
    with pytest.raises(ConfigError):
        apply_rope(q, k[..., :32], cos, sin)
    with pytest.raises(ConfigError):
        apply_rope(q, k, cos[:, :2], sin[:, :2])
    with pytest.raises(ConfigError):
        apply_rope(q, k, cos, sin, tokens_per_program=3)
    with pytest.raises(ConfigError):
        rope_(q, k, cos, sin, num_warps=6)


@pytest.mark.gpu
def test_gpu_realistic_size(assert_close):
    device = torch.device("cuda")
    leaf, q, k = _hf_layout(1, 8192, 32, 8, 128, torch.bfloat16, device, requires_grad=True)
    cos, sin = _tables(torch.arange(8192, device=device)[None], 128, torch.bfloat16)
    q_out, k_out = apply_rope(q, k, cos, sin)
    dq, dk = torch.randn_like(q_out), torch.randn_like(k_out)
    torch.autograd.backward((q_out, k_out), (dq.clone(), dk.clone()))
    leaf32, q32, k32 = _hf_layout(1, 8192, 32, 8, 128, torch.float32, device, requires_grad=True, like=leaf)
    q_ref, k_ref = rope_reference(q32, k32, cos.float(), sin.float())
    torch.autograd.backward((q_ref, k_ref), (dq.float(), dk.float()))
    assert_close(q_out, q_ref, torch.bfloat16, "q")
    assert_close(k_out, k_ref, torch.bfloat16, "k")
    assert_close(leaf.grad, leaf32.grad, torch.bfloat16, "grad")
