"""Kernel benchmark: every slothbook kernel against eager torch, torch.compile and Liger-Kernel, in one run.

Sizes are Llama-3.1-8B's: hidden 4096, intermediate 14336, vocab 128256, 32 query and 8 key-value heads of 128,
8192 tokens (batch 1), bf16, random inputs (no zeros). Contenders, where each has the op:

  slothbook     slothbook.kernels
  slothbook-*   slothbook's kernels with another launch shape, to A/B the default in the same run (VARIANTS):
                rms_norm backward: -1sm / -4sm (1 or 4 persistent programs per SM; the default is 2), -16w (16 warps),
                -torchsum (dW partials summed by torch.sum + a cast instead of one Triton kernel);
                rope: -8w (8 warps), -2tok / -4tok (2 or 4 tokens per program)
  torch         the eager formulation a Hugging Face model runs (HF RMSNorm, rotate_half RoPE, act(gate) * up,
                lm_head then cross-entropy on float logits, PEFT's LoRA composition over a bf16 base; over an NF4
                base, PEFT's own LoRA Linear4bit modules around bitsandbytes' Linear4bit, as QLoRA runs them)
  compile       torch.compile of that eager function (default mode)
  liger         Liger-Kernel's autograd Functions (liger_kernel.ops): RMSNorm, RoPE, SiLU-mul, GELU-mul,
                cross-entropy, fused linear cross-entropy
  bitsandbytes  bitsandbytes.functional.dequantize_4bit (NF4 dequantize only)

Metrics (rows of benchmarks/results/kernels.json, format in common.py):

  time_ms             forward and backward timed separately, and their sum ("fwd+bwd"); GPU time, see "Timing"
  bandwidth_fraction  minimal bytes (each input read once, each output written once) per second, over the
                      device-to-device copy bandwidth measured at the start of the same run (memory-bound ops)
  compute_fraction    matmul FLOPs per second over the bf16 matmul rate measured in the same run (matmul ops)
  peak_alloc_gib      peak memory of one forward + backward above its inputs (CUDA only)
  peak_ratio_vs_torch that peak over the eager contender's (cross-entropy, fused linear cross-entropy)
  rel_error           ||out - ref|| / ||ref|| against an fp32 reference on the same inputs: the forward output
                      ("fwd" config) and the input gradients ("bwd" config)
  bitwise_equal_bitsandbytes   1.0 when the NF4 dequantization equals bitsandbytes' bit for bit

Timing (the last word of each timed row's config says which method timed it):

  graph   (default on CUDA) the call is captured in a CUDA graph n times, each after an L2 eviction (a read of
          256 MiB, which leaves no dirty lines to write back during the call), and the graph of the n evictions
          alone is subtracted: (median replay of A - median replay of B) / n. The GPU runs the captured kernels
          back to back, so no Python, launch or autograd-engine time is counted for any contender. A backward is
          captured after one untimed forward (retain_graph=True keeps its saved tensors for the replays); the
          upstream gradients and in-place inputs are overwritten by the replays, which does not change the
          work. If any contender of a kernel cannot be captured in one direction (a host sync such as .item(),
          found first with torch.cuda.set_sync_debug_mode("error")), every contender of that kernel and direction
          is timed by "events" instead, and a note says why.
  events  (--timing events, or the fallback) CUDA events around each call, L2 flushed by a 256 MiB write
          before it, the CPU kept ahead by a GPU busy-wait, a fresh forward before each backward, untimed
          (common.bench_ms); Python and launch time can show up for calls that launch many kernels.
  cpu     --tiny: perf_counter under the Triton interpreter (a smoke test, not a speed).

Cross-entropy and the fused linear cross-entropy compute the gradient during the forward in some contenders
(Liger; slothbook's fused op), so compare those two on "fwd+bwd". The fused linear cross-entropy keeps the
lm_head frozen (gradient for the hidden states only), as under LoRA.

Each kernel runs in its own worker process (a crash or a CUDA error loses one kernel, not the run); any
contender's failure is recorded as an "error" row.

  python benchmarks/kernel_ops.py                       # everything (meant to take about 4 minutes on an H100)
  python benchmarks/kernel_ops.py --kernels rms_norm rope --contenders slothbook slothbook-1sm liger compile
  python benchmarks/kernel_ops.py --kernels rope swiglu --contenders slothbook liger --append
  python benchmarks/kernel_ops.py --tiny                # CPU smoke test: tiny shapes, Triton interpreter
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:
    sys.path.insert(0, str(_HERE))
import common  # noqa: E402

# The scripts here have generic names (train, generation, distributed): take the folder off sys.path again, so
# that none of them shadows an installed module of that name.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

BENCHMARK = "kernels"
RESULTS = common.RESULTS_DIR / "kernels.json"
KERNELS = ("rms_norm", "rope", "swiglu", "geglu", "cross_entropy", "fused_linear_cross_entropy", "nf4_dequantize",
           "lora_mlp_bf16", "lora_mlp_nf4")
# Launch-shape variants of slothbook's kernels (keyword arguments of the kernel functions), per kernel.
VARIANTS = {
    "rms_norm": {
        "slothbook-1sm": dict(programs_per_sm=1),
        "slothbook-4sm": dict(programs_per_sm=4),
        "slothbook-16w": dict(num_warps=16),
        "slothbook-torchsum": dict(dw_reduction="torch"),
    },
    "rope": {
        "slothbook-8w": dict(num_warps=8),
        "slothbook-2tok": dict(tokens_per_program=2),
        "slothbook-4tok": dict(tokens_per_program=4),
    },
}
_VARIANT_NAMES = tuple(dict.fromkeys(n for v in VARIANTS.values() for n in v))
CONTENDERS = ("slothbook",) + _VARIANT_NAMES + ("torch", "compile", "liger", "bitsandbytes")
TINY_CONTENDERS = ("slothbook",) + _VARIANT_NAMES + ("torch", "bitsandbytes")  # no torch.compile or Liger
TIMINGS = ("graph", "events")
MEMORY_BOUND = ("rms_norm", "rope", "swiglu", "geglu", "cross_entropy", "nf4_dequantize")
GRAD_IN_FORWARD = ("cross_entropy", "fused_linear_cross_entropy")  # judge these on fwd+bwd

LLAMA_31_8B = dict(tokens=8192, hidden=4096, intermediate=14336, vocab=128256, heads=32, kv_heads=8, head_dim=128,
                   rank=16, lora_alpha=32, eps=1e-5, rope_theta=500000.0)
TINY = dict(LLAMA_31_8B, tokens=16, hidden=64, intermediate=128, vocab=500, heads=4, kv_heads=2, head_dim=16, rank=4,
            lora_alpha=8)


# ================================================================== parent: one worker per kernel

def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        return worker(json.loads(args.worker))
    out = Path(args.out) if args.out else (
        Path(tempfile.gettempdir()) / "slothbook_kernels_smoke.json" if args.tiny else RESULTS)
    env = dict(os.environ, TRITON_INTERPRET="1") if args.tiny else None
    started = time.monotonic()
    deadline = started + args.budget_s
    groups = [list(args.kernels)] if args.tiny else [[k] for k in args.kernels]  # tiny: one process is enough
    rows, notes, calibration, device = [], [], None, None
    if args.tiny and set(args.contenders) - set(TINY_CONTENDERS):
        notes.append("--tiny: compile and liger are not run under the Triton interpreter")
    for group in groups:
        left = deadline - time.monotonic()
        if left < 15:
            rows += [common.error_row(BENCHMARK, "all", k, "not run: time budget spent") for k in group]
            continue
        spec = dict(kernels=group, contenders=[c for c in args.contenders if not args.tiny or c in TINY_CONTENDERS],
                    tiny=args.tiny, calibration=calibration, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms,
                    timing=args.timing)
        print(f"--- {' '.join(group)}", file=sys.stderr, flush=True)
        result, failure = common.run_worker([sys.executable, str(Path(__file__).resolve()), "--worker",
                                             json.dumps(spec)], timeout=left, env=env)
        rows += result.get("rows", [])
        notes += result.get("notes", [])
        if failure:
            where = result.get("current") or {"contender": "all", "config": " ".join(group)}
            rows.append(common.error_row(BENCHMARK, where["contender"], where["config"], failure))
        calibration = calibration or result.get("calibration")
        device = device or result.get("device")
    notes.append(f"wall time {time.monotonic() - started:.0f} s for {' '.join(args.kernels)}")
    common.write_results(out, rows, device=device, notes=notes, append=args.append)
    print(summary(rows))
    print(notes[-1])
    print(f"wrote {len(rows)} rows to {out}")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kernels", nargs="+", default=list(KERNELS), choices=KERNELS)
    p.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=CONTENDERS)
    p.add_argument("--warmup-ms", type=float, default=25.0, help="warm-up budget per timing (do_bench's default)")
    p.add_argument("--rep-ms", type=float, default=100.0, help="measurement budget per timing (do_bench's default)")
    p.add_argument("--timing", default="graph", choices=TIMINGS,
                   help="graph: CUDA graph replay (GPU time only; default); events: CUDA events around each call")
    p.add_argument("--budget-s", type=float, default=540.0,
                   help="wall-clock limit (default: fits one 10-minute command); kernels not started by then "
                        "are recorded as not run, a kernel still running is stopped")
    p.add_argument("--out", default=None, help=f"results file (default {RESULTS}; --tiny: a temporary file)")
    p.add_argument("--append", action="store_true", help="merge into an existing results file")
    p.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU under the Triton interpreter (smoke)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.tiny:
        args.warmup_ms = args.rep_ms = 0.0
    return args


# ================================================================== worker

@dataclass
class Case:
    """One kernel at one size: its inputs, contenders, fp32 reference and the work it does.

    ``inputs`` maps names to pristine inputs; those named in ``grads`` are leaves that require grad, and every
    call gets clones of them (non-leaf, like activations in a model; in-place kernels may overwrite them).
    Contenders and the reference take that dict. The reference runs on fp32 copies of the floating inputs,
    updated with ``reference_inputs``. ``grad_outputs`` are the upstream gradients (None: a scalar loss).
    """

    kernel: str
    shape: str
    inputs: dict
    contenders: dict
    reference: Callable[[dict], Any]
    grads: tuple = ()
    grad_outputs: tuple | None = None
    reference_inputs: dict = field(default_factory=dict)
    bytes: dict = field(default_factory=dict)  # direction -> minimal bytes moved
    flops: dict = field(default_factory=dict)  # direction -> matmul FLOPs
    checks: dict = field(default_factory=dict)  # metric -> (contender, fn() -> value)
    compare_peak: bool = False

    def label(self, what: str) -> str:
        return f"{self.kernel} {what} {self.shape}"


class Context:
    """What a worker shares between kernels: device, sizes, selected contenders, recorder, calibration."""

    def __init__(self, spec, device, recorder, result):
        self.device, self.rec, self.result = device, recorder, result
        self.tiny = spec["tiny"]
        self.sizes = TINY if self.tiny else LLAMA_31_8B
        self.selected = spec["contenders"]
        self.bench = (dict(warmup_ms=0.0, rep_ms=0.0, min_reps=1) if self.tiny
                      else dict(warmup_ms=spec["warmup_ms"], rep_ms=spec["rep_ms"]))
        self.timing = "cpu" if device.type != "cuda" else spec.get("timing", "graph")
        self._liger = None
        self._graphs = None

    def graphs(self) -> GraphTimer:
        if self._graphs is None:
            self._graphs = GraphTimer(self.device)
        return self._graphs

    def note(self, text: str) -> None:
        self.result["notes"].append(text)

    def current(self, contender: str, config: str) -> None:
        """Tell the parent what runs now, so a crash is attributed to it."""
        self.result["current"] = {"contender": contender, "config": config}
        common.emit(self.result)

    def liger_ops(self):
        """liger_kernel.ops, imported once; a failed import raises the same error for every kernel."""
        if self._liger is None:
            try:
                import liger_kernel.ops as ops

                self._liger = ops
            except Exception as exc:
                self._liger = exc
        if isinstance(self._liger, Exception):
            raise self._liger
        return self._liger

    def contenders(self, kernel: str, slothbook, eager, liger=None, variant=None, **others) -> dict:
        """The selected contenders: ``liger`` is ``ops -> fn`` (built only when Liger imports); ``variant`` is
        ``keywords -> fn``, slothbook's op with one of ``VARIANTS[kernel]``'s launch shapes."""
        import torch

        found = {"slothbook": slothbook, "torch": eager}
        if variant is not None:
            found.update({name: variant(**kw) for name, kw in VARIANTS.get(kernel, {}).items()})
        if "compile" in self.selected:
            # A compiled backward frees ("donates") its saved tensors as it runs, so it cannot be replayed with
            # retain_graph=True: without donation it is captured in CUDA graphs like every other contender, instead
            # of sending the whole direction to the events fallback.
            functorch_config = torch._functorch.config
            if hasattr(functorch_config, "donated_buffer"):
                functorch_config.donated_buffer = False
            found["compile"] = torch.compile(eager)
        if liger is not None and "liger" in self.selected:
            try:
                found["liger"] = liger(self.liger_ops())
            except Exception as exc:
                self.rec.error("liger", f"{kernel} import", exc)
        found.update(others)
        return {name: fn for name, fn in found.items() if name in self.selected}


def worker(spec: dict) -> None:
    import torch

    device = torch.device("cpu" if spec["tiny"] else "cuda")
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 references must be fp32
    torch.backends.cudnn.allow_tf32 = False
    result = {"rows": [], "device": common.device_details(device), "calibration": spec["calibration"],
              "current": None, "notes": []}
    rec = common.Recorder(BENCHMARK, result["rows"])
    if device.type == "cuda" and not torch.cuda.is_available():
        rec.error("all", " ".join(spec["kernels"]), "no CUDA GPU here; --tiny runs the CPU smoke test")
        return common.emit(result)
    ctx = Context(spec, device, rec, result)
    if result["calibration"] is None:
        result["calibration"] = calibrate(ctx)
    for name in spec["kernels"]:
        ctx.current("setup", f"{name} setup")
        case = None
        with rec.guard("setup", f"{name} setup", device):
            case = BUILDERS[name](ctx)
        if case is not None:
            run_case(case, ctx)
        del case
        common.free_memory(device)
    result["current"] = None
    common.emit(result)


def calibrate(ctx) -> dict:
    """Copy bandwidth and bf16 matmul rate of this device, measured now; recorded as rows of "device"."""
    found = {}
    nbytes, n = (16 * 2**20, 256) if ctx.tiny else (common.GIB, 8192)
    config = f"copy {nbytes // 2**20} MiB bf16"
    ctx.current("device", config)
    with ctx.rec.guard("device", config, ctx.device):
        found["copy_bytes_per_s"] = common.copy_bandwidth(ctx.device, nbytes, **ctx.bench)
        ctx.rec.add("device", config, "bandwidth_gbps", round(found["copy_bytes_per_s"] / 1e9, 1), "GB/s")
    config = f"matmul {n}x{n}x{n} bf16"
    ctx.current("device", config)
    with ctx.rec.guard("device", config, ctx.device):
        found["matmul_flops_per_s"] = common.matmul_rate(ctx.device, n, **ctx.bench)
        ctx.rec.add("device", config, "tflops", float(f"{found['matmul_flops_per_s'] / 1e12:.3g}"), "TFLOP/s")
    common.free_memory(ctx.device)
    return found


# ------------------------------------------------------------------ running one case

def _as_tuple(out) -> tuple:
    return out if isinstance(out, tuple) else (out,)


def _fresh(case: Case):
    """Call arguments with fresh clones of the inputs that get gradients, and fresh upstream gradients."""
    args = {n: (v.clone() if n in case.grads else v) for n, v in case.inputs.items()}
    dys = None if case.grad_outputs is None else tuple(g.clone() for g in case.grad_outputs)
    return args, dys


def _forward(case: Case, fn, args, dys):
    """Run the forward; returns what autograd.grad needs for the backward."""
    return _as_tuple(fn(args)), [args[n] for n in case.grads], dys


def _forward_backward(case: Case, fn, args, dys):
    import torch

    outs, targets, dys = _forward(case, fn, args, dys)
    grads = torch.autograd.grad(outs, targets, dys) if case.grads else ()
    return outs, grads


def _reference(case: Case):
    """fp32 outputs and input gradients of the reference on the same inputs."""
    import torch

    def up(name, value):
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            value = value.detach().float()
            return value.requires_grad_(name in case.grads)
        return value

    args = {n: up(n, v) for n, v in case.inputs.items()}
    args.update(case.reference_inputs)
    dys = None if case.grad_outputs is None else tuple(g.float() for g in case.grad_outputs)
    outs, grads = _forward_backward(case, case.reference, args, dys)
    return [o.detach() for o in outs], list(grads)


def _max_error(actual, expected) -> float:
    return max(common.rel_error(a, e) for a, e in zip(actual, expected, strict=True))


def run_case(case: Case, ctx: Context) -> None:
    import torch

    rec, device, bench = ctx.rec, ctx.device, ctx.bench
    failed = set()

    # 1. Correctness against the fp32 reference; also the warm-up (Triton JIT, torch.compile).
    ref = None
    ctx.current("reference", case.label("reference"))
    with rec.guard("reference", case.label("reference"), device):
        ref = _reference(case)
    for name, fn in case.contenders.items():
        ctx.current(name, case.label("check"))
        ok = False
        with rec.guard(name, case.label("check"), device):
            outs, grads = _forward_backward(case, fn, *_fresh(case))
            if ref is not None:
                rec.add(name, case.label("fwd"), "rel_error", _max_error(outs, ref[0]), "relative")
                if case.grads:
                    rec.add(name, case.label("bwd"), "rel_error", _max_error(grads, ref[1]), "relative")
            del outs, grads
            ok = True
        if not ok:
            failed.add(name)
        common.free_memory(device)
    for metric, (name, check) in case.checks.items():
        with rec.guard(name, case.label("check"), device):
            rec.add(name, case.label("fwd"), metric, float(check()), "bool")
    del ref
    common.free_memory(device)
    runnable = {n: fn for n, fn in case.contenders.items() if n not in failed}

    # 2. Peak memory of one forward + backward, above the inputs.
    what = case.label("fwd+bwd" if case.grads else "fwd")
    if device.type == "cuda":
        peaks = {}
        for name, fn in runnable.items():
            ctx.current(name, case.label("memory"))
            with rec.guard(name, case.label("memory"), device):
                args, dys = _fresh(case)
                peaks[name] = common.peak_extra_bytes(lambda: _forward_backward(case, fn, args, dys), device)
                rec.add(name, what, "peak_alloc_gib", round(peaks[name] / common.GIB, 4), "GiB")
                del args, dys
            common.free_memory(device)
        if case.compare_peak and peaks.get("torch"):
            for name, peak in peaks.items():
                if name != "torch":
                    rec.add(name, what, "peak_ratio_vs_torch", round(peak / peaks["torch"], 4), "ratio")

    # 3. Time: forward, then backward (of an untimed forward), every contender by the same method.
    times, methods = {name: {} for name in runnable}, {}
    for direction in ("fwd", "bwd") if case.grads else ("fwd",):
        methods[direction] = time_direction(case, runnable, direction, ctx, times)
        for name, t in times.items():
            if direction in t:
                record_speed(ctx, case, name, direction, t[direction], methods[direction])
    both = "+".join(dict.fromkeys(methods.values()))  # "graph", or "events+graph" when one direction fell back
    for name, t in times.items():
        if "fwd" in t and "bwd" in t:
            record_speed(ctx, case, name, "fwd+bwd", t["fwd"] + t["bwd"], both)


def _timed_call(case: Case, fn, direction: str, retain: bool):
    """``(prepare, call)``: ``prepare()`` makes the untimed state (fresh inputs; for the backward, also the
    forward), ``call(state)`` is the timed work."""
    import torch

    if direction == "fwd":
        return (lambda: _fresh(case)[0]), fn
    return (lambda: _forward(case, fn, *_fresh(case))), (lambda st: torch.autograd.grad(*st, retain_graph=retain))


def time_direction(case: Case, contenders: dict, direction: str, ctx: Context, times: dict) -> str:
    """Time every contender in one direction by CUDA graph replay or, if any of them cannot be captured, every
    one of them by CUDA events; fills ``times[name][direction]`` and returns the method."""
    rec, device = ctx.rec, ctx.device
    if ctx.timing == "graph":
        found, failure = {}, None
        for name, fn in contenders.items():
            ctx.current(name, case.label(direction))
            try:
                found[name] = ctx.graphs().time_ms(*_timed_call(case, fn, direction, retain=True), **ctx.bench)
            except Exception as exc:  # the fallback below times (or records the error of) every contender
                failure = f"{name}: {type(exc).__name__}: {str(exc).strip()[:300]}"
            common.free_memory(device)
            if failure:
                break
        if failure is None:
            for name, ms in found.items():
                times[name][direction] = ms
            return "graph"
        ctx.note(f"{case.label(direction)}: timed by CUDA events for every contender, not captured ({failure})")
    for name, fn in contenders.items():
        ctx.current(name, case.label(direction))
        prepare, call = _timed_call(case, fn, direction, retain=False)
        with rec.guard(name, case.label(direction), device):
            times[name][direction] = common.bench_ms(call, setup=prepare, device=device, **ctx.bench)
        common.free_memory(device)
    return "cpu" if device.type != "cuda" else "events"


class GraphTimer:
    """GPU time of a call from CUDA graph replays (see "Timing" in the module docstring).

    All work, untimed preparation included, runs on one side stream: autograd runs a backward on the stream of
    its forward, so the capture of a backward sees its kernels.
    """

    def __init__(self, device):
        import torch

        self.torch, self.device = torch, device
        self.stream = torch.cuda.Stream(device)
        self.evict_buffer = torch.ones(common._FLUSH_BYTES // 4, dtype=torch.int32, device=device)

    def _evict(self):
        # Reading (not writing) evicts the L2 without leaving dirty lines whose write-back the call would pay for.
        self.evict_buffer.sum()

    def time_ms(self, prepare, call, *, warmup_ms: float, rep_ms: float, min_reps: int = 5, max_reps: int = 200,
                replays: int = 6) -> float:
        torch = self.torch
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        try:
            with torch.cuda.stream(self.stream):
                return self._time_on_stream(prepare, call, warmup_ms, rep_ms, min_reps, max_reps, replays)
        finally:
            torch.cuda.current_stream(self.device).wait_stream(self.stream)

    def _time_on_stream(self, prepare, call, warmup_ms, rep_ms, min_reps, max_reps, replays) -> float:
        torch = self.torch
        state = prepare()
        # Eager calls on this stream first: allocator and library workspaces for the stream, and a host sync
        # (which a capture cannot hold) raises here instead of breaking the capture.
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(2):
                call(state)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        estimate = max(self._per_call(state, call, 1, 3, 0), 1e-3)
        n = max(min_reps, min(max_reps, int(rep_ms / estimate)))
        warm = max(1, min(5, int(warmup_ms / (n * estimate))))
        return self._per_call(state, call, n, replays, warm)

    def _capture(self, n: int, step):
        graph = self.torch.cuda.CUDAGraph()
        with self.torch.cuda.graph(graph, stream=self.stream):
            for _ in range(n):
                step()
        return graph

    def _per_call(self, state, call, n: int, replays: int, warm: int) -> float:
        def evict_and_call():
            self._evict()
            call(state)

        full, evictions = self._capture(n, evict_and_call), self._capture(n, self._evict)
        for _ in range(warm):
            full.replay()
            evictions.replay()
        a, b = [], []
        for _ in range(replays):  # interleaved, so a drift of the clocks touches both alike
            a.append(self._replay_ms(full))
            b.append(self._replay_ms(evictions))
        return max(statistics.median(a) - statistics.median(b), 0.0) / n

    def _replay_ms(self, graph) -> float:
        torch = self.torch
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)


def record_speed(ctx: Context, case: Case, name: str, direction: str, ms: float, method: str) -> None:
    """time_ms, and the achieved fraction of the measured copy bandwidth or matmul rate; the config ends with the
    timing method."""
    config = f"{case.label(direction)} {method}"
    ctx.rec.add(name, config, "time_ms", round(ms, 4), "ms")
    cal = ctx.result["calibration"] or {}
    nbytes = _total(case.bytes, direction)
    if nbytes and cal.get("copy_bytes_per_s"):
        ctx.rec.add(name, config, "bandwidth_fraction", round(nbytes / (ms / 1e3) / cal["copy_bytes_per_s"], 4),
                    "fraction")
    flops = _total(case.flops, direction)
    if flops and cal.get("matmul_flops_per_s"):
        ctx.rec.add(name, config, "compute_fraction", round(flops / (ms / 1e3) / cal["matmul_flops_per_s"], 4),
                    "fraction")


def _total(per_direction: dict, direction: str):
    if direction == "fwd+bwd":
        return per_direction.get("fwd", 0) + per_direction.get("bwd", 0)
    return per_direction.get(direction, 0)


# ------------------------------------------------------------------ the kernels

def _randn(ctx, *shape, scale=1.0, grad=False):
    import torch

    t = torch.randn(*shape, device=ctx.device, dtype=torch.bfloat16)
    if scale != 1.0:
        t = t.mul_(scale)
    return t.requires_grad_(grad)


def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def build_rms_norm(ctx) -> Case:
    import torch

    from slothbook.kernels.rms_norm import rms_norm, rms_norm_backward, rms_norm_forward, rms_norm_reference

    s = ctx.sizes
    n, h, eps = s["tokens"], s["hidden"], s["eps"]
    x = _randn(ctx, n, h, grad=True)
    w = (1.0 + _randn(ctx, h, scale=0.1)).requires_grad_()
    dy = _randn(ctx, n, h)

    def eager(a):
        return rms_norm_reference(a["x"], a["w"], eps)

    def variant(**schedule):
        """slothbook's RMSNorm with the backward launched with ``schedule`` (rms_norm_backward's keywords)."""

        class Scheduled(torch.autograd.Function):
            @staticmethod
            def forward(fn_ctx, x, w):
                y, rstd = rms_norm_forward(x, w, eps)
                fn_ctx.save_for_backward(x, w, rstd)
                return y

            @staticmethod
            def backward(fn_ctx, dy):
                return rms_norm_backward(dy, *fn_ctx.saved_tensors, **schedule)

        return lambda a: Scheduled.apply(a["x"], a["w"])

    return Case(
        "rms_norm", f"{n}x{h} bf16", {"x": x, "w": w},
        ctx.contenders("rms_norm", lambda a: rms_norm(a["x"], a["w"], eps), eager,
                       liger=lambda lk: lambda a: lk.LigerRMSNormFunction.apply(a["x"], a["w"], eps, 0.0, "llama"),
                       variant=variant),
        eager, grads=("x", "w"), grad_outputs=(dy,),
        bytes={"fwd": 2 * _nbytes(x) + _nbytes(w), "bwd": 3 * _nbytes(x) + 2 * _nbytes(w)},
    )


def _rope_tables(ctx, seq: int, head_dim: int, theta: float):
    import torch

    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=ctx.device, dtype=torch.float32) / head_dim)
    freqs = torch.outer(torch.arange(seq, device=ctx.device, dtype=torch.float32), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos()[None].to(torch.bfloat16), emb.sin()[None].to(torch.bfloat16)  # [1, seq, head_dim]


def build_rope(ctx) -> Case:
    from slothbook.kernels.rope import apply_rope, rope_reference

    s = ctx.sizes
    n, hq, hk, d = s["tokens"], s["heads"], s["kv_heads"], s["head_dim"]

    def hf_layout(heads, grad=False):
        # [batch, heads, seq, head_dim] as a transposed view of [batch, seq, heads, head_dim], as HF makes it.
        return _randn(ctx, 1, n, heads, d).transpose(1, 2).requires_grad_(grad)

    q, k = hf_layout(hq, grad=True), hf_layout(hk, grad=True)
    cos, sin = _rope_tables(ctx, n, d, s["rope_theta"])

    def eager(a):
        return rope_reference(a["q"], a["k"], a["cos"], a["sin"])

    moved = 2 * _nbytes(q, k) + _nbytes(cos, sin)
    return Case(
        "rope", f"q{hq} k{hk} {n}x{d} bf16", {"q": q, "k": k, "cos": cos, "sin": sin},
        ctx.contenders("rope", lambda a: apply_rope(a["q"], a["k"], a["cos"], a["sin"]), eager,
                       liger=lambda lk: lambda a: lk.LigerRopeFunction.apply(a["q"], a["k"], a["cos"], a["sin"]),
                       variant=lambda **kw: lambda a: apply_rope(a["q"], a["k"], a["cos"], a["sin"], **kw)),
        eager, grads=("q", "k"), grad_outputs=(hf_layout(hq), hf_layout(hk)),
        bytes={"fwd": moved, "bwd": moved},
    )


def _build_glu(ctx, kernel: str) -> Case:
    import torch.nn.functional as F

    from slothbook.kernels.swiglu import geglu, swiglu

    s = ctx.sizes
    n, i = s["tokens"], s["intermediate"]
    gate, up, dy = _randn(ctx, n, i, grad=True), _randn(ctx, n, i, grad=True), _randn(ctx, n, i)
    if kernel == "swiglu":
        def eager(a):
            return F.silu(a["gate"]) * a["up"]

        ours = lambda a: swiglu(a["gate"], a["up"])  # noqa: E731
        liger = lambda lk: lambda a: lk.LigerSiLUMulFunction.apply(a["gate"], a["up"])  # noqa: E731
        shape = f"{n}x{i} bf16"
    else:
        def eager(a):
            return F.gelu(a["gate"], approximate="tanh") * a["up"]

        ours = lambda a: geglu(a["gate"], a["up"], approximate="tanh")  # noqa: E731
        liger = lambda lk: lambda a: lk.LigerGELUMulFunction.apply(a["gate"], a["up"])  # noqa: E731
        shape = f"{n}x{i} bf16 tanh"
    return Case(
        kernel, shape, {"gate": gate, "up": up}, ctx.contenders(kernel, ours, eager, liger=liger), eager,
        grads=("gate", "up"), grad_outputs=(dy,), bytes={"fwd": 3 * _nbytes(gate), "bwd": 5 * _nbytes(gate)},
    )


def build_swiglu(ctx) -> Case:
    return _build_glu(ctx, "swiglu")


def build_geglu(ctx) -> Case:
    return _build_glu(ctx, "geglu")


def build_cross_entropy(ctx) -> Case:
    import torch
    import torch.nn.functional as F

    from slothbook.kernels.cross_entropy import cross_entropy

    s = ctx.sizes
    n, v = s["tokens"], s["vocab"]
    logits = _randn(ctx, n, v, scale=2.0, grad=True)
    labels = torch.randint(0, v, (n,), device=ctx.device)

    def eager(a):  # what transformers' causal-LM loss does: upcast, then cross-entropy
        return F.cross_entropy(a["logits"].float(), a["labels"])

    return Case(
        "cross_entropy", f"{n}x{v} bf16", {"logits": logits, "labels": labels},
        ctx.contenders("cross_entropy", lambda a: cross_entropy(a["logits"], a["labels"]), eager,
                       liger=lambda lk: lambda a: lk.LigerCrossEntropyFunction.apply(a["logits"], a["labels"],
                                                                                      None)[0]),
        eager, grads=("logits",), compare_peak=True,
        bytes={"fwd": _nbytes(logits, labels), "bwd": 2 * _nbytes(logits) + _nbytes(labels)},
    )


def build_fused_linear_cross_entropy(ctx) -> Case:
    import torch
    import torch.nn.functional as F

    from slothbook.kernels.fused_linear_cross_entropy import fused_linear_cross_entropy

    s = ctx.sizes
    n, h, v = s["tokens"], s["hidden"], s["vocab"]
    hidden = _randn(ctx, n, h, grad=True)
    weight = _randn(ctx, v, h, scale=h**-0.5)  # frozen lm_head, as under LoRA
    labels = torch.randint(0, v, (n,), device=ctx.device)

    def eager(a):  # lm_head, then transformers' causal-LM loss on float logits
        return F.cross_entropy(F.linear(a["hidden"], a["weight"]).float(), a["labels"])

    return Case(
        "fused_linear_cross_entropy", f"{n}x{h}x{v} bf16", {"hidden": hidden, "weight": weight, "labels": labels},
        ctx.contenders(
            "fused_linear_cross_entropy",
            lambda a: fused_linear_cross_entropy(a["hidden"], a["weight"], a["labels"]), eager,
            liger=lambda lk: lambda a: lk.LigerFusedLinearCrossEntropyFunction.apply(a["hidden"], a["weight"],
                                                                                      a["labels"])[0]),
        eager, grads=("hidden",), compare_peak=True,
        flops={"fwd": 2 * n * h * v, "bwd": 2 * n * h * v},
    )


def _quantize_nf4(weight):
    """bitsandbytes NF4 (blocksize 64, nested absmax, as QLoRA loads): (packed, quant_state, NF4Weight)."""
    import bitsandbytes.functional as bnbf

    from slothbook.kernels.nf4 import nf4_weight_from_quant_state

    packed, state = bnbf.quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4")
    return packed, state, nf4_weight_from_quant_state(packed, state)


def build_nf4_dequantize(ctx) -> Case:
    import bitsandbytes.functional as bnbf
    import torch

    from slothbook.kernels.nf4 import dequantize_nf4, dequantize_nf4_reference

    s = ctx.sizes
    rows, cols = s["hidden"], s["intermediate"]
    packed, state, w = _quantize_nf4(_randn(ctx, rows, cols, scale=0.02))

    def eager(a):
        return dequantize_nf4_reference(a["w"])

    def bnb(a):
        return bnbf.dequantize_4bit(a["packed"], a["state"])

    def equal_to_bnb():
        return torch.equal(dequantize_nf4(w), bnbf.dequantize_4bit(packed, state))

    stored = _nbytes(packed, w.absmax) + (_nbytes(w.nested_absmax) if w.nested else 0)
    return Case(
        "nf4_dequantize", f"{rows}x{cols} bf16", {"w": w, "packed": packed, "state": state},
        ctx.contenders("nf4_dequantize", lambda a: dequantize_nf4(a["w"]), eager, bitsandbytes=bnb),
        lambda a: dequantize_nf4_reference(a["w"], torch.float32),
        bytes={"fwd": stored + rows * cols * 2}, checks={"bitwise_equal_bitsandbytes": ("slothbook", equal_to_bnb)},
    )


_PROJECTIONS = ("gate", "up", "down")


def _build_lora_mlp(ctx, base: str) -> Case:
    """Llama MLP with LoRA on gate/up/down over a bf16 or NF4 base, against PEFT's eager composition."""
    import torch
    import torch.nn.functional as F

    from slothbook.kernels.lora import lora_mlp
    from slothbook.kernels.nf4 import dequantize_nf4_reference

    s = ctx.sizes
    n, h, i, r = s["tokens"], s["hidden"], s["intermediate"], s["rank"]
    scaling = s["lora_alpha"] / r
    dims = {"gate": (h, i), "up": (h, i), "down": (i, h)}
    inputs, reference_inputs, flops = {"x": _randn(ctx, n, h, grad=True)}, {}, {"fwd": 0, "bwd": 0}
    for p, (fan_in, fan_out) in dims.items():
        weight = _randn(ctx, fan_out, fan_in, scale=fan_in**-0.5)
        inputs[f"{p}_a"] = _randn(ctx, r, fan_in, scale=fan_in**-0.5, grad=True)
        inputs[f"{p}_b"] = _randn(ctx, fan_out, r, scale=0.1 * r**-0.5, grad=True)  # trained B: small, non-zero
        if base == "nf4":
            packed, state, nf4 = _quantize_nf4(weight)
            inputs[f"{p}_w"], inputs[f"{p}_bnb"] = nf4, (packed, state)
            reference_inputs[f"{p}_w"] = dequantize_nf4_reference(nf4, dtype=torch.float32)
        else:
            inputs[f"{p}_w"] = weight
        flops["fwd"] += 2 * n * fan_in * fan_out + 2 * n * r * (fan_in + fan_out)
        flops["bwd"] += 2 * n * fan_in * fan_out + 4 * n * r * (fan_in + fan_out)

    def dense(a, p, x):
        return F.linear(x, a[f"{p}_w"])

    def peft_mlp(base_matmul):
        def mlp(a):
            def proj(p, x):  # PEFT's LoRA Linear: base(x) + lora_B(lora_A(x)) * scaling (no dropout)
                return base_matmul(a, p, x) + F.linear(F.linear(x, a[f"{p}_a"]), a[f"{p}_b"]) * scaling

            return proj("down", F.silu(proj("gate", a["x"])) * proj("up", a["x"]))

        return mlp

    def ours(a):
        return lora_mlp(a["x"], *[(a[f"{p}_w"], a[f"{p}_a"], a[f"{p}_b"], scaling) for p in _PROJECTIONS])

    eager = _peft_qlora_mlp(inputs, dims, r, s["lora_alpha"]) if base == "nf4" else peft_mlp(dense)
    kernel = f"lora_mlp_{base}"
    return Case(
        kernel, f"{n}x{h}x{i} r{r} bf16", inputs, ctx.contenders(kernel, ours, eager), peft_mlp(dense),
        grads=("x",) + tuple(f"{p}_{m}" for p in _PROJECTIONS for m in "ab"), grad_outputs=(_randn(ctx, n, h),),
        reference_inputs=reference_inputs, flops=flops,
    )


