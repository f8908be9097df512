"""Swapping a module's forward on the instance, and putting the old one back (floor 1: torch only).

The kernels (models/patch.py), offloaded checkpointing and the tiled MLP (train/) each wrap `forward` under their
own key, so their patches stack and unwind independently. A wrapper that reads the forward it wraps at every call
(`inner_forward`, marked with `reads_inner`) lets a later patch go beneath it (`patch_beneath`): the kernels
patched into an already tiled MLP run inside the tiling instead of replacing it.
"""

from __future__ import annotations

import types

from torch import nn

_READS_INNER = "_slothbook_reads_inner"


def patch_forward(module: nn.Module, key: str, forward) -> None:
    """Set `module.forward = forward`, remembering under `key` what the instance had before."""
    if key in module.__dict__:
        raise RuntimeError(f"{type(module).__name__}.forward is already patched under {key}")
    module.__dict__[key] = (module.__dict__.get("forward"), forward)
    module.forward = forward


def reads_inner(wrapper):
    """Mark `wrapper` as one that calls `inner_forward` at every call (so patches may go beneath it)."""
    setattr(wrapper, _READS_INNER, True)
    return wrapper


def inner_forward(module: nn.Module, key: str):
    """The forward that the patch under `key` wraps now: what was there before it, else the class's."""
    before = module.__dict__[key][0]
    return before if before is not None else types.MethodType(type(module).forward, module)


def patch_beneath(module: nn.Module, key: str, forward) -> None:
    """`patch_forward`, except that when the forward now is a `reads_inner` wrapper, `forward` goes beneath it."""
    outer = _wrapper_around(module, module.__dict__.get("forward"))
    if outer is None or not getattr(module.__dict__[outer][1], _READS_INNER, False):
        return patch_forward(module, key, forward)
    if key in module.__dict__:
        raise RuntimeError(f"{type(module).__name__}.forward is already patched under {key}")
    before, wrapper = module.__dict__[outer]
    module.__dict__[key] = (before, forward)
    module.__dict__[outer] = (forward, wrapper)


def _records(module: nn.Module):
    """(key, before, forward) of each patch on `module`: the (before, forward) pairs patch_forward stored."""
    return [(k, v[0], v[1]) for k, v in module.__dict__.items()
            if isinstance(v, tuple) and len(v) == 2 and callable(v[1])]


def _wrapper_around(module: nn.Module, forward):
    """The key of the patch whose wrapper is `forward` (None when no patch installed it)."""
    return next((k for k, _, wrapper in _records(module) if forward is not None and wrapper is forward), None)


def _reader_of(module: nn.Module, forward):
    """The key of a `reads_inner` patch that wraps `forward` (then `forward` can be unlinked from under it)."""
    return next((k for k, before, wrapper in _records(module)
                 if before is forward and getattr(wrapper, _READS_INNER, False)), None)


def patched_over(module: nn.Module, key: str) -> bool:
    """Whether something replaced the forward after the patch under `key` (unwinding it would drop that wrapper).
    A `reads_inner` wrapper around it does not count: the patch unlinks from under it."""
    saved = module.__dict__.get(key)
    return (saved is not None and module.__dict__.get("forward") is not saved[1]
            and _reader_of(module, saved[1]) is None)


def unpatch_forward(module: nn.Module, key: str) -> bool:
    """Undo the patch under `key`; False when there was none."""
    saved = module.__dict__.pop(key, None)
    if saved is None:
        return False
    before, forward = saved
    reader = _reader_of(module, forward)
    if reader is not None:  # beneath a wrapper that reads its inner forward: it now wraps what was under us
        module.__dict__[reader] = (before, module.__dict__[reader][1])
        return True
    if before is None:
        module.__dict__.pop("forward", None)  # the class's forward shows through again
    else:
        module.forward = before
    return True
