"""What the hardware offers: the devices, and the dtype that suits each."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ConfigError, DeviceError

_DTYPES = {
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
}


@dataclass(frozen=True)
class DeviceInfo:
    index: int | None  # None for the CPU
    name: str
    capability: str
    bf16: bool
    total_bytes: int
    free_bytes: int


def list_devices() -> list[DeviceInfo]:
    """Every CUDA device with its free memory, or the CPU alone when there is none."""
    if not torch.cuda.is_available():
        import psutil

        # What is free is what this process can still take: the same figure the offload pool checks against.
        return [DeviceInfo(None, "CPU", "-", True, psutil.virtual_memory().total, host_memory_available())]
    out = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        free, total = torch.cuda.mem_get_info(i)
        out.append(DeviceInfo(i, props.name, f"{props.major}.{props.minor}", props.major >= 8, total, free))
    return out


def host_memory_available(cgroup_root: str = "/sys/fs/cgroup") -> int:
    """Bytes of host memory this process can still take: the OS's available memory, or less where the container's
    cgroup limit leaves less (past it the kernel kills the process instead of failing an allocation)."""
    import psutil

    available = psutil.virtual_memory().available
    room = _cgroup_room(cgroup_root)
    return available if room is None else max(0, min(available, room))


def _cgroup_room(root: str) -> int | None:
    """The cgroup's limit less its usage (v2, then v1), or None when there is no limit or no cgroup to read."""
    for limit_file, usage_file in (("memory.max", "memory.current"),
                                   ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")):
        try:
            limit = Path(root, limit_file).read_text().strip()
            used = int(Path(root, usage_file).read_text())
        except (OSError, ValueError):
            continue
        # v2 writes "max" for no limit; v1 writes a huge page-rounded number.
        return int(limit) - used if limit.isdigit() and int(limit) < 1 << 60 else None
    return None


def bf16_supported() -> bool:
    # Ampere (8.0) and newer do bf16 natively; emulated bf16 on older cards is slow, so it counts as missing.
    if not torch.cuda.is_available():
        return False
    # Under a multi-process launch every rank must choose the same dtype: bf16 only when every GPU here has it.
    devices = range(torch.cuda.device_count()) if world_size() > 1 else [torch.cuda.current_device()]
    return all(torch.cuda.get_device_capability(i)[0] >= 8 for i in devices)


# ---- multi-process launches (torchrun, accelerate launch, slothbook.launch) set these variables

def world_size() -> int:
    """How many processes train together (1 unless torchrun or accelerate launched this one)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    """This process's index on its machine: the GPU it trains on."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def fsdp_requested() -> bool:
    """`accelerate launch` with an FSDP config says so in the environment before the model loads."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true", "yes")


def training_device() -> int | str:
    """Where this process loads its model: the CPU, the current GPU, or under a multi-process launch the GPU of its
    local rank, which is also made current so that Triton kernels, bitsandbytes and CUDA streams run there."""
    if not torch.cuda.is_available():
        return "cpu"
    if world_size() <= 1:
        return torch.cuda.current_device()
    rank, count = local_rank(), torch.cuda.device_count()
    if rank >= count:
        raise DeviceError(f"This process has LOCAL_RANK {rank}, but only {count} GPU(s) are visible to it. Start at "
                          f"most {count} process(es) per machine (torchrun --nproc-per-node {count}), or check "
                          "CUDA_VISIBLE_DEVICES.")
    torch.cuda.set_device(rank)
    return rank


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """`None` picks bf16 on GPUs that have it, fp16 on older GPUs (T4-class), fp32 on the CPU."""
    if dtype is None:
        if not torch.cuda.is_available():
            return torch.float32
        return torch.bfloat16 if bf16_supported() else torch.float16
    if isinstance(dtype, str):
        if dtype.lower() not in _DTYPES:
            raise ConfigError(f"Unknown dtype '{dtype}'. Use one of: bf16, fp16, fp32 (or None to choose automatically).")
        dtype = _DTYPES[dtype.lower()]
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ConfigError(f"dtype {dtype} is not supported for training; use bf16, fp16 or fp32.")
    if dtype == torch.bfloat16 and torch.cuda.is_available() and not bf16_supported():
        name = torch.cuda.get_device_name()
        raise DeviceError(f"bf16 was asked for, but the GPU '{name}' does not support it. "
                          "Use dtype=torch.float16 (or dtype=None to choose automatically).")
    return dtype
