"""Batch collators that keep the labels they are given (response-only masks survive batching)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .packing import packed_attention_mask, sequence_ids


def _labels(example: dict) -> list[int]:
    return example["labels"] if "labels" in example else example["input_ids"]


@dataclass
class PaddingCollator:
    """Pads to the longest example on the right: input_ids with the pad id, labels with -100, attention_mask 0."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        longest = max(len(e["input_ids"]) for e in examples)
        if self.pad_to_multiple_of:
            longest = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = {
            "input_ids": torch.full((len(examples), longest), self.pad_token_id, dtype=torch.long),
            "attention_mask": torch.zeros((len(examples), longest), dtype=torch.long),
            "labels": torch.full((len(examples), longest), -100, dtype=torch.long),
        }
        for row, example in enumerate(examples):
            n = len(example["input_ids"])
            batch["input_ids"][row, :n] = torch.as_tensor(example["input_ids"])
            batch["attention_mask"][row, :n] = 1
            batch["labels"][row, :n] = torch.as_tensor(_labels(example))
        return batch


@dataclass
class PackedCollator:
    """Concatenates the batch into one row without padding: input_ids, labels, position_ids of shape (1, tokens).

    Works on rows from `pack()` (position_ids given) and on plain tokenized rows. No attention_mask by default:
    transformers then separates the sequences by their position_ids (flash-attention varlen on the GPU, a
    block-diagonal mask for SDPA/eager). The batch also carries use_cache=False: transformers 5 ignores
    position_ids boundaries whenever a KV cache exists, and a model whose config says use_cache=True makes one
    even in training, so attention would silently cross sequences. `attention_mask=True` adds the explicit 4D
    mask of `mask_dtype` (the model's compute dtype) for code paths that do not look at position_ids.
    """

    attention_mask: bool = False
    mask_dtype: torch.dtype = torch.float32

    def __call__(self, examples: list[dict]) -> dict:
        ids, labels, positions = [], [], []
        for example in examples:
            ids += example["input_ids"]
            labels += _labels(example)
            positions += example["position_ids"] if "position_ids" in example else range(len(example["input_ids"]))
        batch = {
            "input_ids": torch.tensor([ids], dtype=torch.long),
            "labels": torch.tensor([labels], dtype=torch.long),
            "position_ids": torch.tensor([positions], dtype=torch.long),
            "use_cache": False,
        }
        # The first token of each sequence is never predicted from the sequence before it.
        seq = sequence_ids(batch["position_ids"])
        first = torch.ones_like(seq, dtype=torch.bool)
        first[:, 1:] = seq[:, 1:] != seq[:, :-1]
        batch["labels"][first] = -100
        if self.attention_mask:
            batch["attention_mask"] = packed_attention_mask(batch["position_ids"], self.mask_dtype)
        return batch
