"""The decoding engine: batched generation with KV caches, optionally guided by a LenVM.

    engine = Engine(model, tokenizer, lenvm=None, num_candidates=8)
    results = engine.generate([Request("Hi", control=Control("equal_to", target=64))])

Requests run in a batch of at most ``batch_size`` rows; a finished row leaves the batch and a
waiting request takes its place (each request's state lives in the engine). Every step:

1. the generator's next-token distribution is truncated per request (temperature, top-k,
   top-p, min-p);
2. a row under a control takes its ``num_candidates`` most probable tokens as candidates (plus
   EOS for equal_to and at_most, so that they can always end); a plain row samples its token,
   its only candidate;
3. the LenVM scores the next state of every candidate of every row at once (scoring.py):
   ``attached``: the generator's own forward over the candidate block gives the values (head) and,
   for the chosen candidate, the next logits (LM head): one forward per step in total;
   ``q``: values of all candidates come from the hidden state that gave the logits, and one
   single-token forward follows; ``standalone``: the LenVM's candidate-block forward plus the
   generator's single-token forward. EOS has value 0. ``candidate_scoring="naive"`` (attached and
   standalone kinds, for speed comparisons) scores each candidate with its own single-token
   forward instead of the block, then feeds the chosen token once more: k + 1 forwards a step;
4. the row's policy (policies.py) turns candidate probabilities and values into a distribution,
   and the row draws from it with its own random stream (argmax when greedy);
5. the caches keep the chosen token only.

A finished Equal To answer that did not end naturally (the generator itself gave its final EOS
under ``NATURAL_EOS``) goes back to decoding from an earlier point, further back on each retry
(:attr:`Control.retries`): the row is prefilled with its prompt and the tokens it keeps and
rejoins the batch, so only the answers that miss pay for a second try.
"""

from __future__ import annotations

import functools
import math
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Literal

import torch

from lenvm.decoding import policies
from lenvm.decoding.scoring import Hidden, Stream
from lenvm.io import InputError, is_int, is_real
from lenvm.model import LengthValueModel, check_tokenizer
from lenvm.prompts import Messages, Prompt, as_prompt, encode_prompt

ControlKind = Literal["none", "equal_to", "at_most", "at_least", "tilt"]
CONTROL_KINDS = ("none", "equal_to", "at_most", "at_least", "tilt")
TARGET_KINDS = ("equal_to", "at_most", "at_least")
RULES = ("ours", "paper")
NO_CAP = 2**62
# gamma**N below this: values N tokens from the end sit within float32 rounding of -1
MIN_DISCOUNT = 1e-6
# An ending counts as natural when the generator itself gave its EOS at least this probability.
NATURAL_EOS = 0.05
# Seed step between the attempts of a best_of request (a large odd number: distinct streams).
ATTEMPT_SEED_STEP = 0x9E3779B97F4A7C15
# Equal To (our rule) by default resamples the end of an answer that did not end naturally this
# many times (see Control).
DEFAULT_RETRIES = 4


