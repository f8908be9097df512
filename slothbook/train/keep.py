"""use_gradient_checkpointing="auto": how many decoder layers keep their activations in GPU memory.

Checkpointing a layer costs a second forward in backward. When the GPU has room for some layers' activations,
those layers run as usual (autograd keeps what they save) and only the others are checkpointed, their inputs
offloaded. The kept layers are the LAST k (closest to the loss): backward reaches them first and frees their
activations before the first recompute of a checkpointed layer needs its working set.

The plan is made once per training forward, at the first decoder layer, from the memory free then: cudaMemGetInfo's
free bytes plus what the caching allocator holds unused (no device synchronisation), less a headroom of
- two layers' worth: the saved tensors and backward working set of one layer, twice (the recompute of a
  checkpointed layer next to the prefetched input of the one below it, and slack for the formula); the working
  set is the larger of the MLP's backward and attention's;
- the loss head's working set (a chunk of logits with the fused cross-entropy; all of them on transformers' path);
- HEADROOM_FIXED (1.5 GiB): the LoRA gradients that appear in backward, the optimizer's state at the first step and
  its step temporaries, a dequantized 4-bit weight, and the allocator's fragmentation.
A layer's bytes come from train/activation_bytes.py (the estimator's formula, checked against saved-tensor hooks),
so the estimator's "auto" keeps the same number of layers for the same memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError
from .activation_bytes import Shape, attention_backward, head_bytes, layer_saved, layer_transient

HEADROOM_FIXED = 3 << 29  # 1.5 GiB, see the module docstring


@dataclass(frozen=True)
class Recipe:
    """What a layer's activation bytes depend on besides the tokens and the activation dtype."""

    shape: Shape
    r: int
    targets: frozenset
    impl: str  # "kernels" (slothbook's patched forwards) or "hf"

    def kept_bytes(self, a: int, context: int) -> int:
        """Bytes per token one layer holds from its forward to its backward when it is not checkpointed, with
        `context` keys per query (the sequence length; eager attention's scores grow with it)."""
        return layer_saved(self.shape, a, self.r, self.targets, self.impl, context).total

    def headroom(self, a: int, n_tokens: int, context: int) -> int:
        """Bytes left free for the backward working sets (see the module docstring)."""
        s = self.shape
        working = max(*(layer_transient(s, a, self.impl, recompute).total for recompute in (False, True)),
                      attention_backward(s, a, flash=True, context=context))
        layer = self.kept_bytes(a, context) + working + 2 * a * s.hidden  # + the layer's input and the prefetched one
        return 2 * n_tokens * layer + head_bytes(s, a, n_tokens, self.impl).peak + HEADROOM_FIXED


def layers_to_keep(recipe: Recipe, a: int, n_tokens: int, room: int, context: int) -> int:
    """How many layers' activations over `n_tokens` tokens, `context` to a sequence, fit in `room` bytes (0 to
    all)."""
    per_layer = n_tokens * recipe.kept_bytes(a, context)
    return max(0, min(recipe.shape.layers, room // per_layer))


def free_device_bytes(device: torch.device) -> int:
    """Bytes a new allocation on `device` can get: the driver's free memory and the caching allocator's unused
    reserve, within the process's share when `torch.cuda.set_per_process_memory_fraction` set one. None of the
    calls synchronises the device."""
    free, total = torch.cuda.mem_get_info(device)
    stats = torch.cuda.memory_stats_as_nested_dict(device)
    reserved = stats["reserved_bytes"]["all"]["current"]
    allocated = stats["allocated_bytes"]["all"]["current"]
    share = getattr(torch.cuda, "get_per_process_memory_fraction", None)  # torch >= 2.6
    if share is not None:
        free = min(free, int(share(device) * total) - reserved)
    return max(0, free) + reserved - allocated


def check_budget(memory_budget) -> None:
    exact = isinstance(memory_budget, int) and not isinstance(memory_budget, bool) and memory_budget >= 0
    fraction = isinstance(memory_budget, float) and 0 < memory_budget <= 1
    if not (memory_budget is None or exact or fraction):
        raise ConfigError(f"memory_budget={memory_budget!r}: use None (measure the free GPU memory each step), a "
                          "number of bytes the kept layers' activations may take (an int >= 0), or a fraction in "
                          "(0, 1] of the measured room.")


class KeepPlan:
    """Which decoder layers of one model run without checkpointing, decided anew for each training forward.

    memory_budget: None: measured on CUDA as described above; on other devices no layer is kept (plain
        checkpointing). An int: the bytes the kept layers' activations may take, used as given on any device (no
        headroom is subtracted: the caller chose it). A float in (0, 1]: that fraction of the measured room.
    """

    def __init__(self, config, layers: nn.ModuleList, memory_budget=None):
        check_budget(memory_budget)
        self.config, self.layers, self.memory_budget = config, layers, memory_budget
        self.kept = 0  # layers kept in the latest training forward
        self._recipe: Recipe | None = None

    @property
    def first_kept(self) -> int:
        return len(self.layers) - self.kept

    def start(self, hidden: torch.Tensor) -> int:
        """Plan the forward whose first layer input is `hidden`; returns how many layers are kept."""
        budget = self.memory_budget
        measured = hidden.is_cuda and not isinstance(budget, int)
        if not measured and not isinstance(budget, int):
            self.kept = 0
            return 0
        recipe = self.recipe()
        a, n_tokens, context = hidden.element_size(), hidden.numel() // hidden.shape[-1], hidden.shape[-2]
        if measured:
            room = free_device_bytes(hidden.device) - recipe.headroom(a, n_tokens, context)
            budget = int(room * (budget if isinstance(budget, float) else 1))
        self.kept = layers_to_keep(recipe, a, n_tokens, budget, context)
        return self.kept

    def recipe(self) -> Recipe:
        # Read at the first training forward: LoRA and the kernels may be added after checkpointing is switched on.
        if self._recipe is None:
            self._recipe = recipe_of(self.config, self.layers[0])
        return self._recipe


def recipe_of(config, layer: nn.Module) -> Recipe:
    """The Recipe of a live model from its config and one of its decoder layers (LoRA rank and targets, kernels)."""
    from ..models.patch import is_patched

    targets, r = set(), 0
    for name, module in layer.named_modules():
        ranks = getattr(module, "r", None)
        if hasattr(module, "lora_A") and isinstance(ranks, dict) and ranks:
            targets.add(name.rsplit(".", 1)[-1])
            r = max(r, *ranks.values())
    return Recipe(Shape.from_config(config, layer), r, frozenset(targets), "kernels" if is_patched(layer) else "hf")
