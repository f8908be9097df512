"""Helpers shared by the benchmark scripts in this folder: rows, results files, timing, calibration, workers.

Import it from a script in this folder with ``import common`` (running ``python benchmarks/<script>.py`` puts
the folder on ``sys.path``). Nothing here imports torch at module level, so a parent process that only
launches workers and writes the results never loads CUDA.

Results file (``benchmarks/results/<name>.json``)::

    {"device": "NVIDIA H100 80GB HBM3", "device_details": {...}, "versions": {"torch": ...},
     "date": "2025-01-01T12:00:00", "command": "python benchmarks/kernel_ops.py", "rows": [...], "notes": [...]}

Row convention: one measurement per row, ``{"benchmark", "contender", "config", "metric", "value", "unit"}``.
``config`` names what was measured in words ("rms_norm fwd 8192x4096 bf16"); ``metric`` is the kind of number
(``time_ms``, ``bandwidth_fraction``, ``peak_alloc_gib``, ``rel_error``...). A failure is a row too, never an
aborted run: ``metric`` is ``"error"``, ``value`` is the message (``"OutOfMemoryError: ..."``) and ``unit`` is
``"message"``; ``config`` says which step failed. Readers skip rows whose metric is ``"error"`` when they want
numbers, and list them when they want to know what did not run.

Optional ``"profiles"`` (``benchmarks/train.py --profile``): a list beside ``rows``, which it leaves unchanged,
one dict per (contender, config): ``{"contender", "config", "source", "steps", "wall_ms", "device_ms", "busy_ms",
"busy_fraction", "kernel_names", "categories": {category: ms}, "kernels": [{"name", "category", "calls", "ms",
"share"}]}``, all per step (fields explained in ``benchmarks/profile_table.py``). The key is absent when nothing
was profiled.

Timing (:func:`bench_ms`) follows ``triton.testing.do_bench``: CUDA events around each repetition, the L2 cache
flushed before each one, repetition counts from millisecond budgets, the median reported. It adds an optional
untimed ``setup`` per repetition, for ops that consume their inputs (in-place kernels, a backward pass that
needs a fresh forward).

Worker processes (:func:`run_worker` in the parent, :func:`emit` in the child): each measurement that could
crash the CUDA context or leak memory into the next one runs in its own Python process. The child prints
its (cumulative) result as one JSON line after each step, prefixed with :data:`RESULT_MARK`; the parent keeps
the last such line, so a child killed by a timeout or a crash still reports everything it finished.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import importlib.metadata
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
RESULTS_DIR = HERE / "results"
RESULT_MARK = "@@RESULT@@ "
GIB = 2**30
ERROR = "error"


def load_script(name: str):
    """benchmarks/<name>.py as the module `slothbook_benchmarks_<name>`, loaded from its file (once): the folder
    stays off sys.path, so that its scripts' generic names (train, generation) shadow no installed module."""
    import importlib.util

    key = f"slothbook_benchmarks_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, HERE / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module  # dataclasses look their module up while the file executes
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[key]
            raise
    return sys.modules[key]


# Packages whose versions every results file records (missing ones are left out).
PACKAGES = ("torch", "triton", "transformers", "peft", "bitsandbytes", "trl", "liger-kernel", "unsloth", "slothbook")

# An L2 flush larger than any GPU's L2 (H100: 50 MiB, B200: 126 MiB), as do_bench uses.
_FLUSH_BYTES = 256 * 2**20
# GPU cycles of busy-wait queued before each timed repetition, so the GPU is behind the CPU when the
# start event runs and the measurement is GPU time, not Python launch overhead (about 0.1 ms).
_LEAD_CYCLES = 200_000


# ------------------------------------------------------------------ rows

def row(benchmark: str, contender: str, config: str, metric: str, value: Any, unit: str) -> dict:
    return {"benchmark": benchmark, "contender": contender, "config": config, "metric": metric, "value": value,
            "unit": unit}


def error_row(benchmark: str, contender: str, config: str, error: BaseException | str) -> dict:
    """The row recording a failure (see the module docstring for the convention)."""
    message = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    return row(benchmark, contender, config, ERROR, message.strip()[:2000], "message")


class Recorder:
    """Collects the rows of one benchmark; ``guard`` turns an exception into an error row.

    ``on_change`` (optional) is called after every added row, e.g. to :func:`emit` partial results.
    """

    def __init__(self, benchmark: str, rows: list | None = None, on_change: Callable[[], None] | None = None):
        self.benchmark = benchmark
        self.rows = rows if rows is not None else []
        self.on_change = on_change

    def add(self, contender: str, config: str, metric: str, value: Any, unit: str) -> None:
        self.rows.append(row(self.benchmark, contender, config, metric, value, unit))
        if self.on_change:
            self.on_change()

    def error(self, contender: str, config: str, error: BaseException | str) -> None:
        self.rows.append(error_row(self.benchmark, contender, config, error))
        if self.on_change:
            self.on_change()

    @contextlib.contextmanager
    def guard(self, contender: str, config: str, device=None):
        """Run the block; on any exception record an error row, free memory and carry on.

        Only ``Exception`` is caught: KeyboardInterrupt and SystemExit still stop the run.
        """
        try:
            yield
        except Exception as exc:  # the message is the result
            self.error(contender, config, exc)
            free_memory(device)

    def value(self, contender: str, config: str, metric: str):
        """The value of a recorded row, or None."""
        for r in self.rows:
            if (r["contender"], r["config"], r["metric"]) == (contender, config, metric):
                return r["value"]
        return None


