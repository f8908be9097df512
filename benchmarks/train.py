"""Training benchmark: LoRA and QLoRA steps of 8B-class models, every contender side by side, in one command.

Models: Llama-3.1-8B, Qwen-2.5-7B and Gemma-2-9B shapes (their published configs) with random bf16 weights,
built once per run on the GPU and saved with a small tokenizer to a local folder (/dev/shm when it has room),
so nothing is downloaded and every contender loads the same weights. Random token ids (never zeros), sequence
length 2048, LoRA r=16 alpha=16 on q,k,v,o,gate,up,down, AdamW (fused) on the LoRA weights, bf16 autocast.

  hf                 transformers + PEFT, SDPA (Gemma-2: eager), non-reentrant gradient checkpointing, plain loss
  liger              hf + Liger-Kernel (apply_liger_kernel_to_<family>: RoPE, RMSNorm, SwiGLU/GeGLU, fused linear CE)
  unsloth            Unsloth's FastLanguageModel, use_gradient_checkpointing="unsloth" (when its wheels are carried)
  slothbook          slothbook's FastLanguageModel, kernels on, its defaults (use_gradient_checkpointing="auto":
                     the layers that fit in free GPU memory keep their activations, the rest are offloaded)
  slothbook-offload  the same with use_gradient_checkpointing="slothbook" (every layer offloaded: least memory)
  slothbook-plain    the same with use_gradient_checkpointing=True
  slothbook-eager    generation only: for_inference(model, cuda_graphs=False) (transformers' generate, our kernels)

Configs: "qlora" (NF4 base) and "lora16" (bf16 base), at batch 1 and 4 for Llama, batch 4 for the others;
"gen": greedy generation of 128 tokens after a 128-token prompt, batch 1 and 8, on the 16-bit Llama with LoRA,
after for_inference (slothbook, unsloth) against plain transformers generate (hf).

Each contender runs in its own subprocess per model and config. Per training config it records
tokens_per_s (median over the timed steps after warm-up, torch.cuda.synchronize + perf_counter around each),
peak_alloc_gib / peak_reserved_gib (over warm-up and timed steps, optimizer state included), mfu (useful
FLOPs per token, see flops_per_token, times tokens/s over the bf16 matmul rate measured at the start of the
same run) and first_loss (the loss of the first step: every contender sees the same weights and token ids,
so these agree to bf16 rounding; a contender that disagrees computes something else). A failure is an
"error" row with the exact message.

  python benchmarks/train.py --models llama --configs qlora lora16 --out a.json   # one device call (estimated
  python benchmarks/train.py --models gemma --configs qlora lora16 --out b.json   # 7 minutes each, unmeasured)
  python benchmarks/train.py --merge a.json b.json --out benchmarks/results/train.json --markdown --chart c.svg
  python benchmarks/train.py --tiny                                # CPU smoke test (Triton interpreter)
  python benchmarks/train.py --tiny --models gemma                 # the same for the Gemma-2 shape at toy sizes

docs/benchmarks.md gives the split of the full set into device calls, and the method and FLOP count in full.

Results: benchmarks/results/train.json, format in benchmarks/common.py; a summary table with ratios to hf
is printed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:
    sys.path.insert(0, str(_HERE))
import common  # noqa: E402
import contenders  # noqa: E402
import profile_table  # noqa: E402
from contenders.base import RANK, Job  # noqa: E402

# The scripts here have generic names (generation, distributed): take the folder off sys.path again, so that none
# of them shadows an installed module. `contenders.<name>` still imports through the package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

BENCHMARK = "train"
RESULTS = common.RESULTS_DIR / "train.json"
CONFIGS = ("qlora", "lora16", "gen")
TINY_CONTENDERS = ("hf", "slothbook")
SEQ, WARMUP, STEPS = 2048, 3, 10
GEN_PROMPT, GEN_NEW, GEN_BATCHES, GEN_RUNS = 128, 128, (1, 8), 2
MATMUL_N = 8192
# Workers: nothing from the hub (there is no network on the device), no progress bars in the captured log.
WORKER_ENV = dict(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                  HF_HUB_DISABLE_PROGRESS_BARS="1")


@dataclass(frozen=True)
class Shape:
    """A model shape: transformers config values, the batches it trains at, whether it generates."""

    name: str
    model_type: str
    config: dict
    batches: tuple
    attention: str = "sdpa"
    generation: bool = False

    def get(self, key: str):
        if key == "head_dim":
            return self.config.get("head_dim") or self.config["hidden_size"] // self.config["num_attention_heads"]
        return self.config[key]


MODELS = {
    "llama": Shape("llama-3.1-8b", "llama", dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072, rms_norm_eps=1e-5,
        rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                           "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001), batches=(1, 4), generation=True),
    "qwen": Shape("qwen-2.5-7b", "qwen2", dict(
        hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, vocab_size=152064, max_position_embeddings=131072, rms_norm_eps=1e-6,
        rope_theta=1000000.0, tie_word_embeddings=False, bos_token_id=151643, eos_token_id=151643),
        batches=(4,)),
    # Attention-logit soft-capping has no SDPA path in transformers: Gemma-2 trains with eager attention.
    "gemma": Shape("gemma-2-9b", "gemma2", dict(
        hidden_size=3584, intermediate_size=14336, num_hidden_layers=42, num_attention_heads=16,
        num_key_value_heads=8, head_dim=256, vocab_size=256000, max_position_embeddings=8192, rms_norm_eps=1e-6,
        rope_theta=10000.0, query_pre_attn_scalar=256, sliding_window=4096, final_logit_softcapping=30.0,
        attn_logit_softcapping=50.0, hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True,
        bos_token_id=2, eos_token_id=1, pad_token_id=0), batches=(4,), attention="eager"),
}


def tiny_of(shape: Shape) -> Shape:
    """The shape's family and features (soft-caps, sliding window, tied head, its attention) at toy sizes: the CPU
    smoke test of that shape's code path in every contender."""
    small = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1024, bos_token_id=1, eos_token_id=2)
    if "head_dim" in shape.config:
        small["head_dim"] = 16
    if "query_pre_attn_scalar" in shape.config:
        small["query_pre_attn_scalar"] = 16
    if "sliding_window" in shape.config:
        small["sliding_window"] = 16  # shorter than the smoke test's sequence, so the window is exercised
    return replace(shape, name="tiny-" + shape.name.split("-")[0], config=dict(shape.config, **small),
                   batches=(1, 2))


