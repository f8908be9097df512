"""`FinetuneConfig`: one fine-tune described as data, shared by the CLI, the magics' YAML cells and the Studio."""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError


@dataclass
class FinetuneConfig:
    model: str = "smollm2-135m"
    dataset: str | None = None  # None: the bundled demo dataset
    text_field: str = "text"
    chat_template: str | None = None
    responses_only: bool = False
    max_seq_length: int = 256
    steps: int = 60
    batch_size: int = 4
    grad_accum: int = 1
    r: int = 16
    lora_alpha: int = 16
    lr: float = 2e-4
    load_in_4bit: bool = True
    gradient_checkpointing: str | bool = "auto"  # "auto", True (plain), False, "slothbook" (offload all)
    dtype: str | None = None
    output: str | None = None  # None: outputs/run-<time>
    overwrite: bool = False
    seed: int = 3407
    logging_steps: int = 5
    save_steps: int = 0
    resume: bool | str = False  # True: the latest checkpoint under <output>/checkpoints; a path: that checkpoint
    max_bad_steps: int = 5  # NaN/inf steps in a row (each skipped) before training stops with a TrainingError
    adapter_subdir: str = "adapter"  # where the adapter is saved, inside the output folder
    checkpoints_subdir: str = "checkpoints"  # where checkpoints are written, inside the output folder
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """ConfigError naming the key of a value of the wrong type, or of a subpath that leaves the output folder."""
        for f in dataclasses.fields(self):
            if f.type == "float" and isinstance(getattr(self, f.name), str):
                setattr(self, f.name, _float(f.name, getattr(self, f.name)))  # YAML reads 2e-4 as a string
            _check_type(f.name, getattr(self, f.name), f.type)
        for key in _SUBDIR_KEYS:
            _check_subdir(key, getattr(self, key))

    @classmethod
    def from_dict(cls, values: dict) -> "FinetuneConfig":
        """Build from a mapping (a YAML cell, a widget), naming any unknown key."""
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        values = {k.replace("-", "_"): v for k, v in (values or {}).items()}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"Unknown configuration key(s): {', '.join(unknown)}. Known keys: {', '.join(sorted(known))}.")
        return cls(**values)

    def output_dir(self) -> Path:
        return Path(self.output or Path("outputs") / time.strftime("run-%Y%m%d-%H%M%S"))

    def adapter_path(self, out: Path) -> Path:
        """Where the adapter goes under the run folder `out` (pass the one output_dir() returned)."""
        return inside(out, self.adapter_subdir, "adapter_subdir")

    def checkpoints_path(self, out: Path) -> Path:
        return inside(out, self.checkpoints_subdir, "checkpoints_subdir")


# Keys that name places inside the run's output folder (the `output` folder itself may be anywhere).
_SUBDIR_KEYS = ("adapter_subdir", "checkpoints_subdir")
_TYPES = {"int": int, "float": (int, float), "bool": bool, "str": str, "None": type(None), "dict": dict}


def _check_type(key: str, value, annotation) -> None:
    names = [n.strip() for n in str(annotation).split("|")]
    if any(n not in _TYPES for n in names):
        return  # a type this check does not know: left to the code that uses it
    allowed = tuple(t for n in names for t in (_TYPES[n] if isinstance(_TYPES[n], tuple) else (_TYPES[n],)))
    if isinstance(value, bool) and bool not in allowed:  # True is an int to Python, not to a user
        allowed = ()
    if not isinstance(value, allowed):
        raise ConfigError(f"{key}: {value!r} is a {type(value).__name__}, but {key} takes {' or '.join(names)}.")


def _float(key: str, text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"{key}: {text!r} is not a number.") from None


def _check_subdir(key: str, value: str) -> None:
    path = Path(value)
    norm = os.path.normpath(value) if value else ""
    if not value or path.is_absolute() or norm == "." or norm.split(os.sep)[0] == "..":
        raise ConfigError(f"{key}: {value!r} must be a folder inside the output folder (like 'adapter'), not an "
                          "absolute path or one that climbs out with '..'. Set `output` to choose where the run goes.")


def inside(out: Path, subpath: str, key: str) -> Path:
    """`out / subpath`, refused when it leaves `out` (through '..', an absolute path or a symlink)."""
    _check_subdir(key, subpath)
    path = Path(out) / subpath
    if not path.resolve().is_relative_to(Path(out).resolve()):
        raise ConfigError(f"{key}: {subpath!r} leads to {path.resolve()}, outside the output folder {out} (through a "
                          "symlink). Choose a plain folder name.")
    return path
