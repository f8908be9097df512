"""The memory estimate as the magic and the Studio show it: a table, a chart, and whether it fits.

A plan targets one place: a GPU size given in GiB (a card you do not have here), a device of this machine
(its free memory), or nothing at all (the current GPU, else the CPU).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..device import host_memory_available
from ..errors import ConfigError
from ..profiler import Estimate, estimate, max_fit
from ..profiler.samples import LABELS, format_bytes
from .devices import free_bytes

GIB = 2**30


@dataclass(frozen=True)
class Target:
    """Where the step would run: the budget in bytes and how the estimator should model it."""

    label: str  # "a 24 GiB GPU", "the 7.10 GiB free on cuda:0", "the 19.70 GiB available on the CPU"
    budget: int
    dtype: str
    implementation: str  # "kernels" on a GPU, "hf" (transformers' own modules) on the CPU
    cpu: bool


def resolve_target(device: str | None = None, gpu_memory_gib: float | None = None, dtype: str | None = None) -> Target:
    """A GPU of `gpu_memory_gib` GiB, else `device` ("cpu", "cuda:N"), else the current GPU, else the CPU."""
    import torch

    if gpu_memory_gib is not None:
        if gpu_memory_gib <= 0:
            raise ConfigError(f"gpu memory must be a positive number of GiB, got {gpu_memory_gib}.")
        return Target(f"a {gpu_memory_gib:g} GiB GPU", int(gpu_memory_gib * GIB), dtype or "bf16", "kernels", False)
    if device is None:
        device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
    budget = free_bytes(device)
    if device == "cpu":
        return Target(f"the {format_bytes(budget)} available on the CPU", budget, dtype or "fp32", "hf", True)
    index = int(device.split(":")[1]) if ":" in device else 0
    bf16 = torch.cuda.get_device_capability(index)[0] >= 8
    return Target(f"the {format_bytes(budget)} free on {device}", budget, dtype or ("bf16" if bf16 else "fp16"),
                  "kernels", False)


def plan(model: str, seq_len: int, batch_size: int = 1, r: int = 16, load_in_4bit: bool = True,
         offload: bool = True, target: Target | None = None, optimizer: str = "adamw") -> Estimate:
    """The estimator's prediction for one configuration on `target` (default: this machine's current device)."""
    target = target or resolve_target()
    # On the CPU there is nowhere to offload to: both modes checkpoint plainly. On a GPU the unchecked box
    # trains with "auto" (keep the activations that fit, offload the rest).
    checkpointing = "plain" if target.cpu else ("offload" if offload else "auto")
    return estimate(model, seq_len=seq_len, batch_size=batch_size, r=r, load_in_4bit=load_in_4bit,
                    checkpointing=checkpointing, optimizer=optimizer, dtype=target.dtype, gpu_memory=target.budget,
                    implementation=target.implementation, device="cpu" if target.cpu else "cuda")


def estimate_table(est: Estimate):
    """A DataFrame: each category's predicted bytes and share of the peak, then the peak."""
    import pandas as pd

    rows = [(LABELS[c], format_bytes(b), f"{b / est.total:.0%}") for c, b in est.bytes.items()]
    rows.append(("predicted peak", format_bytes(est.total), "100%"))
    return pd.DataFrame(rows, columns=["category", "memory", "share"]).set_index("category")


def verdict(est: Estimate, target: Target, model: str) -> tuple[bool, str]:
    """(fits, a sentence saying so; when it does not, what would fit instead)."""
    budget = target.budget
    if est.fits(budget):
        short = host_shortfall(est, target)
        if short is not None:
            return False, short
        return True, f"Fits: predicted peak {format_bytes(est.total)}, {est.total / budget:.0%} of {target.label}."
    s = est.settings
    fit = max_fit(model, budget, seq_len=s["seq_len"], batch_size=s["batch_size"], r=s["r"],
                  load_in_4bit=s["load_in_4bit"], checkpointing=s["checkpointing"], optimizer=s["optimizer"],
                  dtype=s["dtype"], implementation=s["implementation"], device="cpu" if target.cpu else "cuda")
    hints = [] if s["load_in_4bit"] else ["load in 4-bit"]
    if s["checkpointing"] != "offload" and not target.cpu:
        hints.append("offload activations")
    advice = f" What fits: {fit}." if fit.seq_len or fit.batch_size else " Not even the shortest sequence fits."
    more = f" Or {' and '.join(hints)}." if hints else ""
    return False, f"Will not fit: predicted peak {format_bytes(est.total)} exceeds {target.label}.{advice}{more}"


def host_shortfall(est: Estimate, target: Target) -> str | None:
    """What to say when the offloaded layer inputs would not fit in this machine's host memory; None when they do
    (or nothing is offloaded)."""
    need = est.detail.get("offloaded", 0)
    if not need or target.cpu:
        return None
    available = host_memory_available()
    if need <= available:
        return None
    return (f"Will not fit in host memory: offloading keeps {format_bytes(need)} of layer inputs in this machine's "
            f"memory, and {format_bytes(available)} is available. Shorten the sequence or the batch, or let 'auto' "
            "checkpointing (offload unticked) keep the last layers on the GPU.")


def display_estimate(est: Estimate, fits: bool, sentence: str) -> None:
    """Display the table, the chart and the verdict."""
    from IPython.display import display

    from .feedback import Message
    from .static import show_static

    display(estimate_table(est))
    show_static(est.figure(), width=900, height=400)
    display(Message(sentence, "ok" if fits else "warning"))


def show_estimate(est: Estimate, target: Target, model: str) -> bool:
    """Display the estimate and whether it fits on `target`; return whether it fits."""
    fits, sentence = verdict(est, target, model)
    display_estimate(est, fits, sentence)
    return fits
