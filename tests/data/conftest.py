"""Fixtures of the data tests: fresh tokenizers (templates mutate them) and the real embedded model in fp32."""

from __future__ import annotations

import copy

import pytest


@pytest.fixture
def tokenizer(embedded_tokenizer):
    """A fresh copy of the SmolLM2 tokenizer for each test: get_chat_template and heal_tokenizer change it."""
    return copy.deepcopy(embedded_tokenizer)


@pytest.fixture(scope="session")
def model(embedded_dir):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(embedded_dir, dtype=torch.float32, attn_implementation="sdpa")
    return model.eval()


@pytest.fixture
def conversation():
    """A system prompt and two exchanges; the first reply spans lines."""
    return [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!\n\nHow can I help?"},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
    ]


def _learned_runs(tokenizer, input_ids, labels) -> list[str]:
    """The decoded runs of consecutive tokens whose label is not -100 (labels equal input_ids where learned)."""
    runs, current = [], []
    for token, label in zip(list(input_ids), list(labels)):
        if label != -100:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(run) for run in runs]


@pytest.fixture
def learned_runs():
    return _learned_runs
