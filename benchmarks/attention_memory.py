"""Attention's memory per token: what SDPA saves for backward and what its backward adds, per backend.

The memory estimator (slothbook/train/activation_bytes.py) models a decoder layer's backward from the model's
shape. At long context, with the MLP tiled, a layer's backward peaks inside attention, so its workspace (the
gradients dq/dk/dv, an fp32 dq accumulator, GQA's expanded dk/dv) decides the step's peak. This script measures
it on the GPU for Llama-3.1-8B's attention (32 query heads, 8 key-value heads of 128), batch 1, bf16, causal:

  saved     bytes per token autograd holds after the forward, beyond q, k, v and the output
  backward  peak bytes per token the backward allocates above what existed when it started (dq, dk, dv
            and any workspace), with the output's gradient already allocated

Contenders: `transformers` (transformers' sdpa_attention_forward, mask None: the path slothbook's and HF's
models run, enable_gqa=True), and each SDPA backend forced (`cudnn`, `flash`, `efficient`, `math` up to 16K)
with enable_gqa=True (`gqa`) and with transformers' repeat_kv (`repeat`). A backend that refuses a
combination leaves an error row with its message. Rows: config `"<contender> <gqa|repeat> <seq>"`, metrics
`saved_bytes_per_token` and `backward_bytes_per_token`.

  python benchmarks/attention_memory.py --out $OUT/attention_memory.json    # ~1 minute on an H100
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

sys.path.pop(0)

BENCH = "attention_memory"
HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
MATH_MAX_SEQ = 16384  # the math backend materialises [heads, seq, seq] scores


def _backends():
    from torch.nn.attention import SDPBackend

    return {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}


def _attention(contender: str, layout: str):
    """A function (q, k, v) -> output for one contender and GQA layout."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import sdpa_kernel

    groups = HEADS // KV_HEADS
    if contender == "transformers":
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        module = torch.nn.Module()
        module.num_key_value_groups, module.is_causal = groups, True
        return lambda q, k, v: sdpa_attention_forward(module, q, k, v, None, scaling=HEAD_DIM**-0.5)[0]
    backend = _backends()[contender]

    def run(q, k, v):
        with sdpa_kernel([backend]):
            if layout == "repeat":
                k, v = (t.repeat_interleave(groups, dim=1) for t in (k, v))
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    return run


def measure(contender: str, layout: str, seq: int, device) -> tuple[float, float]:
    """(saved, backward) bytes per token of one causal attention over ``seq`` tokens."""
    import torch

    fn = _attention(contender, layout)
    q = torch.randn(1, HEADS, seq, HEAD_DIM, device=device, dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(1, KV_HEADS, seq, HEAD_DIM, device=device, dtype=torch.bfloat16, requires_grad=True)
            for _ in range(2))
    common.sync(device)
    before = torch.cuda.memory_allocated(device)
    out = fn(q, k, v)
    common.sync(device)
    saved = torch.cuda.memory_allocated(device) - before - out.numel() * out.element_size()
    grad = torch.randn_like(out)
    backward = common.peak_extra_bytes(lambda: out.backward(grad), device)
    del out, grad, q, k, v
    common.free_memory(device)
    return saved / seq, backward / seq


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", type=int, nargs="+", default=[8192, 32768, 131072])
    parser.add_argument("--contenders", nargs="+", default=["transformers", "cudnn", "flash", "efficient", "math"])
    parser.add_argument("--out", type=Path, default=common.RESULTS_DIR / f"{BENCH}.json")
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print("attention_memory.py measures CUDA memory: run it on a GPU")
        return 2
    device = torch.device("cuda")
    rec = common.Recorder(BENCH)
    for seq in args.seqs:
        for contender in args.contenders:
            layouts = ["gqa"] if contender == "transformers" else ["gqa", "repeat"]
            for layout in layouts:
                config = f"{contender} {layout} {seq}"
                if contender == "math" and seq > MATH_MAX_SEQ:
                    continue
                with rec.guard(contender, config, device):
                    saved, backward = measure(contender, layout, seq, device)
                    rec.add(contender, config, "saved_bytes_per_token", round(saved), "bytes")
                    rec.add(contender, config, "backward_bytes_per_token", round(backward), "bytes")
                    print(f"{config:32s} saved {saved:9.0f} B/token   backward {backward:9.0f} B/token", flush=True)
    common.write_results(args.out, rec.rows, device=common.device_details(device))
    return 0


if __name__ == "__main__":
    sys.exit(main())
