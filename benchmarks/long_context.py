"""Long-context LoRA / QLoRA benchmark: longest trainable sequence, offload overhead, memory at 32K.

The model has the shape of Llama-3.1-8B (llama3 RoPE scaling) with random bf16 weights built on the GPU,
so nothing is downloaded. Batch 1, LoRA r=16 on every linear layer of the decoder, AdamW on the LoRA
weights, bf16 autocast. Each contender runs in its own subprocess, once per config:

  hf         transformers + PEFT, SDPA, transformers' gradient checkpointing (non-reentrant)
  liger      the same plus Liger kernels (RoPE, RMSNorm, SwiGLU, fused linear cross-entropy), if it imports
  unsloth    FastLanguageModel with use_gradient_checkpointing="unsloth", if it imports
  slothbook  FastLanguageModel.get_peft_model(use_gradient_checkpointing="slothbook"), kernels patched: offloaded
             checkpointing, MLP tiled above 16K tokens, fused LoRA projections, fused linear cross-entropy

Per contender and config ("qlora", "lora16") it measures
  time      step time at --time-seq tokens; slothbook also with plain checkpointing -> overhead_fraction
  memory    peak allocated GPU memory and pinned host memory of one step at --memory-seq tokens
  search    the longest sequence whose step completes: --search-start, then +--search-step up to --max-seq,
            stopping at the first failure or when the time budget is spent
  check     one step at each of --check-seqs (ascending, stopping at the first failure): its time, peak GPU
            memory and pinned host memory; max_seq_len is the longest that completed. At 350K tokens a step of
            the 8B model takes minutes, so a 4K-step search up there does not fit a device session.

  python benchmarks/long_context.py --contenders slothbook --configs qlora --append   # one piece, <= 9 min
  python benchmarks/long_context.py --budget-s 7200                 # everything at once (over an hour)
  python benchmarks/long_context.py --tiny                        # CPU smoke test: tiny model, one search step

Results: benchmarks/results/long_context.json, {"device","versions","date","command","rows":[...],"notes":[...]}.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.metadata
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONTENDERS = ("hf", "liger", "unsloth", "slothbook")
CONFIGS = ("qlora", "lora16")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RESULT_MARK = "@@RESULT@@ "
GIB = 2 ** 30
RESULTS = Path(__file__).resolve().parent / "results" / "long_context.json"

LLAMA_31_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                   num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072, rms_norm_eps=1e-5,
                   rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                      "high_freq_factor": 4.0,
                                                      "original_max_position_embeddings": 8192})
TINY = dict(LLAMA_31_8B, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256)


# ---------------------------------------------------------------- the parent: one subprocess per run

def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        return worker(json.loads(args.worker))
    if args.chart:
        doc = json.loads(Path(args.out or RESULTS).read_text())
        Path(args.chart).write_text(memory_chart_svg(doc["rows"]))
        return print(f"wrote {args.chart}")
    out = Path(args.out or (Path(tempfile.gettempdir()) / "slothbook_long_context_smoke.json" if args.tiny
                            else RESULTS))
    deadline = time.monotonic() + args.budget_s
    rows, notes, device = [], [], None
    for contender in args.contenders:
        for config in args.configs:
            left = deadline - time.monotonic()
            if left < 30:
                notes.append(note(contender, config, "not run: time budget spent"))
                continue
            spec = dict(contender=contender, config=config, tiny=args.tiny, phases=args.phases,
                        time_seq=args.time_seq, memory_seq=args.memory_seq, search_start=args.search_start,
                        search_step=args.search_step, max_seq=args.max_seq, steps=args.steps,
                        check_seqs=sorted(args.check_seqs),
                        workdir=args.workdir, budget_s=left - 20,
                        gpu_memory_gib=args.gpu_memory_gib)
            result = run_worker(spec, timeout=left)
            rows += result.get("rows", [])
            notes += result.get("notes", [])
            device = device or result.get("device")
    write_results(out, rows, notes, device, append=args.append)
    print(f"wrote {len(rows)} rows and {len(notes)} notes to {out}")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=CONTENDERS)
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    p.add_argument("--phases", nargs="+", default=["time", "memory", "search"],
                   choices=["time", "memory", "search", "check"])
    p.add_argument("--check-seqs", nargs="+", type=int, default=None,
                   help="lengths for the check phase (default 131072 262144 352256; --tiny: 64 128)")
    p.add_argument("--time-seq", type=int, default=16384)
    p.add_argument("--memory-seq", type=int, default=32768)
    p.add_argument("--search-start", type=int, default=8192)
    p.add_argument("--search-step", type=int, default=4096)
    p.add_argument("--max-seq", type=int, default=131072)
    p.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    p.add_argument("--gpu-memory-gib", type=float, default=None,
                   help="let the caching allocator hold at most this much (an H200 standing in for an 80 GB H100: "
                        "79.19, the total an H100 80GB HBM3's out-of-memory errors report)")
    p.add_argument("--budget-s", type=float, default=540,
                   help="wall-clock budget for the whole run (default: fits one 10-minute device command)")
    p.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "slothbook-long-context"),
                   help="where the unsloth contender's random checkpoint is written")
    p.add_argument("--out", default=None)
    p.add_argument("--append", action="store_true", help="merge into an existing results file")
    p.add_argument("--chart", default=None, help="only draw peak GPU memory against length from --out (or the "
                   "results file) into this SVG")
    p.add_argument("--tiny", action="store_true", help="tiny model, short sequences, one search step (CPU smoke)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.check_seqs = args.check_seqs or ([64, 128] if args.tiny else [131072, 262144, 352256])
    if args.tiny:
        args.time_seq, args.memory_seq, args.search_start, args.search_step, args.max_seq = 64, 96, 128, 64, 128
        args.steps = 1
    return args


def run_worker(spec: dict, timeout: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    label = f"{spec['contender']} {spec['config']}"
    print(f"--- {label}", file=sys.stderr, flush=True)
    killed = None
    try:
        stdout = subprocess.run(cmd, stdout=subprocess.PIPE, timeout=timeout).stdout
    except subprocess.TimeoutExpired as exc:
        stdout, killed = exc.stdout or b"", note(spec["contender"], spec["config"],
                                                 f"killed after {timeout:.0f} s (budget); partial results")
    result = {}
    for line in stdout.decode(errors="replace").splitlines():
        if line.startswith(RESULT_MARK):
            result = json.loads(line[len(RESULT_MARK):])  # the last one is the most complete
    if not result and killed is None:
        killed = note(spec["contender"], spec["config"], "worker exited without a result (see its stderr)")
    if killed is not None:
        result.setdefault("notes", []).append(killed)
    return result


def write_results(out: Path, rows: list, notes: list, device, append: bool) -> None:
    doc = {"device": device, "versions": versions(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
           "command": " ".join([Path(sys.executable).name] + sys.argv), "rows": rows, "notes": notes}
    if append and out.is_file():
        old = json.loads(out.read_text())
        key = lambda r: (r["benchmark"], r["contender"], r["config"], r["metric"])  # noqa: E731
        fresh = {key(r) for r in rows}
        doc["rows"] = [r for r in old.get("rows", []) if key(r) not in fresh] + rows
        ran = {(n["contender"], n["config"]) for n in notes} | {(r["contender"], r["config"].split()[0])
                                                               for r in rows}
        doc["notes"] = [n for n in old.get("notes", []) if (n["contender"], n["config"]) not in ran] + notes
        doc["command"] = f"{old.get('command', '')} ; {doc['command']}"
        doc["device"] = device or old.get("device")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")


def memory_chart_svg(rows: list, gpu_gib: float = 80.0) -> str:
    """Peak GPU memory of one step against sequence length, a line per contender and config, as a standalone SVG
    (no plotting library: the docs' figure can be redrawn from the JSON anywhere)."""
    series: dict = {}
    for r in rows:
        if r["metric"] == "peak_alloc_gib" and r["value"] is not None:
            config, shape = r["config"].split()
            series.setdefault(f"{r['contender']} {config}", []).append((int(shape.split("x")[0]), r["value"]))
    width, height, left, bottom = 560, 300, 60, 40
    x_max = max([seq for points in series.values() for seq, _ in points] + [1])
    x = lambda seq: left + width * seq / x_max  # noqa: E731
    y = lambda gib: 20 + height * (1 - gib / gpu_gib)  # noqa: E731
    colors = ("#4c78a8", "#f58518", "#54a24b", "#e45756", "#b279a2")
    body = [f'<line x1="{left}" y1="{y(gpu_gib)}" x2="{left + width}" y2="{y(gpu_gib)}" stroke="#999" '
            f'stroke-dasharray="4"/><text x="{left + 4}" y="{y(gpu_gib) + 14}">{gpu_gib:g} GiB GPU</text>',
            f'<line x1="{left}" y1="{y(0)}" x2="{left + width}" y2="{y(0)}" stroke="#333"/>',
            f'<line x1="{left}" y1="{y(0)}" x2="{left}" y2="{y(gpu_gib)}" stroke="#333"/>']
    for tick in range(0, int(gpu_gib) + 1, 20):
        body.append(f'<text x="{left - 6}" y="{y(tick) + 4}" text-anchor="end">{tick}</text>')
    for tick in range(0, x_max + 1, 65536):
        body.append(f'<text x="{x(tick):.1f}" y="{y(0) + 16}" text-anchor="middle">{tick // 1024}K</text>')
    for i, (name, points) in enumerate(sorted(series.items())):
        color, points = colors[i % len(colors)], sorted(points)
        path = " ".join(f"{x(seq):.1f},{y(gib):.1f}" for seq, gib in points)
        body.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2"/>')
        for seq, gib in points:
            body.append(f'<circle cx="{x(seq):.1f}" cy="{y(gib):.1f}" r="4" fill="{color}"/>'
                        f'<text x="{x(seq) - 6:.1f}" y="{y(gib) - 8:.1f}" text-anchor="end">{seq:,}: '
                        f'{gib:.1f}</text>')
        body.append(f'<text x="{left + width - 150}" y="{40 + 16 * i}" fill="{color}">{name}</text>')
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + width + 20}" height="{height + bottom + 30}" '
            f'font-family="sans-serif" font-size="12"><text x="{left}" y="14" font-size="14">Peak GPU memory of one '
            f'step (GiB) against sequence length, batch 1</text>' + "".join(body)
            + f'<text x="{left + width / 2}" y="{height + bottom + 10}" text-anchor="middle">tokens</text></svg>\n')


