"""Every supported family: a tiny random model loads through slothbook, takes LoRA, and trains one step."""

from __future__ import annotations

import pytest
import torch

from slothbook import FastLanguageModel
from slothbook.models.families import FAMILIES
from slothbook.models.families.tiny import save_tiny_model


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
@pytest.mark.parametrize("load_in_4bit", [False, True], ids=["lora16", "qlora"])
def test_family_forward_backward(model_type, load_in_4bit, tmp_path, embedded_tokenizer):
    save_tiny_model(model_type, tmp_path, embedded_tokenizer)
    model, tok = FastLanguageModel.from_pretrained(str(tmp_path), max_seq_length=64, load_in_4bit=load_in_4bit)
    model = FastLanguageModel.get_peft_model(model, r=4)
    ids = torch.randint(3, len(tok), (2, 24))
    loss = model(input_ids=ids, labels=ids).loss
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if p.requires_grad and "lora_A" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    b_grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in b_grads)
