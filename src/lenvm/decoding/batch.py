"""The running batch: the rows being decoded, their KV caches, and one step for all of them.

Rows are left-padded into one batch; a finished row leaves at once and a waiting one takes its
place (the engine decides which). A row that leaves to retry keeps its caches over what it keeps
and rejoins from them rather than from a prefill. The generator's stream always covers every
row; the LenVM's scorer joins when some row needs values (a control, or ``return_values``) and
covers every row from then on.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import cast

import torch

from lenvm.decoding import policies
from lenvm.decoding.scorers import Scorer
from lenvm.decoding.sequence import Sequence
from lenvm.decoding.step import Rows, decide, forbid_unreadable
from lenvm.decoding.streams import Stream


@dataclass
class Batch:
    seqs: list[Sequence]
    gen: Stream  # the generator's body over every row
    scorer: Scorer | None  # the LenVM's values, while some row needs them
    rows: Rows
    uniforms: torch.Tensor  # [B, W] float64: each row's random draws, one per step

    @classmethod
    def join(cls, engine, batch: Batch | None, joining: list[Sequence]) -> Batch:
        """Bring the joining rows in and merge them into the running ``batch`` (None: start one):
        a retry that kept its caches (:attr:`Sequence.kept`) feeds them its last kept token; any
        other row is prefilled (its prompt with its images, and the kept tokens of a retry)."""
        resumed = [s for s in joining if s.kept is not None]
        fresh = [s for s in joining if s.kept is None]
        seqs = (batch.seqs if batch is not None else []) + resumed + fresh
        values = engine.lenvm is not None and any(_needs_values(s) for s in seqs)
        parts: list[tuple[Stream, Scorer | None]] = []  # the running rows', the resumed and the fresh
        if batch is not None:
            if values and batch.scorer is None:  # the first row that needs values
                batch.scorer = engine.scorer_type.prefill(
                    engine.lenvm,
                    [s.context for s in batch.seqs],
                    batch.gen,
                    engine.naive,
                    [s.images for s in batch.seqs],
                )
            parts.append((batch.gen, batch.scorer))
        if resumed:
            kept = [cast(tuple[Stream, Stream | None], s.kept) for s in resumed]
            tokens = [s.context[-1] for s in resumed]
            gen = Stream.resume([k[0] for k in kept], tokens)
            scorer = None
            if values:
                scorer = engine.scorer_type.resume(
                    engine.lenvm, [k[1] for k in kept], tokens, gen, engine.naive
                )
            parts.append((gen, scorer))
            for seq in resumed:
                seq.kept = None  # held by the batch now
        if fresh:
            contexts = [s.context for s in fresh]
            images = [s.images for s in fresh]
            gen = Stream.prefill(engine.body, contexts, engine.generator_features, images)
            scorer = None
            if values:
                scorer = engine.scorer_type.prefill(engine.lenvm, contexts, gen, engine.naive, images)
            parts.append((gen, scorer))
        if len(parts) == 1:
            gen, scorer = parts[0]
        else:
            gen = Stream.cat([g for g, _ in parts])
            scorer = Scorer.cat([cast(Scorer, s) for _, s in parts], source=gen) if values else None
        return cls(seqs, gen, scorer, _rows(seqs, engine.device), _uniforms(seqs))

    def leave(self, engine, finished: list[int], retrying: Iterable[int] = ()) -> Batch | None:
        """The batch without the ``finished`` rows (None when none is left). Those of them in
        ``retrying`` (each cut back by :meth:`Sequence.retry` already) keep their caches over
        their context but its last token, to rejoin from (:attr:`Sequence.kept`), except a retry
        that keeps nothing past a prompt with images (whose 3-D positions a prefix does not
        know: see :meth:`Stream.prefix`)."""
        for row in retrying:
            seq = self.seqs[row]
            # A retry's control needs values: the batch has a scorer.
            if self.scorer is not None and (seq.images is None or seq.tokens):
                length = len(seq.context) - 1
                seq.kept = (self.gen.prefix(row, length), self.scorer.prefix(row, length))
        done = set(finished)
        keep = [i for i in range(len(self.seqs)) if i not in done]
        if not keep:
            return None
        index = torch.tensor(keep, device=engine.device)
        seqs = [self.seqs[i] for i in keep]
        self.gen.select(index)
        scorer = self.scorer
        if scorer is not None:
            scorer.select(index)
            if not any(_needs_values(s) for s in seqs):
                scorer = None
        return Batch(seqs, self.gen, scorer, _rows(seqs, engine.device), _uniforms(seqs))

    def step(self, engine) -> list[int]:
        """Generate one token for every row; returns the rows that finished."""
        r = self.rows
        logits = engine.lm_head(self.gen.last.last).float()
        if engine.never_generated is not None:
            logits.index_fill_(1, engine.never_generated, -float("inf"))
        forbid_unreadable(logits, engine.lenvm)
        uniform = self.uniforms.gather(1, r.step[:, None])[:, 0]
        gamma = engine.lenvm.gamma if engine.lenvm is not None else None
        d = decide(logits, r, self.scorer, engine.num_candidates, engine.eos, gamma, uniform)
        # One candidate per row (every row drew its own token): the tokens are in slot 0 already.
        one = d.ids.shape[1] == 1
        choice = torch.zeros_like(d.ids[:, 0]) if one else policies.choose(d.dist, uniform, r.greedy)
        token = d.ids.gather(1, choice[:, None])[:, 0]
        forced = torch.zeros_like(token, dtype=torch.bool)
        if r.any_cap:
            forced = r.at_cap & ~torch.isin(token, engine.eos)
            token = torch.where(forced, d.eos, token)
        value = None
        if d.values is not None:
            value = d.values.gather(1, choice[:, None])[:, 0].masked_fill(forced, 0.0)

        # Advance: the caches keep the chosen token only.
        self.gen.advance(choice, token)
        if self.scorer is not None:
            self.scorer.advance(choice, token)
        r.step += 1

        # For mean_logprob: the generator's own distribution (temperature 1, untruncated); and
        # where the answer could have ended instead: the most likely EOS and its log-probability.
        logprob = logits.gather(1, token[:, None])[:, 0] - d.log_norm
        # One host transfer per step.
        columns = [token, forced, logprob, d.eos, d.eos_logprob]
        columns += [value] if value is not None else []
        host = torch.stack([c.double() for c in columns]).tolist()
        tops = _top_logprobs(logits, d.log_norm, self.seqs)
        finished = []
        for row, seq in enumerate(self.seqs):
            v = host[5][row] if value is not None else 0.0
            top = tops[row] if tops is not None and seq.request.sampling.top_logprobs else None
            end = (int(host[3][row]), host[4][row])
            if seq.append(int(host[0][row]), bool(host[1][row]), host[2][row], v, engine.eos_set, end, top):
                finished.append(row)
        return finished


def _top_logprobs(logits: torch.Tensor, log_norm: torch.Tensor, seqs: list[Sequence]):
    """Each row's most likely tokens and their log-probabilities (same distribution as the
    logprobs), as many as the row asks for; None when no row asks."""
    wanted = [s.request.sampling.top_logprobs for s in seqs]
    if not any(wanted):
        return None
    top, top_ids = logits.topk(max(wanted), dim=-1)
    values, ids = (top - log_norm[:, None]).tolist(), top_ids.tolist()
    return [list(zip(i[:k], v[:k], strict=True)) for i, v, k in zip(ids, values, wanted, strict=True)]


def _needs_values(seq: Sequence) -> bool:
    return seq.control.active or seq.request.return_values


def _rows(seqs: list[Sequence], device) -> Rows:
    samplings, controls = [s.request.sampling for s in seqs], [s.control for s in seqs]
    return Rows.build(
        samplings,
        controls,
        [len(s.tokens) for s in seqs],
        device,
        free=[s.free for s in seqs],
        retries=[len(s.missed) for s in seqs],
    )


def _uniforms(seqs: list[Sequence]) -> torch.Tensor:
    width = max(len(s.uniforms) for s in seqs)
    return torch.stack(
        [torch.nn.functional.pad(s.uniforms, (0, width - len(s.uniforms)), value=0.5) for s in seqs]
    )