@dataclass(frozen=True)
class Control:
    """A length control for one request.

    ``equal_to``/``at_most``/``at_least`` take a ``target`` in output tokens (EOS not counted) and a
    ``rule``: ``"ours"`` (the generator conditioned on the constraint, the default) or ``"paper"``
    (the paper's one-hot rules over the usual candidates). ``tilt`` takes ``beta``:
    ``p'(x) ∝ p(x)·exp(beta·v(x))``, a positive beta favours shorter continuations.
    ``hard_cap_slack``: force EOS once ``target + slack`` tokens are out (the result then says
    ``"cap"``); off by default, except that at_most with our rule treats its target as a hard
    bound (slack 0).
    ``best_of`` (equal_to only): sample that many answers (each with its own random stream) and
    return the one that ends naturally (the generator gave its final EOS at least
    ``NATURAL_EOS``) closest to the target, or the closest if none does; costs ``best_of`` times
    the decoding.
    ``retries`` (equal_to only): when an answer does not end naturally, go back and resample its
    end, at most this many times; retry ``a`` of ``R`` restarts at the start of the sentence
    ``a / R`` of the target before the target (further back each time, where the text can still
    turn toward a conclusion; the last retry from the beginning), and the result is the first
    natural ending, or the attempt closest to the target if none is.
    Only answers that miss pay for it. None means ``DEFAULT_RETRIES`` for our rule, 0 for the
    paper's.
    """

    kind: ControlKind = "none"
    target: int | None = None
    beta: float | None = None
    rule: Literal["ours", "paper"] = "ours"
    hard_cap_slack: int | None = None
    best_of: int = 1
    retries: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in CONTROL_KINDS:
            raise InputError(f"unknown control {self.kind!r}; expected one of {CONTROL_KINDS}")
        if self.rule not in RULES:
            raise InputError(f"unknown control rule {self.rule!r}; expected one of {RULES}")
        if self.kind in TARGET_KINDS:
            if not is_int(self.target) or self.target < 1:
                raise InputError(
                    f"control {self.kind} needs a target of at least 1 token, got {self.target!r}"
                )
        elif self.target is not None:
            raise InputError(f"control {self.kind!r} takes no target")
        if self.kind == "tilt":
            if not is_real(self.beta):
                raise InputError(f"control tilt needs a finite beta, got {self.beta!r}")
        elif self.beta is not None:
            raise InputError(f"control {self.kind!r} takes no beta")
        if not is_int(self.best_of) or self.best_of < 1:
            raise InputError(f"best_of must be a positive integer, got {self.best_of!r}")
        if self.best_of > 1 and self.kind != "equal_to":
            raise InputError("best_of applies to equal_to controls only")
        if self.retries is not None:
            if not is_int(self.retries) or self.retries < 0:
                raise InputError(f"retries must be a non-negative integer, got {self.retries!r}")
            if self.retries > 0 and self.kind != "equal_to":
                raise InputError("retries applies to equal_to controls only")
        if self.hard_cap_slack is not None:
            if self.kind not in ("equal_to", "at_most"):
                raise InputError("hard_cap_slack applies to equal_to and at_most controls only")
            if not is_int(self.hard_cap_slack) or self.hard_cap_slack < 0:
                raise InputError(
                    f"hard_cap_slack must be a non-negative integer, got {self.hard_cap_slack!r}"
                )

    @property
    def active(self) -> bool:
        return self.kind != "none"

    @property
    def max_retries(self) -> int:
        """How many times an answer that did not end naturally has its end resampled."""
        if self.retries is not None:
            return self.retries
        return DEFAULT_RETRIES if self.kind == "equal_to" and self.rule == "ours" else 0

    @property
    def wants_eos(self) -> bool:
        """Whether EOS always joins the candidates, so the row can end at its target (our rules
        for equal_to and at_most; the paper's rules keep the usual candidates)."""
        return self.kind in ("equal_to", "at_most") and self.rule == "ours"

    @property
    def cap(self) -> int | None:
        """Output tokens after which EOS is forced, if any."""
        if self.hard_cap_slack is not None:
            return self.target + self.hard_cap_slack
        if self.kind == "at_most" and self.rule == "ours":
            return self.target
        return None


