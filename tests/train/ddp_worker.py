"""One process of the DDP test (tests/train/test_distributed.py), written as a user would write a training script:
FastLanguageModel + SFTTrainer (through slothbook's build_trainer), nothing distributed in it.

    python -m torch.distributed.run --nproc-per-node 2 ddp_worker.py MODEL OUT --batch 1   # DDP, 2 ranks
    python ddp_worker.py MODEL OUT --batch 2                                               # one process

Every rank writes its trained LoRA weights to OUT/rank<RANK>.pt. The texts all run past max_seq_length, so every
row is cut to the same length and no batch holds padding: the loss over a global batch is then the same whether
one process sees it whole or each rank sees a part.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

SEQ = 64


def texts() -> list[str]:
    from slothbook.data import demo_dataset_path

    rows = [json.loads(line)["text"] for line in demo_dataset_path().read_text().splitlines() if line.strip()]
    return ["\n".join(rows[i:i + 4]) for i in range(0, 64, 4)]  # 16 texts of four examples: far past 64 tokens


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("out")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=5)
    args = p.parse_args(argv)

    from datasets import Dataset

    from slothbook import FastLanguageModel
    from slothbook.train.sft import TrainArgs, build_trainer

    torch.set_num_threads(1)  # two ranks share the CI machine's cores
    model, tokenizer = FastLanguageModel.from_pretrained(args.model, max_seq_length=SEQ, dtype=torch.float32,
                                                         load_in_4bit=False)
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, random_state=0,
                                             use_gradient_checkpointing=False)
    out = Path(args.out)
    train_args = TrainArgs(output_dir=str(out / "trainer"), max_steps=args.steps, learning_rate=1e-4,
                           per_device_train_batch_size=args.batch, max_seq_length=SEQ, logging_steps=1,
                           warmup_steps=0, seed=0, disable_tqdm=True)
    trainer = build_trainer(model, tokenizer, Dataset.from_dict({"text": texts()}), train_args)
    trainer.train()
    lora = {name: p.detach().cpu().clone() for name, p in model.named_parameters() if p.requires_grad}
    rank = os.environ.get("RANK", "0")
    torch.save({"lora": lora, "world_size": int(os.environ.get("WORLD_SIZE", "1")),
                "losses": [log["loss"] for log in trainer.state.log_history if "loss" in log]},
               out / f"rank{rank}.pt")


if __name__ == "__main__":
    main()
