"""`FinetuneConfig`: one fine-tune described as data, shared by the CLI, the magics' YAML cells and the Studio."""

from __future__ import annotations

import dataclasses
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
    gradient_checkpointing: str | bool = True
    dtype: str | None = None
    output: str | None = None  # None: outputs/run-<time>
    overwrite: bool = False
    seed: int = 3407
    logging_steps: int = 5
    save_steps: int = 0
    resume: bool | str = False  # True: the latest checkpoint under <output>/checkpoints; a path: that checkpoint
    max_bad_steps: int = 5  # NaN/inf steps in a row (each skipped) before training stops with a TrainingError
    extra: dict = field(default_factory=dict)

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
