"""Sharded safetensors writing with a bounded memory footprint.

Tensors are buffered until the next one would push the shard past `max_shard_size`, then the shard is
written straight from the tensors' memory (no bytes copies, unlike `safetensors.torch.save_file`),
so peak host memory is about one shard plus the tensor being added. Shards are named and indexed the
way transformers names them: `model.safetensors` alone, or `model-0000i-of-0000N.safetensors` plus
`model.safetensors.index.json`.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import torch

from ..errors import ConfigError

_DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
INDEX_NAME = "model.safetensors.index.json"


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string such as "5GB", "500MB" or "2GiB" (GB = 10**9, GiB = 2**30)."""
    if isinstance(size, int) and size > 0:
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", str(size).upper())
    if not match or float(match.group(1)) <= 0:
        raise ConfigError(f"max_shard_size must be a positive byte count or a string like '5GB', got {size!r}.")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def write_safetensors(path: str | Path, tensors: list[tuple[str, torch.Tensor]], metadata=None) -> None:
    """Write one safetensors file: 8-byte header length, JSON header, then each tensor's raw bytes."""
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keeps the data section 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for _, t in tensors:
            write_tensor_bytes(f, t)


def write_tensor_bytes(f, t: torch.Tensor) -> None:
    """The tensor's bytes, little-endian, written from its own memory."""
    t = t.detach().cpu().contiguous().reshape(-1)
    if t.numel():
        f.write(t.view(torch.uint8).numpy().data)


class ShardedWriter:
    """Collect (name, tensor) pairs into shards under `folder`; `close()` names them and writes the index."""

    def __init__(self, folder: str | Path, max_shard_size: int | str = "5GB", metadata=None):
        self.folder = Path(folder)
        self.max_bytes = parse_size(max_shard_size)
        self.metadata = metadata or {"format": "pt"}
        self._buffer: list[tuple[str, torch.Tensor]] = []
        self._buffer_bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self._buffer and self._buffer_bytes + nbytes > self.max_bytes:
            self._flush()
        self._buffer.append((name, tensor.detach().cpu().contiguous()))
        self._buffer_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        path = self.folder / f".shard-{len(self._shards):05d}.tmp"
        write_safetensors(path, self._buffer, self.metadata)
        self._shards.append((path, [n for n, _ in self._buffer]))
        self._buffer, self._buffer_bytes = [], 0

    def close(self) -> list[Path]:
        """Flush, give the shards their final names, write the index when there are several. Returns the files."""
        if self._buffer or not self._shards:
            self._flush()
        n = len(self._shards)
        if n == 1:
            final = self.folder / "model.safetensors"
            self._shards[0][0].rename(final)
            return [final]
        weight_map, files = {}, []
        for i, (tmp, names) in enumerate(self._shards, start=1):
            final = self.folder / f"model-{i:05d}-of-{n:05d}.safetensors"
            tmp.rename(final)
            files.append(final)
            weight_map.update({name: final.name for name in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        return files + [self.folder / INDEX_NAME]
