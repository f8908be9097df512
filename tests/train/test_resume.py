"""Stop a real fine-tune at a random step, resume it, and get the uninterrupted run's losses and adapter."""

from __future__ import annotations

import os
import random

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from slothbook.errors import ConfigError
from slothbook.train.interrupt import GracefulStop
from slothbook.train.job import FinetuneConfig, run_finetune

STEPS = 8


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/train/conftest.py


def tiny(output, **kw) -> FinetuneConfig:
    return FinetuneConfig(load_in_4bit=False, gradient_checkpointing=False, steps=STEPS, max_seq_length=64,
                          batch_size=2, lr=5e-4, logging_steps=1, output=str(output), **kw)


class RequestAt(TrainerCallback):
    """The Studio's Stop button, pressed while step `step` runs."""

    def __init__(self, stop: GracefulStop, step: int):
        self.stop, self.step = stop, step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step:
            self.stop.request()


def test_resume_after_a_stop_at_a_random_step_matches_the_uninterrupted_run(tmp_path):
    seed = int(os.environ.get("SLOTHBOOK_RESUME_SEED", "11"))
    at = random.Random(seed).randrange(1, STEPS)
    print(f"stopping at step {at} of {STEPS} (SLOTHBOOK_RESUME_SEED={seed})")

    whole = run_finetune(tiny(tmp_path / "whole"))
    assert len(whole.losses) == STEPS and whole.stopped is None

    stop = GracefulStop()
    first = run_finetune(tiny(tmp_path / "cut"), callbacks=[stop, RequestAt(stop, at)])
    assert first.stopped == "requested" and len(first.losses) == at
    assert first.checkpoint_dir == tmp_path / "cut" / "checkpoints" / f"checkpoint-{at}"
    for name in ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"):
        assert (first.checkpoint_dir / name).is_file(), name

    second = run_finetune(tiny(tmp_path / "cut", resume=True))
    assert second.stopped is None and second.losses[:at] == first.losses  # the history comes back with the state
    resumed = first.losses + second.losses[at:]
    print("uninterrupted:", whole.losses, "\nresumed:      ", resumed)
    torch.testing.assert_close(torch.tensor(resumed), torch.tensor(whole.losses), rtol=0, atol=1e-6)

    expected = load_file(whole.adapter_dir / "adapter_model.safetensors")
    got = load_file(second.adapter_dir / "adapter_model.safetensors")
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-6)


def test_resume_without_a_checkpoint_says_where_it_looked(tmp_path):
    with pytest.raises(ConfigError, match="No checkpoint to resume from in .*checkpoints"):
        run_finetune(tiny(tmp_path, resume=True))
    with pytest.raises(ConfigError, match="no such checkpoint"):
        run_finetune(tiny(tmp_path, resume=str(tmp_path / "checkpoint-3")))
