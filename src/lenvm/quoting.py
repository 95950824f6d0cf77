"""User values as messages and plain output show them: cut short, since a client's or a file's
text may be as long as a request body, and a message that repeats it whole (in an error answer,
and in its log line) is as long; a Python value as its ``repr`` (:func:`quoted`), a value read from
JSON as JSON (:func:`quoted_json`); a field of tab-separated output on its line (:func:`plain_field`)."""

from __future__ import annotations

import json
import re
from typing import Any

from lenvm.io import json_default

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


# Characters that are not text a reader sees, which a line of output shows as escapes: the control
# characters (U+0085 ends a line for some readers), the line and paragraph separators, lone
# surrogates. JSON escapes those below U+0020 itself.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
# One character of JSON text as its reader sees it: an escape, or a character as it is.
_JSON_CHARACTER = re.compile(r"\\u[0-9a-fA-F]{4}|\\.|.", re.DOTALL)


def quoted_json(value: Any, limit: int | None = QUOTED_CHARS) -> str:
    """``value`` as JSON on one line, to show a value of a JSON file or answer in a message, or a
    field of plain output: text as it is (raw UTF-8, as lenvm writes its files), with every
    control character, line separator and lone surrogate escaped; over ``limit`` characters, cut
    at a character (never inside an escape), with an ellipsis."""
    text = json.dumps(value, ensure_ascii=False, default=json_default)
    text = _CONTROL.sub(lambda control: f"\\u{ord(control.group()):04x}", text)
    if limit is None or len(text) <= limit:
        return text
    end = 0
    for character in _JSON_CHARACTER.finditer(text):
        if character.end() > limit - 1:  # room for the ellipsis
            break
        end = character.end()
    return text[:end] + "…"


def plain_field(text: str, encoding: str | None = None) -> str:
    """``text`` as a field of a line of plain (tab-separated) output: as it is, unless a tab, a line
    break or another control character in it would break the line or not show, it starts with a
    double quote, or the output's ``encoding`` lacks one of its characters (which the output then
    writes as an escape); then as the JSON string :func:`quoted_json` writes, so that a reader can
    tell an escape from text that looks like one."""
    if text.startswith('"') or _CONTROL.search(text) or not _encodes(text, encoding):
        return quoted_json(text, limit=None)
    return text


def _encodes(text: str, encoding: str | None) -> bool:
    if encoding is None:
        return True
    try:
        text.encode(encoding)
    except UnicodeEncodeError:
        return False
    except LookupError:  # an encoding Python does not know: nothing to tell
        pass
    return True
