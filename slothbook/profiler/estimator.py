"""Predicting a LoRA/QLoRA step's peak memory from the model's config alone, and what fits in a budget.

Weights, LoRA weights, gradients and optimizer state are exact: they are counted from the model built on the meta
device (no weights are read or allocated), with NF4 storage computed the way bitsandbytes stores it. Activations
come from the per-token model in activations.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from ..device import resolve_dtype
from ..errors import ConfigError
from ..train.keep import Recipe, layers_to_keep
from ..train.offload import find_decoder_layers
from .activations import (
    CHECKPOINTING,
    DEVICES,
    IMPLEMENTATIONS,
    LORA_BYTES,
    Shape,
    activation_estimate,
    cuda_runtime_bytes,
    optimizer_step_transient,
)
from .samples import LABELS, format_bytes

OPTIMIZERS = ("adamw", "adamw_8bit", "sgd")
ESTIMATED = ("weights", "lora", "gradients", "optimizer", "activations")
NF4_BLOCK = 64  # weights per absmax
NF4_BLOCK2 = 256  # absmax values per second-level absmax (double quantization)
BNB_8BIT_BLOCK = 256  # bitsandbytes' blockwise 8-bit optimizer state
BNB_8BIT_MIN_SIZE = 4096  # smaller parameters keep 32-bit optimizer state in bitsandbytes


@dataclass
class Estimate:
    """Predicted peak bytes per category for one training step; `total` is their sum (the predicted peak).

    `activations` follows the profiler's convention: the peak less every named tensor, gradients in full.
    `detail` holds the activation model's parts (held after forward, where the peak falls, host bytes).
    """

    bytes: dict[str, int]
    settings: dict
    detail: dict = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.bytes.values())

    def fits(self, gpu_memory: int | None = None) -> bool:
        budget = gpu_memory if gpu_memory is not None else self.settings.get("gpu_memory")
        if budget is None:
            raise ConfigError("fits() needs gpu_memory (bytes), here or when estimating.")
        return self.total <= budget

    def __getitem__(self, category: str) -> int:
        return self.bytes[category]

    def to_pandas(self):
        import pandas as pd

        rows = [{"category": c, "label": LABELS[c], "bytes": b, "GiB": b / 2**30} for c, b in self.bytes.items()]
        rows.append({"category": "total", "label": "predicted peak", "bytes": self.total, "GiB": self.total / 2**30})
        return pd.DataFrame(rows)

    def figure(self):
        """A plotly bar chart of the categories, with the GPU's memory as a line when it is known."""
        import plotly.graph_objects as go

        from .figure import COLORS

        fig = go.Figure(go.Bar(x=[LABELS[c] for c in self.bytes], y=[b / 2**30 for b in self.bytes.values()],
                               marker_color=[COLORS[c] for c in self.bytes],
                               text=[format_bytes(b) for b in self.bytes.values()], textposition="outside"))
        s = self.settings
        fig.update_layout(title=f"Predicted peak {format_bytes(self.total)}: seq {s['seq_len']} x batch "
                                f"{s['batch_size']}, r={s['r']}, {'4-bit' if s['load_in_4bit'] else s['dtype']}, "
                                f"checkpointing {s['checkpointing']}",
                          yaxis_title="GiB", template="plotly_white", height=400)
        if s.get("gpu_memory"):
            fig.add_hline(y=s["gpu_memory"] / 2**30, line_dash="dash", line_color="firebrick",
                          annotation_text=f"GPU {format_bytes(s['gpu_memory'])}")
        return fig

    def __str__(self) -> str:
        lines = [f"{LABELS[c]:<20} {format_bytes(b):>12}" for c, b in self.bytes.items()]
        lines.append(f"{'predicted peak':<20} {format_bytes(self.total):>12}")
        return "\n".join(lines)


# ---- the model's config -----------------------------------------------------------------------------------

def resolve_config(model_name_or_config):
    """A transformers config from a config, a dict, a loaded model, or a name/path the loader understands."""
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(model_name_or_config, PretrainedConfig):
        return model_name_or_config
    if isinstance(model_name_or_config, nn.Module):
        config = getattr(model_name_or_config, "config", None)
        if config is None:
            raise ConfigError("This model has no `.config`; pass its transformers config instead.")
        return config
    if isinstance(model_name_or_config, dict):
        kwargs = dict(model_name_or_config)
        if "model_type" not in kwargs:
            raise ConfigError("A config dict needs a 'model_type' (for example 'llama').")
        return AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    from ..models.loader import load_config, resolve_source

    return load_config(resolve_source(model_name_or_config))


