"""User values as messages quote them: cut short, since a client's or a file's text may be as long
as a request body, and a message that repeats it whole (in an error answer, and in its log line)
is as long."""

from __future__ import annotations

from typing import Any

# The most characters of a value that a message quotes, its ellipsis included.
QUOTED_CHARS = 80


def shortened(text: str, limit: int = QUOTED_CHARS) -> str:
    """``text``, or, where it is longer than ``limit`` characters, its start and an ellipsis in
    that many (cut between characters, never inside one)."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def quoted(value: Any, limit: int = QUOTED_CHARS) -> str:
    """``value`` as a message quotes it, its ``repr``, cut short: a string inside its quotes (which
    stay), any other value's whole ``repr``."""
    if isinstance(value, str):
        return repr(shortened(value, limit))
    return shortened(repr(value), limit)
