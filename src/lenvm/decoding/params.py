"""What a caller asks of decoding and what it gets back: sampling settings, length controls,
requests and results. One set of types for the engine, rollouts, benchmarks and processors.

    SamplingParams(temperature=0.7, max_new_tokens=256, seed=0)
    Control("equal_to", target=64)
    Request("Describe the sea.", SamplingParams(seed=1), control=Control("at_most", target=40))
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Literal, cast

from lenvm.io import InputError, is_int, is_real, plain_numbers
from lenvm.prompts import PromptInput
from lenvm.quoting import quoted

ControlKind = Literal["none", "equal_to", "at_most", "at_least", "tilt"]
CONTROL_KINDS = ("none", "equal_to", "at_most", "at_least", "tilt")
TARGET_KINDS = ("equal_to", "at_most", "at_least")
FinishReason = Literal["stop", "length", "cap"]
RULES = ("ours", "paper")
# An ending counts as natural when the generator itself gave its EOS at least this probability.
NATURAL_EOS = 0.05
# A target control under our rule by default resamples the end of an answer that did not end
# naturally this many times (see Control).
DEFAULT_RETRIES = 4
# The most best_of attempts, and retries, one request may ask for: each costs a whole answer's
# decoding (a server's clients share its rows).
MAX_ATTEMPTS = 16
# The largest hard_cap_slack: beyond any context, so the cap would never act, and target + slack
# still fits the engines' 64-bit integers.
MAX_HARD_CAP_SLACK = 2**31 - 1
# Most alternatives a request may ask to see at each step (OpenAI's limit).
MAX_TOP_LOGPROBS = 20

# The settings of a decoding policy that a LenVM's values depend on besides the length limit: a
# LenVM predicts the lengths of answers sampled so, and steers well only under them.
POLICY_SETTINGS = ("temperature", "top_p", "top_k", "min_p")
# Settings of a recorded policy by which other tools turn a filter off where ours take the default
# (vLLM's top_k -1; top_p 1 and min_p 0 are off everywhere).
OFF_ELSEWHERE = {"top_k": -1}
# A temperature below this is greedy (as vLLM takes it): far below it, logits / temperature
# would overflow float32 into nan.
MIN_TEMPERATURE = 1e-5
# The largest temperature: far beyond any useful one (from about 100 on, sampling is nearly uniform
# over the kept tokens; vLLM takes at most 2), and small enough that float32 stays finite where
# decoding divides logits by it (an infinite one makes a masked token's -inf logit nan).
MAX_TEMPERATURE = 1e6
# max_new_tokens below this: far beyond any context, and within the integer tensors decoding keeps it in
MAX_NEW_TOKENS_BOUND = 2**31
# The most tokens an answer takes when max_new_tokens is left out (then also within what the
# context leaves after the prompt).
DEFAULT_MAX_NEW_TOKENS = 1024
# gamma**N below this: values N tokens from the end sit within float32 rounding of -1
MIN_DISCOUNT = 1e-6


@dataclass(frozen=True)
class SamplingParams:
    """The decoding policy of a request, validated here once for every caller.

    ``temperature == 0`` (or below ``MIN_TEMPERATURE``, as in vLLM) is greedy, and it is at most
    :data:`MAX_TEMPERATURE`; ``top_k == 0`` and ``min_p == 0`` are off; ``top_p == 1`` is off.
    Filters apply in the order temperature, top-k, top-p, min-p (as in ``transformers``); each
    keeps at least the likeliest token.
    ``seed`` fixes the request's own random stream (None: a fresh one; :func:`lenvm.rollout`
    takes 0); a rollout derives each completion's seed from it. ``ignore_eos`` never ends before
    ``max_new_tokens`` (for speed measurements). ``top_logprobs``: how many of the most likely
    tokens to report at each step (:attr:`Result.top_logprobs`), at most
    :data:`MAX_TOP_LOGPROBS`. ``max_new_tokens`` left out (None): :data:`DEFAULT_MAX_NEW_TOKENS`,
    or what the model's context leaves after the prompt where that is less (:meth:`fitted`).
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    max_new_tokens: int | None = None
    seed: int | None = None
    ignore_eos: bool = False
    top_logprobs: int = 0

    def __post_init__(self) -> None:
        plain_numbers(self)
        checks = [
            (
                is_real(self.temperature) and 0 <= self.temperature <= MAX_TEMPERATURE,
                f"temperature must be a number in [0, {MAX_TEMPERATURE:g}]",
            ),
            (is_real(self.top_p) and 0.0 < self.top_p <= 1.0, "top_p must be a number in (0, 1]"),
            (is_int(self.top_k) and self.top_k >= 0, "top_k must be an integer >= 0 (0 = off)"),
            (is_real(self.min_p) and 0.0 <= self.min_p <= 1.0, "min_p must be a number in [0, 1]"),  # as vLLM
            (
                self.max_new_tokens is None
                or (is_int(self.max_new_tokens) and 1 <= self.max_new_tokens < MAX_NEW_TOKENS_BOUND),
                f"max_new_tokens must be an integer from 1 to {MAX_NEW_TOKENS_BOUND - 1} "
                "(or None: fitted to the context)",
            ),
            (
                self.seed is None or (is_int(self.seed) and -(2**63) <= self.seed < 2**63),
                "seed must be a 64-bit signed integer (-2**63 to 2**63 - 1, as vLLM's) or None",
            ),
            (isinstance(self.ignore_eos, bool), "ignore_eos must be true or false"),
            (
                is_int(self.top_logprobs) and 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS,
                f"top_logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}]",
            ),
        ]
        problems = [message for ok, message in checks if not ok]
        if problems:
            got = ", ".join(f"{f.name}={quoted(getattr(self, f.name))}" for f in fields(self))
            raise InputError(f"bad sampling parameters: {'; '.join(problems)} (got {got})")

    def fitted(self, room: int) -> SamplingParams:
        """With ``max_new_tokens`` set: as given, or (left out) the smaller of
        :data:`DEFAULT_MAX_NEW_TOKENS` and ``room``, what the context leaves after the prompt (at
        least 1: the context check that follows names a prompt that leaves none)."""
        if self.max_new_tokens is not None:
            return self
        return replace(self, max_new_tokens=max(1, min(DEFAULT_MAX_NEW_TOKENS, room)))

    @property
    def limit_name(self) -> str:
        """How messages name the length limit: ``max_new_tokens``, or what it is when left out."""
        if self.max_new_tokens is not None:
            return "max_new_tokens"
        left = f"what the context leaves after the prompt, at most {DEFAULT_MAX_NEW_TOKENS}"
        return f"max_new_tokens (left out: {left})"

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE

    @classmethod
    def from_policy(cls, policy: dict[str, Any] | None, **settings: Any) -> SamplingParams:
        """Sampling under a LenVM's training ``policy`` (its :data:`POLICY_SETTINGS`, e.g.
        ``lenvm.config.sampling``), with ``settings`` (``max_new_tokens``, ``seed``, or any of
        those) given here taking precedence. The policy may come from rollouts of other tools: a
        filter they turn off by another value (:data:`OFF_ELSEWHERE`) is off, a setting they
        leave null takes its default."""
        trained = {
            k: v
            for k, v in (policy or {}).items()
            if k in POLICY_SETTINGS and v is not None and not (k in OFF_ELSEWHERE and v == OFF_ELSEWHERE[k])
        }
        return cls(**{**trained, **settings})

    def policy(self) -> dict[str, Any]:
        """The settings that define the decoding policy (what a LenVM trained on its samples
        models), as stored with rollouts and LenVMs."""
        policy = asdict(self)
        del policy["ignore_eos"], policy["top_logprobs"]
        return policy


