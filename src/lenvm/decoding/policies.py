"""Length-control policies: from scored candidate tokens to a distribution over them.

A policy never touches a model. It receives a batch of rows of candidate next tokens
(:class:`Candidates`: ids, the generator's probabilities, the LenVM values ``v(x) = V(s_t + x)``
and an EOS mask), the step ``t`` (tokens generated before the candidate), the request's target
and gamma, and returns a distribution over the candidates (``[B, k]``, each row sums to 1),
one-hot for the paper's rules. :func:`choose` turns it into a choice.

Conventions, used by every policy here:

- ``V = -(1 - gamma**l)`` lies in (-1, 0]; closer to 0 means fewer tokens left; EOS has value 0.
- ``l(x) = value_to_length(v(x))`` is the predicted number of tokens left after ``x``, EOS
  included, so ``T(x) = t + l(x)`` predicts the output length (EOS excluded) if ``x`` is chosen.
  For EOS, ``T = t``. A target ``N`` asks for ``N`` output tokens: EOS is right when ``t == N``.
- Tilting: ``p'(x) ∝ p(x) · exp(beta · v(x))``. With this sign convention a POSITIVE beta favours
  shorter continuations and a negative one longer continuations.

Our rules (``rule="ours"``) condition the generator on the constraint instead of overriding it:
``p'(x) ∝ p(x) · P(constraint holds | s_t, x)``, the next-token distribution given that the
final length satisfies the constraint (Bayes' rule, as in sampling from the constrained
generator). The LenVM gives a point prediction ``T(x)``; around it the final length is modelled
as Laplace with scale ``b(x) = SPREAD · l(x) + FLOOR``: the error of a length prediction grows
with how far it looks ahead, and the prediction for EOS is exact up to ``FLOOR``.

Every target rule plans for an ending the generator itself would write. An answer ends
*naturally* where the generator gives EOS at least a row's ``natural_eos`` (``Candidates.eos_now``
is the generator's own EOS probability at this step); our rules choose EOS only there, until a
``give_up`` step past which any EOS may end the answer (the engine then resamples the end: an
answer that ends there did not end naturally). Near the end of a window
(:func:`lookahead_from`), when the scorer knows the generator's EOS probability ``q(x)`` right
after each candidate (``Candidates.next_eos``; the attached kind computes it from the
candidates' hidden states), a candidate's weight looks one step ahead: with probability ``q(x)``
(counted only where that ending would be natural) the answer ends right after ``x``, otherwise
the LenVM's prediction holds. So a token that closes the answer on time beats both rambling on
and an EOS in mid-sentence.

- equal_to: ``p(x) · Laplace(N; T(x), b(x))`` while ``t < N``. Far from the target only large
  prediction errors matter, so the generator leads; near it the prediction steers toward
  candidates that let the answer end around ``N``. Once ``t >= N`` the policy wraps up: with
  ``o = t - N + 1``, EOS gets ``p(EOS) · exp(o² / WRAP_UP)`` and another candidate
  ``p(x) · exp(-o² · (l(x) - l_min) / (WRAP_UP · l_min))``, ``l_min`` the soonest predicted end
  among them. The answer finishes its sentence and ends with the generator's own EOS; an EOS the
  generator finds unlikely is allowed from ``N + slack(N)`` on. With an end head
  (:mod:`lenvm.end_head`; ``Candidates.next_end``), "soonest" is where the generator could next end
  naturally, ``t + e(x)``, instead of where it would end left alone, in every rule's wrap-up.
- at_most: ``p(x) · P(L <= N)``: candidates well inside the bound keep their generator
  probabilities; those predicted to cross it are pushed down by the Laplace tail; EOS is exact.
  From :func:`lookahead_from` on (a quarter of the bound before it) it wraps up as equal_to does
  past its target, so the answer is brought to a natural end before the bound, not stopped at it.
  While the LenVM is confident that the answer fits (:func:`fits`), and for the whole of the
  engine's first attempt (``Sequence.free``), the row is left to the generator altogether (the
  same draw as without guidance): the policy steers only answers that went back from the bound.
- at_least: ``p(x) · P(N <= L <= H)`` with ``H = N + ceil(AT_LEAST_AIM · (1 + r) · N)``: the
  answer is steered to end naturally soon after ``N``, not merely after it; EOS before ``N`` has
  probability 0 unless no other candidate is usable; past ``H`` it wraps up as equal_to does
  past its target. ``r`` counts the ends of this answer already resampled (the engine's
  retries): an answer that found no natural end in its window gets a wider one each time.

When no candidate can satisfy the constraint, the row keeps the Laplace weights without that
cut. The paper's rules (``rule="paper"``) are one-hot:
``argmin |v(x) - v*|`` with ``v* = -(1 - gamma**(N - t))`` (equal_to), ``argmax v`` (at_most,
the shortest) and ``argmin v`` (at_least, the longest).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lenvm.returns import length_to_value, value_to_length

WRAP_UP = 2.0  # past the end of its window: EOS is boosted by exp(o² / WRAP_UP), o = overshoot + 1
SPREAD = 0.25  # Laplace scale per predicted remaining token
FLOOR = 0.25  # Laplace scale of an exact prediction: ending one token off costs a factor e^-4
SLACK = 0.08  # an EOS that is not natural waits this share of the window's end beyond it ...
MIN_SLACK = 2  # ... and at least this many tokens
AT_LEAST_AIM = 0.3  # at_least N aims at a natural end in [N, N + ceil(AT_LEAST_AIM * (1 + retries) * N)]
LOOKAHEAD = 0.25  # look one step ahead from this share of the target before it ...
MIN_LOOKAHEAD = 4  # ... and at least this many tokens before it
FIT_CONFIDENCE = 0.9  # at_most leaves a row to the generator while P(L <= N | s_t) is at least this


@dataclass
class Candidates:
    """Candidate next tokens of ``B`` rows, ``k`` each."""

    ids: torch.Tensor  # [B, k] token ids
    probs: torch.Tensor  # [B, k] generator probabilities after truncation; 0 marks an unusable slot
    values: torch.Tensor  # [B, k] V(s_t + x), 0 for EOS
    eos: torch.Tensor  # [B, k] True where the candidate is an EOS token
    # [B, k] the generator's probability of its most likely EOS right after x (when the scorer
    # computed it)
    next_eos: torch.Tensor | None = None
    # [B] the generator's own probability (temperature 1, untruncated) of its EOS now
    eos_now: torch.Tensor | None = None
    # [B, k] tokens until the generator's next natural-end opportunity after x, EOS included (the
    # LenVM's end head, when it has one)
    next_end: torch.Tensor | None = None

    def rows(self, index: torch.Tensor) -> Candidates:
        """The candidates of the rows ``index``."""

        def pick(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[index]

        return Candidates(
            self.ids[index],
            self.probs[index],
            self.values[index],
            self.eos[index],
            pick(self.next_eos),
            pick(self.eos_now),
            pick(self.next_end),
        )

    @property
    def valid(self) -> torch.Tensor:
        return self.probs > 0


def predicted_total(c: Candidates, step: torch.Tensor, gamma: float) -> torch.Tensor:
    """``T(x) = t + l(x)``: the output length predicted if ``x`` is chosen (``[B, k]``, float64).
    A non-EOS token is followed by at least the EOS, so its ``l`` is at least 1."""
    lengths = value_to_length(c.values.double(), gamma).clamp(min=1.0)
    return step[:, None].double() + torch.where(c.eos, 0.0, lengths)


def _soonest_by(c: Candidates, step: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """What a wrap-up ranks candidates by (``[B, k]``, float64): ``t + e(x)``, the length at the
    generator's next natural-end opportunity after ``x`` (``e`` from the LenVM's end head; ``t``
    for EOS), when the end head tells it; else the predicted end ``total``."""
    if c.next_end is None:
        return total
    return step[:, None].double() + torch.where(c.eos, 0.0, c.next_end.double().clamp(min=1.0))


def spread(total: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """Laplace scale ``b(x) = SPREAD · l(x) + FLOOR`` of the final length around ``T(x)``."""
    return SPREAD * (total - step[:, None].double()) + FLOOR


def window_end(kind: str, target: torch.Tensor, retries: torch.Tensor | None = None) -> torch.Tensor:
    """The last output length a target rule aims at: ``N`` (equal_to, at_most) or
    ``N + ceil(AT_LEAST_AIM · (1 + r) · N)`` (at_least, ``r`` = ``retries``: ends of the answer
    already resampled, 0 when None)."""
    if kind == "at_least":
        aim = AT_LEAST_AIM * (1 if retries is None else 1 + retries.double())
        return target + torch.ceil(aim * target.double()).long()
    return target


def give_up(
    kind: str, target: torch.Tensor, horizon: torch.Tensor | None = None, retries: torch.Tensor | None = None
) -> torch.Tensor:
    """The step from which a target rule lets any EOS end the answer, natural or not: the bound
    itself for at_most, else ``slack`` tokens past the window's end (``SLACK`` of it, at least
    ``MIN_SLACK``), and never later than the last step before ``horizon`` (``max_new_tokens``),
    so that the answer ends rather than being cut; ``retries``: see :func:`window_end`."""
    end = window_end(kind, target, retries)
    if kind == "at_most":
        return end
    limit = end + torch.ceil(SLACK * end.double()).long().clamp(min=MIN_SLACK)
    if horizon is not None:
        limit = torch.minimum(limit, (horizon - 1).clamp(min=0))
    return limit


def lookahead_from(target: torch.Tensor) -> torch.Tensor:
    """The step from which a target rule looks one step ahead (the generator's EOS probability
    after each candidate): ``LOOKAHEAD`` of the target before it, at least ``MIN_LOOKAHEAD``
    tokens (the target is where equal_to and at_least start to accept an end, and at_most's
    last chance to end)."""
    ahead = torch.ceil(LOOKAHEAD * target.double()).long().clamp(min=MIN_LOOKAHEAD)
    return (target - ahead).clamp(min=0)


def fits(value: torch.Tensor, step: torch.Tensor, target: torch.Tensor, gamma: float) -> torch.Tensor:
    """Whether the LenVM is confident (``P(L <= N) >= FIT_CONFIDENCE`` under the Laplace model)
    that an answer in state value ``value`` (``[B]``, at ``step``) ends within ``target``: as
    :func:`at_most` judged the token that led to this state."""
    left = value_to_length(value.double(), gamma).clamp(min=1.0)  # tokens left, the EOS among them
    total = step.double() + left - 1.0  # the output length, EOS excluded (as T(x) counts it)
    z = (target.double() + 0.5 - total) / (SPREAD * left + FLOOR)
    return _log_laplace_cdf(z) >= math.log(FIT_CONFIDENCE)


def follow(c: Candidates) -> torch.Tensor:
    """No control: the generator's own distribution over the candidates."""
    return _normalize(c.probs.double().log(), c.valid)


