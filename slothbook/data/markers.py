"""Find where assistant turns begin and end, from the chat template alone.

A probe conversation with sentinel contents is rendered; the text between the sentinels is the template's
scaffolding. Between the second user message and the second reply sits the "response" marker (end of a user
turn + start of an assistant turn); between the first reply and the second user message sits the end of an
assistant turn followed by the start of a user turn. The end of an assistant turn is the part that gap shares
with the text after the final reply, so what follows it is the start of a user turn.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

from ..errors import ConfigError

_SYSTEM, _USER1, _REPLY1, _USER2, _REPLY2 = "SLOTHSYSQX", "SLOTHUSRQA", "SLOTHASTQA", "SLOTHUSRQB", "SLOTHASTQB"
_PROBE = [
    {"role": "system", "content": _SYSTEM},
    {"role": "user", "content": _USER1},
    {"role": "assistant", "content": _REPLY1},
    {"role": "user", "content": _USER2},
    {"role": "assistant", "content": _REPLY2},
]


@dataclass(frozen=True)
class TurnMarkers:
    response: str  # the text right before every assistant reply
    stops: tuple[str, ...]  # texts that open a non-assistant turn (user; system, when it has its own marker)
    end: str  # the text that closes an assistant turn (learned with the reply: the model must learn to stop)

    @property
    def end_token(self) -> str:
        """The closing text without surrounding whitespace: the token generation must stop on."""
        return self.end.strip()


def markers_from_renderer(render: Callable[[list[dict]], str]) -> TurnMarkers:
    """The markers of the template behind `render` (messages -> text)."""
    try:
        text, with_system = render(_PROBE), True
    except Exception:  # templates without a system role raise; probe without one
        text, with_system = render(_PROBE[1:]), False
    sentinels = ([_SYSTEM] if with_system else []) + [_USER1, _REPLY1, _USER2, _REPLY2]
    starts, pos = [], 0
    for sentinel in sentinels:
        found = text.find(sentinel, pos)
        if found < 0:
            raise ConfigError(f"Cannot find turn markers: the chat template dropped a message; it rendered {text!r}.")
        starts.append(found)
        pos = found + len(sentinel)
    ends = [s + len(sentinel) for s, sentinel in zip(starts, sentinels)]
    r1, u2, r2 = range(len(sentinels) - 3, len(sentinels))
    response = text[ends[u2]:starts[r2]]
    if not response.strip():
        raise ConfigError(f"The chat template puts nothing between a user turn and a reply ({text!r}); "
                          "responses cannot be told apart.")
    between = text[ends[r1]:starts[u2]]
    end = os.path.commonprefix([between, text[ends[r2]:]])
    stops = [between[len(end):]]
    if with_system and text[:starts[0]].strip():
        stops.append(text[:starts[0]])  # the system block opens the next conversation in packed text
    return TurnMarkers(response, tuple(s for s in stops if s.strip()), end)


def detect_turn_markers(tokenizer) -> TurnMarkers:
    """The markers of the tokenizer's own chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError("The tokenizer has no chat template; call slothbook.data.get_chat_template(tokenizer, "
                          "name) or heal_tokenizer(tokenizer) first.")
    return markers_from_renderer(lambda messages: tokenizer.apply_chat_template(messages, tokenize=False))


def assistant_spans(text: str, markers: TurnMarkers) -> list[tuple[int, int]]:
    """Character spans of every reply in `text`, each running to the start of the next non-assistant turn
    (so the closing marker is inside)."""
    spans, pos = [], 0
    while (found := text.find(markers.response, pos)) >= 0:
        start = found + len(markers.response)
        stops = [i for i in (text.find(stop, start) for stop in markers.stops) if i >= 0]
        end = min(stops, default=len(text))
        spans.append((start, end))
        pos = end
    return spans


def token_mask(offsets: list[tuple[int, int]], spans: list[tuple[int, int]], text: str) -> list[bool]:
    """Which tokens (by character offsets) belong to a span. A token that straddles a span's edge belongs to it
    when its part inside is more than whitespace (" Hello" after "[/INST]" is the reply's first word)."""
    mask, k = [], 0
    for start, stop in offsets:
        while k < len(spans) and spans[k][1] <= start:
            k += 1
        inside = False
        if k < len(spans):
            a, b = spans[k]
            lo, hi = max(start, a), min(stop, b)
            inside = (a <= start and stop <= b and stop > start) or (lo < hi and text[lo:hi].strip() != "")
        mask.append(inside)
    return mask