TINY = tiny_of(MODELS["llama"])
# --tiny --profile: one profiled step of the first batch only (a profiled step under the interpreter takes seconds).
TINY_SIZES = dict(seq=32, warmup=1, steps=2, gen_prompt=8, gen_new=4, gen_batches=(1, 2), profile_steps=1)
PROFILE_STEPS = 2


# ================================================================== FLOPs

def matmul_weights(shape: Shape, rank: int = RANK) -> tuple[int, int]:
    """(N_base, N_lora): weights of the decoder linears plus lm_head, and of the LoRA matrices on them."""
    hidden, inter, layers, vocab = (shape.get(k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                           "vocab_size"))
    q_dim = shape.get("num_attention_heads") * shape.get("head_dim")
    kv_dim = shape.get("num_key_value_heads") * shape.get("head_dim")
    shapes = [(hidden, q_dim), (hidden, kv_dim), (hidden, kv_dim), (q_dim, hidden),
              (hidden, inter), (hidden, inter), (inter, hidden)]  # q, k, v, o, gate, up, down: (in, out)
    n_base = layers * sum(i * o for i, o in shapes) + hidden * vocab
    n_lora = layers * sum(rank * (i + o) for i, o in shapes)
    return n_base, n_lora


def flops_per_token(shape: Shape, seq: int, rank: int = RANK) -> float:
    """Useful FLOPs per token of one LoRA training step on a frozen base, at sequence length ``seq``.

    forward   2 * N_base (decoder linears + lm_head) + 2 * N_lora + attention
    backward  2 * N_base (input gradients only: the base is frozen) + 4 * N_lora (input and weight
              gradients) + 2 * attention (dP and dV, then dQ and dK)
    attention 2 * q_dim * seq per layer: QK^T and PV, 2 FLOPs per multiply-add, over the causal half.
    Checkpointing's recomputation is not useful work and is not counted; norms, RoPE, activations and the
    softmax are not matmuls and are left out. 6 * N (full fine-tuning, weight gradients) would be wrong here.
    """
    n_base, n_lora = matmul_weights(shape, rank)
    attention = shape.get("num_hidden_layers") * 2 * shape.get("num_attention_heads") * shape.get("head_dim") * seq
    forward = 2 * n_base + 2 * n_lora + attention
    backward = 2 * n_base + 4 * n_lora + 2 * attention
    return float(forward + backward)


