"""SwiGLU / GeGLU kernels against plain-torch references in float64."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from slothbook.errors import ConfigError
from slothbook.kernels.swiglu import (
    GatedMLP,
    geglu,
    geglu_reference,
    glu_backward,
    glu_forward,
    glu_reference,
    swiglu,
    swiglu_reference,
)

# The interpreter's numpy warns when exp overflows to inf inside a sigmoid; the result (0 or 1) is right, as on a GPU.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")

ACTIVATIONS = ["silu", "gelu_tanh", "gelu"]
SHAPES = [(7, 67), (2, 3, 129), (5, 1500)]  # the last one spans two column blocks


def _pair(shape, dtype, device, scale=3.0):
    gate = (torch.randn(shape, device=device) * scale).to(dtype)
    up = torch.randn(shape, device=device).to(dtype)
    return gate, up


def _reference_grads(gate, up, dy, activation):
    g64 = gate.detach().double().requires_grad_()
    u64 = up.detach().double().requires_grad_()
    y64 = glu_reference(g64, u64, activation)
    y64.backward(dy.double())
    return y64.detach(), g64.grad, u64.grad


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_forward_writes_every_element_and_matches_reference(activation, shape, dtype, device, poisoned, assert_close):
    gate, up = _pair(shape, dtype, device)
    out = poisoned(gate)
    y = glu_forward(gate, up, activation, out=out)
    assert y is out and y.dtype == dtype
    assert_close(y, glu_reference(gate.double(), up.double(), activation), dtype, "y")


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_backward_writes_every_element_and_matches_reference(activation, shape, dtype, device, poisoned, assert_close):
    gate, up = _pair(shape, dtype, device)
    dy = torch.randn_like(gate)
    dgate, dup = glu_backward(dy, gate, up, activation, dgate=poisoned(gate), dup=poisoned(up))
    _, dg64, du64 = _reference_grads(gate, up, dy, activation)
    assert_close(dgate, dg64, dtype, "dgate")
    assert_close(dup, du64, dtype, "dup")


@pytest.mark.parametrize(
    "fn,activation",
    [(swiglu, "silu"), (lambda g, u: geglu(g, u, "tanh"), "gelu_tanh"), (lambda g, u: geglu(g, u, "none"), "gelu")],
    ids=["swiglu", "geglu-tanh", "geglu-none"],
)
def test_autograd_through_a_fused_gate_up_projection(fn, activation, dtype, device, assert_close):
    """gate and up as the two halves of one [rows, 2 * inter] tensor: strided rows, gradients land in one buffer."""
    gate_up = (torch.randn(2, 5, 2 * 67, device=device) * 3).to(dtype).requires_grad_()
    gate, up = gate_up.chunk(2, dim=-1)
    y = fn(gate, up)
    dy = torch.randn_like(y)
    y.backward(dy)
    y64, dg64, du64 = _reference_grads(gate, up, dy, activation)
    assert_close(y, y64, dtype, "y")
    assert_close(gate_up.grad, torch.cat((dg64, du64), dim=-1), dtype, "grad")


def test_backward_into_gate_and_up_memory(device, assert_close):
    gate, up = _pair((6, 67), torch.float32, device)
    dy = torch.randn_like(gate)
    _, dg64, du64 = _reference_grads(gate, up, dy, "silu")
    dgate, dup = glu_backward(dy, gate, up, "silu", dgate=gate, dup=up)
    assert dgate is gate and dup is up
    assert_close(dgate, dg64, name="dgate")
    assert_close(dup, du64, name="dup")


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_large_inputs_stay_finite(activation, device, assert_close):
    gate = torch.linspace(-60, 60, 301, device=device).reshape(7, 43)
    up = torch.randn_like(gate)
    dy = torch.randn_like(gate)
    y64, dg64, du64 = _reference_grads(gate, up, dy, activation)
    assert_close(glu_forward(gate, up, activation), y64, name="y")
    dgate, dup = glu_backward(dy, gate, up, activation)
    assert_close(dgate, dg64, name="dgate")
    assert_close(dup, du64, name="dup")


def test_references_are_the_torch_activations(device):
    gate, up = _pair((4, 9), torch.float64, device)
    assert torch.equal(swiglu_reference(gate, up), nn.functional.silu(gate) * up)
    assert torch.equal(geglu_reference(gate, up, "none"), nn.functional.gelu(gate) * up)
    assert torch.equal(geglu_reference(gate, up, "tanh"), nn.functional.gelu(gate, approximate="tanh") * up)


def test_gated_mlp_matches_torch(device, assert_close):
    gate_proj, up_proj, down_proj = nn.Linear(32, 67, bias=False), nn.Linear(32, 67, bias=False), nn.Linear(67, 32)
    mlp_hf = nn.Module()
    mlp_hf.gate_proj, mlp_hf.up_proj, mlp_hf.down_proj = gate_proj, up_proj, down_proj
    mlp = GatedMLP.from_hf(mlp_hf.to(device), activation="gelu_tanh")
    assert mlp.gate_proj is gate_proj
    x = torch.randn(3, 5, 32, device=device)
    expected = down_proj(nn.functional.gelu(gate_proj(x), approximate="tanh") * up_proj(x))
    assert_close(mlp(x), expected, name="mlp")


def test_rejects_bad_arguments(device):
    gate, up = _pair((3, 8), torch.float32, device)
    with pytest.raises(ConfigError):
        geglu(gate, up, approximate="sigmoid")
    with pytest.raises(ConfigError):
        swiglu(gate, up[:, :4])
    with pytest.raises(ConfigError):
        glu_forward(gate, up, "relu")
    with pytest.raises(ConfigError):
        swiglu(gate.requires_grad_(), up, out=torch.empty_like(up))


@pytest.mark.gpu
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gpu_realistic_size(activation, assert_close):
    gate, up = _pair((8192, 11008), torch.bfloat16, torch.device("cuda"))
    gate.requires_grad_()
    up.requires_grad_()
    fn = {"silu": swiglu, "gelu_tanh": lambda g, u: geglu(g, u, "tanh"), "gelu": lambda g, u: geglu(g, u, "none")}
    y = fn[activation](gate, up)
    dy = torch.randn_like(y)
    y.backward(dy)
    g32, u32 = gate.detach().float().requires_grad_(), up.detach().float().requires_grad_()
    y32 = glu_reference(g32, u32, activation)
    y32.backward(dy.float())
    assert_close(y, y32, torch.bfloat16, "y")
    assert_close(gate.grad, g32.grad, torch.bfloat16, "dgate")
    assert_close(up.grad, u32.grad, torch.bfloat16, "dup")
