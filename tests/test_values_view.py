import html
import json
import re
from html.parser import HTMLParser

import numpy as np
import pytest
import torch
from conftest import sentencepiece_tokenizer
from hypothesis import given, settings
from hypothesis import strategies as st

from lenvm import LengthValueModel
from lenvm.io import InputError, write_text
from lenvm.prompts import encode_prompt
from lenvm.returns import length_to_value, td_residual
from lenvm.values_view import TokenValue, ValueTrace, render_html, token_values

PROMPT = "Explain why the sky is blue in one sentence."
TEXT = "The quick brown fox jumps over the lazy dog."


@pytest.fixture(scope="module")
def lenvm(tiny_path, tiny_generator):
    torch.manual_seed(0)
    return LengthValueModel.from_base(tiny_path, kind="attached", gamma=0.9, generator=tiny_generator)


def completion_ids(lenvm, text=TEXT):
    return lenvm.tokenizer(text, add_special_tokens=False)["input_ids"]


def fake_forward(monkeypatch, lenvm, fn):
    """Replace the model's values by ``fn(position)`` at each input position."""

    def forward(input_ids, attention_mask=None):
        positions = torch.arange(input_ids.shape[1], dtype=torch.float64)
        return fn(positions).float().expand(input_ids.shape[0], -1)

    monkeypatch.setattr(lenvm, "forward", forward)


def test_alignment_of_states_and_tokens(lenvm, monkeypatch):
    prompt_len = len(encode_prompt(lenvm.tokenizer, PROMPT))
    ids = completion_ids(lenvm)
    # Value = -position / 1000 shows which input position each state was read from.
    fake_forward(monkeypatch, lenvm, lambda p: -p / 1000)
    trace = token_values(lenvm, PROMPT, TEXT)
    eos = lenvm.config.eos_token_ids[0]
    assert trace.num_tokens == len(ids) + 1
    assert [t.token_id for t in trace.tokens] == ids + [eos]
    assert [t.index for t in trace.tokens] == list(range(len(ids) + 1))
    assert trace.tokens[0].value_before == pytest.approx(-(prompt_len - 1) / 1000)
    assert trace.tokens[-1].value_before == pytest.approx(-(prompt_len + len(ids) - 1) / 1000)
    assert trace.tokens[-1].value_after == 0.0
    for a, b in zip(trace.tokens, trace.tokens[1:], strict=False):
        assert a.value_after == b.value_before
    assert [t.true_remaining for t in trace.tokens] == list(range(len(ids) + 1, 0, -1))


def test_unfinished_keeps_the_model_value_at_the_cut(lenvm, monkeypatch):
    prompt_len = len(encode_prompt(lenvm.tokenizer, PROMPT))
    ids = completion_ids(lenvm)
    fake_forward(monkeypatch, lenvm, lambda p: -p / 1000)
    trace = token_values(lenvm, PROMPT, ids, finished=False)
    assert trace.num_tokens == len(ids)
    assert trace.tokens[-1].token_id == ids[-1]
    assert trace.tokens[-1].value_after == pytest.approx(-(prompt_len + len(ids) - 1) / 1000)
    assert all(t.true_remaining is None for t in trace.tokens)
    summary = trace.to_dict()["summary"]
    assert summary["remaining_mae"] is None and summary["true_length"] is None


def test_residuals_and_lengths_follow_from_the_values(lenvm):
    trace = token_values(lenvm, PROMPT, TEXT)
    values = np.array([t.value_before for t in trace.tokens] + [trace.tokens[-1].value_after])
    assert values[-1] == 0.0 and np.all(values[:-1] < 0)
    np.testing.assert_allclose([t.residual for t in trace.tokens], td_residual(values, trace.gamma))
    for t in trace.tokens:
        assert t.predicted_total == pytest.approx(t.index + t.predicted_remaining)
    assert trace.summary()["predicted_length"] == trace.tokens[0].predicted_remaining
    # An untrained head is far from the truth: the error metric is not trivially zero.
    assert trace.summary()["remaining_mae"] > 0.5