@dataclass(frozen=True)
class Control:
    """A length control for one request.

    ``equal_to``/``at_most``/``at_least`` take a ``target`` in output tokens (EOS not counted) and a
    ``rule``: ``"ours"`` (the generator conditioned on the constraint, the default) or ``"paper"``
    (the paper's one-hot rules over the usual candidates). ``tilt`` takes ``beta``:
    ``p'(x) ∝ p(x)·exp(beta·v(x))``, a positive beta favours shorter continuations.
    ``hard_cap_slack``: force EOS once ``target + slack`` tokens are out (the result then says
    ``"cap"``); off by default, except that at_most with our rule treats its target as a hard
    bound (slack 0, and no other).
    ``best_of`` (equal_to only): sample that many answers (each with its own random stream) and
    return the one that ends naturally (the generator gave its final EOS at least
    ``NATURAL_EOS``) closest to the target, or the closest if none does; costs ``best_of`` times
    the decoding; under greedy decoding every attempt would be the same, so one is made.
    ``retries`` (target controls): when an answer does not end naturally (our rules choose an
    EOS only where the generator itself would end, so such an answer reached the bound of
    at_most, or ran well past the target of equal_to or at_least), go back and resample its
    end, at most this many times; retry ``a`` of ``R`` restarts at the start of the sentence
    ``a / R`` of the target before the target (further back each time, where the text can still
    turn toward a conclusion; the last retry from the beginning), and the result is the first
    natural ending, or the best attempt if none is (see :func:`lenvm.decoding.sequence.best_of`);
    an equal_to answer of our rule that ends naturally but far from its target is resampled up to
    twice too, keeping the nearest natural end (:meth:`lenvm.decoding.sequence.Sequence.may_retry`).
    Only answers that miss pay for it; under greedy decoding, only the retries that change the
    policy (At Most's first, every one of At Least's). None means ``DEFAULT_RETRIES`` for our
    rules, 0 for the paper's. ``natural_eos``: the generator's EOS probability from which an
    ending counts as natural, for our rules' choice of EOS, retries and ``best_of``.
    """

    kind: ControlKind = "none"
    target: int | None = None
    beta: float | None = None
    rule: Literal["ours", "paper"] = "ours"
    hard_cap_slack: int | None = None
    best_of: int = 1
    retries: int | None = None
    natural_eos: float = NATURAL_EOS

    def __post_init__(self) -> None:
        plain_numbers(self)
        if self.kind not in CONTROL_KINDS:
            raise InputError(f"unknown control {quoted(self.kind)}; expected one of {CONTROL_KINDS}")
        if self.rule not in RULES:
            raise InputError(f"unknown control rule {quoted(self.rule)}; expected one of {RULES}")
        if self.kind in TARGET_KINDS:
            if not is_int(self.target) or self.target < 1:
                raise InputError(
                    f"control {self.kind} needs a target of at least 1 token, got {quoted(self.target)}"
                )
        elif self.target is not None:
            raise InputError(f"control {self.kind!r} takes no target")
        if self.kind == "tilt":
            if not is_real(self.beta):
                raise InputError(f"control tilt needs a finite beta, got {quoted(self.beta)}")
        elif self.beta is not None:
            raise InputError(f"control {self.kind!r} takes no beta")
        if not is_int(self.best_of) or not 1 <= self.best_of <= MAX_ATTEMPTS:
            raise InputError(
                f"best_of must be an integer from 1 to {MAX_ATTEMPTS}, got {quoted(self.best_of)}"
            )
        if self.best_of > 1 and self.kind != "equal_to":
            raise InputError("best_of applies to equal_to controls only")
        if self.retries is not None:
            if not is_int(self.retries) or not 0 <= self.retries <= MAX_ATTEMPTS:
                raise InputError(
                    f"retries must be an integer from 0 to {MAX_ATTEMPTS}, got {quoted(self.retries)}"
                )
            if self.retries > 0 and self.kind not in TARGET_KINDS:
                raise InputError(f"retries applies to target controls only ({', '.join(TARGET_KINDS)})")
        if self.hard_cap_slack is not None:
            if self.kind not in ("equal_to", "at_most"):
                raise InputError("hard_cap_slack applies to equal_to and at_most controls only")
            if self.kind == "at_most" and self.rule == "ours":
                raise InputError(
                    "at_most with our rule never passes its target (its policy ends the answer by N): "
                    "hard_cap_slack applies to at_most under rule 'paper'"
                )
            if not is_int(self.hard_cap_slack) or not 0 <= self.hard_cap_slack <= MAX_HARD_CAP_SLACK:
                raise InputError(
                    f"hard_cap_slack must be a non-negative integer of at most {MAX_HARD_CAP_SLACK}, "
                    f"got {quoted(self.hard_cap_slack)}"
                )
        if not is_real(self.natural_eos) or not 0 <= self.natural_eos <= 1:
            raise InputError(f"natural_eos must lie in [0, 1], got {quoted(self.natural_eos)}")

    @property
    def active(self) -> bool:
        return self.kind != "none"

    @property
    def max_retries(self) -> int:
        """How many times an answer that did not end naturally has its end resampled."""
        if self.retries is not None:
            return self.retries
        return DEFAULT_RETRIES if self.kind in TARGET_KINDS and self.rule == "ours" else 0

    @property
    def wants_eos(self) -> bool:
        """Whether EOS always joins the candidates, so the row can end where its target wants
        (our rules; the paper's rules keep the usual candidates)."""
        return self.kind in TARGET_KINDS and self.rule == "ours"

    @property
    def must_reach(self) -> bool:
        """Whether an answer may not end before the target (Equal To, At Least): it needs the
        target's tokens and the EOS that ends them."""
        return self.kind in ("equal_to", "at_least")

    def beyond_horizon(self, gamma: float) -> str | None:
        """Why a LenVM of discount ``gamma`` cannot steer to this control's target, or None: values
        that far from the end all round to -1 (``gamma**target`` below :data:`MIN_DISCOUNT`; under
        the p99 rule, beyond about three times the 99th-percentile training length)."""
        if self.target is None or gamma**self.target >= MIN_DISCOUNT:
            return None
        return (
            f"target {self.target} lies beyond the LenVM's horizon (gamma {gamma:g}: values that far from "
            "the end all round to -1); use a LenVM trained with a larger gamma (the p99 rule over longer "
            "rollouts)"
        )

    def unreachable(self, max_new_tokens: int, limit: str = "max_new_tokens") -> str | None:
        """Why this control can never be met within ``max_new_tokens`` (named ``limit`` in the
        message), or None: Equal To and At Least need their target's tokens and the EOS that ends
        them, which ``max_new_tokens`` counts too."""
        if not self.must_reach or self.target is None or self.target < max_new_tokens:
            return None
        return (
            f"{self.kind} {self.target} can never be met within {limit} ({max_new_tokens}): "
            f"{self.target} tokens and the EOS that ends them take {self.target + 1}"
        )

    @property
    def cap(self) -> int | None:
        """Output tokens after which EOS is forced, if any."""
        if self.target is None:  # no target, nothing to cap at
            return None
        if self.hard_cap_slack is not None:
            return self.target + self.hard_cap_slack
        if self.kind == "at_most" and self.rule == "ours":
            return self.target
        return None


