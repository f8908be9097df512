"""Every template renders what its model family expects, through the tokenizer's own apply_chat_template."""

from __future__ import annotations

import pytest

from slothbook.data import TEMPLATES, get_chat_template, template_spec
from slothbook.errors import ConfigError

# The conversation fixture rendered by hand in each family's format.
EXPECTED = {
    "chatml": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
    "<|im_start|>assistant\nHello!\n\nHow can I help?<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
    "<|im_start|>assistant\n4<|im_end|>\n",
    "qwen-2.5": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
    "<|im_start|>assistant\nHello!\n\nHow can I help?<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
    "<|im_start|>assistant\n4<|im_end|>\n",
    "llama-3": "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\nHello!\n\nHow can I help?<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n4<|eot_id|>",
    "llama-2": "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi there [/INST] Hello!\n\nHow can I help? </s>"
    "<s>[INST] What is 2+2? [/INST] 4 </s>",
    "mistral": "<s>[INST] Be brief.\n\nHi there [/INST] Hello!\n\nHow can I help?</s>[INST] What is 2+2? [/INST] 4</s>",
    "gemma": "<bos><start_of_turn>user\nBe brief.\n\nHi there<end_of_turn>\n<start_of_turn>model\n"
    "Hello!\n\nHow can I help?<end_of_turn>\n<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n"
    "<start_of_turn>model\n4<end_of_turn>\n",
    "phi-3": "<|system|>\nBe brief.<|end|>\n<|user|>\nHi there<|end|>\n"
    "<|assistant|>\nHello!\n\nHow can I help?<|end|>\n<|user|>\nWhat is 2+2?<|end|>\n<|assistant|>\n4<|end|>\n",
    "zephyr": "<|system|>\nBe brief.</s>\n<|user|>\nHi there</s>\n<|assistant|>\nHello!\n\nHow can I help?</s>\n"
    "<|user|>\nWhat is 2+2?</s>\n<|assistant|>\n4</s>\n",
    "vicuna": "Be brief. USER: Hi there ASSISTANT: Hello!\n\nHow can I help?</s>USER: What is 2+2? ASSISTANT: 4</s>",
    # Alpaca is plain text: replies end on the tokenizer's own eos (SmolLM2: <|im_end|>).
    "alpaca": "Be brief.\n\n### Instruction:\nHi there\n\n### Response:\nHello!\n\nHow can I help?<|im_end|>\n\n"
    "### Instruction:\nWhat is 2+2?\n\n### Response:\n4<|im_end|>",
}

# How a prompt for the next reply ends (add_generation_prompt=True after the second user turn).
PROMPT_END = {
    "chatml": "What is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "qwen-2.5": "What is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "llama-3": "What is 2+2?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
    "llama-2": "<s>[INST] What is 2+2? [/INST]",
    "mistral": "</s>[INST] What is 2+2? [/INST]",
    "gemma": "What is 2+2?<end_of_turn>\n<start_of_turn>model\n",
    "phi-3": "What is 2+2?<|end|>\n<|assistant|>\n",
    "zephyr": "What is 2+2?</s>\n<|assistant|>\n",
    "vicuna": "USER: What is 2+2? ASSISTANT:",
    "alpaca": "### Instruction:\nWhat is 2+2?\n\n### Response:\n",
}

# Families without a system message: the default system prompt they render instead.
DEFAULT_SYSTEM_START = {
    "qwen-2.5": "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n",
    "vicuna": "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions. USER: Hi there",
    "alpaca": "Below is an instruction that describes a task. Write a response that appropriately completes the "
    "request.\n\n### Instruction:\nHi there",
}


def test_every_template_has_an_expected_rendering():
    assert set(EXPECTED) == set(TEMPLATES) == set(PROMPT_END)


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_renders_the_family_format(name, tokenizer, conversation):
    get_chat_template(tokenizer, name)
    assert tokenizer.apply_chat_template(conversation, tokenize=False) == EXPECTED[name]


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_generation_prompt(name, tokenizer, conversation):
    get_chat_template(tokenizer, name)
    prompt = tokenizer.apply_chat_template(conversation[:4], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith(PROMPT_END[name])


@pytest.mark.parametrize("name", sorted(DEFAULT_SYSTEM_START))
def test_default_system_prompt(name, tokenizer, conversation):
    get_chat_template(tokenizer, name)
    assert tokenizer.apply_chat_template(conversation[1:], tokenize=False).startswith(DEFAULT_SYSTEM_START[name])


@pytest.mark.parametrize("alias,name", [("Llama3", "llama-3"), ("qwen2.5", "qwen-2.5"), ("PHI_3", "phi-3"),
                                        ("ChatML", "chatml"), ("llama-3.1", "llama-3")])
def test_names_are_forgiving(alias, name):
    assert template_spec(alias).name == name


def test_unknown_name_lists_the_choices():
    with pytest.raises(ConfigError, match="chatml.*alpaca"):
        template_spec("gpt-17")
