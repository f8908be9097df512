"""Gradient checkpointing whose saved layer inputs wait in pinned host memory.

Each decoder layer keeps only its input hidden state. On CUDA that input is copied to a pinned host buffer
on a side stream while the GPU goes on computing; in backward the input of the layer below is copied back
while the current layer recomputes. CUDA events order the two streams; nothing synchronises the device.

    forward   compute  --[layer k]---------------[layer k+1]-----------------
                       | event: input k written  | event: input k+1 written
              side     +-[input k -> pinned]-----+-[input k+1 -> pinned]------
    backward  compute  --wait(k ready)-[recompute k, grads k]--wait(k-1 ready)-[recompute k-1, grads k-1]--
              side     ----------------[input k-1 -> GPU]-> event: k-1 ready

`record_stream` keeps the caching allocator from reusing a tensor's memory before a side-stream copy of it
has finished, whenever Python frees it.

Host buffers come from a `PinnedPool` kept for the life of the model: a step takes one buffer per layer and
gives it back in backward, so after the first step no pinned memory is allocated unless a longer sequence
arrives. On the CPU there is nothing to offload to and layers use plain `torch.utils.checkpoint`.

With `auto=True` (use_gradient_checkpointing="auto") a `KeepPlan` (keep.py) decides at the first layer of each
training forward how many of the last layers fit in free GPU memory; those run unwrapped, autograd keeping their
activations, and only the layers below them are checkpointed.
"""

from __future__ import annotations

import contextlib
import contextvars
import warnings
import weakref
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..device import host_memory_available
from ..errors import TrainingError, UnsupportedArchitectureError
from ..forwards import patch_forward, unpatch_forward
from ..models.unwrap import base_model_of
from .keep import KeepPlan

_POOLS: "weakref.WeakSet[PinnedPool]" = weakref.WeakSet()
_PATCH_KEY = "_slothbook_checkpoint"
_PLAN_KEY = "_slothbook_keep_plan"  # on the decoder layers' ModuleList while "auto" is on
_IN_KEPT_LAYER = contextvars.ContextVar("slothbook_in_kept_layer", default=False)
_TWICE = ("A checkpointed layer was differentiated twice. Offloaded checkpointing keeps a layer's input for "
          "one backward; use use_gradient_checkpointing=True for retain_graph or higher-order gradients.")
_CACHE_ARGS = ("cache", "past_key_values", "past_key_value", "layer_past")  # "cache": transformers >= 5.24
# Where causal LMs keep their decoder layers, below the model (or a PeftModel's base model).
_LAYER_PATHS = ("model.layers", "model.language_model.layers", "language_model.model.layers",
                "transformer.h", "gpt_neox.layers", "model.decoder.layers")


# ---------------------------------------------------------------- host buffers

@dataclass(frozen=True)
class PoolStats:
    allocations: int  # host buffers allocated since the pool was made
    capacity: int     # bytes held, free or in use
    in_use: int       # bytes holding a saved layer input right now
    buffers: int      # buffers held


