"""Per-token values of one completion, and a self-contained HTML view of them.

For a completion of ``L`` tokens, state ``s_t`` is the prompt plus the first ``t`` tokens;
token ``t`` (0-based) moves ``s_t`` to ``s_{t+1}``. Its TD residual
``delta_t = -(1 - gamma) + gamma * V(s_{t+1}) - V(s_t)`` says how much the token changed the
expected rest: with values negative, ``delta < 0`` means the rest got longer than the model
expected, ``delta > 0`` shorter. A prompt's images (vision-language LenVMs) are read with it, and
the HTML view shows them beside the text.
"""

from __future__ import annotations

import base64
import html
import io
import itertools
import json
import re
import unicodedata
from dataclasses import asdict, dataclass, field
from typing import Any, cast

import numpy as np
import torch
from tqdm.auto import tqdm

from lenvm import vision
from lenvm.dataset import Example
from lenvm.io import InputError
from lenvm.model import LengthValueModel, right_pad
from lenvm.prompts import PromptInput, as_prompt, is_token_ids, unencodable
from lenvm.quoting import quoted
from lenvm.returns import td_residual, value_to_length


@dataclass
class TokenValue:
    """One completion token and the values around it.

    ``predicted_remaining`` and ``true_remaining`` belong to the state *before* the token
    (tokens still to come, this one included), so token 0 carries the prompt-boundary prediction.
    """

    index: int
    token_id: int
    text: str
    value_before: float
    value_after: float
    predicted_remaining: float
    true_remaining: int | None
    residual: float
    predicted_total: float


_PREVIEW_CHARS = 40  # of the completion's text in a ValueTrace's repr


@dataclass
class ValueTrace:
    """One completion valued token by token (:func:`token_values`): each token's
    :class:`TokenValue`, whether the completion ended with EOS, the prompt; ``to_dict`` is the JSON
    ``lenvm values`` prints and :func:`render_html` draws it. A notebook shows it as that view."""

    gamma: float
    prompt_token_ids: list[int]
    prompt_text: str
    tokens: list[TokenValue]
    finished: bool
    images: list[str] = field(default_factory=list)  # references of the prompt's images

    @property
    def num_tokens(self) -> int:
        """The completion's tokens, its EOS included where it ended: the count of a rollout record
        and of a predicted length (a generated :class:`~lenvm.decoding.Result` leaves the EOS
        out)."""
        return len(self.tokens)

    def summary(self) -> dict[str, Any]:
        """Prompt-boundary prediction vs the true length, and the mean error over all states;
        ``num_tokens`` and ``true_length`` count the EOS, as :attr:`num_tokens` does."""
        predicted = max(self.tokens[0].predicted_total, 1.0)  # as predict_length: every answer has its EOS
        out: dict[str, Any] = {
            "num_tokens": self.num_tokens,
            "finished": self.finished,
            "predicted_length": predicted,
            "true_length": None,
            "prompt_relative_error": None,
            "remaining_mae": None,
        }
        if self.finished:
            # Every token of a finished completion knows how many tokens were still to come.
            errors = [abs(t.predicted_remaining - cast(int, t.true_remaining)) for t in self.tokens]
            out.update(
                true_length=self.num_tokens,
                prompt_relative_error=abs(predicted - self.num_tokens) / self.num_tokens,
                remaining_mae=float(np.mean(errors)),
            )
        return out

    def __repr__(self) -> str:
        # The summary, not every token (hundreds of TokenValue reprs): the tokens are in .tokens.
        images = f", {len(self.images)} image{'s' if len(self.images) != 1 else ''}" if self.images else ""
        preview = quoted("".join(t.text for t in self.tokens), _PREVIEW_CHARS)
        return (
            f"<ValueTrace {preview}: {_summary_line(self)}; prompt of {len(self.prompt_token_ids)} "
            f"tokens{images}>"
        )

    def _repr_html_(self) -> str:
        """The page of :func:`render_html` in a frame of its own, sized to it (a notebook's view)."""
        return _framed_html(self)

    def to_dict(self) -> dict[str, Any]:
        return {
            "gamma": self.gamma,
            "prompt_tokens": len(self.prompt_token_ids),
            "images": self.images,
            "finished": self.finished,
            "tokens": [asdict(t) for t in self.tokens],
            "summary": self.summary(),
        }