def test_exact_values_give_zero_error_and_zero_residual(lenvm, monkeypatch):
    prompt_len = len(encode_prompt(lenvm.tokenizer, PROMPT))
    length = len(completion_ids(lenvm)) + 1  # EOS included
    gamma = lenvm.gamma

    def exact(p):
        remaining = torch.clamp(length - (p - (prompt_len - 1)), max=length)
        return length_to_value(remaining, gamma)

    fake_forward(monkeypatch, lenvm, exact)
    trace = token_values(lenvm, PROMPT, TEXT)
    summary = trace.summary()
    assert summary["remaining_mae"] == pytest.approx(0.0, abs=1e-3)
    assert summary["predicted_length"] == pytest.approx(length, abs=1e-3)
    assert summary["prompt_relative_error"] == pytest.approx(0.0, abs=1e-4)
    assert np.abs([t.residual for t in trace.tokens]).max() < 1e-6


def test_text_and_ids_agree(lenvm):
    ids = completion_ids(lenvm)
    eos = lenvm.config.eos_token_ids[0]
    from_text = token_values(lenvm, PROMPT, TEXT).to_dict()
    assert token_values(lenvm, PROMPT, ids).to_dict() == from_text
    assert token_values(lenvm, PROMPT, ids + [eos]).to_dict() == from_text
    messages = [{"role": "user", "content": PROMPT}]
    assert token_values(lenvm, messages, ids).to_dict() == from_text
    assert "".join(t["text"] for t in from_text["tokens"][:-1]) == TEXT


def test_to_dict_is_json(lenvm):
    data = json.loads(json.dumps(token_values(lenvm, PROMPT, TEXT).to_dict()))
    assert data["gamma"] == 0.9
    assert data["prompt_tokens"] == len(encode_prompt(lenvm.tokenizer, PROMPT))
    assert set(data["tokens"][0]) >= {
        "index",
        "text",
        "value_before",
        "value_after",
        "predicted_remaining",
        "true_remaining",
        "residual",
        "predicted_total",
    }
    assert data["summary"]["true_length"] == len(data["tokens"])


def test_bad_completions_are_input_errors(lenvm):
    eos = lenvm.config.eos_token_ids[0]
    with pytest.raises(InputError):
        token_values(lenvm, PROMPT, "", finished=False)
    with pytest.raises(InputError):
        token_values(lenvm, PROMPT, completion_ids(lenvm) + [eos], finished=False)
    # An empty finished completion is just its EOS: one state, the prompt boundary.
    only_eos = token_values(lenvm, PROMPT, "")
    assert only_eos.num_tokens == 1
    assert render_html(only_eos).count("<circle") == 2  # its predicted and true length, as dots
    # Nothing follows an EOS (here written out as text, which the tokenizer makes the EOS token).
    with pytest.raises(InputError, match="holds the EOS token at token 2"):
        token_values(lenvm, PROMPT, "a<|im_end|>b c")
    # Ids of another tokenizer are refused by name, not by an index error deep in the model.
    vocab = lenvm.backbone.get_input_embeddings().weight.shape[0]
    for bad in (vocab, -1):
        with pytest.raises(InputError, match=f"holds token id {bad}, outside the vocabulary"):
            token_values(lenvm, PROMPT, [bad])
    with pytest.raises(InputError, match="the completion: its text holds U\\+DCED"):
        token_values(lenvm, PROMPT, "x\udced")  # argv bytes that are not UTF-8


# Bytes of 你 (E4 BD A0) and 🎉 (F0 9F 8E 89), "a" and a space: lead bytes, continuations, ASCII.
_BYTES = [0xE4, 0xBD, 0xA0, 0xF0, 0x9F, 0x8E, 0x89, 0x61, 0x20]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(_BYTES), max_size=24))
def test_token_texts_join_into_the_decoded_text(data):
    """Whatever the bytes, stray ones included (each shown as U+FFFD), the pieces join back."""
    from lenvm.values_view import _byte_level_alphabet, token_texts

    tokenizer = _tokenizer("byte level")
    char_of = {b: c for c, b in _byte_level_alphabet().items()}
    ids = tokenizer.convert_tokens_to_ids([char_of[b] for b in data])  # one byte token each
    assert "".join(token_texts(tokenizer, ids)) == tokenizer.decode(ids)


# Byte tokens of the bytes above, "▁a", "▁b", "▁", "a" and the EOS of a SentencePiece vocabulary.
_PIECES = [2 + b for b in _BYTES] + [258, 259, 260, 261, 1]


