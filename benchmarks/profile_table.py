"""Where the time of a training step goes: a torch.profiler summary of a few steps, and its Markdown tables.

:func:`profile_steps` runs a step function under ``torch.profiler`` (CPU + CUDA activities, no shapes, no
stacks: cheap) and returns a plain dict (JSON-ready; ``benchmarks/train.py --profile`` stores one per contender
and config under the results file's ``"profiles"`` key)::

    {"source": "cuda" | "cpu", "steps", "wall_ms", "device_ms", "busy_ms", "busy_fraction", "kernel_names",
     "categories": {"matmul": ms, ...}, "kernels": [{"name", "category", "calls", "ms", "share"}, ...],
     "host_api": [{"name", "calls", "ms"}, ...]}

Every time is per step. ``device_ms`` is the summed kernel time (kernels on parallel streams both count),
``busy_ms`` the time at least one kernel ran, ``busy_fraction`` = busy / wall: what is left is the GPU waiting
on the host (launch overhead, Python, synchronisation). The wall time includes the profiler's own cost (it
records every CPU op too): a caller that timed unprofiled steps may add their median as ``timed_ms``, which
:func:`overview` shows beside it. ``share`` is a kernel's part of ``device_ms``;
``categories`` splits all of ``device_ms``, not only the top kernels listed. ``host_api`` (CUDA only) lists the
CUDA runtime and driver calls the host made, by time: a host-bound step shows there whether launches or
stalls (cudaMalloc/cudaFree, synchronisations) take its time.

On a machine without CUDA (the smoke test) the CPU ops stand in for kernels: ``source`` is ``"cpu"``, times
are self CPU times and ``busy_ms`` is their sum.

Nothing here imports torch at module level: the parent that only prints tables never loads it.
"""

from __future__ import annotations

import re
import time
import warnings
from pathlib import Path

TOP = 15
NAME_WIDTH = 64
_KERNELS_DIR = Path(__file__).resolve().parents[1] / "kernels"

# Category keys in table order, with what each holds (docs/benchmarks.md repeats this).
CATEGORIES = {
    "matmul": "GEMMs: cuBLAS / cuBLASLt (sm90_xmma, nvjet, gemv, split-K), CUTLASS, aten mm/addmm/bmm",
    "attention": "flash / memory-efficient / cuDNN SDPA kernels (fmha, flash_*, *sdpa*)",
    "nf4_dequant": "NF4 dequantization: bitsandbytes kDequantize*, slothbook's Triton NF4 kernel",
    "slothbook_triton": "slothbook's other Triton kernels (kernels/*.py: RMSNorm, RoPE, GLU, cross-entropy)",
    "other_triton": "Triton kernels of other libraries (Liger, Unsloth, torch.compile's triton_*)",
    "aten": "PyTorch's own elementwise, reduction, copy and optimizer kernels (at::native, cub)",
    "memcpy": "memcpy / memset (host <-> device copies: offloaded checkpoints, .item())",
    "other": "everything else",
}
# Checked in this order: flash kernels carry "cutlass" in their template arguments, so attention comes first.
_PATTERNS = (
    ("memcpy", re.compile(r"^(memcpy|memset)", re.I)),
    ("attention", re.compile(r"flash|fmha|attention|sdpa|scaled_dot_product", re.I)),
    ("nf4_dequant", re.compile(r"dequant|nf4", re.I)),
    ("matmul", re.compile(r"gemm|gemv|cutlass|cublas|xmma|nvjet|splitkreduce|^aten::(mm|addmm|bmm|baddbmm|matmul)$",
                          re.I)),
)
_CUDA_API = re.compile(r"^cu(da)?[A-Z]\w*$")  # cudaLaunchKernel, cudaMalloc, cuLaunchKernelEx (Triton), ...
_ATEN = re.compile(r"at::|at_cuda_detail|cub::|c10::|^aten::|cunn_|elementwise|reduce_kernel", re.I)
_TRITON_LIKE = re.compile(r"^(_\w+|triton_\w+)$")  # a bare identifier: how Triton names its kernels
# Template arguments that say nothing about what a generic wrapper kernel computes.
_NOISE = {"at", "native", "detail", "c10", "cuda", "void", "float", "double", "int", "char", "bool", "unsigned",
          "long", "const", "operator", "lambda", "Array", "BFloat16", "Half", "bfloat16_t", "half_t", "__nv_bfloat16",
          "anonymous", "namespace", "TensorIteratorBase", "std", "cutlass", "OffsetCalculator", "IntDivider",
          "LoadWithoutCast", "StoreWithoutCast", "LoadWithCast", "StoreWithCast", "func_wrapper_t", "ReduceOp",
          "TensorListMetadata"}
_GENERIC = re.compile(r"^(gpu_kernel|elementwise_kernel|vectorized_elementwise|unrolled_elementwise|"
                      r"multi_tensor_apply|reduce_kernel|Kernel\d*$|kernel$|device_kernel$)")