def meta_model(config, dtype: torch.dtype) -> nn.Module:
    """The model's module tree with every tensor on the meta device: shapes without bytes."""
    from transformers import AutoModelForCausalLM

    config = _plain_config(config)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def _plain_config(config):
    # A config saved from a quantized model carries quantization_config, which from_config would act on.
    if getattr(config, "quantization_config", None) is None:
        return config
    config = config.__class__.from_dict(config.to_dict())
    del config.quantization_config
    return config


# ---- exact byte counts ------------------------------------------------------------------------------------

def nf4_bytes(numel: int) -> int:
    """Bytes bitsandbytes stores for one NF4 weight with double quantization (blocksize 64):
    two weights per byte, one uint8 absmax per 64-block, the absmax's fp32 absmax per 256 blocks, the 16-entry NF4
    code, the 256-entry absmax code and an fp32 offset."""
    blocks = math.ceil(numel / NF4_BLOCK)
    return (numel + 1) // 2 + blocks + 4 * math.ceil(blocks / NF4_BLOCK2) + 4 * 16 + 4 * 256 + 4


def quantized_linear_names(model: nn.Module) -> set[str]:
    """The Linear layers transformers replaces with 4-bit ones: all but the skipped (lm_head) and the output head."""
    from ..models.quantization import SKIP_MODULES

    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {name for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and m is not output and name.rsplit(".", 1)[-1] not in SKIP_MODULES}


def weight_bytes(model: nn.Module, load_in_4bit: bool) -> int:
    """Stored bytes of the base model: parameters (tied ones once), NF4 packing and state, and buffers."""
    quantized = quantized_linear_names(model) if load_in_4bit else set()
    total = 0
    seen = set()
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        module_name, _, leaf = name.rpartition(".")
        if module_name in quantized and leaf == "weight":
            total += nf4_bytes(p.numel())
        else:
            total += p.numel() * p.element_size()
    total += sum(b.numel() * b.element_size() for b in model.buffers())
    return total


def lora_shapes(model: nn.Module, r: int, target_modules) -> list[tuple[int, int]]:
    """(A numel, B numel) for every targeted Linear, as PEFT creates them."""
    shapes = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in target_modules:
            shapes.append((r * m.in_features, m.out_features * r))
    if not shapes:
        raise ConfigError(f"target_modules {sorted(target_modules)} match no linear layer of this model.")
    return shapes


def optimizer_bytes(param_numels: list[int], optimizer: str) -> int:
    """State bytes for fp32 adapter parameters: torch AdamW (two moments and a step per parameter), bitsandbytes
    AdamW8bit (uint8 moments in 256-blocks with fp32 absmax, and two 256-entry maps that all parameters share;
    32-bit state below 4096 elements), or SGD without momentum (none)."""
    if optimizer == "sgd":
        return 0
    if optimizer == "adamw":
        return sum(2 * LORA_BYTES * n + 4 for n in param_numels)
    small = [n for n in param_numels if n < BNB_8BIT_MIN_SIZE]
    large = [n for n in param_numels if n >= BNB_8BIT_MIN_SIZE]
    maps = 2 * 4 * 256 if large else 0
    return (sum(2 * 4 * n for n in small) + sum(2 * n + 2 * 4 * math.ceil(n / BNB_8BIT_BLOCK) for n in large)
            + maps)


# ---- the estimate -----------------------------------------------------------------------------------------

def default_targets(config) -> tuple[str, ...]:
    from ..models.families import family_of

    return tuple(family_of(config).target_modules)


def _check(seq_len, batch_size, r, checkpointing, optimizer, implementation):
    for name, value in (("seq_len", seq_len), ("batch_size", batch_size), ("r", r)):
        if not isinstance(value, int) or value <= 0:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}.")
    if checkpointing not in CHECKPOINTING:
        raise ConfigError(f"checkpointing={checkpointing!r}: use one of {', '.join(CHECKPOINTING)}.")
    if optimizer not in OPTIMIZERS:
        raise ConfigError(f"optimizer={optimizer!r}: use one of {', '.join(OPTIMIZERS)}.")
    if implementation not in IMPLEMENTATIONS:
        raise ConfigError(f"implementation={implementation!r}: use 'kernels' (slothbook's patched forwards) or "
                          "'hf' (transformers' and PEFT's own modules).")


