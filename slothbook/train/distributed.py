"""Training on several GPUs with PyTorch's own engines: DDP and FSDP2, started by torchrun, `accelerate launch` or,
from a notebook, `launch` (accelerate's notebook_launcher). slothbook adds no communication of its own.

- DDP (the default under torchrun / accelerate launch): every rank holds the whole base model on its own GPU
  (`slothbook.device.training_device`), Trainer wraps the PEFT model in DistributedDataParallel, and only the LoRA
  gradients are all-reduced, since nothing else requires grad.
- FSDP2 (`accelerate launch --config_file <fsdp2_config(...)>`): the loader sees ACCELERATE_USE_FSDP and stores the
  4-bit codes in the compute dtype, so accelerate can shard them with the rest of each decoder layer.
- The checks here turn the usual bad setups into errors that say what to do.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import torch

from ..device import list_devices, world_size
from ..errors import ConfigError, DeviceError

# ---- who am I --------------------------------------------------------------------------------------------------


def rank() -> int:
    """This process's global rank (0 when it trains alone)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    """Rank 0: the one process that prints, profiles to the screen and saves."""
    return rank() == 0


def wait_for_everyone() -> None:
    """A barrier when several processes train together; nothing otherwise."""
    if torch.distributed.is_available() and torch.distributed.is_initialized() and world_size() > 1:
        torch.distributed.barrier()


def gathered_state_dict(trainer):
    """The whole model's state dict assembled from every rank's shards under FSDP (a collective: every rank must
    call it), None otherwise (the model's own `state_dict()` is already whole under DDP or on one device)."""
    if not getattr(trainer, "is_fsdp_enabled", False):
        return None
    return trainer.accelerator.get_state_dict(trainer.model)


# ---- checks ----------------------------------------------------------------------------------------------------


def check_gpus(num_gpus: int, dtype=None) -> torch.dtype:
    """The dtype every one of the first `num_gpus` GPUs can compute in; DeviceError when there are fewer GPUs, or
    when `dtype` (None: bf16 where all have it, else fp16) is not supported by all of them."""
    if not isinstance(num_gpus, int) or num_gpus < 1:
        raise ConfigError(f"num_gpus must be a positive integer, got {num_gpus!r}.")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise DeviceError(f"{num_gpus} GPUs were asked for, but this machine has no CUDA GPU. Run on a machine with "
                          f"GPUs, or pass cpu=True to try the code path in {num_gpus} CPU processes.")
    if num_gpus > count:
        raise DeviceError(f"{num_gpus} GPUs were asked for, but this machine has {count} CUDA GPU(s) visible "
                          f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}). "
                          f"Ask for at most {count}.")
    gpus = [d for d in list_devices() if d.index is not None][:num_gpus]
    return common_dtype(gpus, dtype)


_NAMES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "half": torch.float16, "fp32": torch.float32, "float32": torch.float32}


def common_dtype(gpus, dtype=None) -> torch.dtype:
    """bf16 when every GPU in `gpus` (DeviceInfo rows) has it, fp16 otherwise; an explicit bf16 that some lack is a
    DeviceError naming them. Every rank must train in the same dtype for their gradients to be averaged."""
    without_bf16 = [f"cuda:{g.index} {g.name} (compute capability {g.capability})" for g in gpus if not g.bf16]
    if dtype is None:
        return torch.float16 if without_bf16 else torch.bfloat16
    wanted = _NAMES.get(dtype.lower()) if isinstance(dtype, str) else dtype
    if wanted not in (torch.bfloat16, torch.float16, torch.float32):
        raise ConfigError(f"Unknown dtype {dtype!r}. Use bf16, fp16 or fp32 (or None to choose automatically).")
    if wanted == torch.bfloat16 and without_bf16:
        kinds = sorted({g.name for g in gpus})
        mixed = f" (these GPUs are of different kinds: {', '.join(kinds)})" if len(kinds) > 1 else ""
        raise DeviceError(f"bf16 was asked for, but {', '.join(without_bf16)} cannot compute in bf16{mixed}. Train in "
                          "fp16, which every one of them supports: dtype='fp16' (--dtype fp16 on the command line).")
    return wanted


def check_backend(cpu: bool = False) -> str:
    """The process-group backend to use: nccl for GPUs, gloo for CPU processes; DeviceError when it is missing."""
    if not torch.distributed.is_available():
        raise DeviceError("This torch build has no torch.distributed, so it cannot train in several processes. "
                          "Install a standard torch build from pytorch.org.")
    if cpu:
        return "gloo"
    if not torch.distributed.is_nccl_available():
        raise DeviceError(f"NCCL is not available in this torch build ({torch.__version__}), and several GPUs need it: "
                          "gloo, the backend that is there, is for CPU tensors. Install a CUDA build of torch "
                          "(pip install torch --index-url https://download.pytorch.org/whl/cu126, or the CUDA "
                          "version of your driver), or pass cpu=True to run the processes on the CPU.")
    return "nccl"


