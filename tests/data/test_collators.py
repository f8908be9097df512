"""Collators keep the labels they are given and pad (or pack) around them."""

from __future__ import annotations

import torch

from slothbook.data import PackedCollator, PaddingCollator


def test_padding_keeps_labels_and_pads_with_minus_100():
    batch = PaddingCollator(pad_token_id=0, pad_to_multiple_of=4)([
        {"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]},
    ])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0], [8, 0, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100], [8, -100, -100, -100]]


def test_packed_row_has_no_padding_and_no_cross_sequence_label():
    batch = PackedCollator()([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8, 9]}])
    assert set(batch) == {"input_ids", "labels", "position_ids", "use_cache"} and batch["use_cache"] is False
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9]]


def test_packed_rows_from_pack_keep_their_positions():
    row = {"input_ids": [1, 2, 3, 4], "labels": [-100, 2, -100, 4], "position_ids": [0, 1, 0, 1]}
    batch = PackedCollator(attention_mask=True, mask_dtype=torch.bfloat16)([row, row])
    assert batch["position_ids"].tolist() == [[0, 1, 0, 1, 0, 1, 0, 1]]
    assert batch["labels"].tolist() == [[-100, 2, -100, 4, -100, 2, -100, 4]]
    assert batch["attention_mask"].shape == (1, 1, 8, 8) and batch["attention_mask"].dtype == torch.bfloat16