@dataclass
class Request:
    """One generation. ``temperature == 0`` is greedy (guided too, under a control);
    ``top_k == 0`` and ``min_p == 0`` are off. ``ignore_eos`` never ends before
    ``max_new_tokens`` (for speed measurements)."""

    prompt: str | Messages | Prompt
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    control: Control | None = None
    return_values: bool = False
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        problems = []
        if not is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            problems.append(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not is_real(self.temperature) or self.temperature < 0:
            problems.append(f"temperature must be >= 0, got {self.temperature!r}")
        if not is_real(self.top_p) or not 0 < self.top_p <= 1:
            problems.append(f"top_p must lie in (0, 1], got {self.top_p!r}")
        if not is_int(self.top_k) or self.top_k < 0:
            problems.append(f"top_k must be a non-negative integer, got {self.top_k!r}")
        if not is_real(self.min_p) or not 0 <= self.min_p < 1:
            problems.append(f"min_p must lie in [0, 1), got {self.min_p!r}")
        if self.seed is not None and not is_int(self.seed):
            problems.append(f"seed must be an integer or None, got {self.seed!r}")
        if self.control is not None and not isinstance(self.control, Control):
            problems.append(f"control must be a Control, got {type(self.control).__name__}")
        if problems:
            raise InputError("bad request: " + "; ".join(problems))


@dataclass
class Result:
    """A generated completion.

    ``token_ids`` end with the EOS token iff ``finish_reason`` is ``"stop"`` (the model or policy
    ended) or ``"cap"`` (a hard cap forced EOS); ``num_tokens`` excludes it. ``values[i]`` is the
    LenVM value after ``token_ids[i]`` (0 after EOS). ``mean_logprob`` is the mean log-probability
    of ``token_ids`` under the generator's own distribution (softmax of its logits at temperature 1,
    before truncation and control): a quality proxy that is comparable across controls.
    ``eos_prob`` is the generator's own probability (same distribution) of the EOS that ended the
    output, None when it did not end with EOS: a policy that ends answers where the generator
    would not shows up as a low value. ``retries``: how many times the end was resampled
    (:attr:`Control.retries`); ``decoded_tokens``: every token decoded for this result, the
    discarded ends and the other ``best_of`` attempts included (its cost).
    """

    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    num_tokens: int
    finish_reason: Literal["stop", "length", "cap"]
    values: list[float] | None
    mean_logprob: float
    eos_prob: float | None = None
    retries: int = 0
    decoded_tokens: int = 0

    @property
    def natural(self) -> bool:
        """Ended with an EOS the generator itself gave at least :data:`NATURAL_EOS`."""
        return self.finish_reason == "stop" and (self.eos_prob or 0.0) >= NATURAL_EOS


@dataclass
class _Sequence:
    """The engine's state for one request."""

    index: int
    attempt: int  # of a best_of request
    request: Request
    control: Control
    prompt_ids: list[int]
    rng: torch.Generator  # this attempt's random stream
    uniforms: torch.Tensor  # [max_new_tokens]: one draw per step, from rng
    tokens: list[int] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    eos_logprob: float | None = None  # the generator's log-probability of the final EOS
    missed: list[Result] = field(default_factory=list)  # earlier ends that were not natural
    decoded: int = 0

    @property
    def context(self) -> list[int]:
        """Every token fed to the models so far: what a (re)admitted row prefills."""
        return self.prompt_ids + self.tokens

    def append(self, token: int, forced: bool, logprob: float, value: float, eos: set[int]) -> bool:
        """Record one generated token; True when the request is finished."""
        self.tokens.append(token)
        self.values.append(value)
        self.logprobs.append(logprob)
        self.decoded += 1
        if token in eos:
            self.finish_reason = "cap" if forced else "stop"
            self.eos_logprob = logprob
        elif len(self.tokens) == self.request.max_new_tokens:
            self.finish_reason = "length"
        return self.finish_reason is not None

    def result(self, tokenizer) -> Result:
        ended = self.finish_reason in ("stop", "cap")
        return Result(
            prompt_token_ids=self.prompt_ids,
            token_ids=list(self.tokens),
            text=tokenizer.decode(self.tokens, skip_special_tokens=True),
            num_tokens=len(self.tokens) - ended,
            finish_reason=self.finish_reason,
            values=list(self.values) if self.request.return_values else None,
            mean_logprob=sum(self.logprobs) / len(self.tokens),
            eos_prob=None if self.eos_logprob is None else math.exp(self.eos_logprob),
            retries=len(self.missed),
            decoded_tokens=self.decoded,
        )

    def may_retry(self, result: Result) -> bool:
        """Whether this end is not natural and a retry is left (see :attr:`Control.retries`)."""
        return not (result.natural or self.request.ignore_eos or len(self.missed) >= self.control.max_retries)

    def retry(self, result: Result, sentence_ends: frozenset[int]) -> None:
        """Go back to resample the end of ``result``. Retry ``a`` of ``R`` goes back ``a / R`` of
        the target, then on to the start of that sentence (just after a token in
        ``sentence_ends``): where an answer decides what to say next, and so whether to conclude."""
        self.missed.append(result)
        back = math.ceil(len(self.missed) / self.control.max_retries * self.control.target)
        cut = max(0, min(result.num_tokens, self.control.target) - back)
        cut = next((i + 1 for i in range(cut - 1, -1, -1) if self.tokens[i] in sentence_ends), cut)
        del self.tokens[cut:], self.values[cut:], self.logprobs[cut:]
        self.finish_reason = self.eos_logprob = None
        self.uniforms = _uniforms(self.rng, self.request.max_new_tokens, self.uniforms.device)

    def final(self, result: Result) -> Result:
        """The result to return: this end if natural, else the best of every end tried (with the
        cost of them all)."""
        if not self.missed:
            return result
        chosen = best_of([*self.missed, result], self.control.target)
        return replace(chosen, retries=len(self.missed), decoded_tokens=self.decoded)


@dataclass
class _Rows:
    """Per-row tensors of a batch, rebuilt from the sequences whenever rows join or leave."""

    temperature: torch.Tensor  # [B] float; 1 for greedy rows (their candidates use p at T = 1)
    top_k: torch.Tensor  # [B] long, 0 = off
    top_p: torch.Tensor  # [B] float
    min_p: torch.Tensor  # [B] float
    greedy: torch.Tensor  # [B] bool
    ignore_eos: torch.Tensor  # [B] bool
    step: torch.Tensor  # [B] long: tokens generated so far
    uniforms: torch.Tensor  # [B, W] float64
    target: torch.Tensor  # [B] long (0 when no target)
    beta: torch.Tensor  # [B] float64
    cap: torch.Tensor  # [B] long: EOS is forced once step reaches it
    wants_eos: torch.Tensor  # [B] bool: EOS always joins the candidates (Control.wants_eos)
    equal_ours: torch.Tensor  # [B] bool: equal_to under our rule (it wraps up at its target)
    plain: torch.Tensor  # [B] bool: no control
    groups: list[tuple[str, str, torch.Tensor]]  # (control kind, rule, rows)
    any_guided: bool
    any_plain: bool
    any_greedy: bool
    any_top_k: bool
    any_top_p: bool
    any_min_p: bool
    any_ignore_eos: bool
    any_cap: bool
    any_wants_eos: bool
    any_equal_ours: bool

    @classmethod
    def build(cls, seqs: list[_Sequence], device) -> _Rows:
        def col(values, dtype):
            return torch.tensor(values, dtype=dtype, device=device)

        reqs = [s.request for s in seqs]
        controls = [s.control for s in seqs]
        width = max(len(s.uniforms) for s in seqs)
        uniforms = torch.stack(
            [torch.nn.functional.pad(s.uniforms, (0, width - len(s.uniforms)), value=0.5) for s in seqs]
        )
        keys: dict[tuple[str, str], list[int]] = {}
        for row, c in enumerate(controls):
            keys.setdefault((c.kind, c.rule), []).append(row)
        wants_eos = [c.wants_eos and not r.ignore_eos for c, r in zip(controls, reqs, strict=True)]
        equal_ours = [c.kind == "equal_to" and c.rule == "ours" for c in controls]
        caps = [
            NO_CAP if c.cap is None or r.ignore_eos else c.cap for c, r in zip(controls, reqs, strict=True)
        ]
        return cls(
            temperature=col([r.temperature or 1.0 for r in reqs], torch.float32),
            top_k=col([r.top_k for r in reqs], torch.long),
            top_p=col([r.top_p for r in reqs], torch.float32),
            min_p=col([r.min_p for r in reqs], torch.float32),
            greedy=col([r.temperature == 0 for r in reqs], torch.bool),
            ignore_eos=col([r.ignore_eos for r in reqs], torch.bool),
            step=col([len(s.tokens) for s in seqs], torch.long),
            uniforms=uniforms,
            target=col([c.target or 0 for c in controls], torch.long),
            beta=col([c.beta or 0.0 for c in controls], torch.float64),
            cap=col(caps, torch.long),
            wants_eos=col(wants_eos, torch.bool),
            equal_ours=col(equal_ours, torch.bool),
            plain=col([not c.active for c in controls], torch.bool),
            groups=[(kind, rule, col(rows, torch.long)) for (kind, rule), rows in keys.items()],
            any_guided=any(c.active for c in controls),
            any_plain=not all(c.active for c in controls),
            any_greedy=any(r.temperature == 0 for r in reqs),
            any_top_k=any(r.top_k > 0 for r in reqs),
            any_top_p=any(r.top_p < 1 for r in reqs),
            any_min_p=any(r.min_p > 0 for r in reqs),
            any_ignore_eos=any(r.ignore_eos for r in reqs),
            any_cap=any(cap < NO_CAP for cap in caps),
            any_wants_eos=any(wants_eos),
            any_equal_ours=any(equal_ours),
        )


@dataclass
class _Batch:
    seqs: list[_Sequence]
    gen: Stream  # the generator
    lvm: Stream | None  # a standalone LenVM's own stream
    hidden: Hidden  # [B, H] the generator's hidden states at the last fed token
    rows: _Rows


class Engine:
    """Batched generation with a generator, optionally guided by a LenVM (see the module doc)."""

    def __init__(
        self,
        model,
        tokenizer,
        lenvm: LengthValueModel | None = None,
        num_candidates: int = 8,
        candidate_scoring: Literal["block", "naive"] = "block",
    ):
        if not is_int(num_candidates) or num_candidates < 1:
            raise InputError(f"num_candidates must be a positive integer, got {num_candidates!r}")
        if candidate_scoring not in ("block", "naive"):
            raise InputError(f"candidate_scoring must be 'block' or 'naive', got {candidate_scoring!r}")
        if candidate_scoring == "naive" and (lenvm is None or lenvm.config.kind == "q"):
            raise InputError("naive candidate scoring needs a LenVM of kind attached or standalone")
        _check_supported(model, "the generator")
        if lenvm is not None:
            check_tokenizer(lenvm.config, tokenizer, what="the generator's tokenizer")
            if lenvm.attached and lenvm.backbone is not model:
                raise InputError(
                    f"a LenVM of kind {lenvm.config.kind!r} reads the generator's own hidden states: "
                    "load it with generator=(model, tokenizer) of this engine's model"
                )
            if not lenvm.attached:
                _check_supported(lenvm.backbone, "the LenVM")
        from lenvm.models import eos_token_ids

        self.model = model.eval()
        self.tokenizer = tokenizer
        self.lenvm = lenvm.eval() if lenvm is not None else None
        self.kind = lenvm.config.kind if lenvm is not None else None
        self.num_candidates = num_candidates
        self.naive = candidate_scoring == "naive"
        self.body = model.base_model
        self.lm_head = model.get_output_embeddings()
        self.device = self.lm_head.weight.device
        self.eos_ids = eos_token_ids(model, tokenizer)
        self._eos = torch.tensor(self.eos_ids, device=self.device)
        self._eos_set = set(self.eos_ids)
        # The generator's stream also yields the head's features when the head reads the generator.
        self._gen_features = lenvm.feature_layer if lenvm is not None and lenvm.attached else -1
        self.context = _context(model)
        if lenvm is not None and not lenvm.attached:
            self.context = min(self.context, _context(lenvm.backbone))

    # -- public ---------------------------------------------------------------------------

    def generate(self, requests: list[Request], batch_size: int = 8, progress: bool = False) -> list[Result]:
        """Generate for every request; results come back in request order."""
        results: list[Result | None] = [None] * len(requests)
        bar = _progress(len(requests), progress)
        for index, result in self.stream(requests, batch_size):
            results[index] = result
            bar.update(1)
        bar.close()
        return results

    def stream(self, requests: list[Request], batch_size: int = 8) -> Iterator[tuple[int, Result]]:
        """Generate for every request, yielding ``(request index, result)`` as each one finishes,
        so that a caller can save finished work while the rest is still decoding."""
        if not is_int(batch_size) or batch_size < 1:
            raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
        seqs = []
        for i, request in enumerate(requests):
            first = self._prepare(i, request)
            seqs += [first] + [self._prepare(i, request, a) for a in range(1, first.control.best_of)]
        # The LenVM runs only when some request needs it; its cache must then cover every row.
        scored = self.lenvm is not None and any(s.control.active or s.request.return_values for s in seqs)
        tried: dict[int, dict[int, Result]] = {}  # best_of requests: finished attempts by number
        waiting = deque(seqs)
        batch: _Batch | None = None
        while waiting or batch is not None:
            # Inference mode per step, not around the loop: the caller's code between yields
            # must not run inside it.
            with torch.inference_mode():
                free = batch_size - (0 if batch is None else len(batch.seqs))
                if waiting and free > 0:
                    joining = [waiting.popleft() for _ in range(min(free, len(waiting)))]
                    batch = self._admit(batch, joining, scored)
                finished = self._step(batch, scored)
                done = [batch.seqs[row] for row in finished]
                if finished:
                    batch = self._retire(batch, finished)
            for seq in done:
                result = seq.result(self.tokenizer)
                if seq.may_retry(result):
                    seq.retry(result, self.sentence_ends)
                    waiting.appendleft(seq)  # first in line: its request is nearly done
                    continue
                result, attempts = seq.final(result), seq.control.best_of
                if attempts == 1:
                    yield seq.index, result
                    continue
                tried.setdefault(seq.index, {})[seq.attempt] = result
                if len(tried[seq.index]) == attempts:
                    results = [r for _, r in sorted(tried.pop(seq.index).items())]  # ties: first attempt
                    chosen = best_of(results, seq.control.target)
                    yield seq.index, replace(chosen, decoded_tokens=sum(r.decoded_tokens for r in results))

    @functools.cached_property
    def sentence_ends(self) -> frozenset[int]:
        """Ids of the tokens that end a sentence or a line (where a retry restarts)."""
        texts = self.tokenizer.batch_decode([[i] for i in range(len(self.tokenizer))])
        return frozenset(
            i for i, text in enumerate(texts) if "\n" in text or text.rstrip().endswith((".", "!", "?"))
        )

    # -- requests -------------------------------------------------------------------------

    def _prepare(self, index: int, request: Request, attempt: int = 0) -> _Sequence:
        if not isinstance(request, Request):
            raise InputError(f"request {index}: expected a Request, got {type(request).__name__}")
        where = f"request {index}"
        prompt_ids = encode_prompt(self.tokenizer, as_prompt(request.prompt, default_id=str(index)))
        if not prompt_ids:
            raise InputError(f"{where}: the prompt encodes to no tokens")
        if len(prompt_ids) + request.max_new_tokens > self.context:
            raise InputError(
                f"{where}: prompt ({len(prompt_ids)} tokens) plus max_new_tokens ({request.max_new_tokens}) "
                f"exceeds the model's context of {self.context} tokens"
            )
        control = request.control or Control()
        if (control.active or request.return_values) and self.lenvm is None:
            raise InputError(f"{where}: a length control or return_values needs an engine with a LenVM")
        if control.target is not None and control.target > self.context:
            raise InputError(
                f"{where}: target {control.target} exceeds the model's context of {self.context}"
            )
        if control.target is not None and self.lenvm.gamma**control.target < MIN_DISCOUNT:
            raise InputError(
                f"{where}: target {control.target} lies beyond the LenVM's horizon (gamma "
                f"{self.lenvm.gamma:g}: values that far from the end all round to -1); use a LenVM "
                "trained with a larger gamma (the p99 rule over longer rollouts)"
            )
        seed = request.seed if request.seed is not None else int(torch.randint(2**62, ()))
        rng = torch.Generator().manual_seed((seed + attempt * ATTEMPT_SEED_STEP) % 2**63)
        uniforms = _uniforms(rng, request.max_new_tokens, self.device)
        return _Sequence(index, attempt, request, control, prompt_ids, rng, uniforms)

    def _admit(self, batch: _Batch | None, joining: list[_Sequence], scored: bool) -> _Batch:
        """Prefill the joining rows (prompts, and the kept tokens of a retry), then merge them into
        the running batch."""
        prompts = [seq.context for seq in joining]
        gen, hidden = Stream.prefill(self.body, prompts, self._gen_features)
        gens, hiddens, lvms = [gen], [hidden], []
        if scored and self.kind == "standalone":
            lvms.append(Stream.prefill(self.lenvm.body, prompts, self.lenvm.feature_layer)[0])
        if batch is not None:
            gens.insert(0, batch.gen)
            hiddens.insert(0, batch.hidden)
            if batch.lvm is not None:
                lvms.insert(0, batch.lvm)
        seqs = (batch.seqs if batch is not None else []) + joining
        return _Batch(
            seqs=seqs,
            gen=Stream.cat(gens),
            lvm=Stream.cat(lvms) if lvms else None,
            hidden=Hidden.cat(hiddens),
            rows=_Rows.build(seqs, self.device),
        )

    def _retire(self, batch: _Batch, finished: list[int]) -> _Batch | None:
        done = set(finished)
        keep = [i for i in range(len(batch.seqs)) if i not in done]
        if not keep:
            return None
        rows = torch.tensor(keep, device=self.device)
        batch.gen.select(rows)
        if batch.lvm is not None:
            batch.lvm.select(rows)
        seqs = [batch.seqs[i] for i in keep]
        return _Batch(seqs, batch.gen, batch.lvm, batch.hidden[rows], _Rows.build(seqs, self.device))

    # -- one step -------------------------------------------------------------------------

    def _step(self, batch: _Batch, scored: bool) -> list[int]:
        """Generate one token for every row; returns the rows that finished."""
        r = batch.rows
        logits = self.lm_head(batch.hidden.last).float()
        uniform = r.uniforms.gather(1, r.step[:, None])[:, 0]
        allowed = logits
        if r.any_ignore_eos:
            allowed = logits.clone()
            allowed[:, self._eos] = logits[:, self._eos].masked_fill(r.ignore_eos[:, None], -float("inf"))
        probs = policies.truncate(
            allowed,
            r.temperature,
            r.top_k if r.any_top_k else None,
            r.top_p if r.any_top_p else None,
            r.min_p if r.any_min_p else None,
        )
        sampled = policies.choose(probs, uniform, r.greedy if r.any_greedy else None) if r.any_plain else None
        if r.any_guided:
            ids, cand_probs = self._candidates(logits, probs, sampled, r)
        else:
            ids, cand_probs = sampled[:, None], probs.gather(1, sampled[:, None])
        eos = torch.isin(ids, self._eos)

        hidden, values = self._score(batch, ids, eos) if scored else (None, None)
        if r.any_guided:
            cands = policies.Candidates(ids, cand_probs, values, eos, self._next_eos(hidden, r))
            choice = policies.choose(self._policy(cands, r), uniform, r.greedy)
        else:
            choice = torch.zeros_like(ids[:, 0])
        token = ids.gather(1, choice[:, None])[:, 0]
        forced = torch.zeros_like(token, dtype=torch.bool)
        if r.any_cap:
            forced = (r.step >= r.cap) & ~torch.isin(token, self._eos)
            token = torch.where(forced, self._primary_eos(logits), token)
        value = (
            values.gather(1, choice[:, None])[:, 0].masked_fill(forced, 0.0) if values is not None else None
        )

        # Advance: the caches keep the chosen token only.
        if hidden is not None:
            batch.gen.keep(choice)
            batch.hidden = hidden[torch.arange(len(choice), device=self.device), choice]
        else:
            batch.hidden = batch.gen.forward(token[:, None])[:, 0]
            batch.gen.keep()
        if batch.lvm is not None:
            if self.naive:
                batch.lvm.forward(token[:, None])
            batch.lvm.keep(choice)
        r.step += 1

        # For mean_logprob: the generator's own distribution (temperature 1, untruncated).
        logprob = logits.gather(1, token[:, None])[:, 0] - logits.logsumexp(-1)
        # One host transfer per step.
        columns = [token, forced, logprob] + ([value] if value is not None else [])
        host = torch.stack([c.double() for c in columns]).tolist()
        finished = []
        for row, seq in enumerate(batch.seqs):
            v = host[3][row] if value is not None else 0.0
            if seq.append(int(host[0][row]), bool(host[1][row]), host[2][row], v, self._eos_set):
                finished.append(row)
        return finished

    def _score(self, batch: _Batch, ids: torch.Tensor, eos: torch.Tensor):
        """LenVM values ``V(s_t + x)`` of the candidates ``ids`` (``[B, k]``; 0 for EOS), and for the
        attached kind the generator's hidden states of the candidates (its forward is the scoring;
        None for naive scoring, whose caches keep no candidate and take the chosen token anew)."""
        hidden = None
        if self.naive:
            stream = batch.gen if self.kind == "attached" else batch.lvm
            values = self.lenvm.values_from_hidden(_one_by_one(stream, ids))
        elif self.kind == "attached":
            hidden = batch.gen.forward(ids)
            values = self.lenvm.values_from_hidden(hidden.features)
        elif self.kind == "standalone":
            values = self.lenvm.values_from_hidden(batch.lvm.forward(ids).features)
        else:
            values = self.lenvm.next_values_from_hidden(batch.hidden.features, ids)
        return hidden, values.float().masked_fill(eos, 0.0)

    def _candidates(self, logits, probs, sampled, r: _Rows) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, k]`` candidate ids and probabilities: the top k for guided rows, the sampled
        token alone (other slots unusable) for plain rows."""
        ids, cand_probs = policies.top_candidates(
            logits,
            probs,
            self.num_candidates,
            self._eos,
            r.wants_eos if r.any_wants_eos else None,
            r.temperature,
        )
        if sampled is not None:
            plain = r.plain[:, None]
            only = torch.zeros_like(cand_probs)
            only[:, 0] = probs.gather(1, sampled[:, None])[:, 0]
            ids = torch.where(plain, sampled[:, None], ids)
            cand_probs = torch.where(plain, only, cand_probs)
        return ids, cand_probs

    def _next_eos(self, hidden: Hidden | None, r: _Rows) -> torch.Tensor | None:
        """The generator's EOS probability after each candidate, for Equal To rows (our rule) that
        reached their target: the attached kind has the candidates' hidden states anyway, and
        one LM-head product turns them into this lookahead (None otherwise)."""
        if hidden is None or not r.any_equal_ours:
            return None
        if not bool((r.equal_ours & (r.step >= r.target)).any()):
            return None
        return torch.softmax(self.lm_head(hidden.last).float(), dim=-1)[..., self._eos].sum(-1)

    def _policy(self, c: policies.Candidates, r: _Rows) -> torch.Tensor:
        """Each row's control policy, applied to the rows of each (kind, rule) group."""
        dist = torch.zeros(c.ids.shape, dtype=torch.float64, device=self.device)
        for kind, rule, rows in r.groups:
            if len(rows) == len(r.plain):  # one group: no gather and scatter
                return policies.apply(kind, rule, c, r.step, r.target, r.beta, self.lenvm.gamma)
            sub = c.rows(rows)
            dist[rows] = policies.apply(
                kind, rule, sub, r.step[rows], r.target[rows], r.beta[rows], self.lenvm.gamma
            )
        return dist

    def _primary_eos(self, logits: torch.Tensor) -> torch.Tensor:
        """Per row, the EOS id the generator finds most likely."""
        if len(self.eos_ids) == 1:
            return self._eos.expand(logits.shape[0])
        return self._eos[logits[:, self._eos].argmax(-1)]


