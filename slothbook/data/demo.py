"""The bundled demo dataset (written by make_demo.py)."""

from __future__ import annotations

from pathlib import Path

from ..errors import DatasetError


def demo_dataset_path() -> Path:
    """Path of demo.jsonl: a few hundred short instruction examples (instruction, input, output, text)."""
    path = Path(__file__).with_name("demo.jsonl")
    if not path.is_file():
        raise DatasetError(f"The demo dataset {path} is missing; recreate it with: python -m slothbook.data.make_demo")
    return path