def slothbook_kernel_names(folder: Path = _KERNELS_DIR) -> frozenset:
    """Names of the ``@triton.jit`` functions in slothbook's kernels/*.py (read from the source: no import)."""
    names = set()
    for path in sorted(folder.glob("*.py")):
        names.update(re.findall(r"@triton\.jit[^\n]*\n(?:@[^\n]*\n)*def (\w+)", path.read_text()))
    return frozenset(names)


# ------------------------------------------------------------------ names and categories

def _top_level_split(text: str, opener: str, closer: str) -> list[tuple[int, int]]:
    """(start, end) of each top-level ``opener ... closer`` span in ``text``."""
    spans, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == opener:
            if depth == 0:
                start = i
            depth += 1
        elif ch == closer and depth:
            depth -= 1
            if depth == 0:
                spans.append((start, i + 1))
    return spans


def short_name(raw: str, width: int = NAME_WIDTH) -> str:
    """A recognisable short form of a (demangled C++) kernel name.

    ``void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>, ...>(int, ...)`` becomes
    ``vectorized_elementwise_kernel<FillFunctor>``: no return type, argument list or namespaces; template
    arguments only where the kernel is a generic wrapper, and then only the first one that names something.
    Longer names are cut to ``width`` characters.
    """
    name = raw.strip().removeprefix("void ")
    if name.startswith("aten::"):
        return name  # a CPU op: already short
    parens = _top_level_split(name, "(", ")")
    if parens and parens[-1][1] == len(name) and parens[-1][0] > 0 and name[parens[-1][0] - 1] != " ":
        name = name[:parens[-1][0]]  # the argument list (not "Memcpy HtoD (Pinned -> Device)")
    angles = _top_level_split(name, "<", ">")
    outer, inner = (name[:angles[0][0]], name[angles[0][0] + 1:angles[0][1] - 1]) if angles else (name, "")
    outer = outer.replace("(anonymous namespace)::", "").split("::")[-1].strip()
    if inner and _GENERIC.match(outer):
        words = [w for w in re.findall(r"[A-Za-z_]\w+", inner) if w not in _NOISE and not _GENERIC.match(w)]
        if words:
            outer = f"{outer}<{words[0]}>"
    outer = outer or raw.strip()
    return outer if len(outer) <= width else outer[:width - 3] + "..."


def category(raw: str, ours: frozenset = frozenset(), source: str = "cuda") -> str:
    """The :data:`CATEGORIES` key of a kernel (or, with ``source="cpu"``, an op) named ``raw``; ``ours``:
    slothbook's Triton kernel names (empty for the other contenders, whose kernels may share a name with ours).
    On the CPU a bare ``_Name`` is an autograd Function, not a Triton kernel: it stays "other"."""
    for key, pattern in _PATTERNS:
        if pattern.search(raw):
            return key
    bare = raw.strip()
    if bare in ours:
        return "slothbook_triton"
    if _ATEN.search(bare):
        return "aten"
    if source == "cuda" and _TRITON_LIKE.match(bare):
        return "other_triton"
    return "other"


# ------------------------------------------------------------------ the summary

def busy_us(spans) -> float:
    """Length of the union of ``(start, end)`` intervals: time during which at least one kernel ran."""
    total, reach = 0.0, None
    for start, end in sorted(spans):
        if reach is None or start > reach:
            total += end - start
            reach = end
        elif end > reach:
            total += end - reach
            reach = end
    return total


def summarize(records, *, steps: int, wall_ms: float, busy: float, source: str, top: int = TOP,
              ours: frozenset = frozenset()) -> dict:
    """The profile dict (module docstring) from ``records``: one ``(raw name, duration in us)`` per kernel
    launch (or CPU op) over ``steps`` steps; ``busy`` in us over all steps, ``wall_ms`` per step."""
    kernels: dict = {}
    for raw, us in records:
        key = short_name(raw)
        entry = kernels.setdefault(key, {"name": key, "category": category(raw, ours, source), "calls": 0, "us": 0.0})
        entry["calls"] += 1
        entry["us"] += us
    total_us = sum(k["us"] for k in kernels.values())
    categories = dict.fromkeys(CATEGORIES, 0.0)
    for k in kernels.values():
        categories[k["category"]] += k["us"]
    ranked = sorted(kernels.values(), key=lambda k: -k["us"])[:top]
    per_step_ms = lambda us: round(us / steps / 1000, 3)  # noqa: E731
    return {
        "source": source, "steps": steps, "wall_ms": round(wall_ms, 3), "device_ms": per_step_ms(total_us),
        "busy_ms": per_step_ms(busy), "busy_fraction": round(busy / steps / 1000 / wall_ms, 4) if wall_ms else 0.0,
        "kernel_names": len(kernels),
        "categories": {key: per_step_ms(us) for key, us in categories.items()},
        "kernels": [{"name": k["name"], "category": k["category"], "calls": round(k["calls"] / steps, 2),
                     "ms": per_step_ms(k["us"]), "share": round(k["us"] / total_us, 4) if total_us else 0.0}
                    for k in ranked],
    }