def _implementation(kernels, device, implementation) -> str:
    """"kernels" or "hf": `implementation` when given, else `kernels`, else what from_pretrained picks on `device`
    (the kernels on CUDA, transformers' own modules elsewhere)."""
    if device not in DEVICES:
        raise ConfigError(f"device={device!r}: use 'cuda' (planning for a GPU) or 'cpu'.")
    if kernels not in (None, True, False):
        raise ConfigError(f"kernels={kernels!r}: use True, False or None (on for CUDA).")
    if implementation is not None:
        return implementation
    if kernels is None:
        kernels = device == "cuda"
    return "kernels" if kernels else "hf"


def model_shape(config, model: nn.Module) -> Shape:
    """The activation Shape of `model` (built from `config`). A config no model was loaded with names no attention
    yet: the loader's choice for its family applies (eager for Gemma-2)."""
    from ..models.families import family_of

    shape = Shape.from_config(config, find_decoder_layers(model)[0])
    if getattr(config, "_attn_implementation", None) is None:
        shape = replace(shape, eager=family_of(config).attention == "eager")
    return shape


class _Fixed:
    """What does not depend on sequence length or batch size, computed once per configuration."""

    def __init__(self, config, r, target_modules, load_in_4bit, optimizer, dtype):
        model = meta_model(config, dtype)
        self.shape = model_shape(config, model)
        self.targets = frozenset(target_modules or default_targets(config))
        lora = lora_shapes(model, r, self.targets)
        numels = [n for pair in lora for n in pair]
        self.weights = weight_bytes(model, load_in_4bit)
        self.lora = LORA_BYTES * sum(numels)
        self.gradients = self.lora
        self.optimizer = optimizer_bytes(numels, optimizer)


def estimate(model_name_or_config, seq_len: int, batch_size: int = 1, r: int = 16, target_modules=None,
             load_in_4bit: bool = True, checkpointing: str = "offload", optimizer: str = "adamw",
             dtype="bf16", gpu_memory: int | None = None, kernels: bool | None = None, device: str = "cuda",
             implementation: str | None = None, _fixed: _Fixed | None = None) -> Estimate:
    """Predict the peak memory of one LoRA (QLoRA with load_in_4bit) training step without loading weights.

    model_name_or_config: a transformers config, a dict with model_type, a loaded model, or a name/path.
    checkpointing: "offload" (layer inputs in host memory), "plain" (layer inputs on the device), "off", or "auto"
        (use_gradient_checkpointing="auto": the last layers that fit keep their activations, the others are
        offloaded; how many is train/keep.py's plan for `gpu_memory` less the weights, adapters, optimizer state
        and CUDA's workspaces; `gpu_memory` defaults to this GPU's total memory. On device="cpu" training runs
        "auto" as plain checkpointing, and so does the estimate). detail["kept_layers"] says how many were kept.
    optimizer: "adamw" (torch), "adamw_8bit" (bitsandbytes) or "sgd" (no momentum: no state).
    dtype: the compute/activation dtype ("bf16", "fp16", "fp32"); the base weights' dtype when not 4-bit.
    gpu_memory: the budget in bytes, for `fits()` and the chart.
    device: "cuda" (planning for a GPU, the default) or "cpu". On CUDA the step also holds cuBLAS's workspaces
        and torch's AdamW steps all adapters at once (see activations.py).
    kernels: slothbook's Triton kernels patched in (fused LoRA projections and MLP, RMSNorm and RoPE kernels, the
        fused linear cross-entropy that never makes the [tokens x vocab] logits) or transformers' and PEFT's own
        modules. None: as from_pretrained decides, on for CUDA and off for the CPU.
    implementation: the older spelling of `kernels` ("kernels" or "hf"); when given it wins.
    """
    implementation = _implementation(kernels, device, implementation)
    _check(seq_len, batch_size, r, checkpointing, optimizer, implementation)
    dtype = _resolve(dtype)
    config = resolve_config(model_name_or_config)
    fixed = _fixed or _Fixed(config, r, target_modules, load_in_4bit, optimizer, dtype)
    a = torch.empty((), dtype=dtype).element_size()
    n_tokens = seq_len * batch_size
    runtime = cuda_runtime_bytes(device)  # allocated from the first step on, through every phase
    mode, kept = checkpointing, 0
    if checkpointing == "auto":
        if device == "cpu":
            mode = "plain"
        else:
            gpu_memory = gpu_memory if gpu_memory is not None else _device_memory()
            recipe = Recipe(fixed.shape, r, fixed.targets, implementation)
            free = gpu_memory - (fixed.weights + fixed.lora + fixed.optimizer + runtime)
            kept = layers_to_keep(recipe, a, n_tokens, free - recipe.headroom(a, n_tokens, seq_len), seq_len)
    act = activation_estimate(fixed.shape, n_tokens, a, r, fixed.targets, mode, implementation,
                              grads=fixed.gradients, quantized=load_in_4bit, kept=kept, device=device,
                              context=seq_len)
    # The optimizer step's own temporaries, with every gradient allocated (the convention `act.peak` follows).
    step = optimizer_step_transient(optimizer, fixed.lora, device)
    values = {"weights": fixed.weights, "lora": fixed.lora, "gradients": fixed.gradients,
              "optimizer": fixed.optimizer, "activations": max(act.peak, step) + runtime}
    settings = dict(seq_len=seq_len, batch_size=batch_size, r=r, target_modules=sorted(fixed.targets),
                    load_in_4bit=load_in_4bit, checkpointing=checkpointing, optimizer=optimizer,
                    dtype=str(dtype).removeprefix("torch."), gpu_memory=gpu_memory, device=device,
                    kernels=implementation == "kernels", implementation=implementation)
    detail = dict(held_after_forward=act.held_after_forward + runtime,
                  peak_where=act.peak_where if act.peak >= step else "optimizer step", offloaded=act.offloaded,
                  cuda_runtime=runtime, kept_layers=fixed.shape.layers if mode == "off" else kept)
    return Estimate(values, settings, detail)