@pytest.mark.parametrize("decoder", ["byte fallback", "strip first space", "metaspace"])
@settings(max_examples=200, deadline=None)
@given(ids=st.lists(st.sampled_from(_PIECES), max_size=24))
def test_sentencepiece_token_texts_join_into_the_decoded_text(decoder, ids):
    """Words keep their leading space, which a decoder that strips the first space of a text
    would take from each token decoded alone; a byte run that a stray byte makes invalid shows
    as U+FFFD throughout, the characters before the stray byte included."""
    from lenvm.values_view import token_texts

    tokenizer = _tokenizer(decoder)
    assert "".join(token_texts(tokenizer, ids)) == tokenizer.decode(ids)


def test_words_keep_their_leading_space_but_the_first_as_the_decoded_text_shows_it():
    from lenvm.values_view import token_texts

    for decoder in ("strip first space", "metaspace"):
        tokenizer = _tokenizer(decoder)
        assert token_texts(tokenizer, [258, 259, 258, 1]) == ["a", " b", " a", "</s>"]  # "a b a</s>"
        assert token_texts(tokenizer, [260, 258]) == ["", " a"]  # the text's first space is dropped
    assert token_texts(_tokenizer("byte fallback"), [258, 259]) == [" a", " b"]  # Gemma keeps it


