"""A Hugging Face tokenizer as llama.cpp's vocabulary: tokens, types, merges or scores, special ids, template.

Two vocabulary kinds cover the supported families:
- "gpt2": byte-level BPE (SmolLM2, Llama-3, Qwen, Phi-4). Tokens and merges are copied; the pre-tokenizer
  (the regex that splits text before BPE) is recognised from the tokenizer's own definition and named the
  way llama.cpp knows it.
- "llama": SentencePiece-style BPE with byte fallback (Llama-2, Mistral, Gemma, Phi-3). llama.cpp merges
  the pair whose result has the highest score; the scores come from the SentencePiece model when the
  tokenizer has one, else from the merge ranks (an earlier merge gets a higher score).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ExportError

# llama.cpp token types.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Split patterns of the byte-level BPE tokenizers llama.cpp implements, by the name it knows them under.
_SPLIT_PATTERNS = {
    "llama-bpe": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+",
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
             r"|\s*[\r\n]+|\s+(?!\S)|\s+",
}
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


@dataclass
class Vocab:
    model: str  # "gpt2" or "llama"
    tokens: list[str]
    types: list[int]
    pre: str = "default"
    merges: list[str] = field(default_factory=list)
    scores: list[float] | None = None
    add_space_prefix: bool | None = None
    special_ids: dict[str, int] = field(default_factory=dict)
    add_bos: bool = False
    add_eos: bool = False
    chat_template: str | None = None


def vocab_from_tokenizer(tokenizer, vocab_size: int) -> Vocab:
    """The llama.cpp vocabulary of `tokenizer`, padded with unused tokens to the model's `vocab_size` rows."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str()) if hasattr(tokenizer, "backend_tokenizer") else None
    if spec is None or spec["model"]["type"] != "BPE":
        raise ExportError(f"GGUF export supports BPE tokenizers (byte-level or SentencePiece-style) from the "
                          f"`tokenizers` library; {type(tokenizer).__name__} is not one.")
    if spec["model"].get("byte_fallback"):
        vocab = _spm_vocab(spec, tokenizer)
    else:
        vocab = _gpt2_vocab(spec)
    _pad_to(vocab, vocab_size, len(tokenizer))
    vocab.special_ids = _special_ids(tokenizer)
    vocab.add_bos, vocab.add_eos = _adds_bos_eos(tokenizer)
    template = getattr(tokenizer, "chat_template", None)
    vocab.chat_template = template if isinstance(template, str) else None
    return vocab


def _ids_to_tokens(spec: dict) -> dict[int, str]:
    by_id = {i: t for t, i in spec["model"]["vocab"].items()}
    by_id.update({a["id"]: a["content"] for a in spec.get("added_tokens", [])})
    return by_id


def _added_types(spec: dict) -> dict[int, int]:
    return {a["id"]: CONTROL if a.get("special") else USER_DEFINED for a in spec.get("added_tokens", [])}


def _merge_strings(spec: dict) -> list[str]:
    # tokenizers writes merges as "a b" (old) or ["a", "b"] (new).
    return [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]


def _gpt2_vocab(spec: dict) -> Vocab:
    by_id, added = _ids_to_tokens(spec), _added_types(spec)
    n = max(by_id) + 1
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(n)]
    types = [added.get(i, NORMAL if i in by_id else UNUSED) for i in range(n)]
    return Vocab("gpt2", tokens, types, pre=bpe_pre_tokenizer(spec), merges=_merge_strings(spec))


