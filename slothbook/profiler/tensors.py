"""Byte counts of the tensors the profiler can name, every storage counted once.

Memory belongs to storages, not tensors: tied embeddings, views and fused-projection slices share one
storage, so every count goes through `StorageSet`, which keys storages by (device, address).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn


def storage_key(t: torch.Tensor) -> tuple:
    try:
        return (t.device.type, t.device.index, t.untyped_storage().data_ptr())
    except (RuntimeError, NotImplementedError):  # tensor subclasses without a plain storage
        return (t.device.type, t.device.index, id(t))


def storage_bytes(t: torch.Tensor) -> int:
    try:
        return t.untyped_storage().nbytes()
    except (RuntimeError, NotImplementedError):
        return t.numel() * t.element_size()


def on_device(t: torch.Tensor, device: torch.device) -> bool:
    if t.device.type != device.type:
        return False
    return device.index is None or t.device.index in (None, device.index)


class StorageSet:
    """Storages seen so far on one device; `add` returns the bytes a tensor adds (0 when already seen)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.keys: set[tuple] = set()

    def add(self, t: torch.Tensor | None) -> int:
        if t is None or not isinstance(t, torch.Tensor) or not on_device(t, self.device):
            return 0
        key = storage_key(t)
        if key in self.keys:
            return 0
        self.keys.add(key)
        return storage_bytes(t)

    def add_all(self, tensors: Iterable[torch.Tensor | None]) -> int:
        return sum(self.add(t) for t in tensors)


def quant_state_tensors(param: torch.Tensor) -> Iterator[torch.Tensor]:
    """The side tensors quantized weights keep beside their packed data.

    bitsandbytes Params4bit: `quant_state` (absmax, code, offset) and, with double quantization, `state2` (the
    absmax of the absmax and its code). Int8Params: the row scales `SCB` (and `CB` when it is a separate copy).
    """
    state = getattr(param, "quant_state", None)
    while state is not None:
        for name in ("absmax", "code", "offset"):
            value = getattr(state, name, None)
            if isinstance(value, torch.Tensor):
                yield value
        state = getattr(state, "state2", None)
    for name in ("SCB", "CB"):
        value = getattr(param, name, None)
        if isinstance(value, torch.Tensor):
            yield value


def base_tensors(model: nn.Module) -> Iterator[torch.Tensor]:
    """Frozen parameters with their quantization state, and buffers (rotary tables, norms' constants)."""
    for p in model.parameters():
        if not p.requires_grad:
            yield p
            yield from quant_state_tensors(p)
    yield from model.buffers()


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def optimizer_tensors(optimizer) -> Iterator[torch.Tensor]:
    """Every tensor in the optimizer's per-parameter state (AdamW moments and step, 8-bit blocks and maps)."""
    for state in unwrap_optimizer(optimizer).state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                yield value


def unwrap_optimizer(optimizer):
    # accelerate's AcceleratedOptimizer (what Trainer hands callbacks) wraps the real one in `.optimizer`.
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def model_device(model: nn.Module) -> torch.device:
    """The device that holds most of the model's parameter bytes (the one worth profiling)."""
    totals: dict[torch.device, int] = {}
    for p in model.parameters():
        totals[p.device] = totals.get(p.device, 0) + p.numel() * p.element_size()
    if not totals:
        return torch.device("cpu")
    device = max(totals, key=totals.get)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device