def profile_steps(run, device, *, steps: int = 2, top: int = TOP, ours: frozenset = frozenset()) -> dict:
    """Profile ``steps`` calls of ``run()``; the wall time is taken between synchronisations around them.

    On CUDA one untraced call under the profiler comes first, so that CUPTI's start-up cost falls there; the
    CPU tracer has none worth a step (the smoke test runs the Triton interpreter, where a step takes seconds).
    """
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile, schedule

    cuda = device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    warm = 1 if cuda else 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Profiler won't be using warmup" (the CPU)
        window = schedule(wait=0, warmup=warm, active=steps, repeat=1)
    with profile(activities=activities, schedule=window) as prof:
        for _ in range(warm):
            run()
            sync()
            prof.step()
        start = time.perf_counter()
        for i in range(steps):
            run()
            if i < steps - 1:
                prof.step()
        sync()
        wall_ms = (time.perf_counter() - start) * 1000 / steps
        prof.step()  # closes the window: the trace is stopped and parsed here, outside the timing
    events = [e for e in prof.events()
              if not getattr(e, "is_user_annotation", False) and not e.name.startswith("ProfilerStep")]
    if cuda:
        kernels = [e for e in events if e.device_type == DeviceType.CUDA]
        if not kernels:
            raise RuntimeError("torch.profiler recorded no CUDA kernels (is CUPTI missing from this torch build?)")
        records = [(e.name, e.time_range.end - e.time_range.start) for e in kernels]
        busy = busy_us((e.time_range.start, e.time_range.end) for e in kernels)
        api = [(e.name, e.time_range.end - e.time_range.start) for e in events
               if e.device_type == DeviceType.CPU and _CUDA_API.match(e.name)]
    else:
        ops = [e for e in events if e.device_type == DeviceType.CPU and not e.is_async]
        records = [(e.name, e.self_cpu_time_total) for e in ops]
        busy = sum(us for _, us in records)
        api = []
    found = summarize(records, steps=steps, wall_ms=wall_ms, busy=busy, source="cuda" if cuda else "cpu", top=top,
                      ours=ours)
    found["host_api"] = host_api(api, steps)
    return found


def host_api(records, steps: int, top: int = 8) -> list:
    """The CUDA runtime/driver calls the host made per step, by time: launches, and the calls that stall it
    (cudaMalloc/cudaFree of a caching-allocator miss, synchronisations, blocking copies)."""
    calls: dict = {}
    for name, us in records:
        entry = calls.setdefault(name, [0, 0.0])
        entry[0] += 1
        entry[1] += us
    ranked = sorted(calls.items(), key=lambda kv: -kv[1][1])[:top]
    return [{"name": name, "calls": round(n / steps, 2), "ms": round(us / steps / 1000, 3)} for name, (n, us) in ranked]


# ------------------------------------------------------------------ Markdown

def _cell(text) -> str:
    return str(text).replace("|", "/")


def overview(profiles: list) -> str:
    """One line per (config, contender): the unprofiled step time where known ("timed_ms", set by the caller),
    the profiled wall time, the busy time and fraction, and the kernel time split by category."""
    header = ["config", "contender", "step ms", "profiled ms", "busy ms", "busy", "kernel ms"] + list(CATEGORIES)
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for p in sorted(profiles, key=lambda p: (p["config"], p["contender"])):
        timed = f"{p['timed_ms']:.1f}" if p.get("timed_ms") else "-"
        cells = [p["config"], p["contender"], timed, f"{p['wall_ms']:.1f}", f"{p['busy_ms']:.1f}",
                 f"{p['busy_fraction']:.0%}", f"{p['device_ms']:.1f}"]
        cells += [f"{p['categories'].get(key, 0.0):.1f}" for key in CATEGORIES]
        out.append("| " + " | ".join(map(_cell, cells)) + " |")
    return "\n".join(out)


def kernel_table(p: dict) -> str:
    """A heading, the step's totals and the top kernels of one profile."""
    unit = "kernel" if p["source"] == "cuda" else "CPU op"
    out = [f"#### {p['contender']}, {p['config']}", "",
           f"Per step ({p['steps']} profiled, {p['source']}): wall {p['wall_ms']:.1f} ms, busy {p['busy_ms']:.1f} ms "
           f"({p['busy_fraction']:.0%}), {unit} time {p['device_ms']:.1f} ms over {p['kernel_names']} names.", "",
           f"| {unit} | category | calls / step | ms / step | share |", "|---|---|---|---|---|"]
    out += [f"| `{_cell(k['name'])}` | {k['category']} | {k['calls']:g} | {k['ms']:.2f} | {k['share']:.1%} |"
            for k in p["kernels"]]
    if p.get("host_api"):
        calls = ", ".join(f"`{c['name']}` {c['calls']:g} calls {c['ms']:.1f} ms" for c in p["host_api"])
        out += ["", f"CUDA API calls on the host per step: {calls}."]
    return "\n".join(out)


def markdown(profiles: list) -> str:
    """The overview, then each profile's top kernels (for docs/benchmarks.md)."""
    if not profiles:
        return ""
    ordered = sorted(profiles, key=lambda p: (p["config"], p["contender"]))
    return "\n\n".join([overview(profiles)] + [kernel_table(p) for p in ordered])