def checkpoint_bytes(shape: Shape, bytes_per_weight: int = 2) -> int:
    """Size of the saved random checkpoint: the linears, the embedding and an untied head (norms are noise)."""
    n_base, _ = matmul_weights(shape, 0)
    embedding = 0 if shape.config.get("tie_word_embeddings") else shape.get("hidden_size") * shape.get("vocab_size")
    return bytes_per_weight * (n_base + embedding)


# ================================================================== parent

def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        return worker(json.loads(args.worker))
    if args.merge:
        doc = merge_documents([json.loads(Path(p).read_text()) for p in args.merge])
        out = Path(args.out or RESULTS)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=1) + "\n")
        report(doc["rows"], args, doc.get("profiles", []))
        print(f"merged {len(args.merge)} files ({len(doc['rows'])} rows) into {out}")
        return None
    return run(args)


def report(rows: list, args, profiles: list = ()) -> None:
    print(summary(rows))
    if profiles:  # where the step time goes: the category split; --markdown adds each one's top kernels
        print("\n" + (profile_table.markdown(profiles) if args.markdown else profile_table.overview(profiles)))
    if args.markdown:
        print("\n" + markdown(rows))
    if args.chart:
        Path(args.chart).parent.mkdir(parents=True, exist_ok=True)
        Path(args.chart).write_text(bar_chart_svg(rows))
        print(f"wrote the bar chart to {args.chart}")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=None, choices=list(MODELS),
                   help="default: all (--tiny: llama; --tiny --models gemma runs the Gemma-2 shape at toy sizes)")
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    p.add_argument("--contenders", nargs="+", default=None, choices=list(contenders.CONTENDERS),
                   help="default: all (--tiny: hf and slothbook)")
    p.add_argument("--batches", nargs="+", type=int, default=None,
                   help="training batch sizes for every model (default: 1 and 4 for Llama, 4 for the others)")
    p.add_argument("--seq", type=int, default=SEQ)
    p.add_argument("--warmup", type=int, default=WARMUP, help="untimed steps first")
    p.add_argument("--steps", type=int, default=STEPS, help="timed steps (the median is reported)")
    p.add_argument("--budget-s", type=float, default=540.0,
                   help="wall-clock budget; work not started by then is recorded as not run (default fits one "
                        "10-minute device command)")
    p.add_argument("--worker-timeout-s", type=float, default=300.0, help="one contender on one model and config")
    p.add_argument("--workdir", default=None, help="where the random checkpoints go (default: /dev/shm when it has "
                                                   "room, else the temporary folder)")
    p.add_argument("--keep-folders", action="store_true", help="keep the random checkpoints for a later run")
    p.add_argument("--out", default=None, help=f"results file (default {RESULTS}; --tiny: a temporary file)")
    p.add_argument("--append", action="store_true", help="merge into an existing results file of this machine")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="run nothing: merge these results files (e.g. from separate device calls) into --out")
    p.add_argument("--markdown", action="store_true", help="also print the table as Markdown (for the docs)")
    p.add_argument("--chart", default=None, metavar="SVG", help="also write the tokens/s bar chart to this file")
    p.add_argument("--profile", action="store_true",
                   help="after the timed steps, profile more steps with torch.profiler: the top kernels and the "
                        "split of the step's device time by category (stored under \"profiles\")")
    p.add_argument("--profile-top", type=int, default=profile_table.TOP, help="kernels listed per profile")
    p.add_argument("--profile-steps", type=int, default=None,
                   help=f"steps profiled (default {PROFILE_STEPS}; --tiny: {TINY_SIZES['profile_steps']})")
    p.add_argument("--host-profile", default=None, metavar="DIR",
                   help="after each batch is timed, run its step under cProfile and write where the "
                        "host's (Python's) time goes to DIR/<contender> <config>.txt (for host-bound configs)")
    p.add_argument("--tiny", action="store_true",
                   help="CPU smoke test: tiny Llama, 2 timed steps, hf and slothbook, Triton interpreter")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.tiny:
        args.seq, args.warmup, args.steps = TINY_SIZES["seq"], TINY_SIZES["warmup"], TINY_SIZES["steps"]
    if args.contenders is None:
        args.contenders = list(TINY_CONTENDERS if args.tiny else contenders.CONTENDERS)
    if args.profile_steps is None:
        args.profile_steps = TINY_SIZES["profile_steps"] if args.tiny else PROFILE_STEPS
    if args.steps < 1 or args.warmup < 1:
        p.error("--steps and --warmup must be at least 1 (the first warm-up step gives first_loss)")
    return args