def _peft_qlora_mlp(inputs: dict, dims: dict, rank: int, alpha: float):
    """The QLoRA MLP as PEFT runs it: peft's LoRA ``Linear4bit`` around bitsandbytes' ``Linear4bit`` for each
    projection, over the same NF4 weights. The LoRA factors come from the call's inputs (``functional_call``), so each
    call differentiates fresh tensors like the other contenders."""
    import bitsandbytes as bnb
    import torch
    import torch.nn.functional as F
    from peft import LoraConfig
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit
    from torch import nn

    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0)

    def projection(p, fan_in, fan_out):
        packed, state = inputs[f"{p}_bnb"]
        base = bnb.nn.Linear4bit(fan_in, fan_out, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4",
                                 device="meta")
        base.weight = bnb.nn.Params4bit(packed, requires_grad=False, quant_state=state, blocksize=state.blocksize,
                                        compress_statistics=True, quant_type="nf4", module=base, bnb_quantized=True)
        return LoraLinear4bit(base, "default", config=config, r=rank, lora_alpha=alpha, lora_dropout=0.0)

    class QLoRAMLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate, self.up, self.down = (projection(p, *dims[p]) for p in _PROJECTIONS)

        def forward(self, x):
            return self.down(F.silu(self.gate(x)) * self.up(x))

    mlp = QLoRAMLP()

    def call(a):
        factors = {f"{p}.lora_{m.upper()}.default.weight": a[f"{p}_{m}"] for p in _PROJECTIONS for m in "ab"}
        return torch.func.functional_call(mlp, factors, (a["x"],))

    return call


