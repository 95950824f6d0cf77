"""An answer's text, decoded token by token after the end of its prompt, as vLLM decodes it.

Each token gets its *piece*: the text it adds to the answer. Joined, the pieces are the answer's
text, so that the tokens of a completion's ``logprobs`` line up with it:

- The answer is decoded after the prompt's last tokens, not alone: a SentencePiece decoder
  (Llama, Mistral) drops the space at the start of a text, and the answer "▁world" after the
  prompt "Hello" reads " world", not "world".
- A token that ends inside a character (byte-level BPE writes a CJK character or an emoji as 2-4
  byte tokens) adds nothing yet; the token that completes the character adds all of it. A
  character split between the prompt and the answer belongs to the answer.
- Special tokens (the EOS) add nothing: the text leaves them out.

Each step decodes a few tokens only (the previous piece's and the new ones), not the whole answer.
"""

from __future__ import annotations

from collections.abc import Sequence

CONTEXT_TOKENS = 5  # prompt tokens the answer is decoded after (vLLM's number)
_INCOMPLETE = "\ufffd"  # what the decoder writes for the bytes of a character not yet complete


class AnswerDecoder:
    """One answer's pieces so far (see the module doc); tokens may be replaced from any position."""

    def __init__(self, tokenizer, prompt: Sequence[int]):
        self.tokenizer = tokenizer
        self._ids = list(prompt[-CONTEXT_TOKENS:])
        self._context = len(self._ids)
        self.pieces: list[str] = []
        # (first id decoded, first id not yet in a piece) before each answer token: decoding
        # from the first, the text up to the second is already given out
        self._marks = [(0, self._context)]

    def set(self, start: int, tokens: Sequence[int]) -> None:
        """The answer's tokens now stand as ``tokens`` from position ``start`` on."""
        del self._ids[self._context + start :], self.pieces[start:], self._marks[start + 1 :]
        for token in tokens:
            self._add(token)

    def _add(self, token: int) -> None:
        first, read = self._marks[-1]
        self._ids.append(token)
        after = self._decode(self._ids[first:])
        given = _given(self._decode(self._ids[first:read]), after)
        if after.endswith(_INCOMPLETE) or len(after) <= len(given):
            self.pieces.append("")  # a piece of a character, or a token the text leaves out
            self._marks.append((first, read))
            return
        self.pieces.append(after[len(given) :])
        self._marks.append((read, len(self._ids)))

    def finished(self) -> list[str]:
        """The pieces of the whole answer: bytes still waiting for the rest of their character
        (the answer ended inside one) read as U+FFFD, in the piece of the last token that is
        not special."""
        first, read = self._marks[-1]
        after = self._decode(self._ids[first:])
        rest = after[len(_given(self._decode(self._ids[first:read]), after)) :]
        pieces = list(self.pieces)
        if rest:
            special = set(self.tokenizer.all_special_ids)
            answer = self._ids[self._context :]
            last = next(
                (k for k in reversed(range(len(answer))) if answer[k] not in special), len(answer) - 1
            )
            pieces[last] += rest
        return pieces

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if ids else ""


def _given(before: str, after: str) -> str:
    """The part of ``after`` that was given out as ``before``: all of it, but for a character
    of the prompt that the answer completes (U+FFFD in ``before``), which goes with the answer."""
    if after.startswith(before) or not before.endswith(_INCOMPLETE):
        return before
    whole = before.rstrip(_INCOMPLETE)
    return whole if after.startswith(whole) else before
