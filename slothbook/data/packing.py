"""Packing without padding: several tokenized sequences share one row, with position_ids restarting per sequence.

Attention must not cross from one sequence into the next. transformers (>= 5) reads the boundaries from
position_ids when no attention_mask is given: flash-attention takes its varlen path, SDPA/eager build a
block-diagonal mask. `packed_attention_mask` builds that mask explicitly for code that wants to pass one.
"""

from __future__ import annotations

import bisect
import logging

import torch

from ..errors import ConfigError, DatasetError

logger = logging.getLogger("slothbook.data")


def _sequences(dataset) -> tuple[list[list[int]], list[list[int]]]:
    """(input_ids, labels) lists from a Dataset/list of dicts with input_ids (labels optional) or of token lists."""
    if hasattr(dataset, "column_names"):
        if "input_ids" not in dataset.column_names:
            raise DatasetError(f"pack() needs an 'input_ids' column; the dataset has {dataset.column_names}. "
                               "Tokenize it first (e.g. train_on_responses_only(dataset, tokenizer)).")
        ids = dataset["input_ids"]
        labels = dataset["labels"] if "labels" in dataset.column_names else ids
        return [list(x) for x in ids], [list(x) for x in labels]
    rows = list(dataset)
    if rows and isinstance(rows[0], dict):
        return [list(r["input_ids"]) for r in rows], [list(r.get("labels", r["input_ids"])) for r in rows]
    return [list(r) for r in rows], [list(r) for r in rows]


def pack(dataset, max_seq_length: int):
    """A `datasets.Dataset` whose rows hold several sequences each (input_ids, labels, position_ids).

    Best-fit decreasing: each sequence, longest first, goes into the fullest row it still fits. A sequence longer
    than `max_seq_length` is truncated. Each sequence's first label is -100: its first token must not be learned
    as a continuation of the previous sequence.
    """
    import datasets

    if max_seq_length < 2:
        raise ConfigError(f"max_seq_length must be at least 2, got {max_seq_length}.")
    ids, labels = _sequences(dataset)
    too_long = sum(len(x) > max_seq_length for x in ids)
    if too_long:
        logger.warning("slothbook: %d of %d sequences are longer than %d tokens and were truncated",
                       too_long, len(ids), max_seq_length)
    order = sorted((i for i in range(len(ids)) if ids[i]), key=lambda i: -len(ids[i]))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row index), sorted: the tightest fit is found by bisection
    for i in order:
        size = min(len(ids[i]), max_seq_length)
        k = bisect.bisect_left(free, (size, -1))
        if k == len(free):
            rows.append([])
            room, row = max_seq_length, len(rows) - 1
        else:
            room, row = free.pop(k)
        rows[row].append(i)
        if room - size > 0:
            bisect.insort(free, (room - size, row))
    packed = {"input_ids": [], "labels": [], "position_ids": []}
    for members in rows:
        row_ids, row_labels, row_pos = [], [], []
        for i in members:
            size = min(len(ids[i]), max_seq_length)
            row_ids += ids[i][:size]
            row_labels += [-100] + labels[i][1:size]
            row_pos += range(size)
        packed["input_ids"].append(row_ids)
        packed["labels"].append(row_labels)
        packed["position_ids"].append(row_pos)
    return datasets.Dataset.from_dict(packed)


def sequence_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """Which packed sequence each token belongs to: a new one starts wherever the position does not go up by 1."""
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[..., 1:] = position_ids[..., 1:] != position_ids[..., :-1] + 1
    return starts.cumsum(-1)


def packed_attention_mask(position_ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The additive 4D mask (batch, 1, q, k) for packed rows: causal, and blocked across sequence boundaries.

    0 where a token may attend, the dtype's most negative value elsewhere; HF models accept it as attention_mask.
    """
    if position_ids.dim() == 1:
        position_ids = position_ids[None]
    seq = sequence_ids(position_ids)
    length = position_ids.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool, device=position_ids.device).tril()
    allowed = (seq[:, :, None] == seq[:, None, :]) & causal
    mask = torch.zeros(allowed.shape, dtype=dtype, device=position_ids.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]
