"""load_dataset_file reads every supported file type and fails with a DatasetError that says what to do."""

from __future__ import annotations

import json

import datasets
import pytest

from slothbook.data import load_dataset_file
from slothbook.errors import DatasetError

ROWS = [{"instruction": "Say hi", "input": "", "output": "Hi"},
        {"instruction": "Reverse", "input": "cat", "output": "tac"}]


def write(tmp_path, suffix):
    path = tmp_path / f"data{suffix}"
    frame = datasets.Dataset.from_list(ROWS)
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    elif suffix == ".json":
        path.write_text(json.dumps(ROWS))
    elif suffix == ".csv":
        frame.to_csv(str(path), index=False)
    else:
        frame.to_parquet(str(path))
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_reads_each_file_type(tmp_path, suffix):
    dataset = load_dataset_file(write(tmp_path, suffix))
    assert isinstance(dataset, datasets.Dataset)
    assert dataset["output"] == ["Hi", "tac"]


def test_split_slicing(tmp_path):
    assert len(load_dataset_file(write(tmp_path, ".jsonl"), split="train[:1]")) == 1


def test_saved_dataset_folder(tmp_path):
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "saved"))
    assert len(load_dataset_file(tmp_path / "saved")) == 2


def test_missing_file(tmp_path):
    with pytest.raises(DatasetError, match="not found: .*nope.jsonl"):
        load_dataset_file(tmp_path / "nope.jsonl")


@pytest.mark.parametrize("content", ["", "\n \n"])
def test_empty_file(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(DatasetError, match="empty"):
        load_dataset_file(path)


def test_header_only_csv_is_empty(tmp_path):
    path = tmp_path / "head.csv"
    path.write_text("instruction,input,output\n")
    with pytest.raises(DatasetError, match="empty"):
        load_dataset_file(path)


def test_unreadable_file(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"instruction": "ok", "output": "fine"}\nthis is not json {{{\n')
    with pytest.raises(DatasetError, match="Could not read .*broken.jsonl as JSON"):
        load_dataset_file(path)


def test_unknown_file_type(tmp_path):
    path = tmp_path / "data.xlsx"
    path.write_bytes(b"PK\x03\x04")
    with pytest.raises(DatasetError, match="unknown file type '.xlsx'"):
        load_dataset_file(path)


def test_hub_id_offline_says_the_hub_is_unreachable(monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(DatasetError, match="Hub is unreachable.*local .jsonl"):
        load_dataset_file("someone/some-dataset")
