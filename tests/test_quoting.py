"""User values quoted short in messages."""

from lenvm.quoting import QUOTED_CHARS, quoted, shortened


def test_a_short_value_is_quoted_whole():
    assert quoted("模型 🎉") == "'模型 🎉'" and quoted(5) == "5" and quoted(None) == "None"
    assert shortened("x" * QUOTED_CHARS) == "x" * QUOTED_CHARS


def test_a_long_value_is_cut_between_characters_with_an_ellipsis():
    assert shortened("🎉" * 100, 10) == "🎉" * 9 + "…"
    text = quoted("模" * 1000)
    assert text == "'" + "模" * (QUOTED_CHARS - 1) + "…'"  # the quotes stay
    assert quoted(list(range(1000))) == repr(list(range(1000)))[: QUOTED_CHARS - 1] + "…"
    assert len(quoted("\x00" * 1000)) < 5 * QUOTED_CHARS  # escapes are a few characters each