def build_lora_mlp_bf16(ctx) -> Case:
    return _build_lora_mlp(ctx, "bf16")


def build_lora_mlp_nf4(ctx) -> Case:
    return _build_lora_mlp(ctx, "nf4")


BUILDERS = {
    "rms_norm": build_rms_norm,
    "rope": build_rope,
    "swiglu": build_swiglu,
    "geglu": build_geglu,
    "cross_entropy": build_cross_entropy,
    "fused_linear_cross_entropy": build_fused_linear_cross_entropy,
    "nf4_dequantize": build_nf4_dequantize,
    "lora_mlp_bf16": build_lora_mlp_bf16,
    "lora_mlp_nf4": build_lora_mlp_nf4,
}


# ================================================================== printed summary

def summary(rows: list) -> str:
    """A short table (time and bandwidth or compute fraction per contender), errors, and the issue's targets."""
    values = {(r["contender"], r["config"], r["metric"]): r["value"] for r in rows if r["metric"] != common.ERROR}
    configs = list(dict.fromkeys(r["config"] for r in rows if r["metric"] == "time_ms"))
    present = {r["contender"] for r in rows if r["metric"] == "time_ms"}
    names = [c for c in CONTENDERS if c in present]
    width = max([len(c) for c in configs] + [10])
    lines = [""] + [f"{r['config']}: {r['value']} {r['unit']}" for r in rows
                    if r["contender"] == "device" and r["metric"] != common.ERROR]
    col = max([18] + [len(c) + 2 for c in names])
    lines.append(f"{'time ms (fraction of copy bw | matmul rate)':<{width}}  " + "".join(f"{c:>{col}}" for c in names))
    for config in configs:
        cells = []
        for name in names:
            ms = values.get((name, config, "time_ms"))
            frac = values.get((name, config, "bandwidth_fraction"), values.get((name, config, "compute_fraction")))
            cell = "-" if ms is None else f"{ms:.3f}" + (f" ({frac:.0%})" if frac is not None else "")
            cells.append(f"{cell:>{col}}")
        lines.append(f"{config:<{width}}  " + "".join(cells))
    for (name, config, metric), value in values.items():
        if metric in ("peak_alloc_gib", "peak_ratio_vs_torch") and config.startswith(GRAD_IN_FORWARD):
            lines.append(f"{metric} {name:<12} {config}: {value}")
    errors = [r for r in rows if r["metric"] == common.ERROR]
    lines.append(f"errors: {len(errors)}")
    lines += [f"  {r['contender']} | {r['config']} | {str(r['value'])[:150]}" for r in errors[:12]]
    lines += targets(values, configs)
    return "\n".join(lines)