# ------------------------------------------------------------------ environment and results file

def versions(packages=PACKAGES) -> dict:
    found = {"python": platform.python_version()}
    for name in packages:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    try:
        import torch

        if torch.version.cuda:
            found["cuda"] = torch.version.cuda
    except ImportError:
        pass
    return found


def device_details(device) -> dict:
    """Name, memory, SM count and compute capability of a CUDA device; the CPU's name otherwise."""
    import torch

    if device.type != "cuda":
        return {"name": f"cpu ({platform.processor() or platform.machine()})", "type": "cpu"}
    p = torch.cuda.get_device_properties(device)
    return {"name": p.name, "type": "cuda", "memory_gib": round(p.total_memory / GIB, 1),
            "multiprocessors": p.multi_processor_count, "capability": f"{p.major}.{p.minor}"}


def write_results(path: Path, rows: list, *, device: dict | None, notes: list | None = None, append: bool = False,
                  command: str | None = None, profiles: list | None = None) -> dict:
    """Write the results file; ``append`` merges into an existing one, replacing rows with the same
    (benchmark, contender, config, metric) and profiles with the same (contender, config). Returns the
    document written."""
    path = Path(path)
    doc = {
        "device": (device or {}).get("name"),
        "device_details": device or {},
        "versions": versions(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": command or " ".join([Path(sys.executable).name] + sys.argv),
        "rows": list(rows),
        "notes": list(notes or []),
    }
    if append and path.is_file():
        old = json.loads(path.read_text())
        key = lambda r: (r["benchmark"], r["contender"], r["config"], r["metric"])  # noqa: E731
        fresh = {key(r) for r in rows}
        doc["rows"] = [r for r in old.get("rows", []) if key(r) not in fresh] + doc["rows"]
        doc["notes"] = old.get("notes", []) + doc["notes"]
        doc["command"] = f"{old.get('command', '')} ; {doc['command']}"
        doc["device"] = doc["device"] or old.get("device")
        doc["device_details"] = doc["device_details"] or old.get("device_details", {})
        profiles = merge_profiles(old.get("profiles", []), profiles or [])
    if profiles:
        doc["profiles"] = list(profiles)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1) + "\n")
    return doc


def merge_profiles(old: list, new: list) -> list:
    """The ``profiles`` of two results files: a new one replaces an old one of the same (contender, config)."""
    key = lambda p: (p.get("contender"), p.get("config"))  # noqa: E731
    fresh = {key(p) for p in new}
    return [p for p in old if key(p) not in fresh] + list(new)


# ------------------------------------------------------------------ memory

def sync(device) -> None:
    import torch

    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device=None) -> None:
    """Collect garbage and hand cached blocks back, so the next contender starts from the same state."""
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
    except ImportError:
        pass


