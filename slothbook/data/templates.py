"""Chat templates of the common model families, written as small Jinja strings.

Each template renders a list of `{"role", "content"}` messages the way its family was trained to read them.
A `TemplateSpec` also says which token ends an assistant turn (the eos a tokenizer must stop on) and which
marker strings must be single tokens of the vocabulary (they are added as special tokens where missing).
Families whose format is plain text (Alpaca) end turns on the tokenizer's own eos: `eos=None`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

from ..errors import ConfigError


@dataclass(frozen=True)
class TemplateSpec:
    name: str
    template: str
    eos: str | None  # the token an assistant turn ends on; None: the tokenizer's own eos
    tokens: tuple[str, ...]  # strings the template needs as single tokens


def _lit(text: str) -> str:
    """A Python string as a Jinja string literal."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


def _split_system(default: str | None = None) -> str:
    """Sets `system` (the leading system message, else `default`) and `turns` (the other messages)."""
    return (
        "{%- if messages and messages[0]['role'] == 'system' -%}"
        "{%- set system = messages[0]['content'] -%}{%- set turns = messages[1:] -%}"
        "{%- else -%}{%- set system = " + (_lit(default) if default is not None else "none") + " -%}"
        "{%- set turns = messages -%}{%- endif -%}"
    )


def _user_content(before: str, between: str) -> str:
    """Sets `content`: the message, with `before + system + between` prepended on the first turn.

    For families without a system role (Llama-2 wraps it in <<SYS>>, Mistral and Gemma prepend it).
    """
    return (
        "{%- if loop.first and system is not none -%}"
        "{%- set content = " + _lit(before) + " + system + " + _lit(between) + " + message['content'] -%}"
        "{%- else -%}{%- set content = message['content'] -%}{%- endif -%}"
    )


def _generation_prompt(text: str) -> str:
    return "{%- if add_generation_prompt -%}{{ " + _lit(text) + " }}{%- endif -%}"


def _chatml(default_system: str | None = None) -> str:
    head = ""
    if default_system is not None:
        head = (
            "{%- if not messages or messages[0]['role'] != 'system' -%}"
            "{{ " + _lit(f"<|im_start|>system\n{default_system}<|im_end|>\n") + " }}{%- endif -%}"
        )
    return head + (
        "{%- for message in messages -%}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
        "{%- endfor -%}"
    ) + _generation_prompt("<|im_start|>assistant\n")


def _role_tags(end: str) -> str:
    """`<|role|>` newline content `end` newline, per message: the layout Phi-3 and Zephyr share."""
    return (
        "{%- for message in messages -%}"
        "{{ '<|' + message['role'] + '|>\\n' + message['content'] + " + _lit(end + "\n") + " }}"
        "{%- endfor -%}"
    ) + _generation_prompt("<|assistant|>\n")


_LLAMA3 = (
    "{{- '<|begin_of_text|>' -}}"
    "{%- for message in messages -%}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' }}"
    "{%- endfor -%}"
) + _generation_prompt("<|start_header_id|>assistant<|end_header_id|>\n\n")

# Llama-2: every exchange opens with <s>, the system prompt sits in a <<SYS>> block of the first user turn.
_LLAMA2 = (
    _split_system()
    + "{%- for message in turns -%}"
    "{%- if message['role'] == 'user' -%}"
    + _user_content("<<SYS>>\n", "\n<</SYS>>\n\n")
    + "{{ '<s>[INST] ' + content | trim + ' [/INST]' }}"
    "{%- else -%}{{ ' ' + message['content'] | trim + ' </s>' }}{%- endif -%}"
    "{%- endfor -%}"
)

# Mistral (v0.1 layout): one <s>, the system prompt prepended to the first user turn.
_MISTRAL = (
    _split_system()
    + "{{- '<s>' -}}"
    "{%- for message in turns -%}"
    "{%- if message['role'] == 'user' -%}"
    + _user_content("", "\n\n")
    + "{{ '[INST] ' + content + ' [/INST]' }}"
    "{%- else -%}{{ ' ' + message['content'] + '</s>' }}{%- endif -%}"
    "{%- endfor -%}"
)

