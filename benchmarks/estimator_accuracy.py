"""Estimator accuracy and profiler overhead: measured peak memory against `slothbook.profiler.estimate`.

The model has the shape of Llama-3.1-8B with random bf16 weights built on the GPU (nothing is downloaded; the
builders are benchmarks/long_context.py's). LoRA r=16 on every projection of the decoder through
`FastLanguageModel.get_peft_model`, AdamW on the adapters, batch 1, slothbook's kernels patched in (CUDA).
For each config ("qlora": NF4 decoder linears, "lora16": bf16), checkpointing mode ("plain", "offload") and
sequence length (2K, 8K, 32K by default):

  unprofiled  warm-up, then --steps timed steps without the profiler (the allocator's peak of the last one),
              and --steps more after the profiled ones: their mean is the baseline, their gap the drift
  profiled    the same steps inside `MemoryProfiler` (CPU: cpu_mode="exact", so the peak includes transients)
  paired      --steps pairs of steps, one unprofiled then one profiled (the profiler attached around that step
              alone): overhead_fraction is the median of the pairs' time ratios less 1, which drift between
              blocks of steps (several percent on an H100 at 2K tokens) does not move
              Beyond --overhead-max-seq tokens (default 8K) only the warm-up and one profiled step run: the
              memory rows, no overhead rows (a 32K step takes seconds; the overhead is measured at 2K and 8K).
  estimate    `estimate(config, seq, 1, **training_setup(model, optimizer))`, from the config alone

Rows (benchmarks/results/estimator_accuracy.json, format in common.py):
  estimator_accuracy  peak_gib, weights_gib, activations_gib, held_after_forward_gib, offloaded_gib (measured /
                      estimate), ratio_to_measured (estimate's peak over the measured one), peak_before (the
                      first phase sample at the step's peak), peak_where (the estimate's: head, layer or
                      optimizer step), cuda_runtime_gib (the estimate's cuBLAS workspaces) and, for sequences
                      past --overhead-max-seq, the profiled step's step_time_ms
  profiler_overhead   step_time_ms (unprofiled / profiled: medians over the pairs), overhead_fraction (median
                      of the pairs' profiled / unprofiled, less 1) and drift_fraction (the pairs' unprofiled
                      median over the first unprofiled block's, less 1: the drift the pairing cancels); the
                      pairs alternate their order, and "control" pairs two unprofiled steps the same way (the
                      noise floor); host_ms_per_step: time spent in the profiler's own hooks (host_fraction:
                      over the unprofiled step time; host_ms_by_call: split by hook); with --trace,
                      extra_calls: runtime calls and ops a profiled step adds (torch.profiler, one step each)

  python benchmarks/estimator_accuracy.py --steps 2 --budget-s 330 --append   # the whole grid, ~4 min on an H100
  python benchmarks/estimator_accuracy.py --configs qlora --seqs 2048 8192 --append    # one piece
  python benchmarks/estimator_accuracy.py --tiny           # CPU smoke test: tiny model, short sequences
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
import common  # noqa: E402

# Off sys.path again, so that this folder's generic script names (train, generation) shadow no installed module.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
builders = common.load_script("long_context")  # random_llama: Llama-3.1-8B's shape (or a tiny one), random weights

CONFIGS = ("qlora", "lora16")
MODES = ("plain", "offload")
SEQS = (2048, 8192, 32768)
RESULTS = common.RESULTS_DIR / "estimator_accuracy.json"
GIB = common.GIB


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        return worker(json.loads(args.worker))
    out = Path(args.out or (Path(tempfile.gettempdir()) / "slothbook_estimator_smoke.json" if args.tiny
                            else RESULTS))
    deadline = time.monotonic() + args.budget_s
    rows, notes, device = [], [], None
    for i, config in enumerate(args.configs):
        left = deadline - time.monotonic()
        if left < 30:
            notes.append(f"{config}: not run, time budget spent")
            continue
        share = left / (len(args.configs) - i)  # an even share, so the last config is not starved
        spec = dict(config=config, tiny=args.tiny, seqs=args.seqs, modes=args.modes, steps=args.steps,
                    overhead_max_seq=args.overhead_max_seq, trace=args.trace, budget_s=share - 20)
        result, failure = common.run_worker([sys.executable, str(Path(__file__).resolve()), "--worker",
                                             json.dumps(spec)], timeout=share)
        rows += result.get("rows", [])
        notes += result.get("notes", [])
        device = device or result.get("device")
        if failure:
            notes.append(f"{config}: {failure}")
    common.write_results(out, rows, device=device, notes=list(dict.fromkeys(notes)), append=args.append)
    print(f"wrote {len(rows)} rows and {len(notes)} notes to {out}")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--seqs", nargs="+", type=int, default=list(SEQS))
    p.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step, per contender")
    p.add_argument("--overhead-max-seq", type=int, default=8192,
                   help="longer sequences get one profiled step and no overhead rows")
    p.add_argument("--trace", action="store_true",
                   help="also record the runtime calls and ops a profiled step adds (torch.profiler, one step each)")
    p.add_argument("--budget-s", type=float, default=540, help="wall-clock budget (one 10-minute device command)")
    p.add_argument("--out", default=None)
    p.add_argument("--append", action="store_true", help="merge into an existing results file")
    p.add_argument("--tiny", action="store_true", help="tiny model and sequences on the CPU (smoke test)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.tiny:
        args.seqs, args.steps = [s for s in args.seqs if s <= 256] or [64, 128, 256], 2
    return args


# ---------------------------------------------------------------- the worker: one config, every mode and length

def worker(spec: dict) -> None:
    import torch

    from slothbook import FastLanguageModel
    from slothbook.train.checkpointing import set_gradient_checkpointing

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    started = time.monotonic()
    rows, notes = [], []
    result = {"rows": rows, "notes": notes, "device": common.device_details(device)}
    accuracy = common.Recorder("estimator_accuracy", rows, on_change=lambda: common.emit(result))
    overhead = common.Recorder("profiler_overhead", rows, on_change=lambda: common.emit(result))
    config = spec["config"]
    try:
        base = builders.random_llama({"tiny": spec["tiny"]}, device, four_bit=config == "qlora")
        model = FastLanguageModel.get_peft_model(base, r=16, use_gradient_checkpointing=True)
        if device.type == "cuda":
            from slothbook.models.patch import patch_model

            patch_model(model)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    except Exception as exc:
        accuracy.error("measured", f"{config} setup", exc)
        return common.emit(result)

    if device.type == "cpu":
        notes.append("CPU: profiled with cpu_mode='exact' (every allocation tracked, about 20% slower steps), so "
                     "profiler_overhead is that mode's; the default mode costs one call per saved tensor.")
    for mode in spec["modes"]:
        set_gradient_checkpointing(model, "slothbook" if mode == "offload" else True)
        for seq in spec["seqs"]:
            name = f"{config} {mode} {seq}x1"
            if time.monotonic() - started > spec["budget_s"]:
                notes.append(f"{name}: not run, time budget spent")
                continue
            with accuracy.guard("measured", name, device):
                measure(model, optimizer, seq, spec["steps"], device, name, accuracy,
                        overhead if seq <= spec["overhead_max_seq"] else None, trace=spec.get("trace", False))
            optimizer.zero_grad(set_to_none=True)
            common.free_memory(device)
    common.emit(result)


def measure(model, optimizer, seq, steps, device, name, accuracy, overhead=None, trace=False) -> None:
    """Estimate against the profiled peak; with an `overhead` recorder also the profiler's cost in step time."""
    import torch

    from slothbook.profiler import MemoryProfiler, estimate
    from slothbook.profiler.setup import training_setup

    ids = torch.randint(0, model.config.vocab_size, (1, seq), device=device)

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def timed_one(after_step=None) -> float:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        step()
        if after_step is not None:
            after_step()
        common.sync(device)
        return (time.perf_counter() - start) * 1000

    def timed(after_step=None):
        return statistics.median(timed_one(after_step) for _ in range(steps))

    step()  # warm-up: optimizer state, offload pool, kernel compilation
    common.sync(device)
    if overhead is None:
        steps = 1  # memory only: one profiled step
    else:
        before_ms = timed()
    allocator_peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    # CPU: "exact" tracks every allocation (the default "saved" mode cannot see backward's working set).
    with MemoryProfiler(model, optimizer, cpu_mode="exact" if device.type == "cpu" else "saved", live=False) as prof:
        profiled_ms = timed(prof.step)
    if overhead is None and allocator_peak is not None:  # no unprofiled step: the profiled one's own peak
        allocator_peak = torch.cuda.max_memory_allocated(device)
    measured = prof.steps[-1]
    phases = [s for s in prof.samples if s.step == measured.step and s.phase != "peak"]
    # The first phase whose running peak reached the step's: the peak happened before that sample.
    peak_phase = next((s.phase for s in phases if s.peak >= measured.peak), "after the last sample")
    forward = next((s for s in phases if s.phase == "forward"), None)
    est = estimate(model.config, seq, 1, **training_setup(model, optimizer, device.type))

    accuracy.add("measured", name, "peak_gib", measured.peak / GIB, "GiB")
    accuracy.add("estimate", name, "peak_gib", est.total / GIB, "GiB")
    accuracy.add("estimate", name, "ratio_to_measured", round(est.total / measured.peak, 4), "ratio")
    if allocator_peak is not None:
        accuracy.add("allocator", name, "peak_gib", allocator_peak / GIB, "GiB")
    for category in ("weights", "activations"):
        accuracy.add("measured", name, f"{category}_gib", getattr(measured, category) / GIB, "GiB")
        accuracy.add("estimate", name, f"{category}_gib", est[category] / GIB, "GiB")
    if forward is not None:
        accuracy.add("measured", name, "held_after_forward_gib", forward.activations / GIB, "GiB")
    accuracy.add("estimate", name, "held_after_forward_gib", est.detail["held_after_forward"] / GIB, "GiB")
    accuracy.add("measured", name, "peak_before", peak_phase, "phase")
    accuracy.add("estimate", name, "peak_where", est.detail["peak_where"], "name")
    accuracy.add("measured", name, "offloaded_gib", measured.offloaded / GIB, "GiB")
    accuracy.add("estimate", name, "offloaded_gib", est.detail["offloaded"] / GIB, "GiB")
    accuracy.add("estimate", name, "implementation", est.settings["implementation"], "name")
    accuracy.add("estimate", name, "cuda_runtime_gib", est.detail["cuda_runtime"] / GIB, "GiB")
    if overhead is None:
        accuracy.add("profiled", name, "step_time_ms", round(profiled_ms, 2), "ms")
        return
    # Step times drift by several percent between blocks of steps (clocks, host jitter): far more than the
    # profiler costs. So the overhead is measured in pairs, an unprofiled step then a profiled one, the profiler
    # attached only around its step (attaching counts the weights again: that cost is outside the timing), and
    # read as the median of the pairs' ratios, which drift shared by both steps of a pair does not move.
    # The order inside a pair alternates (AB, BA, ...) so that a cost the second step of a pair always pays
    # does not land on the profiled one; unprofiled pairs in the same pattern give the noise floor (control).
    paired = MemoryProfiler(cpu_mode="exact" if device.type == "cpu" else "saved", live=False)
    clock = HostClock(paired)

    def profiled_one() -> float:
        paired.attach(model, optimizer)
        # Attaching drops the cached byte count of the optimizer's state, which a profiler attached for the
        # whole run takes once (it is recounted only when the state gains entries): take it here, untimed.
        paired.optimizer_bytes()
        ms = timed_one(paired.step)
        paired.detach()
        return ms

    pairs, control = [], []
    for i in range(steps):
        first_plain = i % 2 == 0
        a = timed_one() if first_plain else profiled_one()
        b = profiled_one() if first_plain else timed_one()
        pairs.append((a, b) if first_plain else (b, a))
        c, d = timed_one(), timed_one()
        control.append((c, d) if first_plain else (d, c))  # mirrored like the pair, two unprofiled steps
    plain_ms = statistics.median(p for p, _ in pairs)
    overhead.add("unprofiled", name, "step_time_ms", round(plain_ms, 2), "ms")
    overhead.add("unprofiled", name, "drift_fraction", round(plain_ms / before_ms - 1, 4), "fraction")
    overhead.add("profiled", name, "step_time_ms", round(statistics.median(q for _, q in pairs), 2), "ms")
    overhead.add("profiler", name, "overhead_fraction",
                 round(statistics.median(q / p for p, q in pairs) - 1, 4), "fraction")
    overhead.add("control", name, "overhead_fraction",
                 round(statistics.median(q / p for p, q in control) - 1, 4), "fraction")
    overhead.add("profiler", name, "host_ms_per_step", round(clock.seconds * 1000 / steps, 3), "ms")
    overhead.add("profiler", name, "host_fraction", round(clock.seconds * 1000 / steps / plain_ms, 4), "fraction")
    overhead.add("profiler", name, "host_ms_by_call", clock.split(steps), "text")
    if trace:
        overhead.add("profiler", name, "extra_calls", runtime_call_difference(timed_one, profiled_one, device), "text")


