"""The engine's state for one request: its tokens so far, its random stream, and the attempts it
made (retries of a target control and ``best_of``).

Each attempt draws from its own seeded random stream, one uniform number per step, so the numbers
an answer draws do not depend on which other requests share its batch (its text still may where a
batch's arithmetic rounds a near tie between two tokens differently).

An attempt also keeps, at every position, the generator's most likely EOS and its
log-probability there: an answer may end instead where its own text let the generator end
naturally (:meth:`Sequence.end_earlier`), before any retry is spent on it: an At Most or At Least
answer that did not end naturally, where the bound holds; an Equal To answer, where that is
nearer its target than its own end. One that found no natural end in any attempt ends where its
text gave EOS the highest probability within its bound (At Most) or near its target (Equal To),
if higher than at its own end (Equal To: at the end of any of its attempts).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field, replace
from typing import cast

import torch

from lenvm.decoding.params import TARGET_KINDS, Control, FinishReason, Request, Result, SamplingParams
from lenvm.decoding.streams import Stream
from lenvm.vision import ImageInputs

# Seed step between the attempts of a best_of request (a large odd number: distinct streams).
ATTEMPT_SEED_STEP = 0x9E3779B97F4A7C15
# An Equal To answer d tokens short of its target is as far off as one SHORT_MISS * d tokens past
# it: a text cut short misses more than one that runs on a little (LIFEBench's Length Score has
# the same ratio, 5 against 2 per unit of relative deviation).
SHORT_MISS = 2.5
# An Equal To answer of our rule that ends naturally but misses its target by more than this share
# of it (by miss) has its end resampled too, while fewer than CLOSER_RETRIES retries were spent, and
# the closest natural end is kept: where the last sentence ends is partly chance, so another draw
# may land nearer. A second draw still lands nearer at short targets, for a few more tokens
# decoded; a third rarely does (docs/benchmarks.md).
CLOSE_ENOUGH = 0.05
CLOSER_RETRIES = 2


@dataclass
class Sequence:
    """One attempt at one request, as the engine decodes it."""

    index: Hashable  # the key of its request
    attempt: int  # of a best_of request
    request: Request
    control: Control
    prompt_ids: list[int]
    rng: torch.Generator  # this attempt's random stream
    uniforms: torch.Tensor  # [max_new_tokens]: one draw per step, from rng
    images: ImageInputs | None = None  # the pixel inputs of the prompt's images: every prefill needs them
    tokens: list[int] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)  # when the request asks
    ends: list[tuple[int, float]] = field(default_factory=list)  # (EOS id, its log-prob) at each position
    finish_reason: FinishReason | None = None
    eos_logprob: float | None = None  # the generator's log-probability of the final EOS
    missed: list[Result] = field(default_factory=list)  # earlier ends, resampled (see may_retry)
    decoded: int = 0
    # A retry waiting to rejoin: the generator's stream and the scorer's own (None where it reads
    # the generator's) over its context but the last token, kept from the batch it left, so that
    # it rejoins without a prefill (Batch.leave, Batch.join).
    kept: tuple[Stream, Stream | None] | None = None

    @classmethod
    def start(
        cls,
        index: Hashable,
        request: Request,
        prompt_ids: list[int],
        attempt: int,
        device,
        images: ImageInputs | None = None,
    ) -> Sequence:
        """Attempt ``attempt`` of request ``index``; a request without a seed gets a random one.
        ``images``: the pixel inputs of the prompt's images (``prompt_ids`` hold their tokens)."""
        seed = request.sampling.seed
        seed = seed if seed is not None else int(torch.randint(2**62, ()))
        # Modulo 2**63, as torch draws alike for seeds 2**63 apart: a negative seed shares seed + 2**63's.
        rng = torch.Generator().manual_seed((seed + attempt * ATTEMPT_SEED_STEP) % 2**63)
        control = request.control or Control()
        uniforms = _uniforms(rng, request.sampling, device)
        return cls(index, attempt, request, control, prompt_ids, rng, uniforms, images)

    @property
    def context(self) -> list[int]:
        """Every token fed to the models so far: what a (re)admitted row prefills."""
        return self.prompt_ids + self.tokens

    def append(
        self,
        token: int,
        forced: bool,
        logprob: float,
        value: float,
        eos: set[int],
        end: tuple[int, float],
        top: list[tuple[int, float]] | None = None,
    ) -> bool:
        """Record one generated token (``end``: the generator's most likely EOS at this position and
        its log-probability; ``top``: the most likely tokens there, when the request asks for
        them); True when the request is finished."""
        self.tokens.append(token)
        self.values.append(value)
        self.logprobs.append(logprob)
        self.ends.append(end)
        if top is not None:
            self.top_logprobs.append(top)
        self.decoded += 1
        if token in eos:
            self.finish_reason = "cap" if forced else "stop"
            self.eos_logprob = logprob
        elif len(self.tokens) == self.request.sampling.max_new_tokens:
            self.finish_reason = "length"
        return self.finish_reason is not None

    def result(self, tokenizer) -> Result:
        ended = self.finish_reason in ("stop", "cap")
        return Result(
            prompt_token_ids=self.prompt_ids,
            token_ids=list(self.tokens),
            text=tokenizer.decode(self.tokens, skip_special_tokens=True),
            num_tokens=len(self.tokens) - ended,
            finish_reason=cast(FinishReason, self.finish_reason),  # read once the attempt finished
            values=list(self.values) if self.request.return_values else None,
            mean_logprob=sum(self.logprobs) / len(self.tokens),
            eos_prob=None if self.eos_logprob is None else math.exp(self.eos_logprob),
            retries=len(self.missed),
            decoded_tokens=self.decoded,
            logprobs=list(self.logprobs),
            top_logprobs=list(self.top_logprobs) if self.request.sampling.top_logprobs else None,
        )

    @property
    def free(self) -> bool:
        """Whether the generator writes this attempt alone: an At Most answer under our rule is
        first written unguided, so one that ends naturally within the bound is the generator's own
        answer; one that reaches the bound goes back (a retry) and is steered to an end from there."""
        c = self.control
        return (
            c is not None
            and c.kind == "at_most"
            and c.rule == "ours"
            and c.max_retries > 0
            and not self.missed
        )

    def end_earlier(self, result: Result) -> bool:
        """End ``result`` (this attempt's answer) instead at a position of its own text where the
        generator gave EOS at least ``natural_eos``: for At Most and At Least, where the answer did
        not end naturally and the bound holds there (the last such position within an At Most
        bound, the most of the answer; the first at or past an At Least target, the nearest to
        it); for Equal To, the position nearest the target (:func:`miss`) where that is nearer
        than the answer's own end, or as near and that end was not natural. An At Most answer
        with no such position and no retry left ends where its own text within the bound gave EOS
        the highest probability (:meth:`_likeliest_end`), if higher than at its own end; an Equal
        To answer likewise near its target (:meth:`_likeliest_near`), if higher than at the end of
        any attempt, where none ended naturally. The text before it is
        what the generator wrote. Only for our rules, and only where the engine may go back on an
        answer's end (retries allowed: a stream is then held back whole). True when the answer
        was cut."""
        c = self.control
        if (
            c.kind not in TARGET_KINDS
            or c.rule != "ours"
            or c.max_retries == 0
            or self.request.sampling.ignore_eos
        ):
            return False
        natural_end = result.ended_above(c.natural_eos)
        if natural_end and c.kind != "equal_to":
            return False
        # An EOS at position j replaces token j: positions inside the answer, before its own end.
        # Natural as Result.ended_above has it: the EOS's probability at least natural_eos.
        natural = [j for j in range(1, result.num_tokens) if math.exp(self.ends[j][1]) >= c.natural_eos]
        target = target_of(c)
        if c.kind == "equal_to":
            cut = min(natural, key=lambda j: miss(j, target), default=None)
            if cut is not None:
                nearer, own = miss(cut, target), miss(result.num_tokens, target)
                cut = cut if nearer < own or (nearer == own and not natural_end) else None
            if cut is None and not natural_end and not self._retry_left():
                cut = self._likeliest_near(result, target)
        elif c.kind == "at_most":
            cut = max((j for j in natural if j <= target), default=None)
            if cut is None and not self._retry_left():
                cut = self._likeliest_end(result, target)
        else:
            cut = min((j for j in natural if j >= target), default=None)
        if cut is None:
            return False
        eos, logprob = self.ends[cut]
        self.tokens[cut:] = [eos]
        self.values[cut:] = [0.0]
        self.logprobs[cut:] = [logprob]
        del self.ends[cut + 1 :], self.top_logprobs[cut + 1 :]
        self.finish_reason, self.eos_logprob = "stop", logprob
        return True

    def _likeliest_end(self, result: Result, bound: int) -> int | None:
        """The position within ``bound`` (before the answer's own end) where the generator gave EOS
        its highest probability, if higher than at the answer's own end: where an At Most answer
        that found no natural end in any attempt ends, at the close its own text came nearest
        to, rather than mid-thought at the bound."""
        return self._likeliest(range(1, min(bound + 1, result.num_tokens)), self._end_logprob())

    def _likeliest_near(self, result: Result, target: int) -> int | None:
        """The position within ``CLOSE_ENOUGH`` of ``target`` (by :func:`miss`, before the answer's
        own end) where the generator gave EOS its highest probability, if higher than at the end of
        this and every earlier attempt, when this one ended further off and none naturally: where
        an Equal To answer that found no natural end ends, on target at a close its text came
        nearer to, rather than at a less likely one elsewhere."""
        close = CLOSE_ENOUGH * target
        if miss(result.num_tokens, target) <= close:
            return None
        if any(r.ended_above(self.control.natural_eos) for r in self.missed):
            return None  # the natural one is returned (best_of)
        near = (j for j in range(1, result.num_tokens) if miss(j, target) <= close)
        earlier = [math.log(r.eos_prob) for r in self.missed if r.eos_prob]
        return self._likeliest(near, max([self._end_logprob(), *earlier]))

    def _likeliest(self, positions: Iterable[int], than: float) -> int | None:
        """Of ``positions``, the one where the generator gave EOS its highest log-probability, if
        that is above ``than``; None where there is none."""
        best = max(positions, key=lambda j: self.ends[j][1], default=None)
        return best if best is not None and self.ends[best][1] > than else None

    def _end_logprob(self) -> float:
        """The log-probability of the EOS that ended this attempt (-inf where none did)."""
        return self.eos_logprob if self.eos_logprob is not None else -math.inf

    def may_retry(self, result: Result) -> bool:
        """Whether a retry is left and this end is worth one (see :attr:`Control.retries`): it is
        not natural, and no earlier attempt ended naturally; or, for Equal To under our rule, it
        is natural but further from the target than ``CLOSE_ENOUGH`` of it, and fewer than
        ``CLOSER_RETRIES`` were spent. Never where greedy decoding would replay it
        (:meth:`_replays`)."""
        c = self.control
        if self.request.sampling.ignore_eos or not self._retry_left():
            return False
        if not result.ended_above(c.natural_eos):
            return not any(r.ended_above(c.natural_eos) for r in self.missed)
        return (
            c.kind == "equal_to"
            and c.rule == "ours"
            and len(self.missed) < CLOSER_RETRIES
            and miss(result.num_tokens, target_of(c)) > CLOSE_ENOUGH * target_of(c)
        )

    def _retry_left(self) -> bool:
        """Whether another retry may be made: fewer than the control's were spent, and greedy
        decoding would not just replay this attempt (:meth:`_replays`)."""
        return len(self.missed) < self.control.max_retries and not self._replays()

    def _replays(self) -> bool:
        """Whether a retry would only write this attempt's tokens again: under greedy decoding it
        goes back to a state already decoded from, under the same policy, unless it leaves At
        Most's unguided first attempt for guidance or widens At Least's window."""
        kind = self.control.kind
        return self.request.sampling.greedy and (kind == "equal_to" or (kind == "at_most" and not self.free))

    def retry(self, result: Result, sentence_ends: frozenset[int]) -> None:
        """Go back to resample the end of ``result`` (see :func:`retry_start`), with a fresh
        stretch of this attempt's random stream."""
        # An answer the generator wrote alone (see free) starts over under guidance: its text was
        # never steered toward an end, so none of it is kept.
        cut = 0
        if not self.free:
            cut = retry_start(
                self.tokens,
                result.num_tokens,
                target_of(self.control),
                len(self.missed) + 1,
                self.control.max_retries,
                sentence_ends,
            )
        self.missed.append(result)
        for kept in (self.tokens, self.values, self.logprobs, self.top_logprobs, self.ends):
            del kept[cut:]
        self.finish_reason = self.eos_logprob = None
        self.uniforms = _uniforms(self.rng, self.request.sampling, self.uniforms.device)

    def final(self, result: Result) -> Result:
        """The result to return: this end if it is the first, else the best of every end tried
        (with the cost of them all)."""
        if not self.missed:
            return result
        control = self.control
        chosen = best_of([*self.missed, result], target_of(control), control.natural_eos, control.kind)
        return replace(chosen, retries=len(self.missed), decoded_tokens=self.decoded)


