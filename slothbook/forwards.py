"""Swapping a module's forward on the instance, and putting the old one back (floor 1: torch only).

The kernels (models/patch.py), offloaded checkpointing and the tiled MLP (train/) each wrap `forward` under their
own key, so their patches stack and unwind independently.
"""

from __future__ import annotations

from torch import nn


def patch_forward(module: nn.Module, key: str, forward) -> None:
    """Set `module.forward = forward`, remembering under `key` what the instance had before."""
    if key in module.__dict__:
        raise RuntimeError(f"{type(module).__name__}.forward is already patched under {key}")
    module.__dict__[key] = (module.__dict__.get("forward"), forward)
    module.forward = forward


def patched_over(module: nn.Module, key: str) -> bool:
    """Whether something replaced the forward after the patch under `key` (unwinding it would drop that wrapper)."""
    saved = module.__dict__.get(key)
    return saved is not None and module.__dict__.get("forward") is not saved[1]


def unpatch_forward(module: nn.Module, key: str) -> bool:
    """Undo the patch under `key`; False when there was none."""
    saved = module.__dict__.pop(key, None)
    if saved is None:
        return False
    before, _ = saved
    if before is None:
        module.__dict__.pop("forward", None)  # the class's forward shows through again
    else:
        module.forward = before
    return True