class RequestError(InputError):
    """A request an engine cannot take: ``key`` names it as the engine was given it, ``reason``
    says why (the message is ``request KEY: REASON``), so that a caller can name it its own way."""

    def __init__(self, key: Any, reason: str):
        super().__init__(f"request {key}: {reason}")
        self.key, self.reason = key, reason


@dataclass(frozen=True)
class Request:
    """One generation: a prompt, its sampling settings and an optional length control.
    The prompt is text or chat messages (the chat template is applied) or token ids (taken as
    they are). ``return_values`` asks for the LenVM value after every generated token."""

    prompt: PromptInput
    sampling: SamplingParams = SamplingParams()
    control: Control | None = None
    return_values: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.sampling, SamplingParams):
            raise InputError(
                f"bad request: sampling must be a SamplingParams, got {type(self.sampling).__name__}"
            )
        if self.control is not None and not isinstance(self.control, Control):
            raise InputError(f"bad request: control must be a Control, got {type(self.control).__name__}")

    @property
    def attempts(self) -> int:
        """Whole answers decoded for this request: the control's ``best_of``, but one under greedy
        decoding, where they would all be the same."""
        return 1 if self.control is None or self.sampling.greedy else self.control.best_of

    def fitted(
        self, key: Any, prompt_tokens: int, context: int, of_prompt: str = "", of_context: str = ""
    ) -> tuple[Request, str]:
        """This request with its ``max_new_tokens`` fitted to what ``context`` leaves after its
        prompt of ``prompt_tokens`` (:meth:`SamplingParams.fitted`), and how messages name that
        limit; :class:`RequestError` (``key``) where the two exceed the context. ``of_prompt``,
        ``of_context``: said after the prompt's and the context's sizes."""
        limit = self.sampling.limit_name
        request = replace(self, sampling=self.sampling.fitted(context - prompt_tokens))
        max_new_tokens = cast(int, request.sampling.max_new_tokens)  # SamplingParams.fitted sets it
        if prompt_tokens + max_new_tokens > context:  # refused, not cut short
            raise RequestError(
                key,
                f"prompt ({prompt_tokens} tokens{of_prompt}) plus {limit} ({max_new_tokens}) exceeds the "
                f"model's context of {context} tokens{of_context}",
            )
        return request, limit


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
    discarded ends and the other ``best_of`` attempts included (its cost). ``logprobs[i]`` is
    the log-probability of ``token_ids[i]`` under the same distribution as ``mean_logprob``, and
    ``top_logprobs[i]`` the ``(token id, log-probability)`` pairs of the most likely tokens there
    (as many as :attr:`SamplingParams.top_logprobs`; None when it is 0).
    """

    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    num_tokens: int
    finish_reason: FinishReason
    values: list[float] | None
    mean_logprob: float
    eos_prob: float | None = None
    retries: int = 0
    decoded_tokens: int = 0
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] | None = None

    @property
    def natural(self) -> bool:
        """Ended with an EOS the generator itself gave at least :data:`NATURAL_EOS`."""
        return self.ended_above(NATURAL_EOS)

    def ended_above(self, threshold: float) -> bool:
        """Ended with an EOS the generator itself gave at least ``threshold``."""
        return self.finish_reason == "stop" and (self.eos_prob or 0.0) >= threshold


# Per-request length control as flat keys, the form every backend accepts: vLLM's
# ``SamplingParams.extra_args`` and ``extra_body={"vllm_xargs": {...}}``, and our server's fields.
LENGTH_TARGETS: dict[str, ControlKind] = {
    "length_equal_to": "equal_to",
    "length_at_most": "at_most",
    "length_at_least": "at_least",
}
# The options that shape a control, in the order they join it (the rule first: which cap an
# at_most control may take depends on it).
LENGTH_OPTIONS = ("length_rule", "length_retries", "length_best_of", "length_hard_cap_slack")
LENGTH_KEYS = (*LENGTH_TARGETS, "length_tilt", *LENGTH_OPTIONS)


class LengthKeyError(InputError):
    """A bad flat ``length_*`` key of a request; ``key`` names it, so that a server can point at it."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