def peak_extra_bytes(fn: Callable[[], Any], device) -> int:
    """Peak CUDA memory allocated while ``fn()`` runs, above what was allocated before it started.

    Counts everything the call allocates (intermediates, outputs, gradients), not the inputs that already
    exist. The result of ``fn`` is dropped before returning.
    """
    import torch

    sync(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    result = fn()
    sync(device)
    peak = torch.cuda.max_memory_allocated(device)
    del result
    return peak - before


# ------------------------------------------------------------------ timing

class _CudaTimer:
    def __init__(self, device):
        import torch

        self.torch, self.device = torch, device
        self.cache = torch.empty(_FLUSH_BYTES, dtype=torch.int8, device=device)
        self.pairs = []

    def before(self):
        self.cache.zero_()  # evict the inputs from L2, as do_bench does
        sleep = getattr(self.torch.cuda, "_sleep", None)
        if sleep is not None:
            sleep(_LEAD_CYCLES)
        start = self.torch.cuda.Event(enable_timing=True)
        start.record()
        return start

    def after(self, start):
        end = self.torch.cuda.Event(enable_timing=True)
        end.record()
        self.pairs.append((start, end))

    def times_ms(self) -> list[float]:
        self.torch.cuda.synchronize(self.device)
        times = [s.elapsed_time(e) for s, e in self.pairs]
        self.pairs = []
        return times


class _CpuTimer:
    def __init__(self):
        self.times = []

    def before(self):
        return time.perf_counter()

    def after(self, start):
        self.times.append((time.perf_counter() - start) * 1000)

    def times_ms(self) -> list[float]:
        times, self.times = self.times, []
        return times


def bench_ms(fn: Callable, setup: Callable[[], Any] | None = None, *, device, warmup_ms: float = 25.0,
             rep_ms: float = 100.0, min_reps: int = 5, max_reps: int = 300, max_warmup: int = 100) -> float:
    """Median time in ms of ``fn()``, or of ``fn(setup())`` with ``setup`` run untimed before each repetition.

    Repetition counts come from the budgets and an estimate of one call (at least ``min_reps`` timed calls;
    with ``rep_ms=0``, the median of the ``min(3, min_reps)`` estimate calls is the result).
    On CUDA each call is timed with events after an L2 flush; on the CPU with ``perf_counter``. Warm the
    function up (JIT compilation, autotuning, torch.compile) before calling this: the first calls of the
    estimate are timed like any other.
    """
    timer = _CudaTimer(device) if device.type == "cuda" else _CpuTimer()

    def once():
        state = setup() if setup is not None else None
        start = timer.before()
        if setup is not None:
            fn(state)
        else:
            fn()
        timer.after(start)  # `state` and the result die here, before the next setup allocates

    for _ in range(min(3, min_reps)):
        once()
    estimate = max(statistics.median(timer.times_ms()), 1e-3)
    if rep_ms <= 0:  # no measurement budget (smoke tests): the estimate is the result
        return estimate
    for _ in range(min(max_warmup, int(warmup_ms / estimate))):
        once()
    timer.times_ms()
    for _ in range(max(min_reps, min(max_reps, int(rep_ms / estimate)))):
        once()
    return statistics.median(timer.times_ms())


def copy_bandwidth(device, nbytes: int = GIB, **bench) -> float:
    """Measured device-to-device copy rate in bytes/s (bytes read plus bytes written), on ``nbytes`` of bf16."""
    import torch

    src = torch.randn(nbytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    ms = bench_ms(lambda: dst.copy_(src), device=device, **bench)
    return 2 * nbytes / (ms / 1000)


def matmul_rate(device, n: int = 8192, **bench) -> float:
    """Measured bf16 matmul rate in FLOP/s for ``[n, n] @ [n, n]``."""
    import torch

    a = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    b = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    a @ b
    ms = bench_ms(lambda: a @ b, device=device, **bench)
    return 2 * n**3 / (ms / 1000)


# ------------------------------------------------------------------ accuracy

def rel_error(actual, expected, chunk_elements: int = 2**24) -> float:
    """``||actual - expected|| / ||expected||`` (Frobenius norms, float64 accumulation), chunked along dim 0
    so that a [tokens, vocab] comparison needs no full-size float64 temporary. NaN anywhere gives NaN."""
    import torch

    a, e = actual.detach(), expected.detach()
    if a.shape != e.shape:
        raise ValueError(f"shape {tuple(a.shape)} != reference shape {tuple(e.shape)}")
    if a.dim() == 0:
        a, e = a.reshape(1), e.reshape(1)
    step = max(1, chunk_elements // max(1, a[0].numel()))
    diff = ref = 0.0
    for i in range(0, a.shape[0], step):
        x, y = a[i:i + step].double(), e[i:i + step].double()
        diff += torch.sum((x - y) ** 2).item()
        ref += torch.sum(y * y).item()
    return (diff ** 0.5) / max(ref ** 0.5, 1e-300)


# ------------------------------------------------------------------ worker processes

def emit(result: dict) -> None:
    """Child side: print the (cumulative) result for the parent; call after every finished step."""
    print(RESULT_MARK + json.dumps(result), flush=True)


def run_worker(argv: list[str], timeout: float, env: dict | None = None) -> tuple[dict, str | None]:
    """Parent side: run ``argv`` (e.g. ``[sys.executable, script, "--worker", spec]``) with a timeout.

    The child's stderr passes through to ours. Returns ``(result, failure)``: the last result the child
    emitted (``{}`` if none) and None, or a message when it timed out, crashed or emitted nothing.
    """
    failure = None
    try:
        done = subprocess.run(argv, stdout=subprocess.PIPE, timeout=timeout, env=env)
        stdout, code = done.stdout, done.returncode
        if code != 0:
            failure = f"worker exited with code {code} (see its stderr above)"
    except subprocess.TimeoutExpired as exc:
        stdout = exc.stdout or b""
        failure = f"worker killed after {timeout:.0f} s (time budget)"
    result = {}
    for line in stdout.decode(errors="replace").splitlines():
        if line.startswith(RESULT_MARK):
            result = json.loads(line[len(RESULT_MARK):])
        elif line.strip():
            print(line, file=sys.stderr)  # the child's own prints, kept visible
    if not result and failure is None:
        failure = "worker emitted no result (see its stderr above)"
    return result, failure