def best_of(results: list[Result], target: int) -> Result:
    """The result that ended naturally (see :data:`NATURAL_EOS`) closest to ``target``; failing
    that, the closest; ties go to the first."""

    return min(results, key=lambda r: (not r.natural, abs(r.num_tokens - target)))


def _uniforms(rng: torch.Generator, n: int, device) -> torch.Tensor:
    return torch.rand(n, generator=rng, dtype=torch.float64).to(device)


def _one_by_one(stream: Stream, ids: torch.Tensor) -> torch.Tensor:
    """LenVM features of the candidates ``ids`` (``[B, k]``), each from its own single-token forward
    that the cache then drops: ``[B, k, H]``."""
    hidden = []
    for j in range(ids.shape[1]):
        hidden.append(stream.forward(ids[:, j : j + 1]).features[:, 0])
        stream.discard()
    return torch.stack(hidden, dim=1)


def _context(model) -> int:
    config = model.config.get_text_config()
    return int(getattr(config, "max_position_embeddings", None) or 2**31)


def _check_supported(model, what: str) -> None:
    """The engine's padding and candidate masks assume full attention in every layer."""
    config = model.config.get_text_config()
    kinds = set(getattr(config, "layer_types", None) or ["full_attention"])
    if kinds != {"full_attention"}:
        raise InputError(
            f"{what} uses attention kinds {sorted(kinds)}; the decoding engine supports full attention only"
        )


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, unit="req", desc="generate")