def tilt(c: Candidates, beta: torch.Tensor) -> torch.Tensor:
    """``p'(x) ∝ p(x) · exp(beta · v(x))`` per row; positive beta favours shorter continuations."""
    return _normalize(c.probs.double().log() + beta[:, None].double() * c.values.double(), c.valid)


def equal_to(
    c: Candidates,
    step: torch.Tensor,
    target: torch.Tensor,
    gamma: float,
    rule: str = "ours",
    natural_eos: torch.Tensor | None = None,
    horizon: torch.Tensor | None = None,
) -> torch.Tensor:
    """Aim at exactly ``target`` output tokens."""
    if rule == "paper":
        goal = length_to_value((target - step).clamp(min=0).double(), gamma)
        distance = (c.values.double() - goal[:, None]).abs().masked_fill(~c.valid, float("inf"))
        return _one_hot(distance.argmin(-1), c)
    total = predicted_total(c, step, gamma)
    q = _natural_next(c, natural_eos)
    density = _log_laplace_density(target[:, None].double(), total, spread(total, step))
    density = _with_lookahead(q, density, _ending_next(step, target))
    over = (step >= target)[:, None]
    weights = torch.where(over, _wrap_up(c, _soonest_by(c, step, total), step, target, q), density)
    allowed = _eos_allowed(c, step, give_up("equal_to", target, horizon), natural_eos)
    return _conditioned(c, weights, _ends_by_horizon(c, step, horizon, allowed))


