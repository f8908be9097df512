"""`%vram`: the memory in use right now, by category, on one line."""

from __future__ import annotations

import torch

from ..profiler.samples import format_bytes
from ..profiler.tensors import StorageSet, base_tensors, model_device, optimizer_tensors, trainable_parameters


def _device_totals(device: torch.device) -> tuple[int, int, int]:
    """(bytes in tensors, bytes held, capacity): CUDA's allocator, or the process on the CPU."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return torch.cuda.memory_allocated(device), torch.cuda.memory_reserved(device), total
    import psutil

    rss = psutil.Process().memory_info().rss
    return rss, rss, psutil.virtual_memory().total


def memory_by_category(model=None, optimizer=None, device=None) -> dict:
    """Bytes now on `device` (default: the model's, else the current GPU, else the CPU) by category.

    Categories: weights (frozen parameters with their quantization state, buffers), lora (trainable parameters),
    gradients, optimizer, other (every other tensor: activations, caches, temporaries; on the CPU the rest of the
    process) and cached (held by CUDA's allocator but free). Also: device, held and capacity.
    """
    if device is None:
        if model is not None:
            device = model_device(model)
        else:
            device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    allocated, held, capacity = _device_totals(device)
    seen = StorageSet(device)
    named = {"weights": 0, "lora": 0, "gradients": 0, "optimizer": 0}
    if model is not None:
        trainable = trainable_parameters(model)
        named["weights"] = seen.add_all(base_tensors(model))
        named["lora"] = seen.add_all(trainable)
        named["gradients"] = seen.add_all(p.grad for p in trainable)
    if optimizer is not None:
        named["optimizer"] = seen.add_all(optimizer_tensors(optimizer))
    other = max(0, allocated - sum(named.values()))
    return {**named, "other": other, "cached": max(0, held - allocated), "device": str(device), "held": held,
            "capacity": capacity}


def memory_line(model=None, optimizer=None, device=None) -> str:
    """One line such as `cuda:0 | weights 1.2 GiB, LoRA 40 MiB, ... | 3.1 GiB of 80 GiB (4%)`."""
    m = memory_by_category(model, optimizer, device)
    cpu = m["device"] == "cpu"
    parts = [f"weights {format_bytes(m['weights'])}", f"LoRA {format_bytes(m['lora'])}",
             f"gradients {format_bytes(m['gradients'])}", f"optimizer {format_bytes(m['optimizer'])}",
             f"{'rest of the process' if cpu else 'other tensors'} {format_bytes(m['other'])}"]
    if not cpu:
        parts.append(f"cached {format_bytes(m['cached'])}")
    held = "resident" if cpu else "held"
    return (f"{m['device']} | {', '.join(parts)} | {held} {format_bytes(m['held'])} of "
            f"{format_bytes(m['capacity'])} ({m['held'] / m['capacity']:.0%})")