def shapes_of(args) -> list[Shape]:
    names = args.models or (["llama"] if args.tiny else list(MODELS))  # --tiny: Llama unless told otherwise
    return [tiny_of(MODELS[m]) if args.tiny else MODELS[m] for m in names]


def workdir_for(args, shape: Shape) -> Path:
    """/dev/shm when it can hold the checkpoint (fast to write and read), else the temporary folder."""
    if args.workdir:
        return Path(args.workdir)
    need = checkpoint_bytes(shape, 4 if args.tiny else 2) * 1.1 + 2 * common.GIB
    shm = Path("/dev/shm")
    if not args.tiny and shm.is_dir() and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > need:
        return shm / "slothbook-train-bench"
    return Path(tempfile.gettempdir()) / "slothbook-train-bench"


def run(args) -> None:
    out = Path(args.out) if args.out else (
        Path(tempfile.gettempdir()) / "slothbook_train_smoke.json" if args.tiny else RESULTS)
    env = dict(WORKER_ENV, **os.environ)
    if args.tiny:
        env["TRITON_INTERPRET"] = "1"
    partial = out.with_name(out.stem + ".partial.json")
    deadline = time.monotonic() + args.budget_s
    rows, notes, profiles, state = [], [], [], {"device": None, "calibration": None}

    def launch(spec: dict, label: str) -> dict:
        left = deadline - time.monotonic()
        if left < 20:
            rows.append(common.error_row(BENCHMARK, spec.get("contender", "setup"), label,
                                         "not run: time budget spent"))
            return {}
        print(f"--- {label}", file=sys.stderr, flush=True)
        spec = dict(spec, tiny=args.tiny, calibration=state["calibration"])
        result, failure = common.run_worker([sys.executable, str(Path(__file__).resolve()), "--worker",
                                             json.dumps(spec)], timeout=min(left, args.worker_timeout_s), env=env)
        rows.extend(result.get("rows", []))
        profiles.extend(result.get("profiles", []))
        if failure:
            where = result.get("current") or {"contender": spec.get("contender", "setup"), "config": label}
            rows.append(common.error_row(BENCHMARK, where["contender"], where["config"], failure))
        state["device"] = state["device"] or result.get("device")
        state["calibration"] = state["calibration"] or result.get("calibration")
        common.write_results(partial, rows, device=state["device"], notes=notes,  # survives a killed parent
                             profiles=profiles)
        return result

    for shape in shapes_of(args):
        folder = workdir_for(args, shape) / f"{shape.name}-random"
        pieces = plan(args, shape, folder)
        if not pieces:
            continue
        rows.append(common.row(BENCHMARK, "model", f"{shape.name} seq {args.seq}", "gflop_per_token",
                               round(flops_per_token(shape, args.seq) / 1e9, 6), "GFLOP"))
        notes.append(f"{shape.name}: random checkpoint in {folder}")
        launch(dict(model=shape.name, folder=str(folder), kind="prepare"), f"prepare {shape.name}")
        if (folder / "config.json").is_file():  # else its error row is recorded: nothing can load it
            for spec, label in pieces:
                launch(spec, label)
        if not args.keep_folders:
            shutil.rmtree(folder, ignore_errors=True)
    common.write_results(out, rows, device=state["device"], notes=notes, append=args.append, profiles=profiles)
    partial.unlink(missing_ok=True)
    report(rows, args, profiles)
    print(f"wrote {len(rows)} rows to {out}")


