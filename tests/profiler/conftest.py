"""Fixtures of the profiler tests: the real model (4-bit and 16-bit) with LoRA, on the CPU, and a step runner."""

from __future__ import annotations

import pytest
import torch

SEQ = 32


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: these steps are tiny, and on a shared 2-core machine two OpenMP threads spinning
    against other processes make a step ten times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def load_lora_model(name: str, load_in_4bit: bool, checkpointing=True):
    from slothbook import FastLanguageModel

    model, _ = FastLanguageModel.from_pretrained(name, load_in_4bit=load_in_4bit, max_seq_length=512,
                                                 dtype=torch.float32, device_map={"": "cpu"}, kernels=False)
    return FastLanguageModel.get_peft_model(model, r=16, use_gradient_checkpointing=checkpointing)


@pytest.fixture(scope="session")
def lora_model_loader():
    """load_lora_model(name, load_in_4bit, checkpointing=True): a fresh LoRA model on the CPU."""
    return load_lora_model


@pytest.fixture(scope="session")
def model16(train_model_name):
    return load_lora_model(train_model_name, load_in_4bit=False)


@pytest.fixture(scope="session")
def model4(train_model_name):
    return load_lora_model(train_model_name, load_in_4bit=True)


def _adamw(model):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)


def _run_steps(model, optimizer, seq_len: int = SEQ, steps: int = 2, batch_size: int = 1, profiler=None):
    """Plain training steps on random tokens; `profiler.step()` closes each one."""
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    for _ in range(steps):
        ids = torch.randint(0, vocab, (batch_size, seq_len), generator=gen)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if profiler is not None:
            profiler.step()


@pytest.fixture
def adamw():
    """adamw(model): AdamW over the model's trainable parameters."""
    return _adamw


@pytest.fixture
def run_steps():
    """run_steps(model, optimizer, seq_len=SEQ, steps=2, batch_size=1, profiler=None)."""
    return _run_steps