def control_from_keys(keys: dict[str, Any], allowed: tuple[str, ...] = LENGTH_KEYS) -> Control | None:
    """The :class:`Control` that a request's flat ``length_*`` keys ask for (other keys are left
    alone); None when they ask for none. An unknown or unsupported ``length_*`` key, two controls
    at once, or a bad value raises :class:`LengthKeyError` naming the key."""
    given = {k: v for k, v in keys.items() if isinstance(k, str) and k.startswith("length_")}
    unknown = sorted(set(given) - set(LENGTH_KEYS))
    if unknown:
        raise LengthKeyError(
            unknown[0],
            f"unknown length control key {quoted(unknown[0])}; expected one of {', '.join(LENGTH_KEYS)}",
        )
    unsupported = sorted(set(given) - set(allowed))
    if unsupported:
        raise LengthKeyError(
            unsupported[0], f"{unsupported[0]!r} is not supported here (supported: {', '.join(allowed)})"
        )
    kinds = [k for k in (*LENGTH_TARGETS, "length_tilt") if given.get(k) is not None]
    if len(kinds) > 1:
        raise LengthKeyError(kinds[1], f"one length control at a time, got {' and '.join(kinds)}")
    options = [k for k in LENGTH_OPTIONS if given.get(k) is not None]
    if not kinds:
        if options:
            raise LengthKeyError(options[0], f"{', '.join(options)} needs a length control")
        return None
    key = kinds[0]
    value = given[key]
    if key == "length_tilt":
        if not is_real(value):
            raise LengthKeyError(key, f"length_tilt must be a finite number, got {quoted(value)}")
        control = Control("tilt", beta=float(value))
    else:
        if not is_int(value) or value < 1:
            raise LengthKeyError(key, f"{key} must be an integer of at least 1 (tokens), got {quoted(value)}")
        control = Control(LENGTH_TARGETS[key], target=value)
    # Each option joins the control on its own, so that Control's own checks name the key at fault.
    for option in options:
        name, value = option.removeprefix("length_"), given[option]
        if not (isinstance(value, str) if name == "rule" else is_int(value)):
            raise LengthKeyError(
                option,
                f"{option} must be {'a string' if name == 'rule' else 'an integer'}, got {quoted(value)}",
            )
        try:
            control = replace(control, **{name: value})
        except InputError as err:
            raise LengthKeyError(option, f"{option}: {err}") from None
    return control


def keys_of(control: Control | None) -> dict[str, Any]:
    """The flat ``length_*`` keys of ``control`` (the inverse of :func:`control_from_keys`), with
    ``retries``, ``best_of`` and ``hard_cap_slack`` only where they are set."""
    if control is None or not control.active:
        return {}
    if control.kind == "tilt":
        keys: dict[str, Any] = {"length_tilt": control.beta}
    else:
        keys = {f"length_{control.kind}": control.target}
    if control.rule != "ours":
        keys["length_rule"] = control.rule
    if control.retries is not None:
        keys["length_retries"] = control.retries
    if control.best_of != 1:
        keys["length_best_of"] = control.best_of
    if control.hard_cap_slack is not None:
        keys["length_hard_cap_slack"] = control.hard_cap_slack
    return keys