class HostClock:
    """Host time spent inside the profiler's hooks and step calls (nested calls counted once)."""

    METHODS = ("_on_forward_begin", "_on_forward_end", "_on_backward_begin", "mark", "begin_step", "end_step",
               "step")

    def __init__(self, profiler):
        self.seconds = 0.0
        self.by_method: dict[str, float] = {}  # outermost calls only, by the method called
        self._depth = 0
        for method in self.METHODS:  # instance attributes: attach() registers these wrappers as the hooks
            setattr(profiler, method, self._timed(method, getattr(profiler, method)))

    def _timed(self, method, fn):
        def wrapper(*args, **kwargs):
            self._depth += 1
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth -= 1
                if self._depth == 0:
                    spent = time.perf_counter() - start
                    self.seconds += spent
                    self.by_method[method] = self.by_method.get(method, 0.0) + spent
        return wrapper

    def split(self, steps: int) -> str:
        return "; ".join(f"{m} {s * 1000 / steps:.3f} ms" for m, s in sorted(self.by_method.items(),
                                                                              key=lambda kv: -kv[1]))


def runtime_call_difference(plain, profiled, device) -> str:
    """CUDA runtime / driver calls and ops whose count differs between a profiled and an unprofiled step
    (one step of each under torch.profiler), with the host time they add: where a synchronisation or an
    allocation would hide. "name +calls (+ms); ...", largest host time first."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])

    def calls(run) -> dict:
        run()  # CUPTI's start-up cost falls outside the recorded step
        with profile(activities=activities) as prof:
            run()
        return {e.key: (e.count, e.cpu_time_total / 1000) for e in prof.key_averages()}

    before, after = calls(plain), calls(profiled)
    extra = []
    for key in set(before) | set(after):
        (n0, t0), (n1, t1) = before.get(key, (0, 0.0)), after.get(key, (0, 0.0))
        if n1 != n0:
            extra.append((t1 - t0, f"{key} {n1 - n0:+d} ({t1 - t0:+.2f} ms)"))
    return "; ".join(text for _, text in sorted(extra, reverse=True)) or "none"


if __name__ == "__main__":
    main()