@torch.no_grad()
def state_values(
    lenvm: LengthValueModel, examples: list[Example], batch_size: int = 8, progress: bool = False
) -> list[np.ndarray]:
    """``V(s_0) .. V(s_L)`` of each example (float64), ``V(s_L) = 0`` after EOS.

    Batches are formed from examples of similar length, so right padding stays small.
    """
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    out: dict[int, np.ndarray] = {}
    bar = tqdm(total=len(examples), unit="completion", desc="values", disable=not progress)
    for begin in range(0, len(order), batch_size):
        chunk = order[begin : begin + batch_size]
        ids, mask, _ = right_pad([examples[i].input_ids for i in chunk], lenvm.device)
        rows = [(examples[i].input_ids, examples[i].images) for i in chunk]
        images = vision.forward_images(lenvm.tokenizer, rows, lenvm.device)
        values = lenvm(ids, mask, **images).double().cpu().numpy()
        for row, i in enumerate(chunk):
            e = examples[i]
            # A cut completion's last state s_T is an input; a finished one's follows EOS.
            stop = e.start + e.num_states + (0 if e.finished else 1)
            v = values[row, e.start : stop]
            out[i] = np.append(v, 0.0) if e.finished else v
        bar.update(len(chunk))
    bar.close()
    return [out[i] for i in range(len(examples))]


def token_values(
    lenvm: LengthValueModel,
    prompt: PromptInput,
    completion: str | list[int],
    finished: bool = True,
) -> ValueTrace:
    """Values, predicted lengths and TD residuals along one completion.

    ``completion`` is text (tokenized on its own, without special tokens) or the generator's
    token ids; prefer ids, since text re-tokenized out of context may split differently. When
    ``finished``, an EOS is appended unless the ids already end with one.
    """
    tok = lenvm.tokenizer
    eos = lenvm.config.eos_token_ids
    encoded = vision.encode(tok, prompt)  # token ids are taken as they are, no template applied
    images = [] if is_token_ids(prompt) else as_prompt(prompt).images
    prompt_ids = encoded.ids
    if isinstance(completion, str):
        if (why := unencodable(completion)) is not None:
            raise InputError(f"the completion: {why}")
        ids = list(tok(completion, add_special_tokens=False)["input_ids"])
    else:
        ids = [int(i) for i in completion]
    ends_with_eos = bool(ids) and ids[-1] in eos
    if finished and not ends_with_eos:
        if not eos:
            raise InputError("the LenVM config names no EOS token to end a finished completion")
        ids.append(eos[0])
    elif not finished and ends_with_eos:
        raise InputError("the completion ends with EOS but was marked unfinished")
    if not ids:
        raise InputError("the completion is empty")
    early = next((t for t, i in enumerate(ids[:-1]) if i in eos), None)
    if early is not None:
        raise InputError(
            f"the completion holds the EOS token at token {early + 1} of {len(ids)}: an answer ends at its "
            "EOS, so nothing can follow it"
        )
    input_ids = prompt_ids + (ids[:-1] if finished else ids)
    lenvm.check_tokens(input_ids, encoded.image_tokens, "the prompt and completion")
    example = Example("0", input_ids, len(prompt_ids) - 1, len(ids), finished, tuple(images))
    values = state_values(lenvm, [example])[0]
    gamma = lenvm.gamma
    if not np.all(np.isfinite(values)):
        raise InputError(
            "the LenVM's values are not finite along this answer (a head that overflowed in this "
            "dtype? load it in float32)"
        )
    residuals = td_residual(values, gamma)
    remaining = value_to_length(values, gamma)
    length = len(ids)
    texts = token_texts(tok, ids)
    tokens = [
        TokenValue(
            index=t,
            token_id=token_id,
            text=texts[t],
            value_before=float(values[t]),
            value_after=float(values[t + 1]),
            predicted_remaining=float(remaining[t]),
            true_remaining=length - t if finished else None,
            residual=float(residuals[t]),
            predicted_total=t + float(remaining[t]),
        )
        for t, token_id in enumerate(ids)
    ]
    return ValueTrace(gamma, prompt_ids, _prompt_text(tok, prompt_ids), tokens, finished, images)


# UTF-8 writes a character in at most 4 bytes and every token holds at least one, so the last
# this many tokens of a piece hold its last character's first byte: whether the piece ends inside
# a character shows in them alone.
_CHARACTER_TOKENS = 4

