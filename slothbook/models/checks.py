"""Checks of model files on disk before anything reads them: whole safetensors, parsable JSON, no pickles, no code.

Each check names the file at fault and says what to do; loaders call them so that a damaged download fails with
a `CorruptFileError` naming the file instead of a deep safetensors/json/transformers traceback.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from ..errors import ConfigError, CorruptFileError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
_REDOWNLOAD = "Download or export it again"
# Files of a model folder whose "auto_map" makes transformers import Python code shipped in the folder.
_AUTO_MAP_FILES = ("config.json", "tokenizer_config.json", "processor_config.json", "adapter_config.json")
_MAX_HEADER = 100 << 20  # the safetensors format's own limit on the JSON header


def read_json(path: str | Path) -> dict:
    """The JSON object in `path`; CorruptFileError naming the file, line and column when it does not parse."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise CorruptFileError(f"{path} is not UTF-8 text (bad byte at offset {exc.start}). {_REDOWNLOAD}.") from exc
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CorruptFileError(f"{path} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}); "
                               f"it is truncated or was edited by hand. {_REDOWNLOAD}, or fix the file.") from exc
    if not isinstance(value, dict):
        raise CorruptFileError(f"{path} should hold a JSON object, but holds a {type(value).__name__}. {_REDOWNLOAD}.")
    return value


def check_safetensors(path: str | Path) -> None:
    """Check a safetensors file's header and that the file holds every byte the header promises.

    Reads only the header: a truncated download, flipped header bytes or a non-safetensors file under a
    .safetensors name are caught without touching the tensor data.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            _corrupt(path, f"it is only {size} bytes long")
        (n,) = struct.unpack("<Q", head)
        if n == 0 or n > _MAX_HEADER or 8 + n > size:
            _corrupt(path, f"its header claims {n} bytes but the file has {size}")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        _corrupt(path, f"its header is not valid JSON ({exc})")
    if not isinstance(header, dict):
        _corrupt(path, "its header is not a JSON object")
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            start, stop = info["data_offsets"]
            end = max(end, int(stop))
            if not 0 <= int(start) <= int(stop):
                raise ValueError
        except (KeyError, TypeError, ValueError):
            _corrupt(path, f"the header entry of tensor {name!r} is malformed")
    if 8 + n + end > size:
        _corrupt(path, f"it is truncated: the header promises {8 + n + end} bytes, the file has {size}")


def _corrupt(path: Path, why: str):
    raise CorruptFileError(f"{path} is not a readable safetensors file: {why}. {_REDOWNLOAD}.")


def check_weight_files(folder: str | Path) -> None:
    """Check every safetensors file of a folder (all shards)."""
    for path in sorted(Path(folder).glob("*.safetensors")):
        check_safetensors(path)


def check_no_pickle(folder: str | Path, allow_pickle: bool, stem: str = "weights") -> None:
    """Refuse a folder whose only weights are pickled (unpickling can execute code) unless `allow_pickle`."""
    folder = Path(folder)
    if allow_pickle or not folder.is_dir() or any(folder.glob("*.safetensors")):
        return
    pickled = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickled:
        raise ConfigError(f"{folder} holds only pickled {stem} ({', '.join(pickled)}), which can execute code when "
                          "loaded. Convert them to safetensors, or pass allow_pickle=True if you trust the source.")


def check_no_remote_code(folder: str | Path, trust_remote_code: bool) -> None:
    """Refuse a folder that would make transformers import its own Python code, unless `trust_remote_code`."""
    folder = Path(folder)
    if trust_remote_code or not folder.is_dir():
        return
    for name in _AUTO_MAP_FILES:
        path = folder / name
        if path.is_file() and read_json(path).get("auto_map"):
            code = sorted(p.name for p in folder.glob("*.py"))
            shipped = f" (it ships {', '.join(code)})" if code else ""
            raise ConfigError(f"{path} has an 'auto_map': the model's code is custom Python in the folder{shipped}. "
                              "slothbook does not run code from a model folder unless you pass "
                              "trust_remote_code=True; do so only if you trust its source.")


def check_vocab(tokenizer, model, fix: str, source=None) -> None:
    """Refuse a tokenizer with ids past the model's embedding rows: those tokens have no embedding and would crash
    the first step that meets them (or the exported model at inference). `fix` says what to do."""
    rows = model.get_input_embeddings().weight.shape[0]
    if tokenizer is None or len(tokenizer) <= rows:
        return
    extra = tokenizer.convert_ids_to_tokens(list(range(rows, min(len(tokenizer), rows + 3))))
    of = f" of {source}" if source is not None else ""
    raise ConfigError(f"The tokenizer{of} has {len(tokenizer)} tokens but the model's embedding has {rows} rows: "
                      f"tokens {rows} and up (e.g. {', '.join(map(repr, extra))}) have no embedding. {fix}")
