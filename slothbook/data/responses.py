"""Response-only training: labels of system and user tokens are -100, so only the assistant's tokens are learned.

Every conversation is rendered to text with the tokenizer's chat template; the assistant spans are found by the
turn markers read off that same template (markers.py); the text is tokenized once with character offsets and a
token is learned when it lies in an assistant span. Working on text keeps the tokenization identical to the
unmasked one (no piecewise encoding that would change how boundaries merge).
"""

from __future__ import annotations

import logging

from ..errors import ConfigError, DatasetError
from .collators import PackedCollator, PaddingCollator
from .formats import standardize
from .markers import TurnMarkers, assistant_spans, detect_turn_markers, token_mask
from .packing import pack

logger = logging.getLogger("slothbook.data")


def train_on_responses_only(trainer_or_dataset, tokenizer=None, max_length: int | None = None):
    """Mask everything but the assistant's replies.

    Given a dataset (any shape `standardize` reads, a "text" column of rendered conversations, or tokenized
    "input_ids"), returns a tokenized dataset with input_ids, attention_mask and labels.
    Given a trainer (TRL SFTTrainer or HF Trainer), replaces its train/eval datasets with masked ones and its
    data collator with one that keeps the labels (packed rows stay packed); returns the trainer.
    """
    if hasattr(trainer_or_dataset, "train_dataset") and hasattr(trainer_or_dataset, "data_collator"):
        return _wrap_trainer(trainer_or_dataset, tokenizer)
    if tokenizer is None:
        raise ConfigError("train_on_responses_only(dataset, tokenizer): a dataset needs the tokenizer whose chat "
                          "template renders it.")
    return tokenize_responses(trainer_or_dataset, tokenizer, max_length)


def _conversation_text(row: dict, index: int, tokenizer) -> str:
    if "messages" in row:
        messages = row["messages"]
        if not any(m.get("role") == "assistant" for m in messages):
            roles = [m.get("role") for m in messages]
            raise DatasetError(f"Row {index} has no assistant turn (roles {roles}); response-only training needs "
                               "at least one reply per conversation. Remove or fix that row.")
        return tokenizer.apply_chat_template(messages, tokenize=False)
    if "text" in row:
        return row["text"]
    return tokenizer.decode(row["input_ids"], skip_special_tokens=False)


def _tokenize_text(text: str, spans, tokenizer, max_length: int | None) -> dict:
    if getattr(tokenizer, "is_fast", True):
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True,
                            truncation=max_length is not None, max_length=max_length)
        learn = token_mask(encoded["offset_mapping"], spans, text)
        ids = list(encoded["input_ids"])
    else:  # no offsets: encode piece by piece at span edges (boundary tokens may split differently)
        ids, learn, pos = [], [], 0
        for start, end in spans + [(len(text), len(text))]:
            for piece, flag in ((text[pos:start], False), (text[start:end], True)):
                piece_ids = tokenizer.encode(piece, add_special_tokens=False) if piece else []
                ids += piece_ids
                learn += [flag] * len(piece_ids)
            pos = end
        ids, learn = ids[:max_length], learn[:max_length]
    labels = [t if keep else -100 for t, keep in zip(ids, learn)]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def tokenize_responses(dataset, tokenizer, max_length: int | None = None, markers: TurnMarkers | None = None):
    """Tokenized `dataset` (input_ids, attention_mask, labels) with only assistant tokens learned."""
    markers = markers or detect_turn_markers(tokenizer)
    columns = list(dataset.column_names)
    if not {"messages", "text", "input_ids"} & set(columns):
        dataset = standardize(dataset)
        columns = list(dataset.column_names)

    def tokenize(row, index):
        text = _conversation_text(row, index, tokenizer)
        spans = assistant_spans(text, markers)
        if not spans:
            raise DatasetError(f"Row {index} has no assistant turn: the reply marker {markers.response!r} of the "
                               f"chat template is not in its text {text[:200]!r}. Render it with the same template.")
        return _tokenize_text(text, spans, tokenizer, max_length)

    out = dataset.map(tokenize, with_indices=True, remove_columns=columns, desc="Masking non-assistant tokens")
    if max_length is None:
        return out
    kept = out.filter(lambda row: any(label != -100 for label in row["labels"]))
    if len(kept) < len(out):
        logger.warning("slothbook: dropped %d rows whose replies were cut off entirely by max_length=%s",
                       len(out) - len(kept), max_length)
    return kept


def _unpack(dataset):
    """Rows packed by TRL (input_ids + seq_lengths) split back into one row per sequence."""
    import datasets

    ids = []
    for row_ids, lengths in zip(dataset["input_ids"], dataset["seq_lengths"]):
        start = 0
        for n in lengths:
            ids.append(row_ids[start:start + n])
            start += n
    return datasets.Dataset.from_dict({"input_ids": ids})


def _wrap_trainer(trainer, tokenizer):
    tokenizer = tokenizer or getattr(trainer, "processing_class", None) or getattr(trainer, "tokenizer", None)
    if tokenizer is None:
        raise ConfigError("The trainer has no tokenizer (processing_class); pass tokenizer=...")
    args = trainer.args
    max_length = getattr(args, "max_length", None) or getattr(args, "max_seq_length", None)
    packing = bool(getattr(args, "packing", False))
    padding_free = packing or bool(getattr(args, "padding_free", False))
    if packing and getattr(args, "packing_strategy", "bfd") == "wrapped":
        raise ConfigError("packing_strategy='wrapped' cuts conversations across rows, so replies cannot be found; "
                          "use packing_strategy='bfd'.")
    markers = detect_turn_markers(tokenizer)

    def rebuild(dataset):
        if "seq_lengths" in dataset.column_names:
            dataset = _unpack(dataset)
        masked = tokenize_responses(dataset, tokenizer, None if packing else max_length, markers)
        return pack(masked, max_length) if packing and max_length else masked

    trainer.train_dataset = rebuild(trainer.train_dataset)
    if isinstance(trainer.eval_dataset, dict):
        trainer.eval_dataset = {k: rebuild(v) for k, v in trainer.eval_dataset.items()}
    elif trainer.eval_dataset is not None:
        trainer.eval_dataset = rebuild(trainer.eval_dataset)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    trainer.data_collator = PackedCollator() if padding_free else PaddingCollator(pad_id)
    logger.info("slothbook: the trainer now learns assistant tokens only (reply marker %r)", markers.response)
    return trainer