# How SentencePiece's byte fallback names a byte token (Llama, Mistral, Gemma): <0xE5>.
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def token_texts(tokenizer, ids: list[int]) -> list[str]:
    """The text of each token, such that they join into exactly the decoded text of ``ids``.

    A character whose bytes are split over several tokens (byte-level BPE: most Chinese
    characters, emoji) is given to the token that completes it, the ones before it get ``""``,
    instead of each showing a replacement character. Each group of tokens is decoded after the
    group before it, so that a word keeps its leading space where the decoder drops the space at
    the start of a text (SentencePiece: Llama, Mistral, Gemma); the first word of ``ids`` shows it
    as the whole text does.
    """
    if not ids:
        return []
    decoded = tokenizer.decode(ids)
    texts: list[str] = []
    start = 0  # the first token of the group being read
    at = 0  # where the group's text begins in `decoded`
    previous: list[int] = []  # the group before it, and that group decoded alone
    previous_text = ""
    # Set while the run of byte tokens the current token belongs to is known to be invalid UTF-8
    # in the whole text.
    broken_run = False
    is_byte: list[bool] | None = (
        None  # which tokens are byte tokens, found once a decoder shows it reads runs whole
    )
    for i in range(len(ids)):
        if i + 1 == len(ids):
            texts.append(decoded[at:])
            break
        if broken_run and is_byte is not None and is_byte[i]:  # set before any run is found broken
            # A byte fallback decoder shows an invalid run as U+FFFD throughout, and bytes added to
            # a run leave it invalid: the group waits, with nothing decoded again.
            texts.append("")
            continue
        broken_run = False
        # Waits past 4 bytes too: after stray bytes (each a U+FFFD of its own) the tokens that
        # complete a character may still come. The last few tokens are decoded first, so that
        # a long run of stray bytes costs time in proportion to its length.
        tail_start = max(start, i + 1 - _CHARACTER_TOKENS)
        if tokenizer.decode(ids[tail_start : i + 1]).endswith("\ufffd"):
            texts.append("")
            continue
        together = tokenizer.decode(previous + ids[start : i + 1])
        piece = together[len(previous_text) :]
        if (
            together.startswith(previous_text)
            and not piece.endswith("\ufffd")
            and decoded.startswith(piece, at)
        ):
            texts.append(piece)
            at += len(piece)
            previous = ids[start : i + 1]
            previous_text = tokenizer.decode(previous)
            start = i + 1
            continue
        # The group reads otherwise in the whole text. Where its last tokens are byte tokens, a
        # decoder that reads a run of bytes whole found the run invalid, by a byte before them
        # (the group ends in U+FFFD) or after them (the whole text shows U+FFFD where the group
        # shows characters), and it stays invalid to its end.
        if is_byte is None:
            is_byte = [bool(_BYTE_TOKEN.fullmatch(t or "")) for t in tokenizer.convert_ids_to_tokens(ids)]
        broken_run = all(is_byte[tail_start : i + 1])
        texts.append("")
    return texts


