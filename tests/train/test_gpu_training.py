"""On a CUDA GPU: 4-bit loading, forward/backward and a few SFT steps of the embedded model in bf16/fp16."""

from __future__ import annotations

import pytest
import torch

from slothbook import FastLanguageModel
from slothbook.train.job import FinetuneConfig, run_finetune

pytestmark = pytest.mark.gpu


def test_4bit_load_on_gpu_uses_nf4_and_compute_dtype(train_model_name):
    import bitsandbytes as bnb

    model, _ = FastLanguageModel.from_pretrained(train_model_name, load_in_4bit=True)
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, bnb.nn.Linear4bit) and q_proj.weight.device.type == "cuda"
    expected = torch.bfloat16 if torch.cuda.get_device_capability()[0] >= 8 else torch.float16
    assert q_proj.compute_dtype == expected and model.lm_head.weight.dtype == expected


@pytest.mark.parametrize("load_in_4bit", [True, False], ids=["qlora", "lora16"])
def test_forward_backward_on_gpu(load_in_4bit, train_model_name):
    model, tok = FastLanguageModel.from_pretrained(train_model_name, max_seq_length=512, load_in_4bit=load_in_4bit)
    model = FastLanguageModel.get_peft_model(model, r=16)
    ids = torch.randint(3, len(tok), (2, 256), device="cuda")
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


def test_few_steps_of_training_on_gpu(tmp_path, train_model_name):
    cfg = FinetuneConfig(model=train_model_name, steps=12, max_seq_length=256, batch_size=8, lr=5e-4, logging_steps=2,
                         output=str(tmp_path / "run"))
    result = run_finetune(cfg)
    assert len(result.losses) == 6 and result.losses[-1] < result.losses[0]
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()
