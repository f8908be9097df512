"""Export fixtures: the embedded SmolLM2-135M after a short real LoRA fine-tune, shared by the whole session."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest
import torch

TRAIN_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Slothbook exports fine-tuned models to GGUF for llama.cpp and Ollama.",
    "Le renard brun saute par-dessus le chien paresseux.",
]
LORA_RANK = 8


@contextlib.contextmanager
def one_thread():
    """One torch thread. On a shared 2-core machine, two spinning threads per process make a 135M forward pass
    10-15x slower than one thread (measured: 0.19 s vs 2-3 s); llama.cpp gets n_threads=1 in these tests too."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module", autouse=True)
def one_cpu_thread():
    with one_thread():
        yield


def _exact_logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits computed with the model's exact arithmetic.

    Train mode with every dropout at 0 changes nothing in a Llama forward, but it keeps bitsandbytes off its
    CPU inference path, which repacks 4-bit weights in place with bf16 block scales and computes in bf16
    (a lossy shortcut that is not the model's math). Grad stays off.
    """
    was_training = model.training
    model.train()
    try:
        with torch.no_grad():
            return model(input_ids=input_ids).logits.float()
    finally:
        model.train(was_training)


@pytest.fixture(scope="session")
def exact_logits():
    """`exact_logits(model, input_ids)`: see _exact_logits."""
    return _exact_logits


def _lora_model(load_in_4bit: bool):
    from slothbook import FastLanguageModel

    model, tokenizer = FastLanguageModel.from_pretrained("smollm2-135m", load_in_4bit=load_in_4bit, max_seq_length=256)
    peft_model = FastLanguageModel.get_peft_model(model, r=LORA_RANK, lora_alpha=16, use_gradient_checkpointing=False)
    return peft_model, tokenizer


@pytest.fixture(scope="session")
def finetuned():
    """The fp32 embedded model with LoRA r=8 trained 10 AdamW steps on a few sentences (lora_B becomes non-zero)."""
    with one_thread():
        return _finetune()


def _finetune():
    torch.manual_seed(0)
    model, tokenizer = _lora_model(load_in_4bit=False)
    batch = tokenizer(TRAIN_TEXTS, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    probe = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    before = _exact_logits(model, probe)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    losses = []
    for _ in range(10):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    from peft import get_peft_model_state_dict

    adapter = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
    shift = (_exact_logits(model, probe) - before).abs().max().item()
    return SimpleNamespace(model=model, tokenizer=tokenizer, adapter=adapter, losses=losses, logit_shift=shift)


@pytest.fixture(scope="session")
def finetuned_4bit(finetuned):
    """The same trained adapter on the NF4 (QLoRA) base: real NF4 weights, real trained LoRA weights.

    The adapter is copied rather than trained again to keep the suite fast on two cores.
    """
    from peft import set_peft_model_state_dict

    with one_thread():
        model, tokenizer = _lora_model(load_in_4bit=True)
    set_peft_model_state_dict(model, finetuned.adapter)
    return SimpleNamespace(model=model, tokenizer=tokenizer)


@pytest.fixture(scope="session")
def merged16_dir(finetuned, tmp_path_factory):
    """The fine-tune merged to 16-bit (fp32 here: the CPU model's dtype) in shards of 100 MB."""
    from slothbook.export import save_pretrained_merged

    path = tmp_path_factory.mktemp("export") / "merged16"
    with one_thread():
        save_pretrained_merged(finetuned.model, path, finetuned.tokenizer, save_method="merged_16bit",
                               max_shard_size="100MB")
    return path


@pytest.fixture(scope="session")
def merged16_model(merged16_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(merged16_dir).eval()


@pytest.fixture(scope="session")
def gguf_files(finetuned, tmp_path_factory):
    """f16, q8_0 and q4_k_m GGUFs of the fine-tune, written in one call."""
    from slothbook.export import save_pretrained_gguf

    folder = tmp_path_factory.mktemp("export") / "gguf"
    with one_thread():
        paths = save_pretrained_gguf(finetuned.model, folder, finetuned.tokenizer, ["f16", "q8_0", "q4_k_m"])
    return dict(zip(["f16", "q8_0", "q4_k_m"], paths))
