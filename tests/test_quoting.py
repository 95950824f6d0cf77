"""User values quoted short in messages."""

import json

import numpy as np

from lenvm.quoting import QUOTED_CHARS, plain_field, quoted, quoted_json, shortened


def test_a_short_value_is_quoted_whole():
    assert quoted("模型 🎉") == "'模型 🎉'" and quoted(5) == "5" and quoted(None) == "None"
    assert shortened("x" * QUOTED_CHARS) == "x" * QUOTED_CHARS


def test_a_long_value_is_cut_between_characters_with_an_ellipsis():
    assert shortened("🎉" * 100, 10) == "🎉" * 9 + "…"
    text = quoted("模" * 1000)
    assert text == "'" + "模" * (QUOTED_CHARS - 1) + "…'"  # the quotes stay
    assert quoted(list(range(1000))) == repr(list(range(1000)))[: QUOTED_CHARS - 1] + "…"
    assert len(quoted("\x00" * 1000)) < 5 * QUOTED_CHARS  # escapes are a few characters each


def test_quoted_values_are_readable_one_line_json_cut_at_a_character():
    """A value a message names reads as lenvm's files write text (raw UTF-8); what a reader cannot
    see or what would end the line is escaped, and a long value is cut with an ellipsis, never
    inside an escape (an ASCII-escaped cut once left a dangling backslash)."""
    assert quoted_json("ü 模 👍") == '"ü 模 👍"'
    assert quoted_json("a\tb\nc\x00\x85\u2028\ud800") == '"a\\tb\\nc\\u0000\\u0085\\u2028\\ud800"'
    assert (
        quoted_json(["模型"]) == '["模型"]'
        and quoted_json(None) == "null"
        and quoted_json(np.int64(3)) == "3"
    )
    long = "模" * 100
    assert quoted_json(long) == '"' + "模" * 78 + "…" and len(quoted_json(long)) == 80
    escapes = "\n" * 100
    for limit in range(2, 12):
        cut = quoted_json(escapes, limit)
        assert len(cut) <= limit and cut.endswith("…")
        assert json.loads(cut[:-1] + '"') == "\n" * ((limit - 2) // 2)  # whole escapes only
    assert quoted_json(escapes, None) == json.dumps(escapes)


def test_a_plain_field_is_its_text_unless_that_would_break_the_line():
    """A field of tab-separated output holding a tab or a line break would make two fields or two
    lines: such a field, and one that starts with a double quote, is a JSON string."""
    for text in ("a", "ü 模", "a b", 'say "hi"', "back\\slash", "👩\u200d👩"):
        assert plain_field(text) == text
    for text in ("tab\tid", "new\nline", "cr\r", "nul\x00", "next\x85line", "sep\u2028", '"quoted"', "\x7f"):
        field = plain_field(text)
        assert field.startswith('"') and json.loads(field) == text
        assert "\t" not in field and len(field.splitlines()) == 1


def test_a_plain_field_its_output_cannot_encode_is_a_json_string():
    """Written to an ASCII console, ``ü1`` would print as ``\\u00fc1``, like an id that holds that
    text: as a JSON string it reads back as itself."""
    assert plain_field("ü1", "ascii") == '"ü1"' and plain_field("ü1", "utf-8") == "ü1"
    assert plain_field("ü1") == "ü1" and plain_field("a", "ascii") == "a"
    assert plain_field("ü1", "no-such-encoding") == "ü1"
