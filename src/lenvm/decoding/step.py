"""One decoding step for a batch of rows, shared by every backend.

    rows = Rows.build(samplings, controls, steps, device)
    decision = decide(logits, rows, scorer, num_candidates, eos_ids, gamma, uniform)

From the generator's next-token logits (``[B, V]``) to a distribution over candidate tokens:

1. each row's sampling distribution (temperature, top-k, top-p, min-p; EOS masked for
   ``ignore_eos`` rows);
2. candidates: a controlled row takes its ``num_candidates`` most probable tokens (plus EOS where
   the control must be able to end; from before truncation where an Equal To or At Least row
   short of its target was left nothing but EOS); a plain row draws its token with ``uniform``
   (its only candidate); when every row draws its own token, each has one candidate, not ``k``;
3. the scorer gives the LenVM value of the state after each candidate (EOS: 0);
4. each row's control policy turns the candidates' probabilities and values into a
   distribution (:mod:`lenvm.decoding.policies`).

The engine then draws from that distribution with each row's own random stream; a logits
processor writes it into the logits its framework samples from (:func:`as_logits`). Either way
a row whose control has a hard cap is sent its EOS at the cap (:attr:`Rows.at_cap`,
:attr:`Decision.eos`). Every backend first takes out of the logits the ids a standalone LenVM
cannot read (:func:`forbid_unreadable`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import torch

from lenvm.decoding import policies
from lenvm.decoding.params import TARGET_KINDS, Control, SamplingParams
from lenvm.decoding.scorers import Scorer
from lenvm.model import LengthValueModel, embedding_matrix

NO_CAP = 2**62


@dataclass
class Rows:
    """Per-row settings of a batch as tensors, built once whenever rows join or leave; ``step``
    (tokens generated so far) moves on every step."""

    temperature: torch.Tensor  # [B] float; 1 for greedy rows (their candidates use p at T = 1)
    top_k: torch.Tensor  # [B] long, 0 = off
    top_p: torch.Tensor  # [B] float
    min_p: torch.Tensor  # [B] float
    greedy: torch.Tensor  # [B] bool
    ignore_eos: torch.Tensor  # [B] bool
    step: torch.Tensor  # [B] long: tokens generated so far
    target: torch.Tensor  # [B] long (0 when no target)
    beta: torch.Tensor  # [B] float64
    cap: torch.Tensor  # [B] long: EOS is forced once step reaches it
    wants_eos: torch.Tensor  # [B] bool: EOS always joins the candidates (Control.wants_eos)
    must_reach: torch.Tensor  # [B] bool: Equal To and At Least, which must not end short of the target
    natural_eos: torch.Tensor  # [B] float64: the generator's EOS probability of a natural end
    horizon: torch.Tensor  # [B] long: max_new_tokens
    look_from: torch.Tensor  # [B] long: our target rules look one step ahead from this step on
    gated: torch.Tensor  # [B] bool: at_most under our rule (left to the generator while it fits)
    free: torch.Tensor  # [B] bool: gated rows the generator writes alone this attempt
    retries: torch.Tensor  # [B] long: ends of each answer already resampled (the engine's retries)
    plain: torch.Tensor  # [B] bool: no control
    groups: list[tuple[str, str, torch.Tensor]]  # (control kind, rule, rows)
    # Which of the above are in use at all: a filter that no row needs costs nothing.
    any_guided: bool
    any_plain: bool
    any_greedy: bool
    any_top_k: bool
    any_top_p: bool
    any_min_p: bool
    any_ignore_eos: bool
    any_cap: bool
    any_wants_eos: bool
    any_must_reach: bool
    any_look: bool
    any_gated: bool

    @classmethod
    def build(
        cls,
        samplings: Sequence[SamplingParams],
        controls: Sequence[Control | None],
        steps: list[int],
        device,
        free: list[bool] | None = None,
        retries: list[int] | None = None,
    ) -> Rows:
        def col(values, dtype):
            return torch.tensor(values, dtype=dtype, device=device)

        filled = [c or Control() for c in controls]  # None: no control
        keys: dict[tuple[str, str], list[int]] = {}
        for row, c in enumerate(filled):
            keys.setdefault((c.kind, c.rule), []).append(row)
        pairs = list(zip(filled, samplings, strict=True))
        wants_eos = [c.wants_eos and not s.ignore_eos for c, s in pairs]
        must_reach = [c.must_reach and not s.ignore_eos for c, s in pairs]
        caps = [NO_CAP if c.cap is None or s.ignore_eos else c.cap for c, s in pairs]
        ours = [looks_ahead(c, s) for c, s in pairs]
        look_from = [
            int(policies.lookahead_from(torch.tensor(c.target))) if mine else NO_CAP
            for c, mine in zip(filled, ours, strict=True)
        ]
        gated = [mine and c.kind == "at_most" for c, mine in zip(filled, ours, strict=True)]
        return cls(
            temperature=col([1.0 if s.greedy else s.temperature for s in samplings], torch.float32),
            top_k=col([s.top_k for s in samplings], torch.long),
            top_p=col([s.top_p for s in samplings], torch.float32),
            min_p=col([s.min_p for s in samplings], torch.float32),
            greedy=col([s.greedy for s in samplings], torch.bool),
            ignore_eos=col([s.ignore_eos for s in samplings], torch.bool),
            step=col(steps, torch.long),
            target=col([c.target or 0 for c in filled], torch.long),
            beta=col([c.beta or 0.0 for c in filled], torch.float64),
            cap=col(caps, torch.long),
            wants_eos=col(wants_eos, torch.bool),
            must_reach=col(must_reach, torch.bool),
            natural_eos=col([c.natural_eos for c in filled], torch.float64),
            horizon=col([s.max_new_tokens for s in samplings], torch.long),
            look_from=col(look_from, torch.long),
            gated=col(gated, torch.bool),
            free=col(free or [False] * len(filled), torch.bool),
            retries=col(retries or [0] * len(filled), torch.long),
            plain=col([not c.active for c in filled], torch.bool),
            groups=[(kind, rule, col(rows, torch.long)) for (kind, rule), rows in keys.items()],
            any_guided=any(c.active for c in filled),
            any_plain=not all(c.active for c in filled),
            any_greedy=any(s.greedy for s in samplings),
            any_top_k=any(s.top_k > 0 for s in samplings),
            any_top_p=any(s.top_p < 1 for s in samplings),
            any_min_p=any(s.min_p > 0 for s in samplings),
            any_ignore_eos=any(s.ignore_eos for s in samplings),
            any_cap=any(cap < NO_CAP for cap in caps),
            any_wants_eos=any(wants_eos),
            any_must_reach=any(must_reach),
            any_look=any(n < NO_CAP for n in look_from),
            any_gated=any(gated),
        )

    @property
    def at_cap(self) -> torch.Tensor:
        """The rows whose hard cap is reached (``[B]`` bool): they are sent their EOS."""
        return self.step >= self.cap

    def looking_ahead(self) -> bool:
        """Whether some row's target rule is near the end of its window: its policy then looks
        one step ahead when the scorer can tell the generator's EOS probability after a
        candidate."""
        return self.any_look and bool((self.step >= self.look_from).any())


def looks_ahead(control: Control | None, sampling: SamplingParams) -> bool:
    """Whether a row's policy looks one step ahead near the end of its window (our target rules),
    so that its scorer must be able to give the generator's EOS probability after a candidate."""
    return (
        control is not None
        and control.kind in TARGET_KINDS
        and control.rule == "ours"
        and not sampling.ignore_eos
    )


