"""Give a tokenizer a chat template and make its eos/pad tokens agree with it.

`get_chat_template(tokenizer, name)` installs one of the templates of `templates.py`; `heal_tokenizer` fixes
what would silently spoil training: no pad token, pad == eos (a collator that masks padding would then never
teach the model to stop), no chat template, or an eos the template does not end turns on.
Each call says in one line what it changed.
"""

from __future__ import annotations

import logging

from ..errors import ConfigError
from .markers import detect_turn_markers
from .templates import TEMPLATES, TemplateSpec, template_spec

logger = logging.getLogger("slothbook.data")

# Pad candidates, best first: dedicated pad tokens, then tokens a model never needs to emit while chatting.
PAD_CANDIDATES = (
    "<|finetune_right_pad_id|>", "<|pad|>", "<pad>", "[PAD]", "<|PAD_TOKEN|>", "<|vision_pad|>",
    "<|endoftext|>", "<unk>", "<|reserved_special_token_0|>", "<|reserved_special_token_250|>",
)

# For a tokenizer without a template: the first family whose markers its vocabulary already has.
_GUESS_ORDER = ("llama-3", "gemma", "phi-3", "chatml", "mistral", "llama-2")


def get_chat_template(tokenizer, name: str | None = None):
    """Install the chat template `name` (see `templates.TEMPLATES`) and fix eos/pad to match; returns the tokenizer.

    Without a name the tokenizer's own template is kept (one is chosen when it has none). Marker tokens the
    vocabulary lacks are added as special tokens; the model then needs `model.resize_token_embeddings(len(tok))`.
    """
    changes = []
    eos = None
    if name is not None:
        spec = template_spec(name)
        tokenizer.chat_template = spec.template
        changes.append(f"chat template set to {spec.name}")
        changes += _add_missing_tokens(tokenizer, spec.tokens)
        eos = spec.eos
    changes += _heal(tokenizer, eos)
    _notice(changes)
    return tokenizer


def heal_tokenizer(tokenizer):
    """Fix a missing chat template, an eos that is not the template's turn end, and a missing or eos-equal pad."""
    _notice(_heal(tokenizer, None))
    return tokenizer


def _notice(changes: list[str]) -> None:
    if changes:
        logger.warning("slothbook adjusted the tokenizer: %s", "; ".join(changes))


def _is_single_token(tokenizer, text: str) -> bool:
    """`text` encodes to exactly one token, and that token is `text` (not an unknown-token stand-in)."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    return len(ids) == 1 and tokenizer.convert_ids_to_tokens(ids[0]) == text


def _add_missing_tokens(tokenizer, tokens) -> list[str]:
    missing = [t for t in tokens if not _is_single_token(tokenizer, t)]
    if not missing:
        return []
    tokenizer.add_tokens(missing, special_tokens=True)
    return [f"added special tokens {', '.join(missing)} that the vocabulary lacked "
            f"(resize the model: model.resize_token_embeddings({len(tokenizer)}))"]


def guess_template(tokenizer) -> TemplateSpec:
    """The family whose marker tokens the vocabulary already has; Alpaca (plain text, no new tokens) otherwise."""
    for name in _GUESS_ORDER:
        spec = TEMPLATES[name]
        if all(_is_single_token(tokenizer, t) for t in spec.tokens):
            return spec
    return TEMPLATES["alpaca"]


def _heal(tokenizer, eos: str | None) -> list[str]:
    changes = []
    if not getattr(tokenizer, "chat_template", None):
        spec = guess_template(tokenizer)
        tokenizer.chat_template = spec.template
        changes.append(f"it had no chat template: using {spec.name}")
        eos = eos or spec.eos
        changes += _add_missing_tokens(tokenizer, spec.tokens)
    if eos is None:
        # The template decides: the token its assistant turns end on (e.g. <|im_end|>, <|eot_id|>).
        try:
            end = detect_turn_markers(tokenizer).end_token
        except ConfigError as exc:  # healing runs at load time: report, never fail the load
            changes.append(f"eos left as is ({exc})")
            end = ""
        eos = end if end and _is_single_token(tokenizer, end) else None
    old_eos = tokenizer.eos_token
    if eos is not None and eos != old_eos:
        changes += _add_missing_tokens(tokenizer, [eos])
        changes.append(f"eos {old_eos!r} -> {eos!r} (the token the template ends replies on)")
        tokenizer.eos_token = eos
    changes += _fix_pad(tokenizer, stale=old_eos)
    return changes


def _fix_pad(tokenizer, stale: str | None = None) -> list[str]:
    """Choose a pad when there is none, or when it is the eos (now or before the eos was changed)."""
    pad, eos = tokenizer.pad_token, tokenizer.eos_token
    if pad is not None and pad not in (eos, stale):
        return []
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else str(tokenizer.chat_template)
    taken = {eos, tokenizer.bos_token}
    for candidate in PAD_CANDIDATES:
        if candidate not in taken and candidate not in template and _is_single_token(tokenizer, candidate):
            tokenizer.pad_token = candidate
            return [f"pad {pad!r} -> {candidate!r} (id {tokenizer.pad_token_id}), distinct from eos {eos!r}"]
    if pad is None and eos is not None:
        tokenizer.pad_token = eos
        return [f"pad set to eos {eos!r}: the vocabulary has no other token to pad with"]
    return []