def check_fresh_process() -> None:
    """A notebook launch forks the kernel: CUDA must not be initialised in it yet (a forked child cannot use it)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        raise DeviceError("CUDA is already initialised in this notebook kernel (a model was loaded or a tensor was put "
                          "on the GPU before), and the training processes are forked from it, which CUDA does not "
                          "allow. Restart the kernel and call slothbook.launch(...) before anything touches the GPU: "
                          "load the model inside the training function.")
    if "bitsandbytes" in sys.modules:
        raise DeviceError("bitsandbytes is already imported in this notebook kernel, and it may initialise CUDA, which "
                          "the forked training processes cannot share. Restart the kernel and call "
                          "slothbook.launch(...) before loading any model: load it inside the training function.")


def check_distributed(dtype=None) -> None:
    """Under a multi-process launch (WORLD_SIZE > 1): the backend exists and the local GPUs share a dtype. Run by
    every rank before loading; a no-op for a single process."""
    if world_size() <= 1:
        return
    on_gpu = torch.cuda.is_available()
    check_backend(cpu=not on_gpu)
    if on_gpu:
        gpus = [d for d in list_devices() if d.index is not None]
        common_dtype(gpus, dtype)


# ---- launching from a notebook ---------------------------------------------------------------------------------


def launch(train_fn, *args, num_gpus: int, cpu: bool = False, dtype=None, port: int | None = None, **kwargs):
    """Run `train_fn(*args, **kwargs)` in `num_gpus` processes, one per GPU, from a notebook (or any script).

    Built on `accelerate.notebook_launcher`: the processes are forked from this one, so call it before anything
    touches the GPU here, and load the model inside `train_fn`. Inside, FastLanguageModel and the Trainer find their
    rank's GPU and train with DDP; use `slothbook.train.distributed.is_main_process()` to print or save once.

    cpu=True runs `num_gpus` CPU processes with the gloo backend instead (to try the code path without GPUs).
    dtype: checked against every GPU (mixed kinds without bf16 need 'fp16'). port: the rendezvous port (default
    29500, or MASTER_PORT). Returns None: the processes' results stay in them; save what you need to disk.
    """
    from accelerate import notebook_launcher

    if cpu:
        if not isinstance(num_gpus, int) or num_gpus < 1:
            raise ConfigError(f"num_gpus must be a positive integer, got {num_gpus!r}.")
    else:
        check_gpus(num_gpus, dtype)
    check_backend(cpu)
    check_fresh_process()
    fn = _with_kwargs(train_fn, kwargs) if kwargs else train_fn
    port = str(port or os.environ.get("MASTER_PORT", "29500"))
    hidden = _hide_gpus() if cpu else _unchanged()
    with hidden:
        notebook_launcher(fn, args=args, num_processes=num_gpus, use_port=port)


def _with_kwargs(train_fn, kwargs):
    """notebook_launcher passes positional arguments only (and names the entry point after the function)."""

    @functools.wraps(train_fn)
    def run(*args):
        return train_fn(*args, **kwargs)

    return run


class _unchanged:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _hide_gpus:
    """CUDA_VISIBLE_DEVICES="" for the forked CPU processes (read when CUDA first initialises, after the fork)."""

    def __enter__(self):
        self.old = os.environ.get("CUDA_VISIBLE_DEVICES")
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        return self

    def __exit__(self, *exc):
        if self.old is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = self.old
        return False


# ---- FSDP2 -----------------------------------------------------------------------------------------------------


def fsdp2_config(layer_class: str, num_processes: int = 2, mixed_precision: str = "bf16",
                 activation_checkpointing: bool = False) -> dict:
    """An `accelerate launch` configuration for FSDP2 over `num_processes` GPUs of one machine.

    Every `layer_class` (the decoder layer, e.g. "LlamaDecoderLayer") is one FSDP unit; Trainer adds the LoRA
    layers as units of their own (peft's wrap policy). FULL_SHARD (reshard after forward), full state dict on
    saving, so the adapter saved from a sharded run is an ordinary one. Keep activation_checkpointing False with
    slothbook's checkpointing (use_gradient_checkpointing=True, "auto" or "slothbook" does it already).
    """
    if not layer_class or not layer_class.isidentifier():
        raise ConfigError(f"layer_class must be a class name such as LlamaDecoderLayer, got {layer_class!r}.")
    if mixed_precision not in ("bf16", "fp16", "no"):
        raise ConfigError(f"mixed_precision must be bf16, fp16 or no, got {mixed_precision!r}.")
    return {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": "FSDP",
        "mixed_precision": mixed_precision,
        "num_machines": 1,
        "num_processes": num_processes,
        "machine_rank": 0,
        "main_training_function": "main",
        "rdzv_backend": "static",
        "same_network": True,
        "use_cpu": False,
        "fsdp_config": {
            "fsdp_version": 2,
            "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "fsdp_transformer_layer_cls_to_wrap": layer_class,
            "fsdp_reshard_after_forward": True,
            "fsdp_state_dict_type": "FULL_STATE_DICT",
            "fsdp_cpu_ram_efficient_loading": False,  # bitsandbytes weights are quantised on each GPU as they load
            "fsdp_offload_params": False,
            "fsdp_activation_checkpointing": activation_checkpointing,
        },
    }


def write_fsdp2_config(path, layer_class: str, **options) -> Path:
    """Write `fsdp2_config(...)` as YAML for `accelerate launch --config_file PATH`; returns the path."""
    import yaml

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(fsdp2_config(layer_class, **options), sort_keys=False))
    return path