def readable_vocab_size(lenvm: LengthValueModel | None) -> int | None:
    """How many token ids ``lenvm`` can read where that may be fewer than a generator writes: the
    rows of a standalone LenVM's own embedding (a generator may pad its embedding past the
    tokenizer's ids, the LenVM's backbone not). None for a LenVM that reads the generator's own
    states, and without a LenVM."""
    if lenvm is None or lenvm.attached:
        return None
    return embedding_matrix(lenvm.backbone).shape[0]


def forbid_unreadable(logits: torch.Tensor, lenvm: LengthValueModel | None) -> torch.Tensor:
    """``logits`` (``[B, V]``, changed in place and returned) with ``-inf`` for every id ``lenvm``
    cannot read (:func:`readable_vocab_size`), so that no candidate and no draw is one: the LenVM
    reads every token it scores, and the rest of the answer after it."""
    readable = readable_vocab_size(lenvm)
    if readable is not None and readable < logits.shape[-1]:
        logits[:, readable:] = -float("inf")
    return logits


@dataclass
class Decision:
    """The outcome of :func:`decide` for ``B`` rows."""

    ids: torch.Tensor  # [B, k] candidate ids (a plain row: its token in slot 0; k = 1 if all drew their own)
    dist: torch.Tensor  # [B, k] float64: the policy's distribution over them
    values: torch.Tensor | None  # [B, k] the LenVM values of the candidates (None without a scorer)
    # The generator's own distribution (temperature 1, untruncated): its log-probabilities are
    # logits - log_norm; eos is the EOS id it finds most likely (what a hard cap sends, and where
    # an answer could have ended), eos_logprob that EOS's log-probability. All [B].
    log_norm: torch.Tensor
    eos: torch.Tensor
    eos_logprob: torch.Tensor
    # Rows left to the generator that sample elsewhere (a logits processor): ``free`` [B] bool,
    # and ``probs`` [B, V], the generator's distribution (temperature, truncation) they sample from.
    free: torch.Tensor | None = None
    probs: torch.Tensor | None = None