class _EmptyBatchAsOneText:
    """A tokenizer whose ``batch_decode([])`` answers one empty text, as transformers 5.17 to
    5.23 do."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)

    def batch_decode(self, sequences):
        return self.tokenizer.batch_decode(sequences) if sequences else [""]


def test_no_tokens_have_no_texts_whatever_the_tokenizer_decodes_of_an_empty_batch():
    from lenvm.values_view import token_texts_alone

    tokenizer = _EmptyBatchAsOneText(_tokenizer("byte level"))
    assert token_texts_alone(tokenizer, []) == []
    ids = tokenizer.encode("a b", add_special_tokens=False)
    assert "".join(token_texts_alone(tokenizer, ids)) == "a b"


_TOKENIZERS: dict = {}


def _tokenizer(kind: str):
    """A test tokenizer, built once: byte-level BPE, or a SentencePiece one (see
    :func:`conftest.sentencepiece_tokenizer`) whose decoder is ``kind``."""
    if kind not in _TOKENIZERS:
        from lenvm.testing import tiny_tokenizer

        _TOKENIZERS[kind] = tiny_tokenizer() if kind == "byte level" else sentencepiece_tokenizer(kind)
    return _TOKENIZERS[kind]


class _CountingDecoder:
    """A tokenizer that counts the token ids it decodes."""

    def __init__(self, tokenizer):
        self.tokenizer, self.decoded = tokenizer, 0

    def decode(self, ids):
        self.decoded += len(ids)
        return self.tokenizer.decode(ids)

    def convert_ids_to_tokens(self, ids):
        return self.tokenizer.convert_ids_to_tokens(ids)


def test_a_long_run_of_stray_bytes_is_read_in_linear_time():
    from lenvm.values_view import _byte_level_alphabet, token_texts

    tokenizer = _tokenizer("byte level")
    char_of = {b: c for c, b in _byte_level_alphabet().items()}
    # 600 stray bytes, then 你 (E4 BD A0) and "a": the strays wait, with the character's first
    # bytes, for the token that completes it.
    data = [0xFF, 0x80] * 300 + [0xE4, 0xBD, 0xA0, 0x61]
    ids = tokenizer.convert_tokens_to_ids([char_of[b] for b in data])
    counting = _CountingDecoder(tokenizer)
    assert token_texts(counting, ids) == [""] * 602 + ["\ufffd" * 600 + "你", "a"]
    assert counting.decoded < 10 * len(ids)  # each token decoded a few times, not once per later one


def test_a_long_invalid_run_of_byte_tokens_is_read_in_linear_time():
    """A run of byte tokens that starts with a stray byte is invalid whatever follows, so a byte
    fallback decoder shows every byte of it as U+FFFD, however valid its last bytes alone are."""
    from lenvm.values_view import token_texts

    tokenizer = _tokenizer("byte fallback")
    ids = [2 + 0x80] + [2 + ord("A")] * 2000 + [258]  # a continuation byte, "A" 2000 times, " a"
    counting = _CountingDecoder(tokenizer)
    assert token_texts(counting, ids) == [""] * 2001 + ["\ufffd" * 2001 + " a"]
    assert counting.decoded < 10 * len(ids)  # each token decoded a few times, not once per later one
    # A run of characters that a stray byte at its end makes invalid: the whole text shows U+FFFD
    # for each of its bytes, and so do the tokens, found as soon as the first character reads otherwise.
    ids = [2 + b for b in "你".encode()] * 700 + [2 + 0x80, 258]
    counting = _CountingDecoder(tokenizer)
    assert token_texts(counting, ids) == [""] * 2101 + ["\ufffd" * 2101 + " a"]
    assert counting.decoded < 10 * len(ids)
    # A run that is valid after all is still given to the token that completes each character.
    ids = [2 + b for b in "é你🎉".encode()] + [258]
    assert token_texts(tokenizer, ids) == ["", "é", "", "", "你", "", "", "", "🎉", " a"]


def test_characters_split_over_tokens_are_shown_whole(lenvm):
    text = "用中文 🎉 done"
    trace = token_values(lenvm, PROMPT, text)
    shown = [t.text for t in trace.tokens[:-1]]  # the EOS last
    assert len(shown) > len(text)  # byte-level pieces: several tokens per character
    assert "".join(shown) == text and "\ufffd" not in "".join(shown)
    assert "中" in shown and "🎉" in shown
    # In the page each piece before a character's last is a sliver of its own colour, named as such.
    page = render_html(trace)
    assert ".tok:empty { display: inline-block;" in page
    assert len(re.findall(r'class="tok" data-i="\d+" style="[^"]*"></span>', page)) == shown.count("") > 0
    assert page.count("(part of the next character)") == shown.count("")


def test_html_escapes_tokens_and_is_self_contained(lenvm, tmp_path):
    nasty = "a <script>alert(\"x\")</script> & 'q'\n\tb"
    trace = token_values(lenvm, PROMPT, nasty)
    page = render_html(trace, title="<b>title</b> & more")
    assert "<script>alert" not in page
    assert "&lt;b&gt;title&lt;/b&gt; &amp; more" in page
    assert page.count("<script") == 2 and page.count("</script>") == 2  # only our own two
    assert not re.search(r"https?://", page)
    assert not re.search(r"""(src|href)\s*=\s*["']?[^"'#>\s]""", page)  # nothing to fetch
    assert page.count('class="tok"') == trace.num_tokens
    assert "\u21b5" in page  # newlines made visible
    assert "<svg" in page and "<polyline" in page
    data = re.search(r'id="lenvm-data">(.*?)</script>', page, re.S).group(1)
    rows = json.loads(data)
    assert "".join(r["text"] for r in rows[:-1]) == nasty
    assert "longer" in page and "shorter" in page
    path = tmp_path / "trace.html"
    write_text(path, page)
    assert path.read_text(encoding="utf-8") == page


class _TokenSpans(HTMLParser):
    """The token spans of a page: the text each holds (what a copy of it gives) and its marks."""

    def __init__(self, page):
        super().__init__()
        self.tokens = []
        self.depth = 0  # of elements open inside the token span being read
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if self.depth:
            self.depth += 1
            if "data-mark" in attrs:
                self.tokens[-1][1].append(attrs["data-mark"])
        elif attrs.get("class") == "tok":
            self.depth = 1
            self.tokens.append(["", []])

    def handle_endtag(self, tag):
        self.depth = max(self.depth - 1, 0)

    def handle_data(self, data):
        if self.depth:
            self.tokens[-1][0] += data


def test_tokens_that_draw_nothing_get_a_mark_and_copy_as_themselves():
    """A zero-width or other format character, a control, or a combining mark with nothing before
    it in its token left its token without width: nothing to see or to hover."""
    texts = ["Hi", "\u200d", "\u0301", "\u200b", "\x00", "\u202e", "a\tb", "\r\n", "x\u0301", "\u2028", ""]
    tokens = [TokenValue(i, 7, text, -0.5, -0.4, 3.0, None, 0.1, i + 3.0) for i, text in enumerate(texts)]
    page = render_html(ValueTrace(0.9, [1], "Say it.", tokens, finished=False))
    spans = _TokenSpans(page).tokens
    assert [marks for _, marks in spans] == [
        [],
        ["U+200D"],
        ["\u25cc"],  # a dotted circle for the mark to sit on
        ["U+200B"],
        ["U+0000"],
        ["U+202E"],
        ["\u2192"],
        ["U+000D", "\u21b5"],
        [],  # on its letter
        ["U+2028"],
        [],  # a piece of a character: a sliver of its own
    ]
    assert ".mark::before { content: attr(data-mark);" in page  # drawn by the style: not copied
    # HTML reads a CR as a newline and drops a NUL; every other character stays as it was.
    assert [held for held, _ in spans] == [t.replace("\r", "").replace("\x00", "") for t in texts]
    assert ".mark { color: rgba(0,0,0,0.5); unicode-bidi: isolate; }" in page  # a U+202E turns only itself
    rows = json.loads(re.search(r'id="lenvm-data">(.*?)</script>', page, re.S).group(1))
    assert [r["repr"] for r in rows[1:6]] == ['"\\u200d"', '"\u0301"', '"\\u200b"', '"\\u0000"', '"\\u202e"']


def test_html_colours_follow_the_residual_sign(lenvm):
    def trace_with(residuals):
        trace = token_values(lenvm, PROMPT, "one two")
        for t, r in zip(trace.tokens, residuals, strict=True):
            t.residual = r
        return trace

    n = token_values(lenvm, PROMPT, "one two").num_tokens
    page = render_html(trace_with([-0.5] * n))
    assert page.count("rgba(230,97,1,0.850)") == n  # orange: longer
    page = render_html(trace_with([0.5] * n))
    assert page.count("rgba(33,102,172,0.850)") == n  # blue: shorter


def test_html_of_an_unfinished_trace(lenvm):
    trace = token_values(lenvm, PROMPT, TEXT, finished=False)
    assert isinstance(trace, ValueTrace)
    page = render_html(trace)
    assert "cut, no EOS" in page
    rows = json.loads(re.search(r'id="lenvm-data">(.*?)</script>', page, re.S).group(1))
    assert all(r["true_remaining"] is None for r in rows)


def test_repr_is_a_summary_not_every_token(lenvm):
    long = " ".join(["word"] * 40)
    trace = token_values(lenvm, PROMPT, long)
    text = repr(trace)
    assert len(text) < 400 and text.count("TokenValue") == 0
    assert f"{trace.num_tokens} tokens (ended with EOS)" in text
    assert f"prompt of {len(trace.prompt_token_ids)} tokens" in text
    assert "'word word" in text and "…'" in text  # the answer's start, cut short
    assert "cut, no EOS" in repr(token_values(lenvm, PROMPT, TEXT, finished=False))


def test_a_notebook_shows_the_view_in_a_frame_of_its_own(lenvm):
    traces = [token_values(lenvm, PROMPT, TEXT), token_values(lenvm, "Say hi.", "Hi!")]
    outputs = [t._repr_html_() for t in traces]
    for trace, output in zip(traces, outputs, strict=True):
        frame = re.fullmatch(r'<iframe srcdoc="([^"]*)" title="[^"<>]*" style="[^"]*"></iframe>', output)
        assert frame, output[:200]
        assert html.unescape(frame.group(1)) == render_html(trace)  # the whole page, escaped
    # On one notebook page the two views' styles, scripts and ids stay in their frames.
    page = "".join(re.sub(r'srcdoc="[^"]*"', "", output) for output in outputs)
    assert not re.search(r"<style|<script|\bid=", page)


def test_the_chart_shows_a_prediction_several_times_the_truth_and_clips_an_absurd_one(lenvm):
    trace = token_values(lenvm, PROMPT, "one two")  # a few tokens, ended
    n = trace.num_tokens
    for first, clipped in ((8.0 * n, False), (50.0 * n, True)):
        trace.tokens[0].predicted_remaining = first
        page = render_html(trace)
        assert ("(clipped at the top)" in page) == clipped
        # the legend's entries side by side, the longer label not running into "true"
        entries = re.findall(r'<text x="(\d+)" y="14">([^<]+)</text>', page)
        legend = sorted((int(x), text) for x, text in entries if text != "remaining tokens")
        (x_pred, label), (x_true, true) = legend
        assert true == "true" and x_pred + 6 * len(label) < x_true - 20


def test_values_that_are_not_finite_are_an_error_not_a_broken_page(lenvm, monkeypatch):
    import lenvm.values_view as view

    monkeypatch.setattr(view, "state_values", lambda model, examples: [np.full(4, np.nan)])
    with pytest.raises(InputError, match="not finite"):
        token_values(lenvm, PROMPT, "one two")
