"""Generation speed after `for_inference`: CUDA-graph decoding (the default) against transformers' `generate`.

A SmolLM2-135M-shaped model (the embedded model's shape; random weights, a tokenizer trained on the demo data)
in bf16 with LoRA r=16 on every projection, greedy decoding of 128 new tokens after a 128-token random prompt,
batch 1 and 8: tokens/s of `model.generate` after `for_inference(model, cuda_graphs=False)` (contender
`slothbook-eager`: transformers' decoding loop over slothbook's kernels) and after `for_inference(model)`
(`slothbook`: each decode step replayed from a CUDA graph). One warm-up call (the capture) before each timed one.
The 8B shape is benchmarks/train.py's `gen` config.

  python3 benchmarks/generation.py --out benchmarks/results/generation-h200.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

sys.path.pop(0)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    import torch

    from slothbook import FastLanguageModel
    from slothbook.data import demo_dataset_path
    from slothbook.models.families.tiny import save_smollm2_shaped_model

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    texts = [json.loads(line)["text"] for line in demo_dataset_path().read_text().splitlines()]
    folder = tempfile.mkdtemp()
    save_smollm2_shaped_model(folder, texts)
    model, _ = FastLanguageModel.from_pretrained(folder, max_seq_length=args.prompt + args.new,
                                                 dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    model = FastLanguageModel.get_peft_model(model, r=16, init_lora_weights=False)
    rows = []
    for batch in args.batches:
        ids = torch.randint(3, 1000, (batch, args.prompt), device=device)
        config = f"gen {args.prompt}+{args.new}x{batch} smollm2-135m-shaped"
        for contender, graphs in (("slothbook-eager", False), ("slothbook", True)):
            FastLanguageModel.for_training(model)
            FastLanguageModel.for_inference(model, cuda_graphs=graphs)

            def generate():
                with torch.inference_mode():
                    return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                          max_new_tokens=args.new, min_new_tokens=args.new, pad_token_id=0)

            generate()  # warm-up: kernels compiled, the decode step captured
            common.sync(device)
            start = time.perf_counter()
            out = generate()
            common.sync(device)
            made = out.shape[1] - args.prompt
            rate = batch * made / (time.perf_counter() - start)
            rows.append(common.row("generation", contender, config, "tokens_per_s", round(rate, 1), "tokens/s"))
            print(f"{config:<40} {contender:<16} {rate:9.1f} tok/s")
    if args.out:
        common.write_results(Path(args.out), rows, device=common.device_details(device))
        print(f"wrote {len(rows)} rows to {args.out}")


if __name__ == "__main__":
    main()