def decide(
    logits: torch.Tensor,
    rows: Rows,
    scorer: Scorer | None,
    num_candidates: int,
    eos_ids: torch.Tensor,
    gamma: float | None,
    uniform: torch.Tensor | None = None,
) -> Decision:
    """One step for every row (see the module doc). ``logits``: ``[B, V]`` float; ``uniform``:
    ``[B]`` draws in [0, 1), needed where some row is plain (it samples here); ``scorer``: None
    when no row needs the LenVM.

    An At Most row (our rule) whose LenVM is confident the answer fits (:func:`policies.fits`,
    from the value of the current state), or that the generator writes alone this attempt
    (``Rows.free``: the engine's first attempt), is left to the generator: given ``uniform`` it draws its
    token as a plain row does, the same draw as without guidance (a step in which every row draws its
    own token scores that token alone: one candidate per row); without (a logits processor,
    which samples elsewhere) the decision hands over the generator's whole distribution for it
    (``Decision.free``, ``Decision.probs``: the candidates alone would favour the EOS that At Most
    always has among them)."""
    allowed = logits
    if rows.any_ignore_eos:
        allowed = logits.clone()
        allowed[:, eos_ids] = logits[:, eos_ids].masked_fill(rows.ignore_eos[:, None], -float("inf"))
    probs = sampling_distribution(allowed, rows)
    if bool(torch.isnan(probs).any()):  # else a draw lands on any token, a masked one included
        raise ValueError("the generator's logits hold NaN or +inf: a broken model, or float16 overflow?")
    if not rows.any_guided:
        return _own_tokens(logits, probs, rows, scorer, eos_ids, uniform)
    if scorer is None or gamma is None:
        raise ValueError("rows under a length control need a scorer and its LenVM's gamma")
    free = None
    if rows.any_gated:
        fitting = policies.fits(scorer.state_values(), rows.step, rows.target, gamma)
        free = rows.gated & (rows.free | fitting)
    own = rows.plain  # rows that draw their token here, from the whole distribution
    any_own = rows.any_plain
    if free is not None and uniform is not None:
        own = own | free
        drawing = int(own.sum())  # one host sync for both questions
        if drawing == len(own):
            return _own_tokens(logits, probs, rows, scorer, eos_ids, uniform)
        any_own = drawing > 0
    sampled = None
    if any_own:
        sampled = policies.choose(probs, _draws(uniform), rows.greedy if rows.any_greedy else None)
    short = rows.must_reach & (rows.step < rows.target) if rows.any_must_reach else None
    ids, cand_probs = policies.top_candidates(
        logits,
        probs,
        num_candidates,
        eos_ids,
        rows.wants_eos if rows.any_wants_eos else None,
        rows.temperature,
        short,
    )
    if sampled is not None:  # rows that drew their own token: it alone, other slots unusable
        mine = own[:, None]
        only = torch.zeros_like(cand_probs)
        only[:, 0] = probs.gather(1, sampled[:, None])[:, 0]
        ids = torch.where(mine, sampled[:, None], ids)
        cand_probs = torch.where(mine, only, cand_probs)
    eos = torch.isin(ids, eos_ids)
    values = scorer.score(ids, eos)
    log_norm, eos_id, eos_logprob = _generator_eos(logits, eos_ids)
    looking = rows.looking_ahead()
    next_eos = scorer.next_eos() if looking else None
    if next_eos is not None:  # only rows in their window look ahead, whoever shares the batch
        next_eos = next_eos.masked_fill(~(rows.step >= rows.look_from)[:, None], 0.0)
    next_end = scorer.next_end() if looking else None
    # The policies weigh the generator's own EOS probability now, as Result.eos_prob reports it
    # for the EOS that ends an answer.
    candidates = policies.Candidates(ids, cand_probs, values, eos, next_eos, eos_logprob.exp(), next_end)
    dist = policy(candidates, rows, gamma)
    if free is not None:
        dist = torch.where(free[:, None], policies.follow(candidates), dist)
    if free is None or uniform is not None:  # without free rows, or they drew their own token above
        return Decision(ids, dist, values, log_norm, eos_id, eos_logprob)
    return Decision(ids, dist, values, log_norm, eos_id, eos_logprob, free, probs)


