"""Trainer checkpoints on disk (not gradient checkpointing: that is checkpointing.py).

Each `checkpoint-<step>` folder is written whole under a temporary name and renamed into place, so a crash, a
second Ctrl-C or a full disk mid-save leaves the previous checkpoint as it was and no partial folder under a
checkpoint's name. Older checkpoints are rotated out (save_total_limit) only after the new one is in place.
Under torch.distributed every rank writes its own RNG state into rank 0's temporary folder; only rank 0 renames.
"""

from __future__ import annotations

import contextlib
import re
import shutil
from pathlib import Path

from ..atomic import atomic_dir
from ..errors import ConfigError
from .distributed import is_main_process, wait_for_everyone

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
_PARTIAL = re.compile(r"^\.checkpoint-\d+\.partial-")
_STAGE = ".stage"  # Trainer writes `<its output dir>/checkpoint-<step>`; we point its output dir here, inside the temp


def _together() -> bool:
    """Several processes in one initialised process group (torchrun, accelerate launch)."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on any (a host sync; only under torch.distributed)."""
    if not _together():
        return flag
    import torch
    import torch.distributed as dist

    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def checkpoints(folder: str | Path) -> list[Path]:
    """The whole checkpoints in `folder`, oldest step first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := _CHECKPOINT.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(folder: str | Path) -> Path:
    """The newest checkpoint under `folder` (or `folder` itself when it is one), or a ConfigError saying why not."""
    folder = Path(folder)
    if (folder / "trainer_state.json").is_file():
        return folder
    found = checkpoints(folder)
    if not found:
        raise ConfigError(f"No checkpoint to resume from in {folder}: training saves one when it is stopped "
                          "(Ctrl-C, SIGTERM, Stop) or every --save-steps steps. Run without --resume to start afresh.")
    return found[-1]


def remove_partials(folder: str | Path) -> None:
    """Delete temporary checkpoint folders that a killed process (SIGKILL, power loss) left behind."""
    folder = Path(folder)
    if folder.is_dir() and is_main_process():
        for p in folder.iterdir():
            if _PARTIAL.match(p.name):
                shutil.rmtree(p, ignore_errors=True)


def rotate(folder: str | Path, keep: int | None, protect: str | Path | None = None) -> None:
    """Keep the `keep` newest checkpoints (and `protect`, the best one); delete the rest, oldest first."""
    if not keep or keep <= 0 or not is_main_process():
        return
    found = checkpoints(folder)
    protected = Path(protect).resolve() if protect else None
    for old in found[:-keep]:
        if old.resolve() != protected:
            shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def _shared_atomic_dir(final: Path):
    """`atomic_dir` that every rank writes into: rank 0 creates it and tells the others its name."""
    if not _together():
        with atomic_dir(final) as tmp:
            yield tmp
        return
    import torch.distributed as dist

    if dist.get_rank() == 0:
        with atomic_dir(final) as tmp:
            dist.broadcast_object_list([str(tmp)], src=0)
            yield tmp
    else:
        name = [None]
        dist.broadcast_object_list(name, src=0)
        yield Path(name[0])
    dist.barrier()  # nobody reads the checkpoint before it has its final name


class AtomicCheckpoints:
    """Mixin for a transformers Trainer: its `_save_checkpoint` writes into a temporary folder that is renamed whole.

    Trainer builds the checkpoint path from `_get_output_dir()`, so during a save that returns a stage folder
    inside the temporary one; everything Trainer writes (model, optimizer, scheduler, scaler, RNG, trainer state)
    lands there. Trainer's own rotation then sees only the stage; ours runs on the real folder after the rename.
    """

    _stage_dir: str | None = None

    def _get_output_dir(self, trial):
        return self._stage_dir or super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial):
        run_dir = Path(super()._get_output_dir(trial))
        name = f"checkpoint-{self.state.global_step}"
        with _shared_atomic_dir(run_dir / name) as tmp:
            self._stage_dir = str(tmp / _STAGE)
            try:
                super()._save_checkpoint(model, trial)
            finally:
                self._stage_dir = None
            wait_for_everyone()  # every rank has written its RNG state before rank 0 moves the files
            if is_main_process():
                written = tmp / _STAGE / name
                for f in written.iterdir():
                    f.rename(tmp / f.name)
                shutil.rmtree(tmp / _STAGE)
        if self.state.best_model_checkpoint and Path(self.state.best_model_checkpoint).parent == tmp / _STAGE:
            self.state.best_model_checkpoint = str(run_dir / name)
        rotate(run_dir, self.args.save_total_limit, self.state.best_model_checkpoint)

    def save_checkpoint(self) -> Path:
        """Save a full checkpoint of the current step now (the public face of Trainer's `_save_checkpoint`)."""
        self._save_checkpoint(self.model, trial=None)
        return Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