def bpe_pre_tokenizer(spec: dict) -> str:
    """The llama.cpp name of a byte-level BPE tokenizer's pre-tokenizer, recognised from its definition."""
    steps = _flatten(spec.get("pre_tokenizer"))
    kinds = [s["type"] for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"  # GPT-2's regex after splitting every digit (SmolLM, StarCoder)
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        pattern = steps[0].get("pattern", {}).get("Regex")
        for name, known in _SPLIT_PATTERNS.items():
            if pattern == known:
                return name
    raise ExportError(
        "This tokenizer's pre-tokenizer is not one llama.cpp implements that slothbook recognises "
        f"({json.dumps(spec.get('pre_tokenizer'))[:300]}). Known: GPT-2, SmolLM, Llama-3 and Qwen2 byte-level BPE. "
        "Export with save_pretrained_merged and convert with llama.cpp's convert_hf_to_gguf.py instead."
    )


def _flatten(step) -> list[dict]:
    if step is None:
        return []
    if step["type"] == "Sequence":
        return [s for inner in step["pretokenizers"] for s in _flatten(inner)]
    return [step]


def _spm_vocab(spec: dict, tokenizer) -> Vocab:
    by_id, added = _ids_to_tokens(spec), _added_types(spec)
    n = max(by_id) + 1
    scores = _spm_scores(tokenizer, spec, n)
    unk = spec["model"].get("unk_token")
    tokens, types = [], []
    for i in range(n):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
            continue
        tokens.append(token)
        if i in added:
            types.append(UNKNOWN if token == unk else added[i])
        elif token == unk:
            types.append(UNKNOWN)
        elif _BYTE_TOKEN.fullmatch(token):
            types.append(BYTE)
        else:
            types.append(NORMAL)
    return Vocab("llama", tokens, types, pre="default", scores=scores, add_space_prefix=_adds_space_prefix(spec))


def _spm_scores(tokenizer, spec: dict, n: int) -> list[float]:
    """Per-token merge priority: the SentencePiece model's own scores when its file is at hand, else minus
    the rank of the first merge that makes the token (the converter orders merges by those scores)."""
    vocab_file = getattr(tokenizer, "vocab_file", None)
    if vocab_file and str(vocab_file).endswith(".model") and Path(vocab_file).is_file():
        from sentencepiece import SentencePieceProcessor

        sp = SentencePieceProcessor(model_file=str(vocab_file))
        scores = [sp.GetScore(i) for i in range(sp.GetPieceSize())]
        return (scores + [0.0] * n)[:n]
    vocab = spec["model"]["vocab"]
    scores = [0.0] * n
    for rank, merge in enumerate(_merge_strings(spec)):
        left, right = merge.split(" ", 1)
        token_id = vocab.get(left + right)
        if token_id is not None and scores[token_id] == 0.0:
            scores[token_id] = -float(rank + 1)
    return scores


def _adds_space_prefix(spec: dict) -> bool:
    """Whether the tokenizer prepends "▁" to the text (SentencePiece's add_dummy_prefix)."""
    normalizers = _flatten_normalizer(spec.get("normalizer"))
    if any(n["type"] == "Prepend" for n in normalizers):
        return True
    for step in _flatten(spec.get("pre_tokenizer")):
        if step["type"] == "Metaspace":
            return step.get("prepend_scheme", "always") in ("always", "first") and step.get("add_prefix_space", True)
    return False


def _flatten_normalizer(step) -> list[dict]:
    if step is None:
        return []
    if step["type"] == "Sequence":
        return [s for inner in step["normalizers"] for s in _flatten_normalizer(inner)]
    return [step]


def _pad_to(vocab: Vocab, vocab_size: int, n_tokenizer: int) -> None:
    if len(vocab.tokens) > vocab_size:
        raise ExportError(f"The tokenizer has {n_tokenizer} tokens but the model's embedding has only {vocab_size} "
                          "rows. Resize the model's embeddings (model.resize_token_embeddings(len(tokenizer))) "
                          "before exporting.")
    for i in range(len(vocab.tokens), vocab_size):
        vocab.tokens.append(f"[PAD{i}]")
        vocab.types.append(UNUSED)
        if vocab.scores is not None:
            vocab.scores.append(0.0)


def _special_ids(tokenizer) -> dict[str, int]:
    ids = {}
    for kind in ("bos", "eos", "unk", "pad", "sep", "mask"):
        value = getattr(tokenizer, f"{kind}_token_id", None)
        if isinstance(value, int):
            ids[kind] = value
    return ids


def _adds_bos_eos(tokenizer) -> tuple[bool, bool]:
    """Whether encoding with special tokens puts bos in front / eos at the end (seen, not read from flags)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    add_bos = bos is not None and len(full) > len(plain) and full[0] == bos
    add_eos = eos is not None and len(full) > len(plain) and full[-1] == eos
    return add_bos, add_eos


def write_vocab(writer, vocab: Vocab) -> None:
    """Put the vocabulary's keys into a gguf.GGUFWriter."""
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    if vocab.merges:
        writer.add_token_merges(vocab.merges)
    if vocab.add_space_prefix is not None:
        writer.add_add_space_prefix(vocab.add_space_prefix)
    adders = {"bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id, "unk": writer.add_unk_token_id,
              "pad": writer.add_pad_token_id, "sep": writer.add_sep_token_id, "mask": writer.add_mask_token_id}
    for kind, token_id in vocab.special_ids.items():
        if kind in adders:
            adders[kind](token_id)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)