def plan(args, shape: Shape, folder: Path) -> list[tuple[dict, str]]:
    """The worker specs for one model, in order: every training config for every contender, then generation."""
    base = dict(model=shape.name, folder=str(folder), seq=args.seq)
    batches = list(args.batches or shape.batches)
    pieces = [(dict(base, kind="train", contender=name, config=config, batches=batches, warmup=args.warmup,
                    steps=args.steps, flops_per_token=flops_per_token(shape, args.seq),
                    profile=profile_spec(args, batches), host_profile=args.host_profile),
               f"{name} {config} {shape.name}")
              for config in args.configs if config != "gen" for name in args.contenders
              if name not in contenders.GENERATION_ONLY]
    if "gen" in args.configs and shape.generation:
        pieces += [(dict(base, kind="generate", contender=name, config="gen"), f"{name} gen {shape.name}")
                   for name in args.contenders if name in contenders.GENERATORS]
    return pieces


def profile_spec(args, batches: list) -> dict | None:
    """What the worker profiles after timing (None: nothing); --tiny profiles its first batch only."""
    if not args.profile:
        return None
    return dict(steps=args.profile_steps, top=args.profile_top, batches=batches[:1] if args.tiny else batches)


# ================================================================== worker

def worker(spec: dict) -> None:
    result = {"rows": [], "profiles": [], "device": None, "calibration": spec.get("calibration"), "current": None}
    rec = common.Recorder(BENCHMARK, result["rows"])
    if spec.get("contender") == "unsloth":
        try:
            import unsloth  # noqa: F401  (Unsloth patches transformers and PEFT: it must come first)
        except Exception as exc:  # the exact import error is the result
            rec.error("unsloth", f"{spec['config']} {spec['model']} import", exc)
            return common.emit(result)
    import torch

    device = torch.device("cpu" if spec["tiny"] else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        rec.error(spec.get("contender", "setup"), spec["model"], "no CUDA GPU here; --tiny runs the CPU smoke test")
        return common.emit(result)
    result["device"] = common.device_details(device)
    {"prepare": prepare, "train": train, "generate": generate}[spec["kind"]](spec, device, rec, result)
    result["current"] = None
    common.emit(result)


def current(result: dict, contender: str, config: str) -> None:
    """Tell the parent what runs now, so that a crash or a timeout is attributed to it."""
    result["current"] = {"contender": contender, "config": config}
    common.emit(result)


def shape_named(name: str) -> Shape:
    return next(s for s in [*MODELS.values(), *map(tiny_of, MODELS.values())] if s.name == name)


def job_for(spec: dict, device) -> Job:
    shape = shape_named(spec["model"])
    return Job(folder=spec["folder"], four_bit=spec["config"] == "qlora", attention=shape.attention,
               max_seq_length=max(spec["seq"], GEN_PROMPT + GEN_NEW), device=device.type,
               kernels=True if spec["tiny"] else None, options=contenders.options_of(spec["contender"]))


def prepare(spec: dict, device, rec, result) -> None:
    """Measure the bf16 matmul rate (once per run) and save the random checkpoint (once per model)."""
    if result["calibration"] is None:
        n = 256 if spec["tiny"] else MATMUL_N
        config = f"matmul {n}x{n}x{n} bf16"
        current(result, "device", config)
        with rec.guard("device", config, device):
            result["calibration"] = common.matmul_rate(device, n)
            # Three significant digits: a loaded CPU runs the tiny calibration at ~0.01 TFLOP/s, which one decimal rounds to 0.
            rec.add("device", config, "tflops", float(f"{result['calibration'] / 1e12:.3g}"), "TFLOP/s")
        common.free_memory(device)
    folder = Path(spec["folder"])
    if (folder / "config.json").is_file():
        return
    current(result, "setup", f"prepare {spec['model']}")
    with rec.guard("setup", f"prepare {spec['model']}", device):
        save_random_checkpoint(shape_named(spec["model"]), folder, device)


def save_random_checkpoint(shape: Shape, folder: Path, device) -> None:
    """The shape with random weights (transformers' own init, run on the GPU), saved as safetensors with a
    small BPE tokenizer; written beside the target and renamed, so a killed run leaves no half folder."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from slothbook.data import demo_dataset_path
    from slothbook.models.families.tiny import train_small_tokenizer

    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    torch.manual_seed(0)
    config = AutoConfig.for_model(shape.model_type, **shape.config)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(partial)
    del model
    common.free_memory(device)
    texts = [json.loads(line)["text"] for line in demo_dataset_path().read_text().splitlines() if line.strip()]
    # The ids the benchmark feeds are random; the tokenizer is there because the loaders require one.
    train_small_tokenizer(texts, vocab_size=min(1024, shape.get("vocab_size"))).save_pretrained(partial)
    partial.rename(folder)


def random_ids(vocab: int, batch: int, seq: int, count: int, device, seed: int):
    """``count`` batches of token ids in [1, vocab), the same for every contender (seeded on the CPU)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab, (batch, seq), generator=g).to(device) for _ in range(count)]


