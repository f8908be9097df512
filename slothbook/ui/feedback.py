"""Messages and errors as notebooks show them: styled HTML with a plain-text twin for terminals."""

from __future__ import annotations

import html
import traceback

from ..errors import SlothbookError

STYLES = {
    "ok": ("#2e7d32", "&#10004;"),
    "info": ("#37474f", "&#8505;"),
    "warning": ("#b26a00", "&#9888;"),
    "error": ("#c62828", "&#10006;"),
}


def message_html(text: str, kind: str = "info") -> str:
    color, icon = STYLES[kind]
    return (f'<div class="slothbook-{kind}" style="color:{color};font-weight:600;margin:4px 0">'
            f"{icon} {html.escape(text)}</div>")


def error_text(exc: BaseException) -> str:
    """`ConfigError: message`: what slothbook raises on purpose says what to do, so the message is enough."""
    return f"{type(exc).__name__}: {exc}"


def error_html(exc: BaseException) -> str:
    """The error's message; for an unexpected one (a bug), its traceback folded underneath."""
    out = message_html(error_text(exc), "error")
    if not isinstance(exc, SlothbookError):
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        out += (f"<details><summary>traceback</summary><pre style='font-size:11px'>{html.escape(tb)}</pre>"
                "</details>")
    return out


class Message:
    """A line of feedback: HTML in a notebook, plain text elsewhere."""

    def __init__(self, text: str, kind: str = "info"):
        self.text, self.kind = text, kind

    def _repr_mimebundle_(self, include=None, exclude=None):
        return {"text/html": message_html(self.text, self.kind), "text/plain": self.text}
