"""How each kind of LenVM values the candidate next tokens of a running batch.

A scorer gives ``v(x) = V(s_t + x)`` for candidates ``ids`` (``[B, k]``; 0 for EOS) and keeps
whatever KV cache that takes in step with the rows. The decoding engine, the ``transformers``
processor and the vLLM processor all drive a scorer the same way::

    scorer = scorer_for(lenvm).prefill(lenvm, rows, source)   # rows: token ids of each row
    values = scorer.score(ids, eos)                           # once per step
    scorer.advance(choice, token)                             # the candidate each row took
    scorer.feed(tokens)                                       # tokens it never scored
    scorer.select(rows); Scorer.cat([a, b])                   # rows leave or join
    kept = scorer.prefix(row, n); Scorer.resume(lenvm, [kept], [token], source)  # one comes back

``source`` is the stream over the generator's body that the caller runs (the engine's own,
which it advances itself). A scorer that reads the generator's hidden states (attached, q) uses
it; called without one (inside another framework's decoding loop) it runs its own stream over
the generator's body and advances that. A standalone LenVM always runs its own stream. A stream
of its own runs only the layers below the head's feature layer (a shallow stream: 18 of 30
layers for the default attached head) unless the caller asks for ``lookahead``, the generator's
EOS probability after each candidate, which needs the final layer. A new kind of LenVM is one
class here and one entry in :data:`SCORERS`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import cast

import torch

from lenvm.decoding.streams import Stream
from lenvm.model import LengthValueModel
from lenvm.vision import ImageInputs


class Scorer(ABC):
    """Candidate values of one LenVM for a batch of rows (see the module doc).

    ``stream`` is the stream the scorer reads; ``owns_stream`` says whether the scorer advances
    it (a caller's generator stream is the caller's to advance). ``naive`` scores each candidate
    with its own single-token forward instead of one block (the floor block scoring beats)."""

    reads_generator = True  # reads the generator's hidden states: a caller's source stream will do
    gives_next_eos = False  # next_eos() can answer (from the final states of a candidate block)

    def __init__(self, lenvm: LengthValueModel, stream: Stream, owns_stream: bool, naive: bool = False):
        self.lenvm = lenvm
        self.stream = stream
        self.owns_stream = owns_stream
        self.naive = naive
        self._features: torch.Tensor | None = None  # the last candidate block's, for an end head

    @classmethod
    def prefill(
        cls,
        lenvm: LengthValueModel,
        rows: list[list[int]],
        source: Stream | None = None,
        naive: bool = False,
        images: list[ImageInputs | None] | None = None,
        lookahead: bool = True,
    ) -> Scorer:
        """A scorer for ``rows`` (prompt and kept tokens of each); ``source``: the caller's stream
        over the same rows of the generator's body, if it runs one; ``images``: the pixel inputs
        of each row's prompt images (see :meth:`Stream.prefill`); ``lookahead``: whether
        :meth:`next_eos` will be wanted (else a stream of its own can stay shallow)."""
        if source is not None and cls.reads_generator:
            return cls(lenvm, source, owns_stream=False, naive=naive)
        shallow = not (lookahead and cls.gives_next_eos)
        stream = Stream.prefill(lenvm.body, rows, lenvm.feature_layer, images, shallow=shallow)
        return cls(lenvm, stream, owns_stream=True, naive=naive)

    @classmethod
    def resume(
        cls,
        lenvm: LengthValueModel,
        prefixes: list[Stream | None],
        tokens: list[int],
        source: Stream | None = None,
        naive: bool = False,
    ) -> Scorer:
        """A scorer for rows that come back from kept caches instead of a prefill (see
        :meth:`Stream.resume`): ``prefixes``, what :meth:`prefix` kept of each row's stream;
        ``tokens``, each row's next token; ``source`` as for :meth:`prefill`."""
        if source is not None and cls.reads_generator:
            return cls(lenvm, source, owns_stream=False, naive=naive)
        stream = Stream.resume(cast(list[Stream], prefixes), tokens)  # a stream of its own kept one
        return cls(lenvm, stream, owns_stream=True, naive=naive)

    def prefix(self, row: int, length: int) -> Stream | None:
        """The scorer's own stream over the first ``length`` tokens of ``row`` (see
        :meth:`Stream.prefix`), for the row to come back with :meth:`resume`; None where it reads
        the caller's stream, which the caller keeps."""
        return self.stream.prefix(row, length) if self.owns_stream else None

    @abstractmethod
    def score(self, ids: torch.Tensor, eos: torch.Tensor) -> torch.Tensor:
        """``[B, k]`` float values of the candidates ``ids``, 0 where ``eos``."""

    def advance(self, choice: torch.Tensor, token: torch.Tensor) -> None:
        """Every row took candidate ``choice`` (token ``token``) of the last :meth:`score`."""
        if self.owns_stream:
            self.stream.advance(choice, token)

    def feed(self, tokens: torch.Tensor) -> None:
        """Tokens (``[B, n]``) appended without being chosen from the last :meth:`score`."""
        if self.owns_stream:
            self.stream.feed(tokens)

    def next_eos(self) -> torch.Tensor | None:
        """The generator's EOS probability right after each candidate of the last :meth:`score`
        (``[B, k]``), when scoring computed the states it needs; else None."""
        return None

    def next_end(self) -> torch.Tensor | None:
        """The end head's tokens until the generator's next natural-end opportunity after each
        candidate of the last :meth:`score` (``[B, k]``, EOS included), when the LenVM has an end
        head and scoring computed the candidates' states; else None."""
        return None

    def state_values(self) -> torch.Tensor:
        """``V(s_t)`` of every row's current state (``[B]``): the head on the hidden state of its
        last token."""
        return self.lenvm.values_from_hidden(self.stream.last.features).float()

    def select(self, rows: torch.Tensor) -> None:
        """Keep only ``rows`` (after some finished)."""
        if self.owns_stream:
            self.stream.select(rows)

    @classmethod
    def cat(cls, parts: list[Scorer], source: Stream | None = None) -> Scorer:
        """One scorer over the rows of ``parts``, in order (they are consumed); ``source``: the
        caller's stream over all of them, if it runs one."""
        first = parts[0]
        stream = Stream.cat([p.stream for p in parts]) if first.owns_stream else source
        if stream is None:
            raise ValueError("scorers that read the caller's stream need it as source")
        return type(first)(first.lenvm, stream, first.owns_stream, first.naive)