def _byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE (GPT-2's scheme) writes each byte as one printable character: printable
    ASCII and most of Latin-1 as themselves, the other bytes as characters from U+0100 on."""
    kept = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars = {b: chr(b) for b in kept}
    for n, b in enumerate(b for b in range(256) if b not in chars):
        chars[b] = chr(0x100 + n)
    return {c: b for b, c in chars.items()}


_BYTE_OF = _byte_level_alphabet()


# Decoded before each token and cut off again (see token_texts_alone): a letter, which every
# tokenizer writes as a token of its own and no decoder joins with the token after it.
_NEUTRAL_TEXT = "a"


def token_texts_alone(tokenizer, ids: list[int]) -> list[str]:
    """The text of each token on its own, as it reads inside a text: a word keeps its leading
    space where the decoder drops the space at the start of a text (SentencePiece: Llama,
    Mistral), so that "▁a" reads " a" and not "a" as the token "a" does.

    Each token is decoded after a neutral token, whose text is then cut off; a token that would
    change that text (none of a usual vocabulary) is decoded alone.
    """
    if not ids:
        # Some tokenizers decode an empty batch as one empty text (transformers 5.17 to 5.23).
        return []
    prefix = tokenizer.encode(_NEUTRAL_TEXT, add_special_tokens=False)
    lead = tokenizer.decode(prefix)
    texts = tokenizer.batch_decode([[*prefix, i] for i in ids])
    return [
        text[len(lead) :] if text.startswith(lead) else tokenizer.decode([i])
        for text, i in zip(texts, ids, strict=True)
    ]


def token_label(tokenizer, token_id: int) -> str:
    """A token's own text (:func:`token_texts_alone`), or, for a piece of a character (which alone
    decodes to U+FFFD), its bytes as ``<0xE5><0xA4>``, so that different pieces stay apart."""
    text = token_texts_alone(tokenizer, [token_id])[0]
    if "\ufffd" not in text:
        return text
    raw = token_bytes(tokenizer, token_id)
    if raw is not None:
        return "".join(f"<0x{b:02X}>" for b in raw)
    return tokenizer.convert_ids_to_tokens(token_id) or text


def token_bytes(tokenizer, token_id: int) -> bytes | None:
    """The bytes a token stands for, read from its vocabulary entry: a byte-fallback token
    ``<0xNN>`` (SentencePiece) that byte, a byte-level BPE token (GPT-2's scheme, which writes each
    byte as one character) its bytes; None for other tokens."""
    raw = tokenizer.convert_ids_to_tokens(token_id)
    if not raw:
        return None
    if _BYTE_TOKEN.fullmatch(raw):
        return bytes([int(raw[3:5], 16)])
    return bytes(_BYTE_OF[c] for c in raw) if all(c in _BYTE_OF for c in raw) else None


def _prompt_text(tokenizer, ids: list[int]) -> str:
    """The prompt as text, each image's run of image tokens shown as one ``[image: N tokens]``."""
    processor = vision.processor_of(tokenizer)
    if processor is None:
        return tokenizer.decode(ids)
    parts = []
    for is_image, run in itertools.groupby(ids, lambda t: t == processor.image_token_id):
        tokens = list(run)
        parts.append(f"[image: {len(tokens)} tokens]" if is_image else tokenizer.decode(tokens))
    return "".join(parts)


# -- HTML -----------------------------------------------------------------------------------

LONGER_RGB = (230, 97, 1)  # orange: the token made the rest longer (residual < 0)
SHORTER_RGB = (33, 102, 172)  # blue: the token made the rest shorter (residual > 0)

_CSS = """
body { font: 14px/1.5 system-ui, sans-serif; margin: 2em auto; max-width: 60em; color: #222; }
h1 { font-size: 1.3em; }
.summary { font-weight: 600; }
.note { color: #555; font-size: 0.92em; }
.swatch { display: inline-block; width: 1em; height: 1em; vertical-align: -0.15em; }
.prompt { white-space: pre-wrap; color: #666; background: #f4f4f4; padding: 0.5em; }
.view { display: flex; gap: 1em; align-items: flex-start; }
.images { flex: none; display: flex; flex-direction: column; gap: 0.5em; }
.images img { max-width: 240px; max-height: 240px; border: 1px solid #ddd; }
.text { flex: 1; min-width: 0; }
.completion { white-space: pre-wrap; font-family: ui-monospace, monospace; line-height: 1.9;
  border: 1px solid #ddd; padding: 0.6em; }
.tok { box-shadow: inset 0 0 0 1px rgba(0,0,0,0.10); border-radius: 2px; cursor: default; }
.tok:hover { outline: 2px solid #000; }
.tok:empty { display: inline-block; width: 0.4em; height: 1.2em; vertical-align: -0.25em; }
.mark { color: rgba(0,0,0,0.5); unicode-bidi: isolate; }
.mark::before { content: attr(data-mark); font-size: 0.8em; }
#tip { position: fixed; pointer-events: none; background: #fff; border: 1px solid #888;
  padding: 0.3em 0.6em; font-size: 12px; box-shadow: 2px 2px 6px rgba(0,0,0,0.2); }
#tip td:first-child { color: #666; padding-right: 1em; }
svg text { font-size: 11px; fill: #444; }
"""