def retry_start(
    tokens: list[int], num_tokens: int, target: int, attempt: int, retries: int, sentence_ends: frozenset[int]
) -> int:
    """How many tokens of an answer retry ``attempt`` of ``retries`` keeps: it goes back
    ``attempt / retries`` of the ``target`` from the target (or from the end of a shorter answer of
    ``num_tokens``), then on back to the start of that sentence (just after a token in
    ``sentence_ends``): where an answer decides what to say next, and so whether to conclude.
    The last retry keeps nothing."""
    back = math.ceil(attempt / retries * target)
    cut = max(0, min(num_tokens, target) - back)
    return next((i + 1 for i in range(cut - 1, -1, -1) if tokens[i] in sentence_ends), cut)


def best_of(results: list[Result], target: int, natural_eos: float, kind: str = "equal_to") -> Result:
    """The result that ended naturally (the generator gave its EOS at least ``natural_eos``);
    among several, or failing that, one that ended with EOS rather than being cut at
    ``max_new_tokens``; then for equal_to the closest to ``target``, for a bound (at_most,
    at_least) one that meets it, with the most likely final EOS. Ties go to the first.
    Closest for equal_to: see :func:`miss`."""

    def key(r: Result) -> tuple:
        ended = r.finish_reason != "length"
        if kind == "equal_to":
            return (not r.ended_above(natural_eos), not ended, miss(r.num_tokens, target))
        meets = r.num_tokens <= target if kind == "at_most" else r.num_tokens >= target
        return (not r.ended_above(natural_eos), not ended, not meets, -(r.eos_prob or 0.0))

    return min(results, key=key)


def miss(length: int, target: int) -> float:
    """How far an Equal To answer of ``length`` tokens is off its ``target``: tokens past it, or
    ``SHORT_MISS`` times the tokens short of it."""
    return SHORT_MISS * (target - length) if length < target else float(length - target)


def _uniforms(rng: torch.Generator, sampling: SamplingParams, device) -> torch.Tensor:
    """One draw per step: the engine fits ``max_new_tokens`` before an attempt starts."""
    return torch.rand(cast(int, sampling.max_new_tokens), generator=rng, dtype=torch.float64).to(device)


def target_of(control: Control) -> int:
    """The target of a target control (equal_to, at_most, at_least: Control requires it), the
    only kind whose ends are resampled or moved."""
    return cast(int, control.target)