class PinnedPool:
    """Host buffers for saved layer inputs, reused from step to step.

    Small buffers are rounded up to a power of two, which is what torch's pinned allocator reserves anyway.
    Large ones (long contexts: 32 layers x 350K tokens x 8 KiB is ~92 GB) would waste up to half the host's
    memory that way, so above `_EXACT_FROM` they are ordinary host memory page-locked in place with
    cudaHostRegister, sized in 1/16-octave steps (<= 6.25% slack). `capacity` is the real footprint either way.
    When nothing free is large enough the pool replaces a smaller free buffer instead of keeping both: a longer
    sequence grows it once, equal or shorter ones reuse it.
    `pin=False` gives ordinary memory through the same code (CPU-only machines, tests).
    """

    def __init__(self, pin: bool | None = None):
        self.pin = torch.cuda.is_available() if pin is None else pin
        self._free: list[torch.Tensor] = []
        self._capacity = 0
        self._in_use = 0
        self._buffers = 0
        self.allocations = 0
        _POOLS.add(self)

    @property
    def capacity(self) -> int:
        return self._capacity

    def stats(self) -> PoolStats:
        return PoolStats(self.allocations, self._capacity, self._in_use, self._buffers)

    def acquire(self, nbytes: int) -> torch.Tensor:
        """A free uint8 buffer of at least `nbytes` (the smallest that fits); grows the pool if none does."""
        fits = [b for b in self._free if b.numel() >= nbytes]
        if fits:
            buffer = min(fits, key=torch.Tensor.numel)
            self._free.remove(buffer)
        else:
            if self._free:  # every free buffer is too small: swap the smallest for a larger one
                small = min(self._free, key=torch.Tensor.numel)
                self._free.remove(small)
                if self.pin and torch.cuda.is_available():
                    torch.cuda.synchronize()  # a prefetch may still be reading it (rare: only when growing)
                self._capacity -= small.numel()
                self._buffers -= 1
                del small  # freed now, so that the host-memory check below counts its bytes as available
            buffer = self._allocate(_size_class(nbytes))
        self._in_use += buffer.numel()
        return buffer

    def release(self, buffer: torch.Tensor) -> None:
        """Give a buffer back. Safe while a copy out of it is still queued: every copy into a buffer is
        queued behind it on the same side stream."""
        self._in_use -= buffer.numel()
        self._free.append(buffer)

    def _allocate(self, size: int) -> torch.Tensor:
        if size > _EXACT_FROM:
            _check_host_room(size, self._capacity)
        try:
            buffer = _pinned(size) if self.pin else torch.empty(size, dtype=torch.uint8)
        except RuntimeError as exc:  # locked-memory limit (ulimit -l) in some containers
            warnings.warn(f"Could not pin {size} bytes of host memory ({exc}); offloading to pageable memory, "
                          "which makes the copies synchronous. Raise `ulimit -l` to restore the overlap.")
            self.pin = False
            buffer = torch.empty(size, dtype=torch.uint8)
        self.allocations += 1
        self._buffers += 1
        self._capacity += size
        return buffer


_EXACT_FROM = 64 << 20  # bytes; below: torch's caching pinned allocator (power-of-two blocks)
_STEPS_PER_OCTAVE = 16
_HOST_RESERVE = 2 << 30  # bytes of host memory left to the OS and this process's own growth


def _check_host_room(size: int, held: int) -> None:
    """A clear error instead of the kernel's out-of-memory kill (which takes a notebook's kernel with it) when the
    next layer input does not fit in the host memory that is left."""
    available = host_memory_available()
    if size <= available - _HOST_RESERVE:
        return
    gib = 2**30
    raise TrainingError(
        f"Offloaded checkpointing needs {size / gib:.2f} GiB more host memory for the next layer's input, but only "
        f"{available / gib:.2f} GiB is available (the offload pool already holds {held / gib:.2f} GiB; every "
        f"offloaded layer keeps its input, tokens x hidden size x 2 bytes, in host memory). Shorten the sequence "
        "or the batch, free host memory, or use use_gradient_checkpointing='auto' (keeps the last layers' "
        "activations on the GPU) or True (plain checkpointing: layer inputs stay on the GPU).")


