"""Samples longer than max_seq_length: counted before training, then truncated (with one warning) or refused.

SFT truncates every sample to max_seq_length tokens, as TRL and Unsloth do; a silently cut reply teaches the model
to stop mid-sentence, so the count is reported once, naming the first rows, and `on_long="error"` refuses instead.
"""

from __future__ import annotations

import logging

from ..errors import ConfigError, DatasetError

logger = logging.getLogger("slothbook.data")

ON_LONG = ("truncate", "error")
_SHOWN = 5


def token_lengths(dataset, tokenizer, text_field: str = "text") -> list[int]:
    """Tokens per row: `text_field` as it is, or a "messages" row rendered by the tokenizer's chat template."""
    if text_field in dataset.column_names:
        return [len(ids) for ids in tokenizer(list(dataset[text_field]))["input_ids"]]
    if "messages" in dataset.column_names:
        return [len(tokenizer.apply_chat_template(m, tokenize=True)) for m in dataset["messages"]]
    raise DatasetError(f"Cannot measure the samples: the dataset has neither a '{text_field}' nor a 'messages' "
                       f"column (it has {list(dataset.column_names)}).")


def check_lengths(dataset, tokenizer, max_seq_length: int, text_field: str = "text", on_long: str = "truncate"):
    """The indices of rows longer than `max_seq_length` tokens.

    on_long="truncate": log one warning with their count and the first of them (training then cuts them).
    on_long="error": raise DatasetError naming them.
    """
    if on_long not in ON_LONG:
        raise ConfigError(f"on_long must be one of {', '.join(ON_LONG)}; got {on_long!r}.")
    lengths = token_lengths(dataset, tokenizer, text_field)
    long = [i for i, n in enumerate(lengths) if n > max_seq_length]
    if not long:
        return long
    shown = ", ".join(f"row {i} ({lengths[i]} tokens)" for i in long[:_SHOWN]) + (", ..." if len(long) > _SHOWN else "")
    what = f"{len(long)} of {len(lengths)} samples are longer than max_seq_length={max_seq_length}: {shown}"
    if on_long == "error":
        raise DatasetError(f"{what}. Raise max_seq_length, shorten or drop those rows, or let them be truncated "
                           "(on_long='truncate').")
    logger.warning("slothbook: %s; they will be truncated to %d tokens (their ends are not learned). Raise "
                   "max_seq_length or shorten them to keep them whole.", what, max_seq_length)
    return long
