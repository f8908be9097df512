"""Distributed benchmark: DDP scaling from 1 to 2 GPUs (Llama-3.1-8B shape, QLoRA) and FSDP2 QLoRA of a
Llama-3.1-70B shape on 2 GPUs, both with random weights, through PyTorch's DDP and accelerate's FSDP2.

  python benchmarks/distributed.py                 # on a 2-GPU machine: DDP 1 and 2 GPUs, then FSDP2 (NCCL)
  python benchmarks/distributed.py --parts ddp     # one part only
  python benchmarks/distributed.py --tiny          # CPU smoke test: a two-layer Llama, 1 and 2 gloo processes

The models are built in memory on each rank, layer by layer: every decoder linear becomes a bitsandbytes NF4 layer
quantized from random bf16 weights on the GPU (4-bit codes stored in bf16 for FSDP, uint8 for DDP), everything else
random bf16. A 70B checkpoint on disk (141 GB) would not fit the machine's disk. Then slothbook's LoRA (r=16 on
q,k,v,o,gate,up,down), its kernels and offloaded checkpointing, AdamW on the LoRA weights, random token ids.

  ddp    torchrun --nproc-per-node N (N = 1, 2): DistributedDataParallel around the PEFT model, batch 1 x seq 2048 per
         rank; tokens_per_s counts every rank's tokens; scaling = tokens/s on 2 over tokens/s on 1 (issue: >= 1.8).
  fsdp2  accelerate launch --config_file <slothbook.train.distributed.write_fsdp2_config(...)>: every decoder layer an
         FSDP2 unit, LoRA layers units of their own (peft's wrap policy, as Trainer sets it), bf16 mixed precision;
         records peak_alloc_gib per rank and tokens_per_s.

Each part runs in its own launched processes; rank 0 prints the result line (benchmarks/common.py's worker protocol),
and a failure is an error row. Results: benchmarks/results/distributed.json (schema in benchmarks/common.py).
NCCL's NVLink multicast stays off (NCCL_NVLS_ENABLE=0): the lent machines do not allow it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:
    sys.path.insert(0, str(_HERE))
import common  # noqa: E402
from contenders.base import ALPHA, RANK, TARGETS, training_step  # noqa: E402

# Only common/contenders are wanted from this folder: its other scripts have generic names (train, generation)
# that must not shadow installed modules.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

BENCHMARK = "distributed"
RESULTS = common.RESULTS_DIR / "distributed.json"
LLAMA_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072, rms_norm_eps=1e-5,
                rope_theta=500000.0, tie_word_embeddings=False)
LLAMA_70B = dict(LLAMA_8B, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64)
TINY = dict(LLAMA_8B, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=1024)
SHAPES = {"llama-3.1-8b": LLAMA_8B, "llama-3.1-70b": LLAMA_70B, "tiny-llama": TINY}
SEQ, WARMUP, STEPS = 2048, 3, 10
TINY_SIZES = dict(seq=32, warmup=1, steps=2)
ENV = dict(NCCL_NVLS_ENABLE="0", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", HF_HUB_DISABLE_PROGRESS_BARS="1")


# ================================================================== parent


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", nargs="+", default=["ddp", "fsdp2"], choices=["ddp", "fsdp2"])
    p.add_argument("--seq", type=int, default=SEQ)
    p.add_argument("--warmup", type=int, default=WARMUP)
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--worker-timeout-s", type=float, default=540.0)
    p.add_argument("--out", default=None, help=f"results file (default {RESULTS}; --tiny: a temporary file)")
    p.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny Llama, gloo, DDP on 1 and 2 processes")
    p.add_argument("--rank-worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.tiny:
        args.seq, args.warmup, args.steps = TINY_SIZES["seq"], TINY_SIZES["warmup"], TINY_SIZES["steps"]
        args.parts = ["ddp"]  # accelerate's FSDP2 needs GPUs
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.rank_worker:
        return rank_worker(json.loads(args.rank_worker))
    out = Path(args.out) if args.out else (Path(tempfile.gettempdir()) / "slothbook_distributed_smoke.json"
                                           if args.tiny else RESULTS)
    env = dict(os.environ, **ENV)
    if args.tiny:
        env["CUDA_VISIBLE_DEVICES"] = ""
    rows, device = [], None
    base = dict(seq=args.seq, warmup=args.warmup, steps=args.steps, tiny=args.tiny)
    for spec, launcher in plan(args, base):
        label = f"{spec['part']} {spec['model']} x{spec['world']}"
        print(f"--- {label}", file=sys.stderr, flush=True)
        argv = [*launcher, str(Path(__file__).resolve()), "--rank-worker", json.dumps(spec)]
        result, failure = common.run_worker(argv, timeout=args.worker_timeout_s, env=env)
        rows.extend(result.get("rows", []))
        device = device or result.get("device")
        if failure:
            rows.append(common.error_row(BENCHMARK, "slothbook", label, failure))
    rows.extend(scaling_rows(rows))
    common.write_results(out, rows, device=device, notes=notes(args))
    for r in rows:
        print(f"{r['config']:<40} {r['metric']:<18} {r['value']} {r['unit']}")
    print(f"wrote {len(rows)} rows to {out}")


def plan(args, base: dict) -> list[tuple[dict, list[str]]]:
    """(spec, launcher) for each launch: torchrun for DDP on 1 and 2 processes, accelerate launch for FSDP2."""
    pieces = []
    model = "tiny-llama" if args.tiny else "llama-3.1-8b"
    for world in (1, 2):
        if "ddp" in args.parts:
            pieces.append((dict(base, part="ddp", model=model, world=world),
                           [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world),
                            "--master-port", str(29500 + world)]))
    if "fsdp2" in args.parts:
        from slothbook.train.distributed import write_fsdp2_config

        config = write_fsdp2_config(Path(tempfile.mkdtemp()) / "fsdp2.yaml", "LlamaDecoderLayer", num_processes=2)
        pieces.append((dict(base, part="fsdp2", model="llama-3.1-70b", world=2),
                       [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]))
    return pieces


def scaling_rows(rows: list) -> list:
    """tokens/s on 2 processes over tokens/s on 1, per model, where both were measured."""
    rate = {r["config"]: r["value"] for r in rows if r["metric"] == "tokens_per_s" and r["config"].startswith("ddp")}
    out = []
    for config, value in rate.items():
        if config.endswith(" x2") and config[:-3] + " x1" in rate:
            out.append(common.row(BENCHMARK, "slothbook", config[:-3] + " 1->2", "scaling",
                                  round(value / rate[config[:-3] + " x1"], 3), "x"))
    return out


def notes(args) -> list[str]:
    return [f"random weights, QLoRA r={RANK} alpha={ALPHA} on {','.join(TARGETS)}; seq {args.seq} x batch 1 per rank; "
            f"{args.warmup} warm-up + {args.steps} timed steps (median); tokens_per_s counts all ranks' tokens",
            "NCCL_NVLS_ENABLE=0"]


# ================================================================== ranks


def rank_worker(spec: dict) -> None:
    import torch
    import torch.distributed as dist

    from slothbook.device import training_device

    result = {"rows": [], "device": None}
    rec = common.Recorder(BENCHMARK, result["rows"])
    label = f"{spec['part']} {spec['model']} x{spec['world']}"
    on_gpu = not spec["tiny"]
    index = training_device()  # this rank's GPU, made current
    device = torch.device("cuda", index) if on_gpu else torch.device("cpu")
    if not dist.is_initialized() and spec["part"] == "ddp":
        dist.init_process_group("nccl" if on_gpu else "gloo")
    result["device"] = common.device_details(device)
    stats = {}
    with rec.guard("slothbook", label, device):
        stats = (train_ddp if spec["part"] == "ddp" else train_fsdp2)(spec, device)
    everyone = [None] * dist.get_world_size() if dist.is_initialized() else [stats]
    if dist.is_initialized():
        dist.all_gather_object(everyone, stats)
    if int(os.environ.get("RANK", "0")) == 0:
        if all(everyone):
            rec.add("slothbook", label, "tokens_per_s", round(sum(s["tokens_per_s"] for s in everyone), 1), "tokens/s")
            for rank, s in enumerate(everyone):
                rec.add("slothbook", f"{label} rank {rank}", "peak_alloc_gib", s["peak_gib"], "GiB")
            rec.add("slothbook", label, "first_loss", everyone[0]["first_loss"], "nats")
        common.emit(result)
    if dist.is_initialized():
        # Leave together: a rank that tears gloo down while another still talks to it can abort the other (seen in
        # CI: the x2 launch exited non-zero after its rows were out).
        dist.barrier()
        dist.destroy_process_group()


def random_qlora_model(shape: dict, device, storage_dtype):
    """A Llama of `shape` with random weights, its decoder linears NF4 (bitsandbytes), built one layer at a time so
    that no more than one layer's bf16 weights exist at once."""
    import bitsandbytes as bnb
    import torch
    from torch import nn
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = AutoConfig.for_model("llama", **shape)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    generator = torch.Generator(device=device).manual_seed(0)  # every rank builds the same weights
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and ".layers." in f"{name}.":
                quantized = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=False, compute_dtype=dtype,
                                              quant_type="nf4", compress_statistics=True, quant_storage=storage_dtype)
                weight = torch.randn(child.out_features, child.in_features, device=device, dtype=dtype,
                                     generator=generator) * 0.02
                quantized.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4",
                                                     compress_statistics=True, quant_storage=storage_dtype,
                                                     module=quantized)
                setattr(module, child_name, quantized.to(device))  # .to() quantizes
    for module in model.modules():  # what is left on meta: embeddings, head, norms
        for key, p in list(module._parameters.items()):
            if p is not None and p.is_meta:
                if "norm" in type(module).__name__.lower():
                    value = torch.ones(p.shape, device=device, dtype=dtype)
                else:
                    value = torch.randn(p.shape, device=device, dtype=dtype, generator=generator) * 0.02
                module._parameters[key] = nn.Parameter(value, requires_grad=False)
    with torch.device(device):  # its inv_freq buffer is still on meta
        model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    model.config.use_cache = False
    return model


