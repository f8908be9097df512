"""Fused LoRA projections against plain torch, with dense and real bitsandbytes NF4 base weights.

The reference runs in float64 on the same inputs (an NF4 weight is dequantized by bitsandbytes itself).
NF4 cases use in-features that are multiples of 64: bitsandbytes' CPU ``dequantize_4bit`` (0.50) decodes
a weight whose rows do not end on a block boundary wrongly, and it is the reference here.
"""

from __future__ import annotations

import bitsandbytes.functional as bnbf
import pytest
import torch

from slothbook.errors import ConfigError
from slothbook.kernels.lora import (
    ACTIVATIONS,
    lora_linear,
    lora_linear_reference,
    lora_mlp,
    lora_mlp_reference,
    lora_o,
    lora_qkv,
    lora_qkv_reference,
)
from slothbook.kernels.nf4 import nf4_weight_from_quant_state

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

WEIGHTS = ["dense", "nf4"]
# Odd token counts and feature sizes for dense weights; NF4 in-features are whole 64-element blocks.
SHAPES = {  # hidden, intermediate, q out, kv out, rank
    "dense": dict(hidden=40, inter=88, q=40, kv=10, r=5),
    "nf4": dict(hidden=128, inter=192, q=128, kv=32, r=8),
}
BATCH, SEQ = 3, 7


class Projection:
    """A LoRA layer's tensors: what the kernel takes (W may be an NF4Weight) and a float64 reference copy."""

    def __init__(self, out_features, in_features, r, dtype, device, weight="dense", scaling=2.0):
        w = (torch.randn(out_features, in_features, device=device) / in_features**0.5).to(dtype)
        if weight == "nf4":
            packed, state = bnbf.quantize_4bit(w, quant_type="nf4", compress_statistics=True, blocksize=64)
            self.weight = nf4_weight_from_quant_state(packed, state)
            self.dense = bnbf.dequantize_4bit(packed, state)
        else:
            self.weight = self.dense = w
        # B is not zero (unlike PEFT's init) so that every gradient path carries signal.
        self.a = (torch.randn(r, in_features, device=device) / in_features**0.5).to(dtype).requires_grad_()
        self.b = (torch.randn(out_features, r, device=device) / r**0.5).to(dtype).requires_grad_()
        self.scaling = scaling
        self.a64 = self.a.detach().double().requires_grad_()
        self.b64 = self.b.detach().double().requires_grad_()

    @property
    def args(self):
        return (self.weight, self.a, self.b, self.scaling)

    @property
    def reference_args(self):
        return (self.dense.double(), self.a64, self.b64, self.scaling)

    def check_grads(self, assert_close, dtype, name):
        assert_close(self.a.grad, self.a64.grad, dtype, f"{name}.dA")
        assert_close(self.b.grad, self.b64.grad, dtype, f"{name}.dB")


def _inputs(features, dtype, device, tokens=(BATCH, SEQ)):
    x = torch.randn(*tokens, features, device=device).to(dtype).requires_grad_()
    return x, x.detach().double().requires_grad_()


def _backward(outs, refs):
    """Backpropagate one random upstream gradient through the kernel's outputs and the reference's."""
    for out, ref in zip(outs, refs):
        dy = torch.randn_like(out)
        out.backward(dy, retain_graph=True)
        ref.backward(dy.double(), retain_graph=True)


@pytest.mark.parametrize("weight", WEIGHTS)
def test_lora_linear_matches_reference(weight, dtype, device, assert_close):
    s = SHAPES[weight]
    p = Projection(s["q"], s["hidden"], s["r"], dtype, device, weight, scaling=0.5)
    x, x64 = _inputs(s["hidden"], dtype, device)
    y = lora_linear(x, *p.args)
    y64 = lora_linear_reference(x64, *p.reference_args)
    assert y.dtype == dtype
    assert_close(y, y64, dtype, "y")
    assert torch.equal(lora_o(x, p.args), y)
    _backward([y], [y64])
    assert_close(x.grad, x64.grad, dtype, "dx")
    p.check_grads(assert_close, dtype, "o")