def train(spec: dict, device, rec, result) -> None:
    import torch

    name, seq, model = spec["contender"], spec["seq"], spec["model"]
    label = lambda batch: f"{spec['config']} {seq}x{batch} {model}"  # noqa: E731
    current(result, name, f"{spec['config']} {model} setup")
    step = None
    with rec.guard(name, f"{spec['config']} {model} setup", device):
        step = contenders.module_of(name).build(job_for(spec, device))
        if hasattr(step, "kernels_on"):
            rec.add(name, f"{spec['config']} {model}", "kernels_on", float(step.kernels_on), "bool")
    if step is None:
        return
    vocab = shape_named(model).get("vocab_size")
    to_profile = []
    for batch in spec["batches"]:
        config = label(batch)
        current(result, name, config)
        with rec.guard(name, config, device):
            ids = random_ids(vocab, batch, seq, spec["warmup"] + spec["steps"], device, seed=batch)
            common.free_memory(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            first_loss = step(ids[0]).item()
            for x in ids[1:spec["warmup"]]:
                step(x)
            times = []
            for x in ids[spec["warmup"]:]:
                common.sync(device)
                start = time.perf_counter()
                step(x)
                common.sync(device)
                times.append(time.perf_counter() - start)
            tokens_per_s = batch * seq / statistics.median(times)
            rec.add(name, config, "tokens_per_s", round(tokens_per_s, 1), "tokens/s")
            if device.type == "cuda":
                rec.add(name, config, "peak_alloc_gib", round(torch.cuda.max_memory_allocated(device) / common.GIB, 2),
                        "GiB")
                rec.add(name, config, "peak_reserved_gib",
                        round(torch.cuda.max_memory_reserved(device) / common.GIB, 2), "GiB")
            if result["calibration"]:
                rec.add(name, config, "mfu", round(tokens_per_s * spec["flops_per_token"] / result["calibration"], 4),
                        "fraction")
            rec.add(name, config, "first_loss", round(first_loss, 4), "nats")
            if spec.get("host_profile"):
                host_profile(step, ids[-1], spec, config, device)
            if spec.get("profile") and batch in spec["profile"]["batches"]:
                to_profile.append((config, ids[-1], statistics.median(times) * 1000))
            del ids
        result["current"] = None
        common.emit(result)
    # After every batch is timed: no timed step runs after the profiler (CUPTI) was switched on in this process.
    for config, ids, timed_ms in to_profile:
        profile(step, ids, timed_ms, spec, config, device, rec, result)
        result["current"] = None
        common.emit(result)


def profile(step, ids, timed_ms: float, spec: dict, config: str, device, rec, result) -> None:
    """torch.profiler over more steps on the last timed batch of ``config``, once every batch is timed and its
    memory peaks read; ``timed_ms``, the unprofiled median step, goes with it to show the profiler's own cost.
    A failure is an error row of its own, the timed rows stay."""
    name = spec["contender"]
    current(result, name, f"{config} profile")
    # Liger and Unsloth kernels may share a name with ours: only slothbook's own runs count as ours.
    ours = profile_table.slothbook_kernel_names() if name.startswith("slothbook") else frozenset()
    with rec.guard(name, f"{config} profile", device):
        found = profile_table.profile_steps(lambda: step(ids), device, steps=spec["profile"]["steps"],
                                            top=spec["profile"]["top"], ours=ours)
        result["profiles"].append(dict(contender=name, config=config, timed_ms=round(timed_ms, 3), **found))


def host_profile(step, ids, spec: dict, config: str, device, steps: int = 3) -> None:
    """cProfile over a few steps (after the timed ones): the Python functions the host spends the step in."""
    import cProfile
    import io
    import pstats

    profiler = cProfile.Profile()
    common.sync(device)
    profiler.enable()
    for _ in range(steps):
        step(ids)
    common.sync(device)
    profiler.disable()
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    print(f"{spec['contender']} {config}: {steps} steps under cProfile", file=text)
    stats.sort_stats("tottime").print_stats(45)
    stats.sort_stats("cumulative").print_stats(45)
    print("Only the Python of slothbook, its kernels' launchers and the libraries it wraps:", file=text)
    stats.sort_stats("tottime").print_stats(r"slothbook|/kernels/|peft|bitsandbytes|accelerate|checkpoint", 45)
    out = Path(spec["host_profile"])
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{spec['contender']} {config}.txt").write_text(text.getvalue())


def generate(spec: dict, device, rec, result) -> None:
    name, model = spec["contender"], spec["model"]
    prompt, new, batches = ((TINY_SIZES["gen_prompt"], TINY_SIZES["gen_new"], TINY_SIZES["gen_batches"])
                            if spec["tiny"] else (GEN_PROMPT, GEN_NEW, GEN_BATCHES))
    current(result, name, f"gen {model} setup")
    run = None
    with rec.guard(name, f"gen {model} setup", device):
        run = contenders.module_of(name).build_generator(job_for(dict(spec, config="lora16"), device))
        if hasattr(run, "kernels_on"):
            rec.add(name, f"gen {model}", "kernels_on", float(run.kernels_on), "bool")
    if run is None:
        return
    vocab = shape_named(model).get("vocab_size")
    for batch in batches:
        config = f"gen {prompt}+{new}x{batch} {model}"
        current(result, name, config)
        with rec.guard(name, config, device):
            ids = random_ids(vocab, batch, prompt, 1, device, seed=batch)[0]
            run(ids, min(4, new))  # warm-up: kernel compilation, cache allocation
            times, made = [], 0
            for _ in range(1 if spec["tiny"] else GEN_RUNS):
                common.sync(device)
                start = time.perf_counter()
                out = run(ids, new)
                common.sync(device)
                times.append(time.perf_counter() - start)
                made = out.shape[1] - prompt
            if made != new:
                raise RuntimeError(f"generated {made} tokens instead of {new}")
            rec.add(name, config, "tokens_per_s", round(batch * made / statistics.median(times), 1), "tokens/s")
        result["current"] = None
        common.emit(result)


# ================================================================== reading results

METRICS = (("tokens_per_s", "tok/s", "{:.0f}"), ("peak_alloc_gib", "alloc GiB", "{:.2f}"),
           ("peak_reserved_gib", "rsrvd GiB", "{:.2f}"), ("mfu", "MFU", "{:.1%}"), ("first_loss", "loss", "{:.3f}"))
RATIOS = (("tokens_per_s", "x hf tok/s"), ("peak_alloc_gib", "x hf alloc"))


def table(rows: list) -> tuple[list[str], list[list[str]]]:
    """Header and one line of cells per (config, contender) that has tokens/s: its numbers, then its tokens/s
    and peak allocated memory as ratios of hf's on the same config."""
    values = {(r["contender"], r["config"], r["metric"]): r["value"] for r in rows if r["metric"] != common.ERROR}
    configs = list(dict.fromkeys(r["config"] for r in rows if r["metric"] == "tokens_per_s"))
    header = ["config", "contender"] + [title for _, title, _ in METRICS] + [title for _, title in RATIOS]
    lines = []
    for config in configs:
        for name in _ordered({c for c, cfg, m in values if cfg == config and m == "tokens_per_s"}):
            cells = [fmt.format(values[(name, config, m)]) if (name, config, m) in values else "-"
                     for m, _, fmt in METRICS]
            ratios = [_ratio(values.get((name, config, m)), values.get(("hf", config, m))) for m, _ in RATIOS]
            lines.append([config, name] + cells + ratios)
    return header, lines


def _ordered(names) -> list[str]:
    order = list(contenders.CONTENDERS)
    return sorted(names, key=lambda n: (order.index(n) if n in order else len(order), n))


def _ratio(value, reference) -> str:
    return "-" if value is None or not reference else f"{value / reference:.2f}"


def summary(rows: list) -> str:
    """The table as fixed-width text, the run's matmul rate and FLOP counts, warnings and every error."""
    header, lines = table(rows)
    widths = [30, 16] + [11] * (len(header) - 2)
    render = lambda cells: "".join(c.ljust(w) if i < 2 else c.rjust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    text = [""] + [f"{r['contender']} {r['config']}: {r['value']} {r['unit']}" for r in rows
                   if r["contender"] in ("device", "model") and r["metric"] != common.ERROR]
    text += [render(header), "-" * sum(widths)] + [render(cells) for cells in lines]
    text += [f"WARNING: {r['contender']} ran without its kernels in {r['config']}" for r in rows
             if r["metric"] == "kernels_on" and not r["value"]]
    errors = [r for r in rows if r["metric"] == common.ERROR]
    text.append(f"errors: {len(errors)}")
    text += [f"  {r['contender']} | {r['config']} | {str(r['value'])[:200]}" for r in errors]
    return "\n".join(text)


def markdown(rows: list) -> str:
    """The table for docs/benchmarks.md, then the errors (contender, config, message)."""
    header, lines = table(rows)
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(cells) + " |" for cells in lines]
    errors = [r for r in rows if r["metric"] == common.ERROR]
    if errors:
        out += ["", "| contender | config | error |", "|---|---|---|"]
        out += [f"| {r['contender']} | {r['config']} | {str(r['value'])[:160].replace('|', '/')} |" for r in errors]
    return "\n".join(out)


def bar_chart_svg(rows: list) -> str:
    """Tokens/s per contender, one group of horizontal bars per config, as a standalone SVG (no plotting
    library needed: the results are turned into the docs' figure on any machine)."""
    header, lines = table(rows)
    names = _ordered({cells[1] for cells in lines})
    colors = dict(zip(names, ("#8c8c8c", "#4c78a8", "#f58518", "#54a24b", "#b279a2", "#e45756")))
    tps = header.index("tok/s")
    bar, gap, left, width = 16, 14, 330, 420
    y, body = 40, []
    for config in dict.fromkeys(cells[0] for cells in lines):
        group = [c for c in lines if c[0] == config]
        top = max(float(c[tps]) for c in group) or 1.0  # each config on its own scale: generation is slower
        body.append(f'<text x="8" y="{y + 12}" font-weight="bold">{config}</text>')
        y += 18
        for cells in group:
            value = float(cells[tps])
            length = max(1.0, width * value / top)
            body.append(f'<text x="{left - 8}" y="{y + 12}" text-anchor="end">{cells[1]}</text>'
                        f'<rect x="{left}" y="{y}" width="{length:.1f}" height="{bar}" fill="{colors[cells[1]]}"/>'
                        f'<text x="{left + length + 6:.1f}" y="{y + 12}">{value:,.0f} ({cells[-2]}x hf)</text>')
            y += bar + 4
        y += gap
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + width + 160}" height="{y + 10}" '
            f'font-family="sans-serif" font-size="12">'
            f'<text x="8" y="20" font-size="14">Tokens/s by contender (higher is better; each config on its own '
            f'scale)</text>'
            + "".join(body) + "</svg>\n")


