"""Ctrl-C, SIGTERM and the Stop button end a real fine-tune after the step with a whole checkpoint; a crash while a
checkpoint is written leaves the previous one as it was."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from slothbook import FastLanguageModel
from slothbook.train.interrupt import GracefulStop
from slothbook.train.job import FinetuneConfig, load_training_dataset, run_finetune
from slothbook.train.sft import TrainArgs, build_trainer

CHECKPOINT_FILES = ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json")


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/train/conftest.py


def tiny(output, **kw) -> FinetuneConfig:
    values = dict(load_in_4bit=False, gradient_checkpointing=False, steps=4, max_seq_length=64, batch_size=2,
                  logging_steps=1, output=str(output))
    return FinetuneConfig(**{**values, **kw})


def assert_whole(checkpoint: Path, step: int) -> None:
    for name in CHECKPOINT_FILES:
        assert (checkpoint / name).is_file(), f"{checkpoint} lacks {name}"
    assert json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] == step
    assert load_file(checkpoint / "adapter_model.safetensors")
    torch.load(checkpoint / "optimizer.pt", weights_only=True)


def no_partials(folder: Path) -> list[str]:
    return [p.name for p in folder.rglob(".*")]


class At(TrainerCallback):
    """Runs `action()` when step `step` begins."""

    def __init__(self, step: int, action):
        self.step, self.action = step, action

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step:
            self.action()


def test_ctrl_c_stops_after_the_step_with_a_checkpoint_and_gives_the_handler_back(tmp_path):
    before = signal.getsignal(signal.SIGINT)
    result = run_finetune(tiny(tmp_path), callbacks=[At(2, lambda: os.kill(os.getpid(), signal.SIGINT))])
    assert result.stopped == "Ctrl-C" and result.trainer.state.global_step == 2 and len(result.losses) == 2
    assert result.checkpoint_dir == tmp_path / "checkpoints" / "checkpoint-2"
    assert_whole(result.checkpoint_dir, 2)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert signal.getsignal(signal.SIGINT) is before and no_partials(tmp_path) == []


def test_a_second_ctrl_c_aborts_at_once_without_a_partial_checkpoint(tmp_path):
    def twice():
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)

    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        run_finetune(tiny(tmp_path), callbacks=[At(2, twice)])
    assert signal.getsignal(signal.SIGINT) is before
    assert not (tmp_path / "adapter").exists() and no_partials(tmp_path) == []


def test_stop_requested_from_another_thread_while_training_runs_in_a_worker(tmp_path):
    """The Studio: training in a worker thread (no signal handlers there), Stop pressed in the kernel's thread."""
    stop, first_step_done, outcome = GracefulStop(), threading.Event(), {}

    class Tell(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            first_step_done.set()

    worker = threading.Thread(target=lambda: outcome.update(result=run_finetune(tiny(tmp_path, steps=6),
                                                                                 callbacks=[stop, Tell()])))
    handler = signal.getsignal(signal.SIGTERM)
    worker.start()
    assert first_step_done.wait(300)
    stop.request()
    worker.join(300)
    result = outcome["result"]
    step = result.trainer.state.global_step
    assert result.stopped == "requested" and 1 <= step < 6
    assert_whole(tmp_path / "checkpoints" / f"checkpoint-{step}", step)
    assert signal.getsignal(signal.SIGTERM) is handler


def test_sigterm_to_the_cli_leaves_a_whole_checkpoint_and_resume_continues_it(tmp_path):
    out = tmp_path / "run"
    options = ["--no-load-in-4bit", "--gradient-checkpointing", "false", "--max-seq-length", "64", "--batch-size", "2",
               "--logging-steps", "1", "--output", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(tmp_path / "stderr.txt", "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "slothbook", "finetune", "--steps", "200", *options],
                                stdout=subprocess.PIPE, stderr=err, text=True, env=env)
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("step     2 | loss"):
                proc.send_signal(signal.SIGTERM)
                break
        stdout = "".join(lines) + proc.stdout.read()
        code = proc.wait(300)
    stderr = (tmp_path / "stderr.txt").read_text()
    assert code == 143, stderr[-3000:]
    step = len([line for line in stdout.splitlines() if line.startswith("step ")])
    assert step >= 2 and f"stopped by SIGTERM at step {step} of 200" in stderr and "--resume" in stderr
    assert_whole(out / "checkpoints" / f"checkpoint-{step}", step)
    assert f"adapter saved to {out / 'adapter'}" in stdout and no_partials(out) == []

    resumed = subprocess.run([sys.executable, "-m", "slothbook", "finetune", "--resume", "--steps", str(step + 1),
                              *options], capture_output=True, text=True, env=env, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"step {step + 1:>5} | loss" in resumed.stdout and f"step {step:>5} | loss" not in resumed.stdout


def test_a_crash_while_writing_a_checkpoint_keeps_the_previous_one_whole(tmp_path, monkeypatch):
    model, tok = FastLanguageModel.from_pretrained("smollm2-135m", max_seq_length=64, load_in_4bit=False)
    model = FastLanguageModel.get_peft_model(model, r=8, use_gradient_checkpointing=False)
    dataset, tok = load_training_dataset(FinetuneConfig(), tok)
    folder = tmp_path / "checkpoints"
    args = TrainArgs(output_dir=str(folder), max_steps=6, per_device_train_batch_size=2, max_seq_length=64,
                     logging_steps=1, save_steps=2, save_total_limit=1, warmup_steps=0)

    def disk_full(obj, f, *a, **k):
        Path(f).write_bytes(b"\0" * 16)  # half a file, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device", str(f))

    class FillDiskAtStep6(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 6:
                monkeypatch.setattr(torch, "save", disk_full)

    trainer = build_trainer(model, tok, dataset, args, callbacks=[FillDiskAtStep6()])
    with pytest.raises(OSError, match="No space left"):
        trainer.train()
    # checkpoint-2 was rotated out only once checkpoint-4 was whole; the failed checkpoint-6 left nothing behind.
    assert sorted(p.name for p in folder.iterdir() if p.is_dir()) == ["checkpoint-4"]
    monkeypatch.undo()
    assert_whole(folder / "checkpoint-4", 4)
    assert no_partials(folder) == []


DDP_WORKER = '''
import json, sys, torch
from pathlib import Path
from datasets import Dataset
from slothbook import FastLanguageModel
from slothbook.data import demo_dataset_path
from slothbook.train.job import save_adapter
from slothbook.train.sft import TrainArgs, build_trainer

torch.set_num_threads(1)
rows = [json.loads(line)["text"] for line in demo_dataset_path().read_text().splitlines() if line.strip()][:32]
model, tok = FastLanguageModel.from_pretrained(sys.argv[1], max_seq_length=64, dtype=torch.float32, load_in_4bit=False)
model = FastLanguageModel.get_peft_model(model, r=8, use_gradient_checkpointing=False)
out = Path(sys.argv[2])
args = TrainArgs(output_dir=str(out / "checkpoints"), max_steps=4, per_device_train_batch_size=1, max_seq_length=64,
                 logging_steps=1, warmup_steps=0, save_steps=2, save_total_limit=1, disable_tqdm=True)
build_trainer(model, tok, Dataset.from_dict({"text": rows}), args).train()
save_adapter(model, tok, out / "adapter")
'''


def test_two_ddp_ranks_write_one_whole_checkpoint_and_one_adapter(tmp_path, train_model_name):
    """torchrun, two gloo processes on the CPU: each rank's RNG state lands in the one checkpoint, rank 0 renames."""
    import socket

    from slothbook.models.loader import resolve_source

    (tmp_path / "worker.py").write_text(DDP_WORKER)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
                          "127.0.0.1", "--master-port", str(port), str(tmp_path / "worker.py"),
                          resolve_source(train_model_name), str(tmp_path / "out")],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    folder = tmp_path / "out" / "checkpoints"
    assert sorted(p.name for p in folder.iterdir() if p.is_dir()) == ["checkpoint-4"]
    checkpoint = folder / "checkpoint-4"
    assert (checkpoint / "rng_state_0.pth").is_file() and (checkpoint / "rng_state_1.pth").is_file()
    for name in ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json"):
        assert (checkpoint / name).is_file(), name
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()
    assert no_partials(tmp_path / "out") == []