def lora_model(spec: dict, device, storage_dtype):
    import torch

    from slothbook import FastLanguageModel
    from slothbook.models.families import family_of
    from slothbook.models.patch import patch_model

    model = random_qlora_model(SHAPES[spec["model"]], device, storage_dtype)
    model.max_seq_length = spec["seq"]
    if device.type == "cuda":
        patch_model(model, family_of(model.config))
    return FastLanguageModel.get_peft_model(model, r=RANK, lora_alpha=ALPHA, target_modules=list(TARGETS),
                                            use_gradient_checkpointing="slothbook" if device.type == "cuda" else True,
                                            random_state=0), torch.Generator().manual_seed(1 + _rank())


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _timed(step, batches, warmup: int, device) -> dict:
    import torch

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    first_loss, times = None, []
    for i, ids in enumerate(batches):
        common.sync(device)
        t0 = time.perf_counter()
        loss = step(ids)
        common.sync(device)
        if i == 0:
            first_loss = float(loss)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    tokens = batches[0].numel()
    peak = torch.cuda.max_memory_allocated(device) if cuda else 0
    return {"tokens_per_s": tokens / statistics.median(times), "peak_gib": round(peak / common.GIB, 2),
            "first_loss": round(first_loss, 4)}


def _batches(spec: dict, generator, device):
    import torch

    vocab = SHAPES[spec["model"]]["vocab_size"]
    return [torch.randint(1, vocab, (1, spec["seq"]), generator=generator).to(device)
            for _ in range(spec["warmup"] + spec["steps"])]


def train_ddp(spec: dict, device) -> dict:
    """Each rank holds the whole 4-bit base; DDP all-reduces the LoRA gradients (the only ones there are)."""
    import torch
    from torch.nn.parallel import DistributedDataParallel

    model, generator = lora_model(spec, device, storage_dtype=torch.uint8)
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return _timed(training_step(ddp, device.type), _batches(spec, generator, device), spec["warmup"], device)


def train_fsdp2(spec: dict, device) -> dict:
    """accelerate (configured by the launcher's FSDP2 YAML) shards the bf16-stored 4-bit base and the LoRA layers."""
    import torch
    from accelerate import Accelerator
    from peft.utils.other import fsdp_auto_wrap_policy

    accelerator = Accelerator()
    model, generator = lora_model(spec, device, storage_dtype=torch.bfloat16)
    accelerator.state.fsdp_plugin.auto_wrap_policy = fsdp_auto_wrap_policy(model)  # as Trainer does for PEFT
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()

    def step(ids):
        loss = model(input_ids=ids, labels=ids).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return _timed(step, _batches(spec, generator, device), spec["warmup"], device)


if __name__ == "__main__":
    main()
