"""Recognise the common dataset shapes and convert them to one: a "messages" column of {"role", "content"} lists.

Shapes (checked in this order):
  openai             messages/conversations: [{"role", "content"}]
  sharegpt           conversations/messages: [{"from", "value"}] with human/gpt/system speakers
  alpaca             instruction, input (optional), output
  prompt-completion  prompt, completion (strings, or lists of messages as TRL writes them)
  text               text: kept as it is (already rendered)
"""

from __future__ import annotations

import logging

from ..errors import DatasetError

logger = logging.getLogger("slothbook.data")

SHAPES = ("openai", "sharegpt", "alpaca", "prompt-completion", "text")

_CONVERSATION_COLUMNS = ("messages", "conversations", "conversation")
_SPEAKERS = {
    "system": "system",
    "human": "user", "user": "user", "prompter": "user",
    "gpt": "assistant", "assistant": "assistant", "bot": "assistant", "model": "assistant", "chatgpt": "assistant",
    "tool": "tool", "function": "tool", "ipython": "tool",
}


def _conversation_column(columns) -> str | None:
    return next((c for c in _CONVERSATION_COLUMNS if c in columns), None)


def detect_shape(dataset) -> str:
    """The name of the dataset's shape (one of SHAPES); DatasetError listing the columns when none fits."""
    columns = list(dataset.column_names)
    conv = _conversation_column(columns)
    if conv is not None and len(dataset) > 0:
        first = next((m for m in dataset[0][conv] or [] if isinstance(m, dict)), None)
        if first is not None and "from" in first and "value" in first:
            return "sharegpt"
        if first is not None and "role" in first and "content" in first:
            return "openai"
    if "instruction" in columns and "output" in columns:
        return "alpaca"
    if "prompt" in columns and "completion" in columns:
        return "prompt-completion"
    if "text" in columns:
        return "text"
    raise DatasetError(
        f"Unrecognised dataset shape; its columns are {columns}. slothbook reads: a 'messages' column of "
        "{role, content} (OpenAI), 'conversations' of {from, value} (ShareGPT), instruction/input/output (Alpaca), "
        "prompt/completion, or a 'text' column. Rename your columns to one of these."
    )


def alpaca_to_messages(instruction: str, input: str | None, output: str) -> list[dict]:
    """One Alpaca record as a user/assistant exchange; a non-empty input follows the instruction after a blank line."""
    user = instruction if not input else f"{instruction}\n\n{input}"
    return [{"role": "user", "content": user}, {"role": "assistant", "content": output}]


def _content_text(content) -> str:
    # OpenAI messages may carry a list of typed parts; keep the text ones.
    if isinstance(content, list):
        return "".join(p.get("text") or "" for p in content if isinstance(p, dict) and p.get("type", "text") == "text")
    return "" if content is None else str(content)


def _normalise(turns, index: int, role_key: str, content_key: str) -> list[dict]:
    messages = []
    for turn in turns or []:
        speaker = str(turn.get(role_key, "")).lower()
        role = _SPEAKERS.get(speaker)
        if role is None:
            raise DatasetError(f"Row {index}: unknown speaker {turn.get(role_key)!r}; expected one of "
                               f"{sorted(_SPEAKERS)}.")
        messages.append({"role": role, "content": _content_text(turn.get(content_key))})
    return messages


def _converter(shape: str, columns: list[str]):
    conv = _conversation_column(columns)
    if shape == "openai":
        return lambda row, i: _normalise(row[conv], i, "role", "content")
    if shape == "sharegpt":
        return lambda row, i: _normalise(row[conv], i, "from", "value")
    if shape == "alpaca":
        return lambda row, i: alpaca_to_messages(row["instruction"] or "", row.get("input"), row["output"] or "")

    def prompt_completion(row, i):
        prompt, completion = row["prompt"], row["completion"]
        if isinstance(prompt, list):  # TRL's conversational prompt/completion
            return _normalise(prompt, i, "role", "content") + _normalise(completion, i, "role", "content")
        return [{"role": "user", "content": prompt or ""}, {"role": "assistant", "content": completion or ""}]

    return prompt_completion


def standardize(dataset):
    """`dataset` with one "messages" column of {"role", "content"} lists ("text" datasets are returned unchanged
    but for the "text" column). Logs which shape it recognised; `detect_shape` returns it."""
    shape = detect_shape(dataset)
    logger.info("slothbook: recognised the %s dataset shape (%d rows)", shape, len(dataset))
    if shape == "text":
        return dataset.select_columns(["text"])
    convert = _converter(shape, list(dataset.column_names))
    return dataset.map(
        lambda row, i: {"messages": convert(row, i)},
        with_indices=True,
        remove_columns=list(dataset.column_names),
        desc=f"Converting {shape} to messages",
    )