def sampling_distribution(logits: torch.Tensor, rows: Rows) -> torch.Tensor:
    """Each row's distribution under its own temperature and truncation (``[B, V]``); a filter
    that no row uses costs nothing."""
    return policies.truncate(
        logits,
        rows.temperature,
        rows.top_k if rows.any_top_k else None,
        rows.top_p if rows.any_top_p else None,
        rows.min_p if rows.any_min_p else None,
    )


def _own_tokens(
    logits: torch.Tensor,
    probs: torch.Tensor,
    rows: Rows,
    scorer: Scorer | None,
    eos_ids: torch.Tensor,
    uniform: torch.Tensor | None,
) -> Decision:
    """The decision when every row draws its own token (plain, or left to the generator): that
    token is the row's only candidate, so the scorer values a block of one column, not ``k``
    copies of it, and there is nothing for a policy to weigh."""
    drawn = policies.choose(probs, _draws(uniform), rows.greedy if rows.any_greedy else None)
    ids = drawn[:, None]
    values = scorer.score(ids, torch.isin(ids, eos_ids)) if scorer is not None else None
    dist = torch.ones_like(ids, dtype=torch.float64)
    return Decision(ids, dist, values, *_generator_eos(logits, eos_ids))


def _generator_eos(
    logits: torch.Tensor, eos_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The generator's own distribution as a decision reports it: ``log_norm``, its most likely
    EOS and that EOS's log-probability (see :class:`Decision`)."""
    log_norm = logits.logsumexp(-1)
    eos_id = policies.primary_eos(logits, eos_ids)
    return log_norm, eos_id, logits.gather(1, eos_id[:, None])[:, 0] - log_norm


def _draws(uniform: torch.Tensor | None) -> torch.Tensor:
    """``uniform``, which rows that draw their own token need."""
    if uniform is None:
        raise ValueError("rows that draw their own token need uniform draws")
    return uniform


def policy(c: policies.Candidates, rows: Rows, gamma: float) -> torch.Tensor:
    """Each row's control policy, applied to the rows of each (kind, rule) group."""

    def apply(kind: str, rule: str, index: torch.Tensor | None) -> torch.Tensor:
        def pick(t: torch.Tensor) -> torch.Tensor:
            return t if index is None else t[index]

        return policies.apply(
            kind,
            rule,
            c if index is None else c.rows(index),
            pick(rows.step),
            pick(rows.target),
            pick(rows.beta),
            gamma,
            pick(rows.natural_eos),
            pick(rows.horizon),
            pick(rows.retries),
        )

    if len(rows.groups) == 1:  # one group: no gather and scatter
        kind, rule, _ = rows.groups[0]
        return apply(kind, rule, None)
    dist = torch.zeros(c.ids.shape, dtype=torch.float64, device=c.ids.device)
    for kind, rule, index in rows.groups:
        dist[index] = apply(kind, rule, index)
    return dist


def as_logits(d: Decision, rows: Rows, vocab_size: int, scale: torch.Tensor | None = None) -> torch.Tensor:
    """The decision as the logits a framework samples from (``[B, vocab_size]``, float32): the log
    of the policy's distribution on the candidates, times each row's ``scale`` (``[B]``; vLLM
    divides by the temperature afterwards), -inf elsewhere; a row left to the generator
    (``d.free``), the log of its whole distribution so; a row at its hard cap, its EOS alone; a
    greedy row, its most likely token alone."""
    logits = d.dist.log() if scale is None else d.dist.log() * scale[:, None]
    out = torch.full((d.ids.shape[0], vocab_size), -float("inf"), device=d.ids.device)
    out.scatter_(1, d.ids, logits.float())
    if d.free is not None:
        whole = cast(torch.Tensor, d.probs).float().log()  # decide sets it with free
        whole = whole if scale is None else whole * scale[:, None]
        out = torch.where(d.free[:, None], whole, out)
    if rows.any_cap:
        only_eos = torch.full_like(out, -float("inf")).scatter_(1, d.eos[:, None], 0.0)
        out = torch.where(rows.at_cap[:, None], only_eos, out)
    if rows.any_greedy:  # the policy's choice alone, whether the framework samples or not
        choice = torch.full_like(out, -float("inf")).scatter_(1, out.argmax(-1, keepdim=True), 0.0)
        out = torch.where(rows.greedy[:, None], choice, out)
    return out