_JS = """
const rows = JSON.parse(document.getElementById('lenvm-data').textContent);
const tip = document.getElementById('tip');
const marker = document.getElementById('marker');
const fmt = (x, d) => x === null ? 'n/a' : Number(x).toFixed(d);
function show(ev) {
  const r = rows[Number(ev.currentTarget.dataset.i)];
  const table = document.createElement('table');
  for (const [k, v] of [['index', r.index], ['token', r.repr], ['token id', r.token_id],
      ['value before', fmt(r.value_before, 4)], ['value after', fmt(r.value_after, 4)],
      ['predicted remaining', fmt(r.predicted_remaining, 1)],
      ['true remaining', fmt(r.true_remaining, 0)], ['TD residual', fmt(r.residual, 4)],
      ['predicted total', fmt(r.predicted_total, 1)]]) {
    const tr = table.insertRow();
    tr.insertCell().textContent = k;
    tr.insertCell().textContent = String(v);
  }
  tip.replaceChildren(table);
  tip.hidden = false;
  marker.setAttribute('x1', r.x);
  marker.setAttribute('x2', r.x);
  marker.style.display = '';
}
// Where the tip (its size along an axis) goes beside the pointer: after it, or before it where the
// window has no room after it (a frame fitted to the page has none below its last line).
const beside = (at, size, room) => Math.max(0, at + 14 + size > room ? at - 14 - size : at + 14);
function move(ev) {
  tip.style.left = beside(ev.clientX, tip.offsetWidth, innerWidth) + 'px';
  tip.style.top = beside(ev.clientY, tip.offsetHeight, innerHeight) + 'px';
}
for (const el of document.querySelectorAll('.tok')) {
  el.addEventListener('mouseenter', show);
  el.addEventListener('mousemove', move);
  el.addEventListener('mouseleave', () => { tip.hidden = true; marker.style.display = 'none'; });
}
// In a frame (a notebook's view, same origin), the frame takes the page's height as it changes:
// the prompt opened, the notebook made narrower; and the height of a horizontal scrollbar, there
// when the chart is wider than the frame. Standalone, frameElement is null.
const frame = window.frameElement;
if (frame) {
  const root = document.documentElement;
  const fit = () => {
    const scrollbar = innerHeight - root.clientHeight;
    frame.style.height = Math.ceil(root.getBoundingClientRect().height + scrollbar) + 'px';
  };
  new ResizeObserver(fit).observe(root);
}
"""

_W, _H = 720, 220  # chart size
_LEFT, _RIGHT, _TOP, _BOTTOM = 48, 12, 24, 30


def _x(index: int, count: int) -> float:
    return _LEFT + (_W - _LEFT - _RIGHT) * (index / max(count - 1, 1))


def _y(length: float, top: float) -> float:
    return _TOP + (_H - _TOP - _BOTTOM) * (1.0 - min(length, top) / top)


def _polyline(points: list[float], top: float, attrs: str) -> str:
    if len(points) == 1:  # one state (an answer that is only its EOS): a line of one point draws nothing
        return f'<circle cx="{_x(0, 1):.1f}" cy="{_y(points[0], top):.1f}" r="3" fill="none" {attrs}/>'
    coords = " ".join(f"{_x(i, len(points)):.1f},{_y(p, top):.1f}" for i, p in enumerate(points))
    return f'<polyline fill="none" points="{coords}" {attrs}/>'