def versions() -> dict:
    found = {}
    for name in ("torch", "transformers", "peft", "bitsandbytes", "triton", "liger-kernel", "unsloth", "slothbook"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return found


def note(contender, config, text) -> dict:
    return {"contender": contender, "config": config, "note": text}


# ---------------------------------------------------------------- the worker: one contender, one config

def worker(spec: dict) -> None:
    contender, config = spec["contender"], spec["config"]
    rows, notes = [], []
    result = {"rows": rows, "notes": notes}
    started = time.monotonic()

    def emit():  # after every phase, so that a run killed by the budget still reports what it measured
        print(RESULT_MARK + json.dumps(result), flush=True)

    try:
        if contender == "unsloth":
            import unsloth  # noqa: F401  (unsloth must be imported before transformers)
        if contender == "liger":
            import liger_kernel.transformers  # noqa: F401
    except Exception as exc:  # the exact import error is the result
        notes.append(note(contender, config, f"unavailable: {type(exc).__name__}: {exc}"))
        return emit()

    import torch

    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    result["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    if spec.get("gpu_memory_gib") and device.type == "cuda":
        # A larger GPU stands in for a smaller one: the caching allocator refuses to hold more than this.
        total = torch.cuda.mem_get_info(device)[1]  # what the fraction is of (the properties report less)
        torch.cuda.set_per_process_memory_fraction(min(1.0, spec["gpu_memory_gib"] * GIB / total), device)
        result["device"] += f" capped at {spec['gpu_memory_gib']:g} GiB"
    if os.environ.get("PYTORCH_CUDA_ALLOC_CONF"):
        notes.append(note(contender, config, f"PYTORCH_CUDA_ALLOC_CONF={os.environ['PYTORCH_CUDA_ALLOC_CONF']}"))
    try:
        run = SETUPS[contender](spec, device, notes)
    except Exception as exc:
        notes.append(note(contender, config, f"setup failed: {type(exc).__name__}: {exc}"))
        return emit()

    def row(benchmark, seq, metric, value, unit):
        rows.append({"benchmark": benchmark, "contender": contender, "config": f"{config} {seq}x1",
                     "metric": metric, "value": value, "unit": unit})

    if "time" in spec["phases"]:
        seq = spec["time_seq"]
        ms = run.time_ms(seq, spec["steps"], notes)
        row("step_time", seq, "time_ms", ms, "ms")
        if run.plain is not None and ms is not None:  # slothbook: the same step with plain checkpointing
            run.plain()
            plain_ms = run.time_ms(seq, spec["steps"], notes)
            run.offloaded()
            row("step_time_plain_checkpointing", seq, "time_ms", plain_ms, "ms")
            row("offload_overhead", seq, "overhead_fraction",
                None if plain_ms is None else round(ms / plain_ms - 1, 4), "fraction")
        emit()
    if "memory" in spec["phases"]:
        seq = spec["memory_seq"]
        peak, pinned = run.memory(seq, notes)
        row("memory", seq, "peak_alloc_gib", peak, "GiB")
        row("memory", seq, "pinned_gib", pinned, "GiB")
        emit()
    if "search" in spec["phases"]:
        deadline = started + spec["budget_s"]
        best, seq = 0, spec["search_start"]
        while seq <= spec["max_seq"]:
            if time.monotonic() > deadline:
                notes.append(note(contender, config, f"search stopped by the time budget before {seq}"))
                break
            if not run.step_fits(seq, notes):
                break
            best, seq = seq, seq + spec["search_step"]
        rows.append({"benchmark": "max_seq_len", "contender": contender, "config": f"{config} search",
                     "metric": "max_seq_len", "value": best, "unit": "tokens"})
        emit()
    if "check" in spec["phases"]:
        best = 0
        for seq in spec["check_seqs"]:
            print(f"{contender} {config}: one step at {seq} tokens", file=sys.stderr, flush=True)
            measured = run.one_step(seq, notes)
            if measured is None:
                break
            best = seq
            for metric, value, unit in zip(("time_ms", "peak_alloc_gib", "pinned_gib", "host_available_gib"),
                                           measured, ("ms", "GiB", "GiB", "GiB")):
                row("long_step", seq, metric, value, unit)
            emit()
        rows.append({"benchmark": "max_seq_len", "contender": contender, "config": f"{config} checked",
                     "metric": "max_seq_len", "value": best, "unit": "tokens"})
    emit()


class Run:
    """A model ready to train, and the measurements taken on it."""

    def __init__(self, spec, model, loss, device, plain=None, offloaded=None):
        import torch

        self.contender, self.config = spec["contender"], spec["config"]
        self.model, self.loss, self.device = model, loss, device
        self.plain, self.offloaded = plain, offloaded  # slothbook: switch checkpointing mode in place
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=1e-5)
        self.vocab = model.config.vocab_size

    def step(self, seq: int) -> None:
        import torch

        ids = torch.randint(0, self.vocab, (1, seq), device=self.device)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            loss = self.loss(ids)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        sync(self.device)

    def guarded(self, seq: int, notes: list, what: str) -> bool:
        """One step; False (with a note) when it runs out of memory or fails."""
        import torch

        try:
            self.step(seq)
            return True
        except torch.OutOfMemoryError as exc:  # its first sentence says what was asked for and what was free
            notes.append(note(self.contender, self.config, f"{what}: out of memory at {seq} tokens: "
                                                           f"{str(exc).split('. Of the')[0][:400]}"))
        except Exception as exc:
            notes.append(note(self.contender, self.config, f"{what}: {type(exc).__name__}: {exc} at {seq} tokens"))
        self.optimizer.zero_grad(set_to_none=True)
        release(self.device)
        return False

    def time_ms(self, seq: int, steps: int, notes: list):
        if not self.guarded(seq, notes, "time"):  # warm-up (also allocates the offload pool)
            return None
        start = time.perf_counter()
        for _ in range(steps):
            if not self.guarded(seq, notes, "time"):
                return None
        return round((time.perf_counter() - start) / steps * 1000, 1)

    def memory(self, seq: int, notes: list):
        import torch

        release(self.device)
        if self.device.type != "cuda":
            notes.append(note(self.contender, self.config, "memory: no CUDA statistics on the CPU"))
            return None, None
        torch.cuda.reset_peak_memory_stats(self.device)
        if not self.guarded(seq, notes, "memory"):
            return None, None
        peak = torch.cuda.max_memory_allocated(self.device) / GIB
        return round(peak, 3), round(pinned_bytes() / GIB, 3)

    def one_step(self, seq: int, notes: list):
        """(time_ms, peak GiB, pinned GiB, host GiB still available) of one step from a cold start (the first at
        this length: it includes growing the pinned pool), or None when it fails; no GPU statistics on the CPU.
        Pinned plus available host memory bounds the longest context that offloading can hold."""
        import torch

        release(self.device)
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        if not self.guarded(seq, notes, "check"):
            return None
        ms = round((time.perf_counter() - start) * 1000, 1)
        from slothbook.device import host_memory_available  # what the offload pool could still page-lock

        available = round(host_memory_available() / GIB, 3)
        if not cuda:
            return ms, None, None, available
        notes.append(note(self.contender, self.config, f"check at {seq}: peak reserved "
                          f"{torch.cuda.max_memory_reserved(self.device) / GIB:.2f} GiB"))
        return (ms, round(torch.cuda.max_memory_allocated(self.device) / GIB, 3), round(pinned_bytes() / GIB, 3),
                available)

    def step_fits(self, seq: int, notes: list) -> bool:
        release(self.device)
        return self.guarded(seq, notes, "search")


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)  # timing only: the step itself never synchronises