def _wrap_up(
    c: Candidates, total: torch.Tensor, step: torch.Tensor, target: torch.Tensor, q: torch.Tensor | None
) -> torch.Tensor:
    """Log weights once ``target`` (a window's end) is reached: EOS is favoured by
    ``o² / WRAP_UP`` and other candidates by how much sooner than the soonest one they are
    predicted to end (``o`` = tokens out beyond the target, plus one). A sentence gets a few
    tokens to finish where the generator gives EOS a fair chance; a mid-sentence EOS wins only
    after several. With the lookahead, after ``x`` the generator ends with probability ``q(x)``,
    an ending worth what EOS is worth now; so "." before a likely EOS beats a mid-sentence EOS."""
    pressure = (step - target + 1).clamp(min=0)[:, None].double() ** 2 / WRAP_UP
    left = (total - step[:, None].double()).clamp(min=1.0).masked_fill(c.eos | ~c.valid, float("inf"))
    soonest = left.min(-1, keepdim=True).values.clamp(max=1e9)
    later = torch.where(c.eos, 0.0, (left - soonest) / soonest)
    weights = torch.where(c.eos, pressure, -pressure * later)
    if q is not None:
        weights = torch.where(c.eos, weights, torch.logaddexp(q.log() + pressure, torch.log1p(-q) + weights))
    return weights