def _chart(trace: ValueTrace) -> str:
    """Predicted (and, if finished, true) remaining length at each state ``s_0 .. s_{L-1}``."""
    predicted = [t.predicted_remaining for t in trace.tokens]
    n = len(predicted)
    # An untrained head can predict absurd lengths; cap the axis so the truth stays readable (at
    # a tenth of the height at least), but show a trained head that is off by several times.
    top = min(max(predicted), 10.0 * n) if trace.finished else max(predicted)
    top = max(top, float(n) if trace.finished else 1.0, 1.0)
    clipped = max(predicted) > top
    parts = [f'<svg width="{_W}" height="{_H}" viewBox="0 0 {_W} {_H}" role="img">']
    bottom = _H - _BOTTOM
    parts.append(
        f'<line x1="{_LEFT}" y1="{bottom}" x2="{_W - _RIGHT}" y2="{bottom}" stroke="#999"/>'
        f'<line x1="{_LEFT}" y1="{_TOP}" x2="{_LEFT}" y2="{bottom}" stroke="#999"/>'
    )
    decimals = 0 if top >= 10 else 1  # a short answer's half-way tick is 1.5, not "2"
    for frac in (0.0, 0.5, 1.0):
        y = _y(top * frac, top)
        parts.append(
            f'<text x="{_LEFT - 4}" y="{y + 4:.1f}" text-anchor="end">{top * frac:.{decimals}f}</text>'
            f'<line x1="{_LEFT}" y1="{y:.1f}" x2="{_W - _RIGHT}" y2="{y:.1f}" stroke="#eee"/>'
        )
    parts.append(
        f'<text x="{_LEFT}" y="{_H - 8}">token 0</text>'
        f'<text x="{_W - _RIGHT}" y="{_H - 8}" text-anchor="end">token {n - 1}</text>'
        f'<text x="{(_W + _LEFT) / 2:.0f}" y="{_H - 8}" text-anchor="middle">position</text>'
        f'<text x="{_LEFT}" y="14">remaining tokens</text>'
    )
    if trace.finished:
        truth = [float(cast(int, t.true_remaining)) for t in trace.tokens]  # finished: all known
        dashed = 'stroke="#888" stroke-width="1.5" stroke-dasharray="4 3"'
        parts.append(_polyline(truth, top, dashed))
    parts.append(_polyline(predicted, top, 'stroke="#1f77b4" stroke-width="1.8"'))
    legend = [
        ("predicted" + (" (clipped at the top)" if clipped else ""), 'stroke="#1f77b4" stroke-width="2"')
    ]
    if trace.finished:
        legend.append(("true", 'stroke="#888" stroke-dasharray="4 3" stroke-width="1.5"'))
    x: float = _W - _RIGHT
    for text, stroke in reversed(legend):  # laid out from the right by the text's width
        x -= 24 + 6.5 * len(text)
        parts.append(
            f'<line x1="{x:.0f}" y1="10" x2="{x + 20:.0f}" y2="10" {stroke}/>'
            f'<text x="{x + 24:.0f}" y="14">{html.escape(text)}</text>'
        )
        x -= 14
    parts.append(
        f'<line id="marker" x1="0" y1="{_TOP}" x2="0" y2="{bottom}" stroke="#000" '
        'style="display:none"/></svg>'
    )
    return "".join(parts)


# Characters that draw nothing where they stand: controls (a newline, NUL), format characters
# (zero-width space and joiner, bidirectional controls), line and paragraph separators.
_UNSEEN = frozenset({"Cc", "Cf", "Zl", "Zp"})
# Combining marks, which draw on the character before them: nothing where a token starts with one.
_COMBINING = frozenset({"Mn", "Me"})
_DOTTED_CIRCLE = "\u25cc"  # where Unicode's charts show a combining mark alone
_ARROWS = {"\t": "\u2192", "\n": "\u21b5"}


def _mark(char: str) -> str:
    """How the view shows a character that draws nothing: an arrow for a tab or a newline, else
    its code point (which every font draws, unlike the control pictures such as ␀)."""
    return _ARROWS.get(char) or f"U+{ord(char):04X}"


def _visible(text: str) -> str:
    """Escaped token text in which each character that draws nothing, and a combining mark that
    starts the token, has a mark, so that every token can be seen and hovered. The marks are the
    style's (generated content, which a copy leaves out) and the characters stay, so that the text
    copied from the page is the tokens' own and newlines and tabs still break lines; but for CR,
    which HTML reads as a newline, and NUL, which it drops."""
    out = []
    for i, char in enumerate(text):
        category = unicodedata.category(char)
        if category in _UNSEEN:
            kept = "" if char in "\r\0" else char
            out.append(f'<span class="mark" data-mark="{_mark(char)}">{kept}</span>')
        elif i == 0 and category in _COMBINING:
            out.append(f'<span class="mark" data-mark="{_DOTTED_CIRCLE}">{char}</span>')
        else:
            out.append(html.escape(char))
    return "".join(out)


def _quoted_token(text: str) -> str:
    """A token's text as its tip names it: a JSON string, in which the characters that draw nothing
    are escapes (JSON's own escapes only the ASCII controls)."""
    return "".join(
        json.dumps(char)[1:-1] if unicodedata.category(char) in _UNSEEN else char
        for char in json.dumps(text, ensure_ascii=False)
    )


def _colour(residual: float, scale: float) -> str:
    strength = min(abs(residual) / scale, 1.0)
    r, g, b = LONGER_RGB if residual < 0 else SHORTER_RGB
    return f"rgba({r},{g},{b},{0.85 * strength:.3f})"


def _script_json(data: Any) -> str:
    """JSON that is safe inside a <script> element (no '</script>' or '<!--' can appear)."""
    text = json.dumps(data)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _image_tags(trace: ValueTrace) -> str:
    """The prompt's images as ``<img>`` tags with the pictures inside (PNG, at most 480 pixels a
    side), so that the page stays one self-contained file."""
    tags = []
    for i, ref in enumerate(trace.images):
        image = vision.load_image(ref)
        image.thumbnail((480, 480))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        data = base64.b64encode(buffer.getvalue()).decode("ascii")
        tags.append(f'<img src="data:image/png;base64,{data}" alt="prompt image {i + 1}">')
    return f'<div class="images">{"".join(tags)}</div>' if tags else ""