# Gemma: the assistant is called "model"; no system role, so it is prepended to the first user turn.
_GEMMA = (
    _split_system()
    + "{{- '<bos>' -}}"
    "{%- for message in turns -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    + _user_content("", "\n\n")
    + "{{ '<start_of_turn>' + role + '\\n' + content | trim + '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
) + _generation_prompt("<start_of_turn>model\n")

_VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
_VICUNA = (
    _split_system(_VICUNA_SYSTEM)
    + "{{- system + ' ' -}}"
    "{%- for message in turns -%}"
    "{%- if message['role'] == 'user' -%}{{ 'USER: ' + message['content'] + ' ' }}"
    "{%- else -%}{{ 'ASSISTANT: ' + message['content'] + '</s>' }}{%- endif -%}"
    "{%- endfor -%}"
) + _generation_prompt("ASSISTANT:")

_ALPACA_SYSTEM = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)
# Alpaca is plain text: a response ends on whatever eos the tokenizer has.
_ALPACA = (
    _split_system(_ALPACA_SYSTEM)
    + "{{- system + '\\n\\n' -}}"
    "{%- for message in turns -%}"
    "{%- if message['role'] == 'user' -%}{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}"
    "{%- else -%}{{ '### Response:\\n' + message['content'] + eos_token }}"
    "{%- if not loop.last -%}{{ '\\n\\n' }}{%- endif -%}{%- endif -%}"
    "{%- endfor -%}"
) + _generation_prompt("### Response:\n")

_QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

TEMPLATES: dict[str, TemplateSpec] = {
    spec.name: spec
    for spec in (
        TemplateSpec("chatml", _chatml(), "<|im_end|>", ("<|im_start|>", "<|im_end|>")),
        TemplateSpec(
            "llama-3", _LLAMA3, "<|eot_id|>",
            ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
        ),
        TemplateSpec("llama-2", _LLAMA2, "</s>", ("<s>", "</s>")),
        TemplateSpec("mistral", _MISTRAL, "</s>", ("<s>", "</s>")),
        TemplateSpec("gemma", _GEMMA, "<end_of_turn>", ("<bos>", "<start_of_turn>", "<end_of_turn>")),
        TemplateSpec(
            "phi-3", _role_tags("<|end|>"), "<|end|>", ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
        ),
        TemplateSpec("qwen-2.5", _chatml(_QWEN_SYSTEM), "<|im_end|>", ("<|im_start|>", "<|im_end|>")),
        TemplateSpec("zephyr", _role_tags("</s>"), "</s>", ("</s>",)),
        TemplateSpec("vicuna", _VICUNA, "</s>", ("</s>",)),
        TemplateSpec("alpaca", _ALPACA, None, ()),
    )
}

# Other spellings people use for the same families.
_ALIASES = {
    "llama3": "llama-3", "llama31": "llama-3", "llama32": "llama-3", "llama2": "llama-2",
    "qwen25": "qwen-2.5", "qwen2": "qwen-2.5", "qwen": "qwen-2.5", "phi3": "phi-3", "phi35": "phi-3",
    "gemma2": "gemma", "gemma3": "gemma", "mistral7b": "mistral", "vicuna11": "vicuna",
}


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def template_spec(name: str) -> TemplateSpec:
    """The spec registered under `name`, forgiving case, dashes, dots and the usual aliases."""
    by_key = {_key(n): n for n in TEMPLATES}
    key = _key(name)
    found = by_key.get(key) or _ALIASES.get(key)
    if found is None:
        raise ConfigError(f"Unknown chat template {name!r}. Choose one of: {', '.join(TEMPLATES)}.")
    return TEMPLATES[found]


@lru_cache(maxsize=32)
def _compiled(template: str):
    # The same sandbox transformers renders chat templates in, so both agree on whitespace handling.
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template)


def render(template: str, messages: list[dict], eos_token: str = "", bos_token: str = "",
           add_generation_prompt: bool = False) -> str:
    """Render `messages` with a Jinja chat template, without needing a tokenizer."""
    return _compiled(template).render(
        messages=messages, eos_token=eos_token, bos_token=bos_token, add_generation_prompt=add_generation_prompt
    )