def merge_documents(docs: list[dict]) -> dict:
    """Join results files from separate runs (e.g. two device calls): later rows replace earlier ones with the
    same (benchmark, contender, config, metric); each part's command, date and versions are kept."""
    key = lambda r: (r["benchmark"], r["contender"], r["config"], r["metric"])  # noqa: E731
    rows: dict = {}
    versions: dict = {}
    notes, profiles = [], []
    for doc in docs:
        rows.update({key(r): r for r in doc.get("rows", [])})
        profiles = common.merge_profiles(profiles, doc.get("profiles", []))
        notes += doc.get("notes", [])
        for package, version in doc.get("versions", {}).items():
            if versions.setdefault(package, version) != version:
                notes.append(f"{package} {version} in the part run by: {doc.get('command')}")
    first = next((d for d in docs if d.get("device")), docs[0])
    merged = {"device": first.get("device"), "device_details": first.get("device_details", {}),
              "versions": versions, "date": max(d.get("date", "") for d in docs),
              "command": " ; ".join(d.get("command", "") for d in docs), "rows": list(rows.values()), "notes": notes,
              "parts": [{k: part.get(k) for k in ("command", "date", "device", "versions")}
                        for d in docs for part in d.get("parts") or [d]]}  # a merged file brings its parts
    if profiles:
        merged["profiles"] = profiles
    return merged


if __name__ == "__main__":
    main()
