"""%vram's numbers: bytes by category for a model and optimizer, and the one-line form."""

from __future__ import annotations

import torch
from torch import nn

from slothbook.ui.vram import memory_by_category, memory_line


def _model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 4))
    model[0].requires_grad_(False)  # the frozen base; model[1] plays the adapter
    return model


def test_categories_count_frozen_trainable_gradient_and_optimizer_bytes():
    model = _model()
    m = memory_by_category(model)
    assert m["device"] == "cpu"
    assert m["weights"] == (16 * 16 + 16) * 4 and m["lora"] == (16 * 4 + 4) * 4
    assert m["gradients"] == 0 and m["optimizer"] == 0

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    model(torch.randn(2, 16)).sum().backward()
    optimizer.step()
    m = memory_by_category(model, optimizer)
    assert m["gradients"] == (16 * 4 + 4) * 4
    assert m["optimizer"] == 2 * (16 * 4 + 4) * 4 + 2 * 4  # two moments per parameter, a float32 step each
    assert m["held"] >= m["other"] > 0 and m["capacity"] > m["held"]


def test_one_line_names_every_category_without_a_model():
    line = memory_line()
    assert "\n" not in line and line.startswith("cpu |")
    for word in ("weights 0 B", "LoRA 0 B", "gradients", "optimizer", "rest of the process", "resident", "%)"):
        assert word in line
