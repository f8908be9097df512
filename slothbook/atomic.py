"""Writing files and folders atomically: a complete result under its final name, or nothing.

Everything is written under a temporary name beside its destination (same filesystem, so the final rename is
atomic) and renamed only once complete. On any failure, KeyboardInterrupt included, the temporary is removed.
Checkpoints, adapters and exports all go through here (floor 1: no slothbook imports).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike):
    """Yield a temporary folder beside `final`; on success it replaces `final`, on failure it is removed."""
    final = Path(final).expanduser()
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    try:
        yield tmp
        _replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace_dir(tmp: Path, final: Path) -> None:
    if not final.exists():
        tmp.rename(final)
        return
    # Swap through a second name so the old export is removed only after the new one is in place.
    old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
    old.rmdir()
    final.rename(old)
    try:
        tmp.rename(final)
    except BaseException:
        old.rename(final)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(final: str | os.PathLike):
    """Yield a temporary file path beside `final`; on success it is renamed to `final`, else removed."""
    final = Path(final).expanduser()
    tmp = _empty_file_beside(final, "partial")
    try:
        yield tmp
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def scratch_file(near: str | os.PathLike):
    """Yield a temporary file path beside `near` that is always removed afterwards (an intermediate)."""
    tmp = _empty_file_beside(Path(near).expanduser(), "scratch")
    try:
        yield tmp
    finally:
        tmp.unlink(missing_ok=True)


def _empty_file_beside(path: Path, kind: str) -> Path:
    """A new empty hidden file in `path`'s folder (made if missing), named after `path` and `kind`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.{kind}-", dir=path.parent)
    os.close(fd)
    return Path(name)