def _size_class(nbytes: int) -> int:
    power = 1 << max(nbytes - 1, 0).bit_length()
    if power <= _EXACT_FROM:
        return power
    step = power // (2 * _STEPS_PER_OCTAVE)
    return -(-nbytes // step) * step


def _pinned(size: int) -> torch.Tensor:
    """`size` page-locked bytes: from torch's caching allocator when small, registered in place when large."""
    if size <= _EXACT_FROM:
        return torch.empty(size, dtype=torch.uint8, pin_memory=True)
    buffer = torch.empty(size, dtype=torch.uint8)
    cudart = torch.cuda.cudart()
    err = int(cudart.cudaHostRegister(buffer.data_ptr(), size, 0))
    if err != 0:
        raise RuntimeError(f"cudaHostRegister of {size} bytes failed with CUDA error {err}")
    global _registered
    _registered += size
    # Unpin when the pool drops the buffer (its storage is freed right after this runs).
    weakref.finalize(buffer, _unregister, cudart, buffer.data_ptr(), size)
    return buffer


_registered = 0  # bytes page-locked by _pinned in place: torch's host allocator statistics do not see them


def _unregister(cudart, ptr: int, size: int) -> None:
    global _registered
    cudart.cudaHostUnregister(ptr)
    _registered -= size


def registered_bytes() -> int:
    """Host bytes page-locked in place for large offload buffers (not in torch.cuda.host_memory_stats)."""
    return _registered


def offloaded_bytes() -> int:
    """Host bytes held by every offload pool alive (pinned memory on CUDA machines); read by the profiler."""
    return sum(pool.capacity for pool in list(_POOLS))


# ---------------------------------------------------------------- moving one saved input

class _Offloader:
    """Moves saved layer inputs between their device and a pool. One per model."""

    def __init__(self, pool: PinnedPool):
        self.pool = pool
        self.latest: weakref.ref | None = None  # the input saved last, which the next one prefetches in backward
        self._streams: dict[torch.device, torch.cuda.Stream] = {}

    def side_stream(self, device: torch.device):
        if device.type != "cuda":
            return None
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device=device)
        return self._streams[device]

    def to_host(self, x: torch.Tensor, host: torch.Tensor) -> None:
        side = self.side_stream(x.device)
        if side is None:
            host.copy_(x)
            return
        side.wait_event(torch.cuda.current_stream(x.device).record_event())  # x is written by queued compute
        with torch.cuda.stream(side):
            host.copy_(x, non_blocking=True)
        x.record_stream(side)  # the allocator must not hand x's memory out before the copy has read it

    def to_device(self, host: torch.Tensor, device: torch.device):
        """A device copy of `host` and the event that marks it ready (None when the copy was synchronous)."""
        side = self.side_stream(device)
        if side is None:
            return host.clone(), None
        compute = torch.cuda.current_stream(device)
        x = torch.empty(host.shape, dtype=host.dtype, device=device)  # owned by compute, which will read it
        side.wait_event(compute.record_event())  # x's block may still be read by queued compute kernels
        with torch.cuda.stream(side):
            x.copy_(host, non_blocking=True)
        x.record_stream(side)  # stays safe if it is freed unused (a prefetch whose backward never comes)
        return x, side.record_event()


class _SavedInput:
    """One layer input parked in host memory from its forward to its backward."""

    def __init__(self, offloader: _Offloader, x: torch.Tensor):
        x = x.contiguous()
        nbytes = x.numel() * x.element_size()
        buffer = offloader.pool.acquire(nbytes)
        self.host = buffer[:nbytes].view(x.dtype).view(x.shape)
        self.device = x.device
        self.offloader = offloader
        # Gives the buffer back after backward, or when the graph is dropped without one.
        self._release = weakref.finalize(self, offloader.pool.release, buffer)
        self._below = offloader.latest
        offloader.latest = weakref.ref(self)
        self._fetched = None
        offloader.to_host(x, self.host)

    def prefetch(self) -> None:
        if self._fetched is None and self.host is not None:
            self._fetched = self.offloader.to_device(self.host, self.device)

    def prefetch_below(self) -> None:
        below = self._below() if self._below is not None else None
        if below is not None:
            below.prefetch()

    def take(self) -> torch.Tensor:
        """The input back on its device, ready for the current stream; the host buffer returns to the pool."""
        if self.host is None:
            raise TrainingError(_TWICE)
        self.prefetch()
        x, ready = self._fetched
        if ready is not None:
            torch.cuda.current_stream(self.device).wait_event(ready)
        self._fetched = self.host = None
        self._release()
        return x


# ---------------------------------------------------------------- recomputation

class ReplayState:
    """What a recompute needs to repeat a forward exactly: RNG states (dropout) and autocast settings."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cpu_rng = torch.get_rng_state()
        self.cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        self.autocast = (torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type))

    @contextlib.contextmanager
    def replay(self):
        cuda_devices = [self.device] if self.cuda_rng is not None else []
        enabled, dtype = self.autocast
        with torch.random.fork_rng(devices=cuda_devices), torch.enable_grad(), \
                torch.autocast(self.device.type, dtype=dtype, enabled=enabled):
            torch.set_rng_state(self.cpu_rng)
            if self.cuda_rng is not None:
                torch.cuda.set_rng_state(self.cuda_rng, self.device)
            yield


def grads_of(outputs, grad_outputs, inputs: list[torch.Tensor]) -> list[torch.Tensor | None]:
    """Gradients of `inputs` given the output gradients autograd handed to a Function's backward."""
    outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
    pairs = [(o, g) for o, g in zip(outputs, grad_outputs)
             if isinstance(o, torch.Tensor) and o.requires_grad and g is not None]
    if not pairs or not inputs:
        return [None] * len(inputs)
    outs, grads = zip(*pairs)
    return list(torch.autograd.grad(outs, inputs, grads, allow_unused=True))