def at_most(
    c: Candidates,
    step: torch.Tensor,
    target: torch.Tensor,
    gamma: float,
    rule: str = "ours",
    natural_eos: torch.Tensor | None = None,
    horizon: torch.Tensor | None = None,
) -> torch.Tensor:
    """Stay at or below ``target``; the engine adds a hard EOS at the bound for our rule."""
    if rule == "paper":
        return _one_hot(c.values.double().masked_fill(~c.valid, -float("inf")).argmax(-1), c)
    total = predicted_total(c, step, gamma)
    inside = _log_laplace_cdf((target[:, None] + 0.5 - total) / spread(total, step))
    fits_next = torch.where(step + 1 <= target, 0.0, -float("inf")).double()
    q = _natural_next(c, natural_eos)
    log_p = torch.where(c.eos, 0.0, _with_lookahead(q, inside, fits_next))
    wrap_from = lookahead_from(target)
    soon = _soonest_by(c, step, total)
    weights = torch.where((step >= wrap_from)[:, None], _wrap_up(c, soon, step, wrap_from, q), log_p)
    feasible = torch.where(c.eos, total <= target[:, None], (step < target)[:, None])
    return _conditioned(c, weights, feasible & _eos_allowed(c, step, target, natural_eos))


def at_least(
    c: Candidates,
    step: torch.Tensor,
    target: torch.Tensor,
    gamma: float,
    rule: str = "ours",
    natural_eos: torch.Tensor | None = None,
    horizon: torch.Tensor | None = None,
    retries: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reach at least ``target``: EOS is never allowed before it unless nothing else is usable.
    ``retries`` (``[B]``): ends of each answer already resampled, which widen its window."""
    early = c.eos & (step < target)[:, None]
    if rule == "paper":
        allowed = c.valid & ~early
        allowed = torch.where(allowed.any(-1, keepdim=True), allowed, c.valid)
        return _one_hot(c.values.double().masked_fill(~allowed, float("inf")).argmin(-1), c)
    total = predicted_total(c, step, gamma)
    end = window_end("at_least", target, retries)
    b = spread(total, step)
    within = log_laplace_interval((target[:, None] - 0.5 - total) / b, (end[:, None] + 0.5 - total) / b)
    q = _natural_next(c, natural_eos)
    ends_within = torch.where((step + 1 >= target) & (step + 1 <= end), 0.0, -float("inf")).double()
    log_p = torch.where(c.eos, 0.0, _with_lookahead(q, within, ends_within))
    over = (step > end)[:, None]
    weights = torch.where(over, _wrap_up(c, _soonest_by(c, step, total), step, end + 1, q), log_p)
    allowed = ~early & _eos_allowed(c, step, give_up("at_least", target, horizon, retries), natural_eos)
    return _conditioned(c, weights, _ends_by_horizon(c, step, horizon, allowed))


def apply(
    kind: str,
    rule: str,
    c: Candidates,
    step: torch.Tensor,
    target: torch.Tensor,
    beta: torch.Tensor,
    gamma: float,
    natural_eos: torch.Tensor | None = None,
    horizon: torch.Tensor | None = None,
    retries: torch.Tensor | None = None,
) -> torch.Tensor:
    """The policy of control ``kind`` (``none``, ``tilt`` or a target kind) for rows sharing it;
    ``natural_eos`` (``[B]``): each row's bar for a natural end (None: every EOS is natural);
    ``horizon``: each row's ``max_new_tokens``; ``retries``: each row's ends already resampled
    (at_least widens its window with them)."""
    if kind == "none":
        return follow(c)
    if kind == "tilt":
        return tilt(c, beta)
    if kind == "at_least":  # the one rule whose window widens with retries
        return at_least(c, step, target, gamma, rule, natural_eos, horizon, retries)
    return TARGET_RULES[kind](c, step, target, gamma, rule, natural_eos=natural_eos, horizon=horizon)


def truncate(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor | None = None,
    top_p: torch.Tensor | None = None,
    min_p: torch.Tensor | None = None,
) -> torch.Tensor:
    """The sampling distribution: per-row temperature, top-k, top-p and min-p, in that order as in
    ``transformers`` (``[B]`` tensors; ``None`` skips a filter that is off in every row; top_k 0
    and top_p 1 are off). Returns normalized probabilities, zero outside each row's truncation,
    which always keeps the row's likeliest token."""
    probs = torch.softmax(logits / temperature[:, None], dim=-1)
    if top_k is None and top_p is None and min_p is None:
        return probs
    if top_k is not None:
        top_k = top_k.clamp(max=probs.shape[-1])  # beyond the vocabulary: every token
        top = probs.topk(int(top_k.max()), dim=-1).values
        kth = top.gather(1, (top_k.clamp(min=1) - 1)[:, None])
        probs = probs.masked_fill((probs < kth) & (top_k > 0)[:, None], 0.0)
    if top_p is not None:
        ordered, order = probs.sort(dim=-1, descending=True)
        before = ordered.cumsum(-1) - ordered  # mass of the more probable tokens
        limit = torch.where(top_p < 1, top_p, float("inf"))[:, None] * ordered.sum(-1, keepdim=True)
        cut = before >= limit
        # The smallest set whose mass reaches p is never empty, even for a p that rounds to 0.
        cut[:, 0] = False
        probs = probs.scatter(1, order, ordered.masked_fill(cut, 0.0))
    if min_p is not None:
        probs = probs.masked_fill(probs < min_p[:, None] * probs.max(-1, keepdim=True).values, 0.0)
    return probs / probs.sum(-1, keepdim=True)


def top_candidates(
    logits: torch.Tensor,
    probs: torch.Tensor,
    k: int,
    eos_ids: torch.Tensor,
    wants_eos: torch.Tensor | None,
    temperature: torch.Tensor,
    keep_going: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` most probable tokens of ``probs`` (ids and probabilities, ``[B, k]``).

    Rows in ``wants_eos`` (``[B]`` bool, None for no row: targets that must be able to end) get
    the most likely EOS token in the last slot when none is among the top ``k``; it keeps its
    probability before truncation when top-p or min-p cut it, so a row can end when its target
    is reached. Likewise rows in ``keep_going`` (short of a target they must reach) where nothing
    but EOS kept a probability (truncation cut the rest: a short answer's EOS often holds more
    than top-p; or a low temperature rounded it to 0) take their other candidates from the
    distribution before truncation given that the answer goes on (EOS left out, so that they keep
    probabilities however far EOS leads), so that the control can go on."""
    if keep_going is not None:
        kept = (probs > 0).sum(-1)
        only_eos = kept == (probs[:, eos_ids] > 0).sum(-1)
        lost = keep_going & only_eos
        if lost.any():
            going_on = (logits / temperature[:, None]).index_fill(1, eos_ids, -float("inf"))
            probs = torch.where(lost[:, None], torch.softmax(going_on, dim=-1), probs)
    k = min(k, probs.shape[-1])
    cand_probs, ids = probs.topk(k, dim=-1)
    if k > 1 and wants_eos is not None:
        eos_id = primary_eos(logits, eos_ids)
        scaled = logits / temperature[:, None]
        untruncated = (scaled.gather(1, eos_id[:, None])[:, 0] - scaled.logsumexp(-1)).exp()
        truncated = probs.gather(1, eos_id[:, None])[:, 0]
        swap = wants_eos & ~torch.isin(ids, eos_ids).any(-1)
        ids[:, -1] = torch.where(swap, eos_id, ids[:, -1])
        eos_p = torch.where(truncated > 0, truncated, untruncated)
        cand_probs[:, -1] = torch.where(swap, eos_p, cand_probs[:, -1])
        # A low temperature can round EOS's probability to 0, which marks a slot unusable: a row
        # that must be able to end keeps it, as its least likely candidate.
        lost_eos = wants_eos[:, None] & torch.isin(ids, eos_ids) & (cand_probs == 0)
        cand_probs = cand_probs.masked_fill(lost_eos, torch.finfo(cand_probs.dtype).tiny)
    return ids, cand_probs


def primary_eos(logits: torch.Tensor, eos_ids: torch.Tensor) -> torch.Tensor:
    """Per row, the EOS id the generator finds most likely (``[B]``)."""
    if len(eos_ids) == 1:
        return eos_ids.expand(logits.shape[0])
    return eos_ids[logits[:, eos_ids].argmax(-1)]


def choose(dist: torch.Tensor, uniform: torch.Tensor, greedy: torch.Tensor | None = None) -> torch.Tensor:
    """Index drawn from each row of ``dist`` (``[B, n]``, unnormalized is fine) by inverse CDF with
    ``uniform`` (``[B]`` in [0, 1)); rows where ``greedy`` is True take the argmax instead.

    The uniforms come from each request's own random stream, so a draw does not depend on which
    other requests share the batch. Zero-probability entries are never drawn."""
    cdf = dist.double().cumsum(-1)
    # The number of CDF entries at or below the draw (a binary search: the CDF is sorted).
    drawn = torch.searchsorted(cdf, uniform.double()[:, None] * cdf[:, -1:], right=True)[:, 0]
    drawn = drawn.clamp(max=dist.shape[-1] - 1)
    if greedy is None:
        return drawn
    return torch.where(greedy, dist.argmax(-1), drawn)


TARGET_RULES = {"equal_to": equal_to, "at_most": at_most, "at_least": at_least}


def _log_laplace_cdf(z: torch.Tensor) -> torch.Tensor:
    """``log P(X <= z)`` for a standard Laplace variable."""
    return torch.where(z >= 0, torch.log1p(-0.5 * torch.exp(-z.clamp(min=0))), z.clamp(max=0) - math.log(2))


def log_laplace_interval(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """``log P(lo <= X <= hi)`` for a standard Laplace variable (``lo <= hi``), without the
    cancellation of a difference of CDFs far in either tail."""
    # Both in the right tail: P = 0.5·(exp(-lo) - exp(-hi)); mirrored in the left tail.
    right = -lo.clamp(min=0) + torch.log1p(-torch.exp(-(hi - lo).clamp(min=1e-12))) - math.log(2)
    left = hi.clamp(max=0) + torch.log1p(-torch.exp(-(hi - lo).clamp(min=1e-12))) - math.log(2)
    # Straddling 0: P = 1 - 0.5·exp(lo) - 0.5·exp(-hi).
    middle = torch.log1p(-0.5 * torch.exp(lo.clamp(max=0)) - 0.5 * torch.exp(-hi.clamp(min=0)))
    return torch.where(lo >= 0, right, torch.where(hi <= 0, left, middle))


def _log_laplace_density(x: torch.Tensor, center: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return -(x - center).abs() / scale - (2 * scale).log()


def _natural_next(c: Candidates, natural_eos: torch.Tensor | None) -> torch.Tensor | None:
    """``q(x)``: the probability that the generator ends right after ``x`` with an EOS that would
    count as natural (0 below the row's bar, and for EOS itself); None when unknown."""
    if c.next_eos is None:
        return None
    q = c.next_eos.double().clamp(0.0, 1.0 - 1e-9)
    if natural_eos is not None:
        q = torch.where(q >= natural_eos[:, None].double(), q, 0.0)
    return q.masked_fill(c.eos, 0.0)


def _ending_next(step: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """How well ending right after a candidate (length ``t + 1``, an exact prediction) meets
    equal_to ``target``: the log Laplace density, ``[B, 1]``."""
    length = (step + 1)[:, None].double()
    return _log_laplace_density(target[:, None].double(), length, torch.full_like(length, SPREAD + FLOOR))


def _with_lookahead(q: torch.Tensor | None, continuing: torch.Tensor, ending: torch.Tensor) -> torch.Tensor:
    """``log(q · exp(ending) + (1 - q) · exp(continuing))``: with probability ``q(x)`` the answer
    ends right after ``x`` (log weight ``ending``, ``[B, 1]`` or ``[B]``), else the LenVM's
    prediction holds (``continuing``, ``[B, k]``); without a lookahead, ``continuing``."""
    if q is None:
        return continuing
    ending = ending if ending.dim() == 2 else ending[:, None]
    return torch.logaddexp(q.log() + ending, torch.log1p(-q) + continuing)


def _eos_allowed(
    c: Candidates, step: torch.Tensor, limit: torch.Tensor, natural_eos: torch.Tensor | None
) -> torch.Tensor:
    """Where EOS may be chosen (``[B, k]``, True for every other candidate): where the generator
    itself gives it at least the row's ``natural_eos``, or from step ``limit`` on."""
    if natural_eos is None or c.eos_now is None:
        return torch.ones_like(c.eos)
    ok = (c.eos_now.double() >= natural_eos.double()) | (step >= limit)
    return ~c.eos | ok[:, None]


def _ends_by_horizon(
    c: Candidates, step: torch.Tensor, horizon: torch.Tensor | None, allowed: torch.Tensor
) -> torch.Tensor:
    """``allowed`` less every candidate but EOS at the last step before ``horizon``
    (``max_new_tokens``): the answer ends there rather than being cut."""
    if horizon is None:
        return allowed
    return allowed & (c.eos | (step < horizon - 1)[:, None])


def _conditioned(c: Candidates, log_likelihood: torch.Tensor, feasible: torch.Tensor) -> torch.Tensor:
    """``p(x) · likelihood(x)`` over usable, feasible candidates; a row with no feasible candidate
    keeps the likelihood but drops the cut."""
    allowed = c.valid & feasible
    allowed = torch.where(allowed.any(-1, keepdim=True), allowed, c.valid)
    return _normalize(c.probs.double().log() + log_likelihood, allowed)


def _normalize(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits.masked_fill(~allowed, -float("inf")), dim=-1)


def _one_hot(index: torch.Tensor, c: Candidates) -> torch.Tensor:
    return torch.nn.functional.one_hot(index, c.ids.shape[-1]).double()
