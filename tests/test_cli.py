"""`slothbook finetune` as a user runs it: a real subprocess on the embedded model."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from peft import PeftModel

from slothbook import FastLanguageModel


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "slothbook", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=900)


def test_finetune_prints_loss_memory_summary_and_saves_a_loadable_adapter(tmp_path):
    out = tmp_path / "run"
    result = run_cli("finetune", "--steps", "4", "--logging-steps", "2", "--max-seq-length", "96",
                     "--output", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step     2 | loss" in result.stdout and "step     4 | loss" in result.stdout
    for category in ("weights", "LoRA", "gradients", "optimizer", "activations"):
        assert category.lower() in result.stdout.lower(), result.stdout
    assert f"adapter saved to {out / 'adapter'}" in result.stdout
    base, tok = FastLanguageModel.from_pretrained("smollm2-135m", max_seq_length=96, load_in_4bit=True)
    model = PeftModel.from_pretrained(base, out / "adapter").eval()
    with torch.no_grad():
        assert torch.isfinite(model(**tok("Hello", return_tensors="pt")).logits).all()


def test_chat_dataset_with_template_and_responses_only(tmp_path):
    rows = [{"instruction": f"Add {a} and {b}.", "input": "", "output": f"{a + b}"} for a in range(6) for b in range(4)]
    data = tmp_path / "alpaca.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    result = run_cli("finetune", "--dataset", str(data), "--chat-template", "chatml", "--responses-only",
                     "--steps", "2", "--logging-steps", "1", "--max-seq-length", "64", "--output", str(tmp_path / "o"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "alpaca shape" in result.stdout and "adapter saved" in result.stdout


def test_dataset_without_the_text_field_lists_its_fields(tmp_path):
    data = tmp_path / "odd.csv"
    data.write_text("question,answer_text\nwhy,because\n")
    result = run_cli("finetune", "--dataset", str(data), "--steps", "1", "--output", str(tmp_path / "o"))
    assert result.returncode == 2
    assert "question" in result.stderr and "answer_text" in result.stderr and "--text-field" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_dataset_file_is_a_clear_error(tmp_path):
    result = run_cli("finetune", "--dataset", str(tmp_path / "nope.jsonl"), "--steps", "1")
    assert result.returncode == 2 and "nope.jsonl" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("args, words", [(["--r", "0"], "rank"), (["--max-seq-length", "0"], "max_seq_length"),
                                         (["--model", "/no/such/model"], "does not exist")])
def test_bad_options_are_clear_errors(tmp_path, args, words):
    result = run_cli("finetune", *args, "--steps", "1", "--output", str(tmp_path / "o"))
    assert result.returncode == 2 and words in result.stderr and "Traceback" not in result.stderr


def test_gpu_command_lists_a_device():
    result = run_cli("gpu")
    assert result.returncode == 0 and ("CPU" in result.stdout or "cuda:0" in result.stdout)


def test_estimate_command_prints_categories_and_fit():
    result = run_cli("estimate", "--seq", "1024", "--batch", "2", "--gpu-memory-gib", "8")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "predicted peak" in result.stdout and "fits in 8 GiB: seq_len" in result.stdout
