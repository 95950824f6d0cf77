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
with how far it looks ahead, and the prediction for EOS is exact up to ``FLOOR``. Hence:

- equal_to: ``p(x) · Laplace(N; T(x), b(x))`` while ``t < N``. Far from the target only large
  prediction errors matter, so the generator leads; near it the prediction steers toward
  candidates that let the answer end around ``N``. Once ``t >= N`` the policy wraps up: with
  ``o = t - N + 1``, EOS gets ``p(EOS) · exp(o² / WRAP_UP)`` and another candidate
  ``p(x) · exp(-o² · (l(x) - l_min) / (WRAP_UP · l_min))``, ``l_min`` the soonest predicted end
  among them. The answer finishes its sentence and ends with the generator's own EOS instead
  of being cut at ``N``; an EOS the generator finds unlikely wins only after several tokens of
  overshoot (EOS is always a candidate; a hard cut is the explicit ``hard_cap_slack`` option).
  When the scorer knows the generator's EOS probability ``q(x)`` right after each candidate
  (``Candidates.next_eos``; the attached kind computes it from the candidates' hidden states),
  a candidate's weight looks one step ahead: ``q(x)`` of it counts as ending there, so a token
  that closes the sentence beats both rambling on and an EOS in mid-sentence.
- at_most: ``p(x) · P(L <= N)``: candidates well inside the bound keep their generator
  probabilities; those predicted to cross it are pushed down by the Laplace tail; EOS is exact.
- at_least: ``p(x) · P(L >= N)``: the mirror image; EOS before ``N`` has probability 0 unless no
  other candidate is usable.

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

WRAP_UP = 2.0  # equal_to past its target: EOS is boosted by exp(o² / WRAP_UP), o = overshoot + 1
SPREAD = 0.25  # Laplace scale per predicted remaining token
FLOOR = 0.25  # Laplace scale of an exact prediction: ending one token off costs a factor e^-4


@dataclass
class Candidates:
    """Candidate next tokens of ``B`` rows, ``k`` each."""

    ids: torch.Tensor  # [B, k] token ids
    probs: torch.Tensor  # [B, k] generator probabilities after truncation; 0 marks an unusable slot
    values: torch.Tensor  # [B, k] V(s_t + x), 0 for EOS
    eos: torch.Tensor  # [B, k] True where the candidate is an EOS token
    # [B, k] the generator's probability of EOS right after x (when the scorer computed it)
    next_eos: torch.Tensor | None = None

    def rows(self, index: torch.Tensor) -> Candidates:
        """The candidates of the rows ``index``."""
        nxt = None if self.next_eos is None else self.next_eos[index]
        return Candidates(self.ids[index], self.probs[index], self.values[index], self.eos[index], nxt)

    @property
    def valid(self) -> torch.Tensor:
        return self.probs > 0


def predicted_total(c: Candidates, step: torch.Tensor, gamma: float) -> torch.Tensor:
    """``T(x) = t + l(x)``: the output length predicted if ``x`` is chosen (``[B, k]``, float64).
    A non-EOS token is followed by at least the EOS, so its ``l`` is at least 1."""
    lengths = value_to_length(c.values.double(), gamma).clamp(min=1.0)
    return step[:, None].double() + torch.where(c.eos, 0.0, lengths)


def spread(total: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """Laplace scale ``b(x) = SPREAD · l(x) + FLOOR`` of the final length around ``T(x)``."""
    return SPREAD * (total - step[:, None].double()) + FLOOR


def follow(c: Candidates) -> torch.Tensor:
    """No control: the generator's own distribution over the candidates."""
    return _normalize(c.probs.double().log(), c.valid)


def tilt(c: Candidates, beta: torch.Tensor) -> torch.Tensor:
    """``p'(x) ∝ p(x) · exp(beta · v(x))`` per row; positive beta favours shorter continuations."""
    return _normalize(c.probs.double().log() + beta[:, None].double() * c.values.double(), c.valid)


def equal_to(
    c: Candidates, step: torch.Tensor, target: torch.Tensor, gamma: float, rule: str = "ours"
) -> torch.Tensor:
    """Aim at exactly ``target`` output tokens."""
    if rule == "paper":
        goal = length_to_value((target - step).clamp(min=0).double(), gamma)
        distance = (c.values.double() - goal[:, None]).abs().masked_fill(~c.valid, float("inf"))
        return _one_hot(distance.argmin(-1), c)
    total = predicted_total(c, step, gamma)
    b = spread(total, step)
    log_likelihood = -(total - target[:, None]).abs() / b - (2 * b).log()
    over = (step >= target)[:, None]
    return _conditioned(c, torch.where(over, _wrap_up(c, total, step, target), log_likelihood), c.valid)


def _wrap_up(c: Candidates, total: torch.Tensor, step: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """equal_to once its target is reached: log weights that favour EOS by ``o² / WRAP_UP`` and
    other candidates by how much sooner than the soonest one they are predicted to end
    (``o`` = tokens out beyond the target, plus one). A sentence gets a few tokens to finish
    where the generator gives EOS a fair chance; a mid-sentence EOS wins only after several."""
    pressure = (step - target + 1).clamp(min=0)[:, None].double() ** 2 / WRAP_UP
    left = (total - step[:, None].double()).clamp(min=1.0).masked_fill(c.eos | ~c.valid, float("inf"))
    soonest = left.min(-1, keepdim=True).values.clamp(max=1e9)
    later = torch.where(c.eos, 0.0, (left - soonest) / soonest)
    weights = torch.where(c.eos, pressure, -pressure * later)
    if c.next_eos is not None:
        # One step of lookahead: after x the generator ends with probability q(x), an ending
        # worth what EOS is worth now; so "." before a likely EOS beats a mid-sentence EOS.
        q = c.next_eos.double().clamp(0.0, 1.0)
        ahead = torch.logaddexp(q.log() + pressure, (1 - q).log() + weights)
        weights = torch.where(c.eos, weights, ahead)
    return weights


def at_most(
    c: Candidates, step: torch.Tensor, target: torch.Tensor, gamma: float, rule: str = "ours"
) -> torch.Tensor:
    """Stay at or below ``target``; the engine adds a hard EOS at the bound for our rule."""
    if rule == "paper":
        return _one_hot(c.values.double().masked_fill(~c.valid, -float("inf")).argmax(-1), c)
    total = predicted_total(c, step, gamma)
    inside = _log_laplace_cdf((target[:, None] + 0.5 - total) / spread(total, step))
    log_p = torch.where(c.eos, 0.0, inside)
    feasible = torch.where(c.eos, total <= target[:, None], (step < target)[:, None])
    return _conditioned(c, log_p, feasible)


def at_least(
    c: Candidates, step: torch.Tensor, target: torch.Tensor, gamma: float, rule: str = "ours"
) -> torch.Tensor:
    """Reach at least ``target``: EOS is never allowed before it unless nothing else is usable."""
    early = c.eos & (step < target)[:, None]
    if rule == "paper":
        allowed = c.valid & ~early
        allowed = torch.where(allowed.any(-1, keepdim=True), allowed, c.valid)
        return _one_hot(c.values.double().masked_fill(~allowed, float("inf")).argmin(-1), c)
    total = predicted_total(c, step, gamma)
    beyond = _log_laplace_cdf((total - target[:, None] + 0.5) / spread(total, step))
    done = (step + 1 >= target)[:, None]  # the next token reaches the target whatever it is
    log_p = torch.where(c.eos | done, 0.0, beyond)
    return _conditioned(c, log_p, ~early)


def apply(
    kind: str,
    rule: str,
    c: Candidates,
    step: torch.Tensor,
    target: torch.Tensor,
    beta: torch.Tensor,
    gamma: float,
) -> torch.Tensor:
    """The policy of control ``kind`` (``none``, ``tilt`` or a target kind) for rows sharing it."""
    if kind == "none":
        return follow(c)
    if kind == "tilt":
        return tilt(c, beta)
    return TARGET_RULES[kind](c, step, target, gamma, rule)


def truncate(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor | None = None,
    top_p: torch.Tensor | None = None,
    min_p: torch.Tensor | None = None,
) -> torch.Tensor:
    """The sampling distribution: per-row temperature, top-k, top-p and min-p, in that order as in
    ``transformers`` (``[B]`` tensors; ``None`` skips a filter that is off in every row; top_k 0
    and top_p 1 are off). Returns normalized probabilities, zero outside each row's truncation."""
    probs = torch.softmax(logits / temperature[:, None], dim=-1)
    if top_k is None and top_p is None and min_p is None:
        return probs
    if top_k is not None:
        top = probs.topk(int(top_k.max()), dim=-1).values
        kth = top.gather(1, (top_k.clamp(min=1) - 1)[:, None])
        probs = probs.masked_fill((probs < kth) & (top_k > 0)[:, None], 0.0)
    if top_p is not None:
        ordered, order = probs.sort(dim=-1, descending=True)
        before = ordered.cumsum(-1) - ordered  # mass of the more probable tokens
        limit = torch.where(top_p < 1, top_p, float("inf"))[:, None] * ordered.sum(-1, keepdim=True)
        probs = probs.scatter(1, order, ordered.masked_fill(before >= limit, 0.0))
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
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` most probable tokens of ``probs`` (ids and probabilities, ``[B, k]``).

    Rows in ``wants_eos`` (``[B]`` bool, None for no row: targets that must be able to end) get
    the most likely EOS token in the last slot when none is among the top ``k``; it keeps its
    probability before truncation when top-p or min-p cut it, so a row can end when its target
    is reached."""
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