def _device_memory() -> int:
    """This GPU's total memory, the budget "auto" plans for when none is given."""
    if not torch.cuda.is_available():
        raise ConfigError('checkpointing="auto" keeps as many layers as fit in the GPU\'s memory: give gpu_memory '
                          "(bytes; the CLI's --gpu-memory-gib), or estimate on a machine with the GPU.")
    return torch.cuda.mem_get_info()[1]


def _resolve(dtype) -> torch.dtype:
    # Planning for a GPU from any machine: bf16 must not be refused because this machine lacks a GPU.
    if isinstance(dtype, torch.dtype):
        return dtype
    return resolve_dtype(dtype) if dtype is not None else torch.bfloat16


@dataclass(frozen=True)
class Fit:
    """The largest sequence length at the given batch size, and the largest batch at the given length."""

    seq_len: int | None  # None: not even the shortest length fits
    batch_size: int | None
    at_batch_size: int
    at_seq_len: int
    gpu_memory: int

    def __str__(self) -> str:
        parts = []
        parts.append(f"seq_len {self.seq_len} at batch_size {self.at_batch_size}" if self.seq_len else
                     f"no sequence length fits at batch_size {self.at_batch_size}")
        parts.append(f"batch_size {self.batch_size} at seq_len {self.at_seq_len}" if self.batch_size else
                     f"no batch fits at seq_len {self.at_seq_len}")
        return " or ".join(parts)


def max_fit(model_name_or_config, gpu_memory_bytes: int, seq_len: int = 2048, batch_size: int = 1,
            multiple_of: int = 64, max_seq_len: int = 1 << 20, max_batch_size: int = 4096, **kwargs) -> Fit:
    """The largest sequence length (a multiple of `multiple_of`) that fits at `batch_size`, and the largest batch
    that fits at `seq_len`, within `gpu_memory_bytes`. Other arguments as for `estimate`."""
    if not isinstance(gpu_memory_bytes, int) or gpu_memory_bytes <= 0:
        raise ConfigError(f"gpu_memory_bytes must be a positive number of bytes, got {gpu_memory_bytes!r}.")
    config = resolve_config(model_name_or_config)
    dtype = _resolve(kwargs.pop("dtype", "bf16"))
    fixed = _Fixed(config, kwargs.get("r", 16), kwargs.get("target_modules"), kwargs.get("load_in_4bit", True),
                   kwargs.get("optimizer", "adamw"), dtype)

    kwargs.setdefault("gpu_memory", gpu_memory_bytes)  # what checkpointing="auto" plans for

    def fits(seq, batch):
        return estimate(config, seq, batch, dtype=dtype, _fixed=fixed, **kwargs).total <= gpu_memory_bytes

    best_seq = _largest(lambda n: fits(n * multiple_of, batch_size), max_seq_len // multiple_of)
    best_batch = _largest(lambda b: fits(seq_len, b), max_batch_size)
    return Fit(best_seq * multiple_of if best_seq else None, best_batch or None, batch_size, seq_len,
               gpu_memory_bytes)


def _largest(ok, upper: int) -> int:
    """The largest n in [1, upper] with ok(n), for ok true up to some n then false; 0 when ok(1) is false."""
    if not ok(1):
        return 0
    lo, hi = 1, 2
    while hi <= upper and ok(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, upper + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo
