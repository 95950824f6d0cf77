"""The benchmarks' Markdown tables and code spans hold text from data exactly as it is."""

import html
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lenvm.bench.common import markdown_code, markdown_table
from lenvm.bench.length_tokens import _markdown as length_tokens_markdown

HOSTILE = ["a|b", "x\ny", "cr\r\nlf", "a\\|b", "`tick`", "| edge |"]


def _cells(line: str) -> list[str]:
    """A GFM table row's cells: split at each pipe that no backslash escapes."""
    return [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]


def test_every_cell_stays_in_its_row_and_column():
    table = markdown_table(["domain", *HOSTILE], [[text, *range(len(HOSTILE))] for text in HOSTILE])
    lines = table.splitlines()
    assert len(lines) == 2 + len(HOSTILE)  # no line break splits a row
    assert {len(_cells(line)) for line in lines} == {1 + len(HOSTILE)}
    assert _cells(lines[0])[1] == r"a\|b" and _cells(lines[4])[0] == "cr<br>lf"


def _rendered(markdown: str) -> str:
    markdown_it = pytest.importorskip("markdown_it")
    return markdown_it.MarkdownIt("commonmark").enable("table").render(markdown)


def test_a_renderer_reads_the_cells_back():
    table = markdown_table(["domain", "a|b"], [["x|y\nz", markdown_code("p|q")]])
    assert re.findall(r"<t[hd]>(.*?)</t[hd]>", _rendered(table)) == [
        "domain",
        "a|b",
        "x|y<br>z",
        "<code>p|q</code>",
    ]


@pytest.mark.parametrize("text", ["plain", "a`b", "```", "`x", "x`", "`", " a ", " `` ", "'a`|b'"])
def test_code_spans_show_their_text_exactly(text):
    assert _rendered(markdown_code(text)) == f"<p><code>{html.escape(text, quote=False)}</code></p>\n"


@given(st.text(alphabet=st.sampled_from("`a |\\"), min_size=1))
def test_any_code_span_shows_its_text_exactly(text):
    if not text.strip(" "):
        return  # a line of spaces is no paragraph: nothing to compare
    assert _rendered(markdown_code(text)) == f"<p><code>{html.escape(text, quote=False)}</code></p>\n"


def test_length_tokens_table_shows_tokens_with_backticks_and_pipes():
    tokens = ["```", "a`|b", "`"]
    stat = {"count": 3, "longer_fraction": 1.0, "shorter_fraction": 0.0, "mean_residual": -0.1}
    results = {
        "completions": 1,
        "tokens": 9,
        "gamma": 0.9,
        "threshold": 0.1,
        "min_count": 1,
        "settings": {"threshold": 0.1},
        "longer": [{**stat, "token": t} for t in tokens],
        "shorter": [],
    }
    codes = re.findall(r"<code>(.*?)</code>", _rendered(length_tokens_markdown(results)))
    assert codes == [html.escape(repr(t), quote=False) for t in tokens]
