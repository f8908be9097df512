"""heal_tokenizer and get_chat_template on the real SmolLM2 tokenizer (pad == eos == <|im_end|> out of the box)."""

from __future__ import annotations

import logging

import pytest

from slothbook.data import TEMPLATES, get_chat_template, heal_tokenizer


def notices(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "slothbook.data" and r.levelno >= logging.WARNING]


def test_pad_equal_to_eos_gets_a_distinct_token(tokenizer, caplog):
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"
    template = tokenizer.chat_template
    heal_tokenizer(tokenizer)
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.pad_token_id == 0
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.chat_template == template  # its own template is kept
    (line,) = notices(caplog)
    assert "pad '<|im_end|>' -> '<|endoftext|>'" in line and "\n" not in line


def test_healthy_tokenizer_is_left_alone(tokenizer, caplog):
    heal_tokenizer(tokenizer)
    caplog.clear()
    heal_tokenizer(tokenizer)
    assert notices(caplog) == []


def test_missing_pad_is_chosen(tokenizer):
    tokenizer.pad_token = None
    heal_tokenizer(tokenizer)
    assert tokenizer.pad_token == "<|endoftext|>"


def test_missing_template_is_chosen_from_the_vocabulary(tokenizer, caplog):
    tokenizer.chat_template = None
    heal_tokenizer(tokenizer)
    assert tokenizer.chat_template == TEMPLATES["chatml"].template  # the vocabulary has <|im_start|>/<|im_end|>
    assert len(tokenizer) == 49152  # nothing added
    assert "no chat template: using chatml" in notices(caplog)[0]


def test_eos_the_template_does_not_end_on_is_fixed(tokenizer, caplog):
    tokenizer.eos_token = "<|endoftext|>"
    heal_tokenizer(tokenizer)
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token != tokenizer.eos_token
    assert "eos '<|endoftext|>' -> '<|im_end|>'" in notices(caplog)[0]


def test_named_template_adds_only_missing_tokens_and_says_so(tokenizer, caplog):
    get_chat_template(tokenizer, "llama-3")
    assert len(tokenizer) == 49152 + 4
    for marker in ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"):
        assert len(tokenizer.encode(marker, add_special_tokens=False)) == 1
    assert tokenizer.eos_token == "<|eot_id|>"
    assert tokenizer.pad_token not in (tokenizer.eos_token, "<|im_end|>")
    (line,) = notices(caplog)
    assert "added special tokens" in line and "resize_token_embeddings(49156)" in line


def test_named_template_present_in_vocabulary_adds_nothing(tokenizer):
    get_chat_template(tokenizer, "qwen-2.5")
    assert len(tokenizer) == 49152
    assert (tokenizer.eos_token, tokenizer.pad_token) == ("<|im_end|>", "<|endoftext|>")


def test_no_name_keeps_the_own_template(tokenizer):
    template = tokenizer.chat_template
    get_chat_template(tokenizer)
    assert tokenizer.chat_template == template


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_eos_matches_what_replies_end_on(name, tokenizer, conversation):
    get_chat_template(tokenizer, name)
    text = tokenizer.apply_chat_template(conversation, tokenize=False)
    assert text.rstrip().endswith(tokenizer.eos_token)
    assert tokenizer.pad_token != tokenizer.eos_token
