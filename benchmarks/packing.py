"""Packing benchmark: training tokens/s with padded batches against packed rows without padding.

Every contender trains on the same sequences (response-only labels from slothbook.data), one forward and
backward pass of the whole model per step, and is timed over one pass through them after a warm-up step:

  padded-static   each sequence padded to --max-seq-length, --batch-size sequences per step (the naive default)
  padded-dynamic  padded to the longest sequence of its batch (what a padding collator does)
  packed          slothbook.data.pack into rows of --max-seq-length, --batch-size rows per step, flattened by
                  PackedCollator into one row with position_ids restarting per sequence (no padding at all)

tokens_per_s counts real tokens only (padding is work, not progress); padding_fraction is the share of the
computed positions that were padding. Workloads: "demo" (the bundled demo dataset: short, similar lengths)
and "mixed" (demo exchanges joined into conversations of 1 to 6 turns: lengths vary, as in real chat data).

  python benchmarks/packing.py                          # CPU, embedded SmolLM2-135M, demo workload
  python benchmarks/packing.py --dataset mixed --max-seq-length 512 --sequences 24
  python benchmarks/packing.py --device cuda --sequences 512 --batch-size 16 --save

--save writes benchmarks/results/packing-<device>.json (format in benchmarks/common.py).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:
    sys.path.insert(0, str(_HERE))
import common  # noqa: E402

# Off sys.path again: the scripts here have generic names (train, generation) that must not shadow installed modules.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

BENCHMARK = "packing"


def workload(name: str, count: int, tokenizer, seed: int = 0):
    """`count` tokenized conversations (input_ids, attention_mask, labels) with response-only labels."""
    import datasets

    from slothbook.data import demo_dataset_path, load_dataset_file, standardize, train_on_responses_only

    exchanges = standardize(load_dataset_file(demo_dataset_path()))["messages"]
    if name == "demo":
        conversations = exchanges[:count]
    else:  # mixed: consecutive demo exchanges joined into multi-turn conversations of 1 to 6 turns
        rng, conversations, i = random.Random(seed), [], 0
        while len(conversations) < count:
            turns = rng.randint(1, 6)
            conversations.append([m for pair in exchanges[i:i + turns] for m in pair])
            i = (i + turns) % (len(exchanges) - 6)
    return train_on_responses_only(datasets.Dataset.from_dict({"messages": conversations}), tokenizer)


def batches(contender: str, data, batch_size: int, max_seq_length: int, pad_id: int):
    from slothbook.data import PackedCollator, PaddingCollator, pack

    rows = [{k: r[k][:max_seq_length] for k in ("input_ids", "labels")} for r in data]
    if contender == "packed":
        rows = list(pack(rows, max_seq_length))
        collate = PackedCollator()
    else:
        multiple = max_seq_length if contender == "padded-static" else None
        collate = PaddingCollator(pad_id, pad_to_multiple_of=multiple)
    return [collate(rows[i:i + batch_size]) for i in range(0, len(rows), batch_size)]


def train_pass(model, steps, device) -> float:
    """Seconds for forward + backward over all steps (after one untimed warm-up step)."""
    import torch

    def step(batch):
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        model(**batch).loss.backward()
        model.zero_grad(set_to_none=True)

    step(steps[0])
    common.sync(device)
    start = time.perf_counter()
    for batch in steps:
        step(batch)
    common.sync(device)
    return time.perf_counter() - start


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="HF model folder (default: the embedded SmolLM2-135M)")
    parser.add_argument("--dataset", choices=["demo", "mixed"], default="demo")
    parser.add_argument("--sequences", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-seq-length", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--attn", default="sdpa", help="attn_implementation (e.g. flash_attention_2 on a GPU)")
    parser.add_argument("--contenders", nargs="+", default=["padded-static", "padded-dynamic", "packed"])
    parser.add_argument("--save", action="store_true", help="write benchmarks/results/packing-<device>.json")
    args = parser.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from slothbook.data import heal_tokenizer

    if args.model is None:
        from slothbook.models.embedded import embedded_model_dir

        args.model = str(embedded_model_dir())
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tokenizer = heal_tokenizer(AutoTokenizer.from_pretrained(args.model))
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, attn_implementation=args.attn).to(device)
    model.train()
    data = workload(args.dataset, args.sequences, tokenizer)
    real = sum(min(len(ids), args.max_seq_length) for ids in data["input_ids"])
    config = (f"{args.dataset} x{args.sequences} ({real} tokens) batch {args.batch_size} "
              f"max_seq_length {args.max_seq_length} {str(dtype).removeprefix('torch.')} {args.attn} "
              f"threads {torch.get_num_threads()}")
    recorder = common.Recorder(BENCHMARK)
    print(f"{config} on {common.device_details(device)['name']}")
    for contender in args.contenders:
        with recorder.guard(contender, config, device):
            steps = batches(contender, data, args.batch_size, args.max_seq_length, tokenizer.pad_token_id)
            computed = sum(b["input_ids"].numel() for b in steps)
            seconds = train_pass(model, steps, device)
            recorder.add(contender, config, "tokens_per_s", round(real / seconds, 1), "tokens/s")
            recorder.add(contender, config, "padding_fraction", round(1 - real / computed, 4), "fraction")
            print(f"  {contender:15s} {real / seconds:9.1f} tokens/s  padding {1 - real / computed:6.1%}  "
                  f"({len(steps)} steps, {seconds:.1f} s)")
    for r in recorder.rows:
        if r["metric"] == common.ERROR:
            print(f"  {r['contender']:15s} failed: {r['value']}")
    if args.save:
        name = "cpu" if device.type == "cpu" else "cuda"
        path = common.RESULTS_DIR / f"packing-{name}.json"
        common.write_results(path, recorder.rows, device=common.device_details(device), append=True)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