class _OffloadedLayer(torch.autograd.Function):
    """Runs a layer without keeping activations; parks its input in host memory; recomputes in backward.

    The layer's trainable parameters are inputs of the Function, so its output requires grad even when
    the hidden state does not (frozen embeddings) and their gradients flow through autograd as usual.
    """

    @staticmethod
    def forward(ctx, run, offloader, hidden, *params):
        ctx.run, ctx.params = run, params
        ctx.replay = ReplayState(hidden.device)
        ctx.saved = _SavedInput(offloader, hidden)
        return run(hidden)  # autograd runs Function.forward under no_grad

    @staticmethod
    def backward(ctx, *grad_outputs):
        saved, run, params = ctx.saved, ctx.run, ctx.params
        ctx.saved = ctx.run = ctx.params = None  # ctx outlives backward while the loss is referenced
        if saved is None:
            raise TrainingError(_TWICE)
        hidden = saved.take()
        saved.prefetch_below()  # the copy overlaps this layer's recompute
        need_hidden, need_params = ctx.needs_input_grad[2], ctx.needs_input_grad[3:]
        hidden = hidden.detach().requires_grad_(need_hidden)
        wanted = [p for p, need in zip(params, need_params) if need]
        with ctx.replay.replay():
            outputs = run(hidden)
        grads = iter(grads_of(outputs, grad_outputs, ([hidden] if need_hidden else []) + wanted))
        grad_hidden = next(grads) if need_hidden else None
        return (None, None, grad_hidden, *(next(grads) if need else None for need in need_params))


# ---------------------------------------------------------------- wrapping decoder layers