def _summary_line(trace: ValueTrace) -> str:
    """The trace's length, its prediction at the prompt against the truth, and gamma, in a line."""
    s = trace.summary()
    line = f"{s['num_tokens']} token{'s' if s['num_tokens'] != 1 else ''}"
    line += f" ({'ended with EOS' if trace.finished else 'cut, no EOS'})"
    line += f" · predicted at the prompt: {s['predicted_length']:.1f} tokens"
    if trace.finished:
        error = 100 * s["prompt_relative_error"]
        line += f" (true {s['true_length']}, relative error {error:.0f}%)"
        line += f" · mean |predicted − true remaining|: {s['remaining_mae']:.1f} tokens"
    return line + f" · gamma = {trace.gamma:g}"


def render_html(trace: ValueTrace, title: str = "LenVM token values") -> str:
    """One self-contained HTML page: summary, remaining-length chart, the prompt (its images beside
    the text) and the coloured tokens."""
    residuals = np.abs([t.residual for t in trace.tokens])
    # Scale colours to the 95th percentile so one outlier does not wash out everything else.
    scale = max(float(np.quantile(residuals, 0.95)), 1e-9)
    line = _summary_line(trace)
    rows = []
    spans = []
    for t in trace.tokens:
        # A piece of a character (its text is the next token's) is a sliver of its own colour.
        shown = _quoted_token(t.text) if t.text else "(part of the next character)"
        rows.append({**asdict(t), "repr": shown, "x": round(_x(t.index, trace.num_tokens), 1)})
        spans.append(
            f'<span class="tok" data-i="{t.index}" style="background:{_colour(t.residual, scale)}">'
            f"{_visible(t.text)}</span>"
        )
    longer = "rgb({},{},{})".format(*LONGER_RGB)
    shorter = "rgb({},{},{})".format(*SHORTER_RGB)
    esc_title = html.escape(title)
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{esc_title}</title>
<style>{_CSS}</style>
</head>
<body>
<h1>{esc_title}</h1>
<p class="summary">{html.escape(line)}</p>
{_chart(trace)}
<p class="note">Token colour = TD residual
&delta;<sub>t</sub> = &minus;(1&minus;&gamma;) + &gamma;&middot;V(s<sub>t+1</sub>)
&minus; V(s<sub>t</sub>):
<span class="swatch" style="background:{longer}"></span> orange: the token made the rest
<b>longer</b> than expected (&delta; &lt; 0);
<span class="swatch" style="background:{shorter}"></span> blue: <b>shorter</b> (&delta; &gt; 0).
Values are negative here, V = &minus;(1 &minus; &gamma;<sup>remaining</sup>), so a negative
residual means more tokens ahead; the paper, which uses the positive mirror 1 &minus;
&gamma;<sup>remaining</sup>, reports the opposite sign. Full colour at |&delta;| &ge; {scale:.3g}.
Hover a token for its numbers.</p>
<div class="view">{_image_tags(trace)}<div class="text">
<details><summary>Prompt ({len(trace.prompt_token_ids)} tokens)</summary>
<div class="prompt">{html.escape(trace.prompt_text)}</div></details>
<div class="completion">{"".join(spans)}</div></div></div>
<div id="tip" hidden></div>
<script type="application/json" id="lenvm-data">{_script_json(rows)}</script>
<script>{_JS}</script>
</body>
</html>
"""


# The frame's height until the page inside fits it to itself (where scripts do not run, it scrolls).
_FRAME_HEIGHT = 640


def _framed_html(trace: ValueTrace) -> str:
    """The page of :func:`render_html` as an ``<iframe>`` to put into another page (a notebook's
    output). In a frame of its own the page keeps its styles and element ids to itself, and the
    host's styles stay out of it, whatever the host (classic Jupyter, JupyterLab, VS Code); its
    scripts run in the frame without the host running them."""
    page = html.escape(render_html(trace), quote=True)
    return (
        f'<iframe srcdoc="{page}" title="LenVM token values" '
        f'style="width: 100%; height: {_FRAME_HEIGHT}px; border: none;"></iframe>'
    )
