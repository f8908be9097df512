"""Load a dataset from a local JSONL/JSON/CSV/Parquet file, a folder, or a Hugging Face Hub id."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import DatasetError

# File suffix -> the `datasets` builder that reads it.
BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}
_LOCAL_FILE = "a local .jsonl, .json, .csv or .parquet file"
_LOCAL_HINT = f"Pass {_LOCAL_FILE} instead."


def load_dataset_file(path_or_id: str | os.PathLike, split: str | None = None):
    """A `datasets.Dataset` read from a file, a folder of such files, a saved dataset, or a hub id.

    `split` picks a split (slicing like "train[:100]" works); local files have a single "train" split.
    """
    path = Path(path_or_id).expanduser()
    if path.is_file():
        return _load_file(path, split)
    if path.is_dir():
        return _load_folder(path, split)
    if _looks_like_path(str(path_or_id)):
        raise DatasetError(f"Dataset file not found: {path}. Check the path (relative paths start from "
                           f"{Path.cwd()}).")
    return _load_hub(str(path_or_id), split)


def _looks_like_path(text: str) -> bool:
    # A hub id is "name" or "owner/name"; anything else that does not exist is a mistyped path.
    return (Path(text).suffix.lower() in BUILDERS or text.startswith(("/", ".", "~"))
            or "\\" in text or text.count("/") > 1)


def _nonempty(dataset, source: str):
    if len(dataset) == 0:
        raise DatasetError(f"The dataset {source} is empty: it has no rows. Add examples or pick another file.")
    return dataset


def _load_file(path: Path, split: str | None):
    import datasets

    builder = BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise DatasetError(f"Cannot read {path}: unknown file type {path.suffix!r}. "
                           f"slothbook reads {', '.join(BUILDERS)} files.")
    if not os.access(path, os.R_OK):
        raise DatasetError(f"Cannot read {path}: permission denied. Fix its permissions or copy it somewhere readable.")
    if path.stat().st_size == 0 or not path.read_bytes()[:65536].strip():
        raise DatasetError(f"The dataset file {path} is empty. Add examples or pick another file.")
    if path.suffix.lower() in _TEXT_SUFFIXES:
        check_utf8(path)
    try:
        dataset = datasets.load_dataset(builder, data_files=str(path), split=split or "train")
    except Exception as exc:  # datasets wraps parse errors in several exception types
        culprit = find_bad_row(path)  # datasets' own messages count rows per block: find the real line
        if culprit:
            raise DatasetError(f"Could not read {path} as {builder.upper()}: {culprit} Fix or remove that row and "
                               "load again.") from exc
        cause = exc.__cause__ or exc
        raise DatasetError(f"Could not read {path} as {builder.upper()}: {type(cause).__name__}: {cause}. "
                           "Check that every line/row is well formed.") from exc
    return _nonempty(dataset, str(path))


_TEXT_SUFFIXES = (".jsonl", ".json", ".csv")


def check_utf8(path: Path) -> None:
    """DatasetError naming the line and byte offset of the first byte of `path` that is not UTF-8.

    Checked before reading: Arrow's JSON reader accepts such bytes and fails only when a row is used."""
    offset = 0
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DatasetError(f"{path}, line {number}: byte {offset + exc.start} (0x{raw[exc.start]:02x}) is "
                                   "not UTF-8 text. Save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8 "
                                   f"{path.name}).") from None
            offset += len(raw)


def find_bad_row(path: Path) -> str | None:
    """Where a UTF-8 JSON/JSON Lines file stops parsing, as a sentence naming the line: a JSON Lines row
    that is not a JSON object, or the position where a JSON document breaks. None when none is found."""
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".json"):
        return None
    text = path.read_text(encoding="utf-8")
    if suffix == ".json" and not _first_line_is_object(text):
        try:
            json.loads(text)
        except json.JSONDecodeError as exc:
            return f"line {exc.lineno}, column {exc.colno} is not valid JSON ({exc.msg})."
        return None
    return _bad_json_line(path, text)


def _first_line_is_object(text: str) -> bool:
    first = text.lstrip().split("\n", 1)[0]
    try:
        return isinstance(json.loads(first), dict)
    except json.JSONDecodeError:
        return False


def _bad_json_line(path: Path, text: str) -> str | None:
    """The first JSON Lines row that is not a JSON object."""
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            return f"line {number} is not valid JSON (column {exc.colno}: {exc.msg})."
        if not isinstance(row, dict):
            return f"line {number} is a JSON {type(row).__name__}, not an object of column: value pairs."
    return None


def _load_folder(path: Path, split: str | None):
    import datasets

    try:
        if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
            loaded = datasets.load_from_disk(str(path))  # written by Dataset.save_to_disk
        else:
            loaded = datasets.load_dataset(str(path))
    except Exception as exc:
        raise DatasetError(f"Could not read the dataset folder {path}: {exc}. {_LOCAL_HINT}") from exc
    return _nonempty(_pick_split(loaded, split, str(path)), str(path))


def _load_hub(dataset_id: str, split: str | None):
    import datasets

    try:
        loaded = datasets.load_dataset(dataset_id, split=split)
    except ConnectionError as exc:  # offline: datasets raises ConnectionError("Couldn't reach ... on the Hub")
        raise DatasetError(f"'{dataset_id}' is not a local file and the Hugging Face Hub is unreachable ({exc}). "
                           f"Download the dataset where there is internet, or pass {_LOCAL_FILE}.") from exc
    except Exception as exc:
        raise DatasetError(f"'{dataset_id}' is neither a local file nor a loadable Hub dataset ({exc}). "
                           f"{_LOCAL_HINT}") from exc
    return _nonempty(_pick_split(loaded, split, dataset_id), dataset_id)


def _pick_split(loaded, split: str | None, source: str):
    """A DatasetDict narrowed to one split: the one asked for, else "train", else the first."""
    if not hasattr(loaded, "keys"):
        return loaded
    if split is not None:
        if split not in loaded:
            raise DatasetError(f"{source} has no split {split!r}; it has {list(loaded)}.")
        return loaded[split]
    return loaded["train"] if "train" in loaded else loaded[next(iter(loaded))]
