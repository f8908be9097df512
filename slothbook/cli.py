"""`slothbook finetune | estimate | export | gpu`: the same wiring as the notebook, headless."""

from __future__ import annotations

import argparse
import sys

from .errors import SlothbookError
from .train.job import FinetuneConfig


def _finetune_parser(sub) -> None:
    d = FinetuneConfig()
    p = sub.add_parser("finetune", help="LoRA/QLoRA fine-tune (defaults: the embedded model, 4-bit, the demo dataset)")
    p.add_argument("--model", default=d.model, help="HF folder, hub id, .gguf file, or 'smollm2-135m' (default)")
    p.add_argument("--dataset", default=None, help="JSONL/JSON/CSV/Parquet file or hub dataset id (default: bundled demo)")
    p.add_argument("--text-field", default=d.text_field, help="column holding the training text (default: text)")
    p.add_argument("--chat-template", default=None, help="render conversations with this template (chatml, llama-3, ...)")
    p.add_argument("--responses-only", action="store_true", help="learn only the assistant turns")
    p.add_argument("--max-seq-length", type=int, default=d.max_seq_length)
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--grad-accum", type=int, default=d.grad_accum)
    p.add_argument("--r", type=int, default=d.r, help="LoRA rank")
    p.add_argument("--lora-alpha", type=int, default=d.lora_alpha)
    p.add_argument("--lr", type=float, default=d.lr, help="learning rate")
    p.add_argument("--load-in-4bit", action=argparse.BooleanOptionalAction, default=d.load_in_4bit)
    p.add_argument("--gradient-checkpointing", default=str(d.gradient_checkpointing).lower(),
                   help="auto (default: keep the layers that fit in GPU memory, offload the rest), true (plain), "
                        "false, or slothbook (offload every layer's activations to CPU memory)")
    p.add_argument("--dtype", default=None, help="bf16, fp16 or fp32 (default: the best the device supports)")
    p.add_argument("--output", default=None, help="output folder (default: outputs/run-<time>)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing adapter in --output")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--logging-steps", type=int, default=d.logging_steps)
    p.add_argument("--save-steps", type=int, default=d.save_steps, help="checkpoint every N steps (0: none)")
    p.add_argument("--resume", nargs="?", const=True, default=False, metavar="CHECKPOINT",
                   help="continue from the latest checkpoint under --output/checkpoints, or from CHECKPOINT")
    p.add_argument("--max-bad-steps", type=int, default=d.max_bad_steps,
                   help="NaN/inf steps in a row (each skipped) before training stops (default: %(default)s)")


def _checkpointing(value: str):
    low = value.lower()
    return {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}.get(low, low)


def cmd_finetune(ns) -> int:
    from .profiler import MemoryProfiler

    values = {k: v for k, v in vars(ns).items() if k not in ("command", "func")}
    values["gradient_checkpointing"] = _checkpointing(values["gradient_checkpointing"])
    cfg = FinetuneConfig.from_dict(values)
    from .train.job import run_finetune

    profiler = MemoryProfiler(live=False)
    with profiler.oom_guard():  # an out-of-memory names the step, phase, largest category and what would fit
        result = run_finetune(cfg, callbacks=[profiler.callback()])
    from .profiler import gather_peaks, peaks_line
    from .train.distributed import is_main_process

    peaks = gather_peaks(profiler)  # a collective under torchrun: every rank takes part, rank 0 prints
    if not is_main_process():
        return 0
    print()
    print(profiler.summary())
    if len(peaks) > 1:
        print(peaks_line(peaks))
    first, last = (result.losses[0], result.losses[-1]) if result.losses else (float("nan"),) * 2
    print(f"\nloss {first:.4f} -> {last:.4f} in {result.seconds:.1f} s")
    print(f"adapter saved to {result.adapter_dir}")
    if result.stopped:
        print(f"slothbook: training stopped by {result.stopped} at step {result.trainer.state.global_step} of "
              f"{cfg.steps}; checkpoint saved to {result.checkpoint_dir}. Continue with the same options and "
              f"--resume --output {result.adapter_dir.parent}", file=sys.stderr)
        return STOP_EXIT_CODES.get(result.stopped, 1)
    return 0


# Stopped by a signal: the shell's 128 + signal number, so scripts see the run did not finish (it can be resumed).
STOP_EXIT_CODES = {"Ctrl-C": 130, "SIGTERM": 143}


def cmd_estimate(ns) -> int:
    from .profiler import estimate, max_fit

    options = dict(r=ns.r, load_in_4bit=ns.load_in_4bit, checkpointing=ns.checkpointing, optimizer=ns.optimizer,
                   dtype=ns.dtype)
    gpu_memory = int(ns.gpu_memory_gib * 2**30) if ns.gpu_memory_gib else None
    print(f"{ns.model}: seq {ns.seq} x batch {ns.batch}, r={ns.r}, {'4-bit' if ns.load_in_4bit else '16-bit'} base, "
          f"checkpointing {ns.checkpointing}, {ns.optimizer}")
    print(estimate(ns.model, ns.seq, ns.batch, gpu_memory=gpu_memory, **options))
    if gpu_memory:
        print(f"fits in {ns.gpu_memory_gib:g} GiB: {max_fit(ns.model, gpu_memory, ns.seq, ns.batch, **options)}")
    return 0


def _estimate_parser(sub) -> None:
    p = sub.add_parser("estimate", help="predict peak memory by category without loading weights")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--seq", type=int, default=2048, help="sequence length")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--load-in-4bit", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--checkpointing", choices=("offload", "plain", "off", "auto"), default="offload",
                   help="auto: the layers that fit in --gpu-memory-gib (default: this GPU's memory) keep "
                        "their activations, the rest are offloaded")
    p.add_argument("--optimizer", choices=("adamw", "adamw_8bit", "sgd"), default="adamw")
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--gpu-memory-gib", type=float, default=None, help="also say the longest sequence / batch that fit")


def cmd_gpu(ns) -> int:
    from .device import list_devices

    print(f"{'device':<28} {'capability':>10} {'bf16':>5} {'total GiB':>10} {'free GiB':>9}")
    for dev in list_devices():
        name = dev.name if dev.index is None else f"cuda:{dev.index} {dev.name}"
        print(f"{name:<28} {dev.capability:>10} {'yes' if dev.bf16 else 'no':>5} "
              f"{dev.total_bytes / 2**30:>10.1f} {dev.free_bytes / 2**30:>9.1f}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slothbook", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _finetune_parser(sub)
    _estimate_parser(sub)
    sub.add_parser("gpu", help="list devices with memory and bf16 support")
    return parser


COMMANDS = {"finetune": cmd_finetune, "estimate": cmd_estimate, "gpu": cmd_gpu}


def main(argv=None) -> int:
    ns = build_parser().parse_args(argv)
    try:
        return COMMANDS[ns.command](ns)
    except SlothbookError as exc:
        print(f"slothbook: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
