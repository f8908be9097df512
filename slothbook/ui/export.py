"""One entry point for the four export methods, as the magic and the Studio offer them."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError

METHODS = ("lora", "merged_16bit", "merged_4bit", "gguf")


def gguf_types() -> tuple[str, ...]:
    from ..export.gguf_export import DIRECT_TYPES, LLAMA_CPP_TYPES

    return DIRECT_TYPES + tuple(LLAMA_CPP_TYPES)


@dataclass
class ExportResult:
    method: str
    paths: list[Path]  # the folder (lora, merged) or the GGUF file(s)
    bytes: int

    def __str__(self) -> str:
        from ..profiler.samples import format_bytes

        return f"{self.method}: {', '.join(map(str, self.paths))} ({format_bytes(self.bytes)})"


def export_model(model, tokenizer, method: str, path: str | os.PathLike, quantization: str | None = None,
                 overwrite: bool = False) -> ExportResult:
    """Save `model` with `method` (lora, merged_16bit, merged_4bit or gguf with a `quantization` such as
    q4_k_m) under the folder `path`."""
    if method not in METHODS:
        raise ConfigError(f"Unknown export method {method!r}. Choose one of: {', '.join(METHODS)}.")
    if model is None:
        raise ConfigError("There is no model to export yet: train one first.")
    if method == "gguf":
        from ..export import save_pretrained_gguf

        paths = save_pretrained_gguf(model, path, tokenizer=tokenizer, quantization_method=quantization or "q8_0",
                                     overwrite=overwrite)
    else:
        if quantization:
            raise ConfigError(f"A quantization ({quantization}) applies to gguf exports only, not to {method}.")
        from ..export import save_pretrained_merged

        paths = [save_pretrained_merged(model, path, tokenizer=tokenizer, save_method=method, overwrite=overwrite)]
    return ExportResult(method, [Path(p) for p in paths], sum(size_on_disk(p) for p in paths))


def size_on_disk(path: str | os.PathLike) -> int:
    """Bytes of a file, or of every file under a folder."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
