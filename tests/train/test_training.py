"""Training the real embedded model on the bundled dataset: the loss falls, adapters round-trip."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel

from slothbook import FastLanguageModel
from slothbook.train.job import FinetuneConfig, run_finetune


def _first_last(losses):
    return sum(losses[:2]) / 2, sum(losses[-2:]) / 2


@pytest.mark.parametrize("load_in_4bit", [True, False], ids=["qlora", "lora16"])
def test_thirty_steps_lower_the_loss_and_adapter_round_trips(load_in_4bit, tmp_path):
    cfg = FinetuneConfig(load_in_4bit=load_in_4bit, steps=30, max_seq_length=128, batch_size=4, lr=5e-4,
                         logging_steps=3, output=str(tmp_path / "run"))
    result = run_finetune(cfg)
    first, last = _first_last(result.losses)
    assert len(result.losses) == 10 and last < 0.8 * first, result.losses

    trained = result.model
    FastLanguageModel.for_inference(trained)
    ids = result.tokenizer("What is 12 + 7?", return_tensors="pt").input_ids
    with torch.no_grad():
        expected = trained(input_ids=ids).logits

    base, _ = FastLanguageModel.from_pretrained("smollm2-135m", max_seq_length=128, load_in_4bit=load_in_4bit)
    reloaded = PeftModel.from_pretrained(base, result.adapter_dir).eval()
    with torch.no_grad():
        got = reloaded(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_existing_adapter_is_not_overwritten(tmp_path):
    from slothbook.errors import ConfigError

    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_model.safetensors").write_bytes(b"user's work")
    with pytest.raises(ConfigError, match="overwrite"):
        run_finetune(FinetuneConfig(steps=1, output=str(tmp_path)))
    assert (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes() == b"user's work"
