"""An Ollama Modelfile beside each GGUF: FROM, the chat template in Go template syntax, stop tokens.

Ollama renders prompts with Go templates, not the Jinja chat templates transformers uses, so the known
chat formats are recognised by their marker tokens and written as the equivalent Go template. An
unrecognised format gets no TEMPLATE line (Ollama then falls back on the template inside the GGUF).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .atomic import atomic_file


@dataclass(frozen=True)
class OllamaFormat:
    name: str
    markers: tuple[str, ...]  # all must appear in the Jinja template
    template: str
    stops: tuple[str, ...]


_CHATML = OllamaFormat(
    "chatml", ("<|im_start|>", "<|im_end|>"),
    "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n",
    ("<|im_start|>", "<|im_end|>"),
)
_LLAMA3 = OllamaFormat(
    "llama-3", ("<|start_header_id|>", "<|eot_id|>"),
    "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>"
    "{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n",
    ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
)
# Gemma has no system role: a system message is sent as a user turn; the assistant is called "model".
_GEMMA = OllamaFormat(
    "gemma", ("<start_of_turn>", "<end_of_turn>"),
    "{{- range .Messages }}<start_of_turn>{{ if eq .Role \"assistant\" }}model{{ else }}user{{ end }}\n"
    "{{ .Content }}<end_of_turn>\n{{ end }}<start_of_turn>model\n",
    ("<start_of_turn>", "<end_of_turn>"),
)
_PHI3 = OllamaFormat(
    "phi-3", ("<|user|>", "<|end|>"),
    "{{- range .Messages }}<|{{ .Role }}|>\n{{ .Content }}<|end|>\n{{ end }}<|assistant|>\n",
    ("<|end|>", "<|user|>", "<|assistant|>"),
)
# Mistral: the system prompt is prepended to the last user turn, as Mistral's own template does.
_MISTRAL = OllamaFormat(
    "mistral", ("[INST]", "[/INST]"),
    "{{- range $i, $_ := .Messages }}{{ if eq .Role \"user\" }}[INST] "
    "{{ if and $.System (eq (len (slice $.Messages $i)) 1) }}{{ $.System }}\n\n{{ end }}{{ .Content }} [/INST]"
    "{{ else if eq .Role \"assistant\" }} {{ .Content }}</s>{{ end }}{{ end }}",
    ("[INST]", "[/INST]", "</s>"),
)
FORMATS = (_CHATML, _LLAMA3, _GEMMA, _PHI3, _MISTRAL)


def ollama_format(chat_template: str | None) -> OllamaFormat | None:
    """The known chat format a Jinja chat template uses, recognised by its marker tokens."""
    if not chat_template:
        return None
    return next((f for f in FORMATS if all(m in chat_template for m in f.markers)), None)


def default_system_prompt(tokenizer, fmt: OllamaFormat | None) -> str | None:
    """The system prompt the chat template inserts when the conversation has none (SmolLM2 and Qwen do)."""
    if fmt is not _CHATML:
        return None
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)
    except Exception:  # a template that cannot render without a system message, for instance
        return None
    match = re.match(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", text, re.S)
    return match.group(1) if match else None


def modelfile_text(gguf_name: str, tokenizer, num_ctx: int) -> str:
    fmt = ollama_format(getattr(tokenizer, "chat_template", None))
    lines = [f"FROM ./{gguf_name}", ""]
    if fmt is None:
        lines += ["# The chat template was not recognised: Ollama uses the one stored in the GGUF.", ""]
    else:
        lines += [f'TEMPLATE """{fmt.template}"""', ""]
        system = default_system_prompt(tokenizer, fmt)
        if system:
            lines += [f'SYSTEM """{system}"""', ""]
        lines += [f'PARAMETER stop "{s}"' for s in fmt.stops]
    lines.append(f"PARAMETER num_ctx {int(num_ctx)}")
    return "\n".join(lines) + "\n"


def write_modelfile(path: str | Path, gguf_name: str, tokenizer, num_ctx: int) -> Path:
    with atomic_file(path) as tmp:
        tmp.write_text(modelfile_text(gguf_name, tokenizer, num_ctx))
    return Path(path)
