"""Every dataset shape converts to one messages format; an unknown shape names its columns."""

from __future__ import annotations

import datasets
import pytest

from slothbook.data import detect_shape, standardize
from slothbook.errors import DatasetError

EXCHANGE = [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Hi"}]


def convert(rows):
    dataset = datasets.Dataset.from_list(rows)
    return detect_shape(dataset), standardize(dataset)


def test_alpaca_with_and_without_input():
    shape, out = convert([
        {"instruction": "Reverse the word.", "input": "cat", "output": "tac"},
        {"instruction": "Say hi", "input": "", "output": "Hi"},
    ])
    assert shape == "alpaca" and out.column_names == ["messages"]
    assert out[0]["messages"] == [{"role": "user", "content": "Reverse the word.\n\ncat"},
                                  {"role": "assistant", "content": "tac"}]
    assert out[1]["messages"] == EXCHANGE


def test_sharegpt_speakers_are_mapped():
    shape, out = convert([{"conversations": [
        {"from": "system", "value": "Be kind."}, {"from": "human", "value": "Say hi"}, {"from": "gpt", "value": "Hi"},
    ]}])
    assert shape == "sharegpt"
    assert out[0]["messages"] == [{"role": "system", "content": "Be kind."}, *EXCHANGE]


def test_openai_messages_with_text_parts():
    shape, out = convert([{"messages": EXCHANGE}])
    assert shape == "openai" and out[0]["messages"] == EXCHANGE
    # Arrow keeps one type per column, so typed parts come in a dataset of their own.
    shape, out = convert([{"messages": [
        {"role": "user", "content": [{"type": "text", "text": "Say "}, {"type": "text", "text": "hi"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Hi"}]},
    ]}])
    assert shape == "openai" and out[0]["messages"] == EXCHANGE


def test_plain_prompt_completion():
    shape, out = convert([{"prompt": "Say hi", "completion": "Hi"}])
    assert shape == "prompt-completion" and out[0]["messages"] == EXCHANGE


def test_conversational_prompt_completion():
    shape, out = convert([{"prompt": EXCHANGE[:1], "completion": EXCHANGE[1:]}])
    assert shape == "prompt-completion" and out[0]["messages"] == EXCHANGE


def test_plain_text_is_kept():
    shape, out = convert([{"text": "Once upon a time", "source": "x"}])
    assert shape == "text" and out.column_names == ["text"] and out[0]["text"] == "Once upon a time"


def test_unrecognised_shape_lists_the_columns():
    with pytest.raises(DatasetError, match=r"\['question', 'answer_text'\]"):
        convert([{"question": "?", "answer_text": "!"}])


def test_unknown_speaker_names_the_row():
    rows = [{"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]},
            {"conversations": [{"from": "narrator", "value": "a"}]}]
    with pytest.raises(DatasetError, match="Row 1: unknown speaker 'narrator'"):
        convert(rows)
