"""get_peft_model's use_gradient_checkpointing modes switch cleanly and give the same LoRA gradients."""

from __future__ import annotations

import warnings

import pytest
import torch
from datasets import Dataset

from slothbook import FastLanguageModel
from slothbook.train.checkpointing import set_gradient_checkpointing
from slothbook.train.sft import TrainArgs, build_trainer
from lora_steps import lora_grads


def test_modes_switch_and_agree():
    model, tok = FastLanguageModel.from_pretrained("smollm2-135m", max_seq_length=64)
    model = FastLanguageModel.get_peft_model(model, r=4, use_gradient_checkpointing="slothbook")
    layer = model.base_model.model.model.layers[0]
    assert "forward" in vars(layer)  # the offload wrapper sits on the instance
    with torch.random.fork_rng():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.02)  # so lora_A gets a gradient too
    ids = torch.randint(3, len(tok), (2, 16))
    offloaded = lora_grads(model, ids)[1]

    set_gradient_checkpointing(model, True)
    assert "forward" not in vars(layer)
    plain = lora_grads(model, ids)[1]

    set_gradient_checkpointing(model, False)
    none = lora_grads(model, ids)[1]
    for name in offloaded:
        assert torch.equal(offloaded[name], plain[name]), name
        torch.testing.assert_close(offloaded[name], none[name], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("mode", [False, True])
def test_the_trainer_keeps_the_models_choice(mode, tmp_path):
    """TRL defaults its Trainer to switching transformers' checkpointing on; get_peft_model's choice stands instead,
    and transformers >= 5.25 has nothing to warn about a renamed field."""
    model, tok = FastLanguageModel.from_pretrained("smollm2-135m", max_seq_length=64)
    model = FastLanguageModel.get_peft_model(model, r=4, use_gradient_checkpointing=mode)
    args = TrainArgs(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=1, max_seq_length=64,
                     logging_steps=1, warmup_steps=0, save_steps=0, disable_tqdm=True)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        build_trainer(model, tok, Dataset.from_dict({"text": ["a short line of text to train on"] * 4}), args).train()
    layers = model.base_model.model.model.layers
    assert {bool(getattr(layer, "gradient_checkpointing", False)) for layer in layers} == {mode}
    assert not [str(w.message) for w in record if "checkpointing` is deprecated" in str(w.message)]