@pytest.mark.parametrize("weight", WEIGHTS)
def test_lora_qkv_gqa_matches_reference(weight, dtype, device, assert_close):
    s = SHAPES[weight]
    q, k, v = (Projection(n, s["hidden"], s["r"], dtype, device, weight) for n in (s["q"], s["kv"], s["kv"]))
    x, x64 = _inputs(s["hidden"], dtype, device)
    outs = lora_qkv(x, q.args, k.args, v.args)
    refs = lora_qkv_reference(x64, q.reference_args, k.reference_args, v.reference_args)
    assert [o.shape[-1] for o in outs] == [s["q"], s["kv"], s["kv"]]
    for name, out, ref in zip("qkv", outs, refs):
        assert_close(out, ref, dtype, name)
    _backward(outs, refs)
    assert_close(x.grad, x64.grad, dtype, "dx")
    for name, p in zip("qkv", (q, k, v)):
        p.check_grads(assert_close, dtype, name)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("weight", WEIGHTS)
def test_lora_mlp_matches_reference(weight, activation, dtype, device, assert_close):
    s = SHAPES[weight]
    gate, up = (Projection(s["inter"], s["hidden"], s["r"], dtype, device, weight) for _ in range(2))
    down = Projection(s["hidden"], s["inter"], s["r"], dtype, device, weight)
    x, x64 = _inputs(s["hidden"], dtype, device)
    y = lora_mlp(x, gate.args, up.args, down.args, activation=activation)
    y64 = lora_mlp_reference(x64, gate.reference_args, up.reference_args, down.reference_args, activation)
    assert_close(y, y64, dtype, "y")
    _backward([y], [y64])
    assert_close(x.grad, x64.grad, dtype, "dx")
    for name, p in (("gate", gate), ("up", up), ("down", down)):
        p.check_grads(assert_close, dtype, name)


def test_outputs_take_in_place_ops(device, assert_close):
    """RoPE rotates q and k in place through a head view; autograd must allow it and stay correct."""
    s, dtype, heads = SHAPES["dense"], torch.float32, 2
    q, k, v = (Projection(n, s["hidden"], s["r"], dtype, device) for n in (s["q"], s["kv"], s["kv"]))
    x, x64 = _inputs(s["hidden"], dtype, device)
    outs = lora_qkv(x, q.args, k.args, v.args)
    refs = lora_qkv_reference(x64, q.reference_args, k.reference_args, v.reference_args)
    for t in (*outs[:2], *refs[:2]):
        t.view(BATCH, SEQ, heads, -1).transpose(1, 2).mul_(3.0)
    y = lora_mlp(x[0, 0], q.args, q.args, q.args)  # a single token without a batch dim
    assert y.shape == (s["q"],)
    y.mul_(2.0)
    _backward(outs, refs)
    assert_close(x.grad, x64.grad, dtype, "dx")
    q.check_grads(assert_close, dtype, "q")