def targets(values: dict, configs: list) -> list[str]:
    """The issue's targets, checked on what this run measured."""
    bandwidth = {c: values[("slothbook", c, "bandwidth_fraction")] for c in configs
                 if c.split()[0] in MEMORY_BOUND and c.split()[1] != "fwd+bwd"
                 and ("slothbook", c, "bandwidth_fraction") in values}
    versus_liger = {}
    for c in configs:
        kernel, direction = c.split()[:2]
        ours, liger = values.get(("slothbook", c, "time_ms")), values.get(("liger", c, "time_ms"))
        judged = direction == "fwd+bwd" if kernel in GRAD_IN_FORWARD else direction != "fwd+bwd"
        if judged and ours is not None and liger is not None:
            versus_liger[c] = ours / liger
    ratio = [v for (n, c, m), v in values.items()
             if n == "slothbook" and m == "peak_ratio_vs_torch" and c.startswith("fused_linear_cross_entropy")]
    return [
        "targets:",
        "  memory-bound kernels >= 80% of copy bandwidth: "
        + _verdict([f"{c} {f:.0%}" for c, f in bandwidth.items() if f < 0.8], len(bandwidth)),
        "  no kernel slower than Liger: "
        + _verdict([f"{c} {r:.2f}x" for c, r in versus_liger.items() if r > 1.0], len(versus_liger)),
        "  fused linear CE peak < 25% of eager: "
        + ("not measured" if not ratio else ("yes" if ratio[0] < 0.25 else "NO") + f" ({ratio[0]:.1%})"),
    ]


def _verdict(misses: list, n_checked: int) -> str:
    if not n_checked:
        return "not measured"
    return f"yes ({n_checked} checked)" if not misses else f"NO ({len(misses)} of {n_checked}): " + ", ".join(misses)


if __name__ == "__main__":
    main()