def release(device) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def pinned_bytes() -> int:
    """Pinned host memory held by torch's host allocator (the offload pool included) after returning its
    unused cache; the slothbook pool's own count where those statistics do not exist."""
    import torch

    empty_host_cache = (getattr(getattr(torch, "accelerator", None), "empty_host_cache", None)
                        or getattr(torch._C, "_host_emptyCache", None))  # older torch: only the private one
    if empty_host_cache is not None:
        empty_host_cache()
    from slothbook.train.offload import registered_bytes

    stats = getattr(torch.cuda, "host_memory_stats", None)
    if stats is not None:  # large offload buffers are page-locked in place, outside these statistics
        return int(stats().get("allocated_bytes.current", 0)) + registered_bytes()
    from slothbook.train.offload import offloaded_bytes

    return offloaded_bytes()


# ---------------------------------------------------------------- building models

def llama_config(tiny: bool):
    from transformers import LlamaConfig

    return LlamaConfig(**(TINY if tiny else LLAMA_31_8B), attn_implementation="sdpa", use_cache=False)


def random_llama(spec: dict, device, four_bit: bool):
    """Random bf16 weights initialised on the device (fp32 on the CPU); nf4 Linear4bit decoder linears for QLoRA."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(llama_config(spec["tiny"]), dtype=dtype,
                                                 attn_implementation="sdpa")
    if four_bit:
        quantize_decoder_linears(model, dtype)
    release(device)
    return model


def quantize_decoder_linears(model, compute_dtype) -> None:
    """Swap every nn.Linear of the decoder layers for a bitsandbytes nf4 Linear4bit (double quantisation)."""
    import bitsandbytes as bnb
    from torch import nn

    for layer in model.model.layers:
        for parent in list(layer.modules()):
            for name, child in list(parent.named_children()):
                if not isinstance(child, nn.Linear):
                    continue
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4",
                                      device="meta")
                weight = child.weight.data
                q.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=True,
                                             quant_type="nf4").to(weight.device)  # quantises
                if child.bias is not None:
                    q.bias = nn.Parameter(child.bias.data, requires_grad=False)
                setattr(parent, name, q)
    model.is_loaded_in_4bit = True  # what peft looks at to wrap Linear4bit with its QLoRA layer


def add_lora(model):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS,
                                            task_type="CAUSAL_LM"))


def hf_checkpointing(model) -> None:
    model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def labels_loss(model):
    return lambda ids: model(input_ids=ids, labels=ids).loss


def setup_hf(spec, device, notes) -> Run:
    model = add_lora(random_llama(spec, device, spec["config"] == "qlora"))
    hf_checkpointing(model)
    return Run(spec, model.train(), labels_loss(model), device)


def setup_liger(spec, device, notes) -> Run:
    from liger_kernel.transformers import apply_liger_kernel_to_llama

    base = random_llama(spec, device, spec["config"] == "qlora")
    apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                fused_linear_cross_entropy=True, model=base)
    model = add_lora(base)
    hf_checkpointing(model)
    return Run(spec, model.train(), labels_loss(model), device)


def setup_slothbook(spec, device, notes) -> Run:
    """What a user gets: FastLanguageModel.get_peft_model with offloaded checkpointing (the MLP tiled above 16K
    tokens) and, on CUDA, slothbook's kernels patched in (fused LoRA projections, RMSNorm, RoPE, and the fused
    linear cross-entropy, so the logits never exist)."""
    from slothbook import FastLanguageModel
    from slothbook.train.checkpointing import set_gradient_checkpointing

    base = random_llama(spec, device, spec["config"] == "qlora")
    model = FastLanguageModel.get_peft_model(base, r=16, lora_alpha=16, target_modules=TARGETS,
                                             use_gradient_checkpointing="slothbook")
    if device.type == "cuda":
        from slothbook.models.patch import patch_model

        patch_model(model)
    else:
        notes.append(note("slothbook", spec["config"], "CPU: no kernels patched (they need CUDA)"))
    return Run(spec, model.train(), labels_loss(model), device,
               plain=lambda: set_gradient_checkpointing(model, True),
               offloaded=lambda: set_gradient_checkpointing(model, "slothbook"))


def setup_unsloth(spec, device, notes) -> Run:
    import torch
    from unsloth import FastLanguageModel

    folder = random_checkpoint(spec, device)
    model, _ = FastLanguageModel.from_pretrained(str(folder), max_seq_length=spec["max_seq"], dtype=torch.bfloat16,
                                                 load_in_4bit=spec["config"] == "qlora")
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=16, lora_dropout=0, target_modules=TARGETS,
                                             use_gradient_checkpointing="unsloth")
    return Run(spec, model.train(), labels_loss(model), device)


def random_checkpoint(spec, device) -> Path:
    """The random model saved once as a local folder (unsloth loads by path), with a stand-in tokenizer."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    folder = Path(spec["workdir"]) / ("tiny-llama-random" if spec["tiny"] else "llama-3.1-8b-random")
    if (folder / "config.json").is_file():
        return folder
    model = random_llama(spec, device, four_bit=False)
    model.save_pretrained(folder)
    vocab = {f"<{i}>": i for i in range(model.config.vocab_size)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<0>"))
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<0>", eos_token="<1>",
                            pad_token="<2>").save_pretrained(folder)
    del model
    release(device)
    return folder


SETUPS = {"hf": setup_hf, "liger": setup_liger, "unsloth": setup_unsloth, "slothbook": setup_slothbook}


if __name__ == "__main__":
    main()
