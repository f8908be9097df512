"""Counting live tensor bytes on the CPU, where PyTorch keeps no allocator statistics.

Two counters, both keyed by storage address and both learning of a storage's end from a finalizer on its
Python object (PyTorch keeps that object alive exactly as long as the storage, views included):

- `SavedTensorCounter` (the default): a `saved_tensors_hooks` pair around the forward sees every tensor autograd
  keeps for backward. That is the activation memory the graph holds, exact and cheap: one Python call per saved
  tensor, nothing per operation. It does not see the transient working set of backward (recomputed layers,
  activation gradients).
- `AllocationTracker` (opt-in, `cpu_mode="exact"`): a dispatch mode sees every storage an operation creates, so it
  reports what CUDA's `memory_allocated` / `max_memory_allocated` would, transients included. Every operation pays
  a Python call (about 20% slower steps), so it is for checking the estimator, not for everyday training.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class _LiveBytes:
    """Bytes of the storages registered and not yet freed, with a resettable peak."""

    def __init__(self, skip: Iterable[int] = ()):
        self.live = 0
        self.peak = 0
        self._sizes: dict[int, int] = {}
        self._skip = set(skip)

    def register(self, t: torch.Tensor) -> None:
        if t.device.type != "cpu":
            return
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr == 0 or ptr in self._sizes or ptr in self._skip:
            return
        size = storage.nbytes()
        self._sizes[ptr] = size
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._release, ptr)

    def _release(self, ptr: int) -> None:
        self.live -= self._sizes.pop(ptr, 0)

    def reset_peak(self) -> None:
        self.peak = self.live


class SavedTensorCounter(_LiveBytes):
    """Live bytes of the tensors autograd saves for backward (and of the forward's outputs, via `hold`).

    `skip` holds the storage addresses of parameters: a linear layer saves its weight, which is not an activation.
    Hooks pushed inside the forward (checkpointing, offloading) take precedence over these, so tensors they
    discard or move to the host are rightly not counted here.
    """

    def __init__(self, skip: Iterable[int] = ()):
        super().__init__(skip)
        self._hooks = None

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        self.register(t)
        return t

    def start(self) -> None:
        if self._hooks is None:
            self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, _same)
            self._hooks.__enter__()

    def stop(self) -> None:
        if self._hooks is not None:
            self._hooks.__exit__(None, None, None)
            self._hooks = None

    def hold(self, tensors: Iterable) -> None:
        for t in tensors:
            if isinstance(t, torch.Tensor):
                self.register(t)


def _same(t):
    return t


class AllocationTracker(_LiveBytes, TorchDispatchMode):
    """Every CPU storage created by an aten operation while active, live until freed.

    Seed it with the tensors that exist already (weights, gradients, optimizer state) so that their frees are
    seen too; then `live` and `peak` mean what `torch.cuda.memory_allocated` and `max_memory_allocated` mean.
    """

    def __init__(self):
        _LiveBytes.__init__(self)
        TorchDispatchMode.__init__(self)
        self._aliasing: dict = {}
        self.active = False

    def seed(self, tensors: Iterable[torch.Tensor]) -> None:
        for t in tensors:
            self.register(t)

    def _returns_alias(self, func) -> bool:
        # Views and in-place/out= operations return storage that already exists: not an allocation.
        alias = self._aliasing.get(func)
        if alias is None:
            alias = any(r.alias_info is not None for r in func._schema.returns)
            self._aliasing[func] = alias
        return alias

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self._returns_alias(func):
            if isinstance(out, torch.Tensor):
                self.register(out)
            elif isinstance(out, (tuple, list)):
                for o in out:
                    if isinstance(o, torch.Tensor):
                        self.register(o)
        return out

    def start(self) -> None:
        if not self.active:
            self.__enter__()
            self.active = True

    def stop(self) -> None:
        if self.active:
            self.__exit__(None, None, None)
            self.active = False