def find_decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The nn.ModuleList of decoder layers of a causal LM, a PeftModel around one, or a bare base model."""
    base = base_model_of(model)
    for path in _LAYER_PATHS:
        found = base
        for name in path.split("."):
            found = getattr(found, name, None)
        if isinstance(found, nn.ModuleList) and len(found) > 0:
            return found
    # Unknown layout: the longest list of identical blocks named in _no_split_modules.
    names = set(getattr(base, "_no_split_modules", None) or ())
    candidates = [m for m in base.modules() if isinstance(m, nn.ModuleList) and len(m) > 0
                  and len({type(b) for b in m}) == 1 and type(m[0]).__name__ in names]
    if not candidates:
        raise UnsupportedArchitectureError(
            f"Could not find the decoder layers of {type(base).__name__}. Use use_gradient_checkpointing=True "
            "(plain checkpointing) for this model, or report the architecture.")
    return max(candidates, key=len)


def _split_hidden(args: tuple, kwargs: dict):
    """The hidden state, the other arguments, and a function that calls a forward with another hidden state."""
    if args:
        # Bind the other arguments alone: a closure over `args` would keep the input hidden state alive on the
        # device until backward, which is exactly what offloading it is meant to avoid.
        others = args[1:]
        return args[0], (others, kwargs), lambda forward, h: forward(h, *others, **kwargs)
    others = {k: v for k, v in kwargs.items() if k != "hidden_states"}
    return kwargs["hidden_states"], ((), others), lambda forward, h: forward(hidden_states=h, **others)


def _without_cache(layer: nn.Module, kwargs: dict) -> dict:
    """The recompute would write the KV cache a second time, and training has no use for it (as in HF)."""
    if getattr(layer, "_can_checkpoint_with_cache", False):
        return kwargs
    kwargs = dict(kwargs)
    if kwargs.get("use_cache"):
        kwargs["use_cache"] = False
    for name in _CACHE_ARGS:
        if kwargs.get(name) is not None:
            kwargs[name] = None
    return kwargs


def _needs_grad(obj) -> bool:
    if isinstance(obj, torch.Tensor):
        return obj.requires_grad
    if isinstance(obj, (tuple, list)):
        return any(_needs_grad(o) for o in obj)
    if isinstance(obj, dict):
        return any(_needs_grad(o) for o in obj.values())
    return False


def in_kept_layer() -> bool:
    """Whether the caller runs inside a decoder layer that keeps its activations (the tiled MLP stays off there:
    tiling recomputes the MLP, which is what keeping the layer avoids)."""
    return _IN_KEPT_LAYER.get()


def _run_kept(forward, args, kwargs):
    token = _IN_KEPT_LAYER.set(True)
    try:
        return forward(*args, **kwargs)
    finally:
        _IN_KEPT_LAYER.reset(token)


def _checkpointed_forward(layer: nn.Module, forward, offloader: _Offloader | None, offload_on_cpu: bool,
                          index: int = 0, plan: KeepPlan | None = None):
    def checkpointed(*args, **kwargs):
        if not (layer.training and torch.is_grad_enabled()):
            return forward(*args, **kwargs)  # eval and generation run the layer untouched
        if getattr(layer, "gradient_checkpointing", False):
            layer.gradient_checkpointing = False  # ours replaces HF's (a Trainer may switch it on later)
        kwargs = _without_cache(layer, kwargs)
        hidden, rest, call = _split_hidden(args, kwargs)
        if plan is not None:
            if index == 0:
                plan.start(hidden)
            if index >= plan.first_kept:
                return _run_kept(forward, args, kwargs)
        use_offload = offloader is not None and (hidden.is_cuda or offload_on_cpu)
        # Only the hidden state is saved: other arguments that need grad take the general path.
        if use_offload and not _needs_grad(rest):
            params = [p for p in layer.parameters() if p.requires_grad]
            return _OffloadedLayer.apply(lambda h: call(forward, h), offloader, hidden, *params)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return checkpointed


def enable_offloaded_checkpointing(model: nn.Module, offload: bool = True, pool: PinnedPool | None = None,
                                   offload_on_cpu: bool = False, auto: bool = False,
                                   memory_budget=None) -> PinnedPool | None:
    """Checkpoint every decoder layer of `model`, keeping only each layer's input hidden state.

    offload: park those inputs in pinned host memory (CUDA), copied on a side stream that overlaps compute.
        False keeps them on the device (plain checkpointing). On the CPU layers always use plain
        `torch.utils.checkpoint`, unless `offload_on_cpu` routes them through the pool too (ordinary
        memory: it only costs a copy, and lets the offload path be tested without a GPU).
    pool: the host pool to use; a new `PinnedPool` by default.
    auto: leave the last layers unwrapped, as many as fit in free GPU memory, re-planned every training forward
        (see keep.py; `keep_plan(model).kept` says how many the latest forward kept). memory_budget: None
        (measured; on the CPU no layer is kept), the bytes the kept layers may take (int), or a fraction (float)
        of the measured room.
    Returns the pool (None when offload is False). Eval mode and no-grad calls run the layers untouched.
    Calling it again replaces the previous wrapping; `disable_offloaded_checkpointing` undoes it.
    """
    layers = find_decoder_layers(model)
    disable_offloaded_checkpointing(model)
    plan = KeepPlan(_config_of(model), layers, memory_budget) if auto else None
    if offload and pool is None:
        pool = PinnedPool()
    offloader = _Offloader(pool) if offload else None
    for index, layer in enumerate(layers):
        if getattr(layer, "gradient_checkpointing", False):
            layer.gradient_checkpointing = False
        patch_forward(layer, _PATCH_KEY,
                      _checkpointed_forward(layer, layer.forward, offloader, offload_on_cpu, index, plan))
    if plan is not None:
        layers.__dict__[_PLAN_KEY] = plan
    return pool if offload else None


def disable_offloaded_checkpointing(model: nn.Module) -> None:
    """Restore the decoder layers' own forwards (a no-op where nothing was wrapped)."""
    layers = find_decoder_layers(model)
    layers.__dict__.pop(_PLAN_KEY, None)
    for layer in layers:
        unpatch_forward(layer, _PATCH_KEY)


def keep_plan(model: nn.Module) -> KeepPlan | None:
    """The KeepPlan of a model wrapped with auto=True (use_gradient_checkpointing="auto"), else None."""
    return find_decoder_layers(model).__dict__.get(_PLAN_KEY)


def _config_of(model: nn.Module):
    base = base_model_of(model)
    config = getattr(base, "config", None)
    if config is None:
        raise UnsupportedArchitectureError(f"{type(base).__name__} has no `.config`, which use_gradient_checkpointing="
                                           "'auto' reads the layer sizes from. Use True or 'slothbook'.")
    return config