class BlockScorer(Scorer):
    """Exact values: the candidates are fed through the LenVM's body as one block (each sees its
    row's prefix and itself), the head reads their states, and advancing keeps the chosen
    candidate's cache entry."""

    def score(self, ids: torch.Tensor, eos: torch.Tensor) -> torch.Tensor:
        features = _candidate_features(self.stream, ids, self.naive)
        self._features = features if self.lenvm.end_head is not None else None
        return _values(self.lenvm, features, eos)

    def next_end(self) -> torch.Tensor | None:
        return None if self._features is None else self.lenvm.end_lengths_from_hidden(self._features)


class AttachedScorer(BlockScorer):
    """A head on the generator's own hidden states. Its candidate block passes through the
    generator's body, so in the engine it is also the generator's next step (the engine keeps
    the chosen candidate instead of a second forward), and one LM-head product over it gives the
    generator's EOS probability after each candidate."""

    gives_next_eos = True

    def next_eos(self) -> torch.Tensor | None:
        block = self.stream.pending
        if block is None or self.stream.shallow:
            return None
        lm_head = self.lenvm.backbone.get_output_embeddings()
        probs = torch.softmax(lm_head(block.last).float(), dim=-1)
        # The most likely EOS alone, as the natural-end bar judges the EOS that ends an answer.
        return probs[..., self.lenvm.config.eos_token_ids].amax(-1)


class StandaloneScorer(BlockScorer):
    """A LenVM with a backbone of its own, in a stream of its own beside the generator's."""

    reads_generator = False


class QScorer(Scorer):
    """A length Q-head: the values of all candidates from the hidden state that gave the logits,
    with no candidate forward at all."""

    def score(self, ids: torch.Tensor, eos: torch.Tensor) -> torch.Tensor:
        values = self.lenvm.next_values_from_hidden(self.stream.last.features, ids)
        return values.float().masked_fill(eos, 0.0)


SCORERS: dict[str, type[Scorer]] = {"attached": AttachedScorer, "standalone": StandaloneScorer, "q": QScorer}


def scorer_for(lenvm: LengthValueModel) -> type[Scorer]:
    return SCORERS[lenvm.config.kind]


def _values(lenvm: LengthValueModel, features: torch.Tensor, eos: torch.Tensor) -> torch.Tensor:
    return lenvm.values_from_hidden(features).float().masked_fill(eos, 0.0)


def _candidate_features(stream: Stream, ids: torch.Tensor, naive: bool) -> torch.Tensor:
    """The head's features of every candidate (``[B, k, H]``): one block forward whose entries
    stay pending in ``stream``; or, ``naive``, one single-token forward per candidate, each
    dropped at once (the floor that block scoring beats)."""
    if not naive:
        return stream.forward(ids).features
    features = []
    for j in range(ids.shape[1]):
        features.append(stream.forward(ids[:, j : j + 1]).features[:, 0])
        stream.discard()
    return torch.stack(features, dim=1)
