"""Naming tensors: storages counted once (tied embeddings, views), quantization state included."""

from __future__ import annotations

import torch
from torch import nn

from slothbook.profiler.tensors import StorageSet, base_tensors, quant_state_tensors, unwrap_optimizer


def test_tied_embeddings_and_views_are_counted_once():
    emb = nn.Embedding(100, 8)
    head = nn.Linear(8, 100, bias=False)
    head.weight = emb.weight
    seen = StorageSet(torch.device("cpu"))
    assert seen.add(emb.weight) == 100 * 8 * 4
    assert seen.add(head.weight) == 0
    assert seen.add(emb.weight[:10]) == 0


def test_other_devices_are_not_counted():
    seen = StorageSet(torch.device("cuda", 0))
    assert seen.add(torch.zeros(10)) == 0


def test_four_bit_weights_carry_their_quantization_state(model4):
    quantized = [p for p in model4.parameters() if getattr(p, "quant_state", None) is not None]
    assert quantized, "the 4-bit model has no Params4bit"
    p = quantized[0]
    extra = list(quant_state_tensors(p))
    state = p.quant_state
    assert {id(t) for t in extra} == {id(state.absmax), id(state.code), id(state.offset), id(state.state2.absmax),
                                      id(state.state2.code)}
    assert p.dtype == torch.uint8 and p.numel() * 2 == state.shape.numel()  # two NF4 weights per stored byte
    assert any(t is p for t in base_tensors(model4))


def test_unwrap_optimizer_reaches_the_torch_optimizer():
    class Wrapper(torch.optim.Optimizer):  # accelerate's AcceleratedOptimizer has this shape
        def __init__(self, optimizer):
            self.optimizer = optimizer

    inner = torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.1)
    assert unwrap_optimizer(Wrapper(inner)) is inner
    assert unwrap_optimizer(inner) is inner
