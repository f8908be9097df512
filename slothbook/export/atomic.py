"""Writing exports safely: never clobber a user's files, never leave half a file under a final name.

Every export is written under a temporary name beside its destination (same filesystem, so the final
`os.replace` is atomic) and renamed only once complete. On any failure, KeyboardInterrupt included,
the temporary is removed.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..atomic import atomic_dir, atomic_file, scratch_file  # noqa: F401  (re-exported)
from ..errors import ExportError

# Headroom on top of the estimate: filesystem blocks, metadata, tokenizer files.
_SPACE_MARGIN = 1.05
_SPACE_SLACK_BYTES = 64 << 20

# Files whose presence says "this folder is a model export", which overwrite=True may replace.
_EXPORT_MARKERS = ("config.json", "adapter_config.json")
_EXPORT_SUFFIXES = (".safetensors", ".gguf")


def free_bytes(path: str | os.PathLike) -> int:
    """Free bytes on the filesystem that holds `path` (or its nearest existing parent)."""
    probe = Path(path).resolve()
    while not probe.exists():
        probe = probe.parent
    return shutil.disk_usage(probe).free


def check_free_space(path: str | os.PathLike, needed_bytes: int, what: str) -> None:
    """Raise ExportError when the disk that will hold `path` cannot take `needed_bytes` (with headroom)."""
    need = int(needed_bytes * _SPACE_MARGIN) + _SPACE_SLACK_BYTES
    free = free_bytes(path)
    if free < need:
        raise ExportError(
            f"Not enough disk space for {what} at {path}: about {_gib(need)} needed, {_gib(free)} free. "
            "Free some space or choose a folder on another disk."
        )


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def _looks_like_export(folder: Path) -> bool:
    names = [p.name for p in folder.iterdir()]
    return not names or any(n in _EXPORT_MARKERS or n.endswith(_EXPORT_SUFFIXES) or n.startswith("Modelfile")
                            for n in names)


def check_destination(path: str | os.PathLike, overwrite: bool, is_dir: bool) -> Path:
    """Refuse to replace an existing file or non-empty folder unless overwrite=True.

    Even with overwrite=True, a folder that does not look like a model export (no config, adapter,
    weights or GGUF files) is refused: a mistyped path must not wipe unrelated files.
    """
    path = Path(path).expanduser()
    if not path.exists():
        return path
    if is_dir and not path.is_dir():
        raise ExportError(f"{path} is a file, but this export writes a folder. Choose another path.")
    if not is_dir and path.is_dir():
        raise ExportError(f"{path} is a folder, but this export writes a file. Choose another path.")
    if is_dir and not any(path.iterdir()):
        return path
    if not overwrite:
        raise ExportError(f"{path} already exists. Pass overwrite=True to replace it, or choose another path.")
    if is_dir and not _looks_like_export(path):
        raise ExportError(
            f"{path} exists and does not look like a model export (no config, adapter, weights or GGUF files); "
            "refusing to replace it even with overwrite=True. Choose an empty or new folder."
        )
    return path