def _saved_tensors(fn):
    """Run ``fn`` and return every tensor autograd saved for backward while it ran."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved


@pytest.mark.parametrize("weight", WEIGHTS)
def test_forward_saves_no_dequantized_weight(weight, device):
    s, dtype, tokens = SHAPES["nf4"], torch.bfloat16, BATCH * SEQ
    hidden, inter, r = s["hidden"], s["inter"], s["r"]
    gate, up = (Projection(inter, hidden, r, dtype, device, weight) for _ in range(2))
    down = Projection(hidden, inter, r, dtype, device, weight)
    q, k, v = (Projection(n, hidden, r, dtype, device, weight) for n in (s["q"], s["kv"], s["kv"]))
    x, _ = _inputs(hidden, dtype, device)
    adapters = sum(p.a.numel() + p.b.numel() for p in (gate, up, down))

    y, saved = _saved_tensors(lambda: lora_mlp(x, gate.args, up.args, down.args))
    weight_shapes = {(inter, hidden), (hidden, inter)}
    assert not [t.shape for t in saved if tuple(t.shape) in weight_shapes]
    # x, gate, up, three [tokens, r] LoRA intermediates and the adapters themselves; nothing else.
    assert sum(t.numel() for t in saved) == tokens * (hidden + 2 * inter + 3 * r) + adapters
    y.sum().backward()  # what was saved is enough
    assert gate.a.grad is not None and down.b.grad is not None

    outs, saved = _saved_tensors(lambda: lora_qkv(x, q.args, k.args, v.args))
    weight_shapes = {(n, hidden) for n in (s["q"], s["kv"])} | {(hidden, n) for n in (s["q"], s["kv"])}
    assert not [t.shape for t in saved if tuple(t.shape) in weight_shapes]
    adapters = sum(p.a.numel() + p.b.numel() for p in (q, k, v))
    assert sum(t.numel() for t in saved) == tokens * (hidden + 3 * r) + adapters


def test_autocast_with_fp32_adapters(device, assert_close):
    """fp32 activations and adapter weights under bf16 autocast: computed in bf16, grads in fp32."""
    s = SHAPES["dense"]
    gate, up = (Projection(s["inter"], s["hidden"], s["r"], torch.float32, device) for _ in range(2))
    down = Projection(s["hidden"], s["inter"], s["r"], torch.float32, device)
    for p in (gate, up, down):
        p.weight = p.dense = p.dense.to(torch.bfloat16)  # a bf16 base model with fp32 adapters
    x, x64 = _inputs(s["hidden"], torch.float32, device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        y = lora_mlp(x, gate.args, up.args, down.args)
    assert y.dtype == torch.bfloat16
    y64 = lora_mlp_reference(x64, gate.reference_args, up.reference_args, down.reference_args)
    assert_close(y, y64, torch.bfloat16, "y")
    _backward([y], [y64])
    assert x.grad.dtype == torch.float32 and gate.a.grad.dtype == torch.float32
    assert_close(x.grad, x64.grad, torch.bfloat16, "dx")
    for name, p in (("gate", gate), ("up", up), ("down", down)):
        assert_close(p.a.grad, p.a64.grad, torch.bfloat16, f"{name}.dA")
        assert_close(p.b.grad, p.b64.grad, torch.bfloat16, f"{name}.dB")


def test_mlp_second_backward_raises_instead_of_wrong_grads(device):
    """Backward reuses the saved gate/up memory for their gradients; a retained graph must not be reused."""
    s = SHAPES["dense"]
    gate, up = (Projection(s["inter"], s["hidden"], s["r"], torch.float32, device) for _ in range(2))
    down = Projection(s["hidden"], s["inter"], s["r"], torch.float32, device)
    x, _ = _inputs(s["hidden"], torch.float32, device)
    y = lora_mlp(x, gate.args, up.args, down.args)
    y.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace"):
        y.sum().backward()


def test_frozen_adapter_gets_no_grad(device):
    s = SHAPES["dense"]
    p = Projection(s["q"], s["hidden"], s["r"], torch.float32, device)
    p.a.requires_grad_(False)
    x, _ = _inputs(s["hidden"], torch.float32, device)
    lora_linear(x, *p.args).sum().backward()
    assert p.a.grad is None and p.b.grad is not None and x.grad is not None


def test_rejects_trainable_base_wrong_shapes_and_unknown_activation(device):
    s = SHAPES["dense"]
    p = Projection(s["q"], s["hidden"], s["r"], torch.float32, device)
    x, _ = _inputs(s["hidden"], torch.float32, device)
    with pytest.raises(ConfigError, match="frozen"):
        lora_linear(x, p.weight.clone().requires_grad_(), p.a, p.b, p.scaling)
    with pytest.raises(ConfigError, match="LoRA shapes"):
        lora_linear(x, p.weight, p.b, p.a, p.scaling)
    with pytest.raises(ConfigError, match="activation"):
        lora_mlp(x, p.args, p.args, p.args, activation="relu")


# --- Llama-3.1-8B sizes on a GPU --------------------------------------------------------------------

LLAMA_8B = dict(hidden=4096, inter=14336, q=4096, kv=1024, r=16)  # 32 query heads, 8 kv heads of 128
LLAMA_TOKENS = (1, 2048)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("weight", WEIGHTS)
def test_llama_8b_qkv_and_mlp(weight, assert_close):
    device, dtype, s = torch.device("cuda"), torch.bfloat16, LLAMA_8B
    x, x64 = _inputs(s["hidden"], dtype, device, LLAMA_TOKENS)
    q, k, v = (Projection(n, s["hidden"], s["r"], dtype, device, weight) for n in (s["q"], s["kv"], s["kv"]))
    outs = lora_qkv(x, q.args, k.args, v.args)
    refs = lora_qkv_reference(x64, q.reference_args, k.reference_args, v.reference_args)
    for name, out, ref in zip("qkv", outs, refs):
        assert_close(out, ref, dtype, name)
    _backward(outs, refs)
    assert_close(x.grad, x64.grad, dtype, "qkv dx")
    for name, p in zip("qkv", (q, k, v)):
        p.check_grads(assert_close, dtype, name)
    del q, k, v, outs, refs

    x.grad = x64.grad = None
    gate, up = (Projection(s["inter"], s["hidden"], s["r"], dtype, device, weight) for _ in range(2))
    down = Projection(s["hidden"], s["inter"], s["r"], dtype, device, weight)
    y = lora_mlp(x, gate.args, up.args, down.args)
    y64 = lora_mlp_reference(x64, gate.reference_args, up.reference_args, down.reference_args)
    assert_close(y, y64, dtype, "mlp")
    _backward([y], [y64])
    assert_close(x.grad, x64.grad, dtype, "mlp dx")
    for name, p in (("gate", gate), ("up", up), ("down", down)):
        p.check_grads(assert_close, dtype, name)


@pytest.mark.gpu
@gpu
def test_llama_8b_mlp_forward_keeps_only_its_activations():
    """After forward, memory grows by the saved activations and the output only: no dense weight stays."""
    device, dtype, s = torch.device("cuda"), torch.bfloat16, LLAMA_8B
    tokens = LLAMA_TOKENS[0] * LLAMA_TOKENS[1]
    gate, up = (Projection(s["inter"], s["hidden"], s["r"], dtype, device, "nf4") for _ in range(2))
    down = Projection(s["hidden"], s["inter"], s["r"], dtype, device, "nf4")
    for p in (gate, up, down):
        del p.dense  # keep only the NF4 weight resident
    x, _ = _inputs(s["hidden"], dtype, device, LLAMA_TOKENS)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    y = lora_mlp(x, gate.args, up.args, down.args)
    torch.cuda.synchronize()
    grown = torch.cuda.memory_allocated() - before
    saved = tokens * (2 * s["inter"] + 3 * s["r"]) * 2  # x was already allocated
    output = y.numel() * 2
    dense_weight = s["inter"] * s["hidden"] * 2
    assert grown <= saved + output + (1 << 20), (grown, saved + output, dense_weight)


@pytest.mark.parametrize("weight", WEIGHTS)
def test_qkv_and_mlp_under_non_reentrant_checkpointing(weight, device, assert_close):
    """torch.utils.checkpoint (use_reentrant=False) lets backward unpack each saved tensor once."""
    from torch.utils.checkpoint import checkpoint

    dtype, s = torch.float32, SHAPES[weight]
    q, k, v = (Projection(n, s["hidden"], s["r"], dtype, device, weight) for n in (s["q"], s["kv"], s["kv"]))
    gate, up = (Projection(s["inter"], s["hidden"], s["r"], dtype, device, weight) for _ in range(2))
    down = Projection(s["hidden"], s["inter"], s["r"], dtype, device, weight)

    def block(x):
        a, b, c = lora_qkv(x, q.args, k.args, v.args)
        return lora_mlp(x, gate.args, up.args, down.args).sum() + a.sum() + b.sum() + c.sum()

    x, _ = _inputs(s["hidden"], dtype, device)
    checkpoint(block, x, use_reentrant=False).backward()
    got = [p.grad.clone() for p in (q.a, q.b, gate.a, down.b)] + [x.grad.clone()]
    for p in (q.a, q.b, gate.a, down.b, x):
        p.grad = None
    block(x).backward()
    want = [p.grad for p in (q.a, q.b, gate.a, down.b)] + [x.grad]
    for name, g, w in zip(("qA", "qB", "gateA", "downB", "x"), got, want):
        assert_close(g, w.double(), dtype, name)
