"""Is a training step host-bound? Per-step wall and host-issue times, allocator calls, and host cost per launch.

benchmarks/train.py reports a median; a host-bound step (batch 1 at 2048 tokens on an 8B model) varies with the
host's CPU from step to step and machine to machine. This script builds slothbook's contender exactly as
train.py does (random Llama-3.1-8B checkpoint, FastLanguageModel, AdamW, bf16 autocast) and, per config:

  time_ms             median wall time of --steps steps (synchronised before and after each), with min and max
  host_issue_ms       median time until step() returns, before synchronising: equal to time_ms when the GPU
                      waits on the host throughout
  device_allocs       cudaMalloc calls of the caching allocator during the timed steps (0: no allocator stall)
  time_ms_gc_off      the median again with Python's garbage collector off

and once, the host's cost of single calls (microseconds, the mean of 2,000 unsynchronised calls):
`dequantize_nf4` of a 4096x4096 NF4 weight (128x128 with --tiny), `nf4_weight_from_quant_state`, a LoRA-sized fp32->bf16 cast, an
empty 4096x4096 allocation and a small in-place add.

  python benchmarks/host_bound.py --configs qlora lora16 --out $OUT/host_bound.json    # ~2 minutes on an H100
  python benchmarks/host_bound.py --tiny        # CPU smoke test: tiny Llama, Triton interpreter
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path

BENCH = "host_bound"


def _timed_steps(step, batches, device):
    import torch

    cuda = device.type == "cuda"
    wall, issue = [], []
    allocs = torch.cuda.memory_stats(device).get("num_device_alloc", 0) if cuda else 0
    for ids in batches:
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        step(ids)
        returned = time.perf_counter()
        if cuda:
            torch.cuda.synchronize(device)
        wall.append((time.perf_counter() - start) * 1e3)
        issue.append((returned - start) * 1e3)
    allocs = torch.cuda.memory_stats(device).get("num_device_alloc", 0) - allocs if cuda else 0
    return wall, issue, allocs


def measure_config(train, config: str, args, folder: Path, device, rec) -> None:
    import contenders  # importable once train.py has loaded it

    model = train.TINY.name if args.tiny else train.MODELS["llama"].name
    spec = dict(model=model, config=config, contender="slothbook", seq=args.seq, tiny=args.tiny, folder=str(folder))
    step = contenders.module_of("slothbook").build(train.job_for(spec, device))
    vocab = train.shape_named(model).get("vocab_size")
    batches = train.random_ids(vocab, 1, args.seq, args.warmup + 2 * args.steps, device, seed=1)
    for ids in batches[:args.warmup]:
        step(ids)
    wall, issue, allocs = _timed_steps(step, batches[args.warmup:args.warmup + args.steps], device)
    gc.disable()
    try:
        gc_off, _, _ = _timed_steps(step, batches[args.warmup + args.steps:], device)
    finally:
        gc.enable()
    name = f"slothbook {config} {args.seq}x1 {model}"
    rec.add("slothbook", name, "time_ms", round(statistics.median(wall), 2), "ms")
    rec.add("slothbook", name, "time_ms_min", round(min(wall), 2), "ms")
    rec.add("slothbook", name, "time_ms_max", round(max(wall), 2), "ms")
    rec.add("slothbook", name, "host_issue_ms", round(statistics.median(issue), 2), "ms")
    rec.add("slothbook", name, "device_allocs", allocs, "calls")
    rec.add("slothbook", name, "time_ms_gc_off", round(statistics.median(gc_off), 2), "ms")
    print(f"{name}: step ms {[round(w, 1) for w in wall]}\n  host issue ms {[round(i, 1) for i in issue]}\n"
          f"  cudaMalloc calls {allocs}, gc off median {statistics.median(gc_off):.1f} ms", flush=True)


def launch_costs(device, rec, calls: int, n: int = 4096) -> None:
    import bitsandbytes.functional as bnbf
    import torch

    from slothbook.kernels.nf4 import dequantize_nf4, nf4_weight_from_quant_state

    data, state = bnbf.quantize_4bit(torch.randn(n, n, device=device, dtype=torch.bfloat16),
                                     quant_type="nf4", compress_statistics=True)
    weight = nf4_weight_from_quant_state(data, state)
    lora, small = torch.randn(16, 4096, device=device), torch.randn(16, 4096, device=device)
    ops = {f"dequantize_nf4 {n}x{n}": lambda: dequantize_nf4(weight, dtype=torch.bfloat16),
           "nf4_weight_from_quant_state": lambda: nf4_weight_from_quant_state(data, state),
           "cast 16x4096 fp32 to bf16": lambda: lora.to(torch.bfloat16),
           "empty 4096x4096 bf16": lambda: torch.empty(4096, 4096, device=device, dtype=torch.bfloat16),
           "add_ 16x4096": lambda: small.add_(1)}
    for name, op in ops.items():
        for _ in range(min(50, calls)):
            op()
        start = time.perf_counter()
        for _ in range(calls):
            op()
        us = (time.perf_counter() - start) / calls * 1e6
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        rec.add("host", name, "host_us_per_call", round(us, 2), "us")
        print(f"host us per call, {name}: {us:.1f}", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="+", choices=("qlora", "lora16"), default=["qlora", "lora16"])
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--workdir", type=Path, default=None, help="where the random checkpoint goes")
    p.add_argument("--out", type=Path, default=None, help="results file (default benchmarks/results/host_bound.json)")
    p.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny Llama, 2 steps, Triton interpreter")
    args = p.parse_args(argv)
    if args.tiny:
        args.seq, args.warmup, args.steps = 32, 1, 2

    import torch

    import common  # python puts this folder on sys.path for a script run from it

    train = common.load_script("train")

    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="slothbook-host-"))
    shape = train.TINY if args.tiny else train.MODELS["llama"]
    folder = workdir / shape.name
    if not (folder / "config.json").is_file():
        train.save_random_checkpoint(shape, folder, device)
    rec = common.Recorder(BENCH)
    for config in args.configs:
        with rec.guard("slothbook", f"{config} setup", device):
            measure_config(train, config, args, folder, device, rec)
        common.free_memory(device)
    with rec.guard("host", "launch costs", device):
        launch_costs(device, rec, *((3, 128) if args.tiny else (2000, 4096)))
    out = args.out or (Path(tempfile.gettempdir()) / f"{BENCH}.json" if args.tiny
                       else common.RESULTS_DIR / f"{BENCH}.json")
    common.write_results(out, rec.rows, device=common.device_details(device))
    print(f"wrote {len(rec.rows)} rows to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
