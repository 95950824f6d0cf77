"""vLLM integration: LenVM length control inside vLLM (a logits processor, no fork), and vLLM as a
generation backend for rollouts and benchmarks.

Serving, with any OpenAI client::

    LENVM_PATH=my-lenvm python -m vllm.entrypoints.openai.api_server --model M \\
        --logits-processors lenvm.integrations.vllm:LenVMLogitsProcessor
    client.chat.completions.create(..., extra_body={"vllm_xargs": {"length_equal_to": 64}})

Offline::

    llm = LLM(model=M, logits_processors=[LenVMLogitsProcessor], additional_config={"lenvm_path": L})
    llm.chat(messages, SamplingParams(extra_args={"length_at_most": 40}))  # chat-templated, as trained

A request asks for a length control with the flat keys every lenvm backend accepts
(:func:`lenvm.decoding.params.control_from_keys`): ``length_equal_to``, ``length_at_most``,
``length_at_least``, ``length_tilt``, ``length_rule`` and ``length_hard_cap_slack``. Bad values are
refused when vLLM admits the request (HTTP 400 from the server), as is a control with structured
output or with a ``min_tokens`` it contradicts. Admission is shown no prompt: a prompt id that a
standalone LenVM's own embedding lacks (vLLM takes the rows its generator pads its embedding with)
leaves that request without its control, with a warning, where :class:`VLLMEngine` refuses it.
Such ids are never a controlled request's candidates, as in our engine (the LenVM would have to
read them); requests without a control may take them. A request decoded without its control (that
prompt, or an answer holding such an id after a step went unguided) keeps its own temperature and
truncation, as does every controlled request in a step whose LenVM forward failed (logged; the
LenVM's cache is then rebuilt).
Retries (of every target control, and with them At Most's unguided first attempt) and ``best_of``
need our own engine.

Each step the processor runs the decoding step of :mod:`lenvm.decoding.step` for the rows under a
control, all of them in one candidate-block forward of the LenVM, which keeps its own KV cache per
request in the worker (on a CPU its linear layers run on vLLM's own GEMM kernels); rows without a
control cost nothing. After a custom processor, vLLM's
sampler applies temperature, min-p and top-k/top-p. So that it samples exactly the policy's
distribution ``q``, the processor writes ``T · log q`` (vLLM divides by ``T`` again), and a
controlled request's top-k, top-p and min-p are taken over by the processor when vLLM admits it:
they shape the candidates, as in our engine, and vLLM's own are set to off for that request, since
applying them again to ``q`` would cut its tail (they wait in ``extra_args`` under
``lenvm_truncation`` and come back if the same ``SamplingParams`` is admitted again without a
control: drop its length keys, not the whole ``extra_args``, or make new params). Greedy requests
take the argmax of ``q``.
Under the V1 model runner, vLLM applies repetition, frequency and presence penalties after the
processor, so a request that sets them no longer samples ``q`` exactly; Model Runner V2 applies
them (and logit bias and bad words) before it, so ``q`` comes from the penalized logits, and its
thinking-budget forcing after it, over the processor's choice.

Configuration: the LenVM folder comes from ``additional_config={"lenvm_path": ...}``
(``--additional-config``) or the environment variable ``LENVM_PATH``; set the variable where vLLM
is started so that requests are also checked against the LenVM's horizon when they are admitted.
``lenvm_num_candidates`` (``LENVM_NUM_CANDIDATES``, default 8) and ``lenvm_dtype``
(``LENVM_DTYPE``, default float32) likewise. An attached or q LenVM loads its generator (named in
its config) as its own backbone beside vLLM's copy.

One class serves both of vLLM's model runners: V1 (the default without Triton, so on CPUs) hands
it each request's live output list and tells it of requests that leave or move; Model Runner V2
(the default on GPUs) tells it only of requests that take a slot (new, or resumed after
preemption), so the processor reads each controlled request's token ids from the runner's token
buffer the first time it samples and then appends the token the runner feeds it at each step, and
a request that no longer appears leaves the LenVM's cache. V2 is refused with speculative
decoding (several rows per request) and with prompt embeddings (no ids to read).
"""

from __future__ import annotations

import functools
import importlib
import logging
import math
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch

# vLLM logs to stdout by default, where lenvm's commands print their results (JSON for a pipe):
# where lenvm loads vLLM first, its log goes to stderr unless the user chose. vLLM sets up its
# logger when first imported; one that is loaded already (`vllm serve`) keeps its own setting.
if "vllm" not in sys.modules:
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")

from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from lenvm.decoding.params import (
    LENGTH_KEYS,
    MIN_TEMPERATURE,
    Control,
    Request,
    RequestError,
    Result,
    SamplingParams,
    control_from_keys,
    keys_of,
)
from lenvm.decoding.scorers import Scorer, scorer_for
from lenvm.decoding.sequence import target_of
from lenvm.decoding.step import (
    Rows,
    as_logits,
    decide,
    forbid_unreadable,
    looks_ahead,
    sampling_distribution,
)
from lenvm.decoding.streams import attention_span
from lenvm.io import InputError, outside_vocabulary

try:  # Model Runner V2's interface (vLLM's default on GPUs); releases before it have V1's alone
    RUNNER_V2: Any = importlib.import_module("vllm.v1.worker.gpu.sample.logits_processor")
except ImportError:  # pragma: no cover - older vLLM
    RUNNER_V2 = None
PROCESSOR_BASES = (LogitsProcessor,) if RUNNER_V2 is None else (LogitsProcessor, RUNNER_V2.LogitsProcessor)

# What a vLLM request may ask for: one pass of decoding, so no retries and no best_of.
KEYS = tuple(k for k in LENGTH_KEYS if k not in ("length_retries", "length_best_of"))
# Where admission keeps a controlled request's own top-k, top-p and min-p (see the module doc).
TRUNCATION = "lenvm_truncation"
OFF = (0, 1.0, 0.0)  # top-k, top-p and min-p that truncate nothing
GREEDY = MIN_TEMPERATURE  # vLLM's threshold: a lower temperature is greedy
logger = logging.getLogger(__name__)


def _setting(vllm_config, name: str, default: Any = None) -> Any:
    extra = vllm_config.additional_config if isinstance(vllm_config.additional_config, dict) else {}
    if name in extra:
        return extra[name]
    return os.environ.get(name.upper(), default)


def _int_setting(vllm_config, name: str, default: int, least: int) -> int:
    value = _setting(vllm_config, name, default)
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = least - 1
    if number < least or str(number) != str(value).strip():
        raise ValueError(f"{name} ({name.upper()}) must be an integer of at least {least}, got {value!r}")
    return number


def length_args(control: Control | None) -> dict[str, Any] | None:
    """``control`` as the ``extra_args`` of vLLM's ``SamplingParams`` (None without one)."""
    return {k: v for k, v in keys_of(control).items() if k in KEYS} or None


def _give_back_truncation(params) -> None:
    """Undo an earlier admission's takeover of these params' top-k, top-p and min-p (a
    ``SamplingParams`` used for another request): their own values come back unless they were set
    anew since, and the stash goes."""
    args = params.extra_args or {}
    if TRUNCATION not in args:
        return
    if (params.top_k, params.top_p, params.min_p) == OFF:
        params.top_k, params.top_p, params.min_p = args[TRUNCATION]
    params.extra_args = {k: v for k, v in args.items() if k != TRUNCATION} or None


@functools.cache
def _gamma(path: str) -> float:
    from lenvm.model import read_config

    return read_config(path).gamma


@dataclass(eq=False)
class _Row:
    """A controlled request in vLLM's batch."""

    control: Control
    sampling: SamplingParams  # the temperature and truncation the candidates come from
    temperature: float  # what vLLM divides the processor's logits by
    prompt: list[int]
    output: list[int]  # its output ids so far: V1's live list, kept up to date by apply under V2
    lookahead: bool  # its policy looks one step ahead (the cache must run the final layer)
    params: Any  # vLLM's SamplingParams of the request
    fed: int = -1  # output ids in the LenVM's cache (-1: the request is not in it)
    refused: str | None = None  # why it is decoded without its control (with its own sampling)

    @classmethod
    def of(cls, params, prompt: list[int] | None, output: list[int], vocab_size: int) -> _Row | None:
        """The request's row, None without a control; ``vocab_size``: the ids the LenVM embeds. A
        prompt the LenVM cannot read leaves the row ``refused``."""
        control = control_from_keys(params.extra_args or {}, KEYS)
        if control is None:
            return None
        top_k, top_p, min_p = (params.extra_args or {}).get(TRUNCATION) or (
            params.top_k,
            params.top_p,
            params.min_p,
        )
        greedy = params.temperature < GREEDY
        sampling = SamplingParams(
            temperature=0.0 if greedy else float(params.temperature),
            top_k=max(int(top_k), 0),
            top_p=float(top_p),
            min_p=float(min_p),
            max_new_tokens=max(int(params.max_tokens or 1), 1),
            ignore_eos=bool(params.ignore_eos),
        )
        temperature = 1.0 if greedy else float(params.temperature)
        lookahead = looks_ahead(control, sampling)
        row = cls(control, sampling, temperature, list(prompt or []), output, lookahead, params)
        if prompt is None:
            row.refused = "a length control needs the prompt's token ids, not prompt embeddings"
        elif (why := outside_vocabulary(prompt, vocab_size)) is not None:
            row.refused = f"the LenVM reads the prompt with an embedding of its own: {why}"
        return row


class LenVMLogitsProcessor(*PROCESSOR_BASES):  # type: ignore[misc]  # V1's and Model Runner V2's
    """Length control for vLLM's V1 model runner and its Model Runner V2 (see the module doc)."""

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        """Refuse bad ``length_*`` keys when vLLM admits a request (a 400 from the server), and take
        over a controlled request's truncation (see the module doc)."""
        _give_back_truncation(sampling_params)  # params admitted before and used again
        args = sampling_params.extra_args or {}
        control = control_from_keys(args, KEYS)
        if control is None:
            return
        max_tokens = sampling_params.max_tokens
        if max_tokens is not None and (why := control.unreachable(max_tokens, "max_tokens")) is not None:
            raise InputError(f"length_{why}")  # named as the request's key
        if getattr(sampling_params, "structured_outputs", None) is not None:
            raise InputError(
                "a length control cannot be combined with structured output: the grammar may forbid the "
                "EOS where the control ends the answer"
            )
        min_tokens = getattr(sampling_params, "min_tokens", 0) or 0
        if control.kind in ("equal_to", "at_most") and min_tokens > target_of(control):
            raise InputError(f"min_tokens {min_tokens} contradicts length_{control.kind} {control.target}")
        path = os.environ.get("LENVM_PATH")
        if path and (why := control.beyond_horizon(_gamma(path))) is not None:
            raise InputError(f"length {why}")
        p = sampling_params
        p.extra_args = {**args, TRUNCATION: [p.top_k, p.top_p, p.min_p]}
        p.top_k, p.top_p, p.min_p = OFF

    def __init__(self, vllm_config, *runner: Any):
        """V1 passes ``(device, is_pin_memory)``; Model Runner V2 its requests' state."""
        from lenvm.hub import load_tokenizer
        from lenvm.model import LengthValueModel, check_tokenizer, embedding_matrix

        self.state: Any = None  # Model Runner V2's requests (their token ids), or None under V1
        if (
            RUNNER_V2 is not None
            and len(runner) == 1
            and isinstance(runner[0], RUNNER_V2.LogitsProcRequestState)
        ):
            self.state = runner[0]
            device = self.state.device
            if getattr(vllm_config, "speculative_config", None) is not None:
                raise ValueError(
                    "LenVMLogitsProcessor decides one token per request and step: start vLLM without "
                    "speculative decoding"
                )
            if getattr(vllm_config.model_config, "enable_prompt_embeds", False):
                # V2 shows a processor a prompt's ids only, and an embedded prompt has none.
                raise ValueError(
                    "LenVMLogitsProcessor needs every prompt's token ids, which Model Runner V2 does not "
                    "show it for prompt embeddings: start vLLM without --enable-prompt-embeds, or with "
                    "VLLM_USE_V2_MODEL_RUNNER=0"
                )
        else:
            device, _pinned = runner
        path = _setting(vllm_config, "lenvm_path")
        if not path:
            raise ValueError(
                "LenVMLogitsProcessor needs a LenVM: set the environment variable LENVM_PATH or "
                '--additional-config \'{"lenvm_path": "..."}\''
            )
        named = os.environ.get("LENVM_PATH")
        if named and os.path.realpath(named) != os.path.realpath(path):
            # Admission reads the variable alone: it would check requests against another LenVM.
            raise ValueError(
                f"LENVM_PATH names {named} and --additional-config names {path}: name the LenVM once"
            )
        self.num_candidates = _int_setting(vllm_config, "lenvm_num_candidates", 8, least=2)
        dtype = _setting(vllm_config, "lenvm_dtype", "float32")
        self.lenvm = LengthValueModel.from_pretrained(path, device=device, dtype=dtype).eval()
        _use_vllm_cpu_gemm(self.lenvm.body)
        span = attention_span(self.lenvm.backbone, "the LenVM's body")
        if vllm_config.model_config.max_model_len > span:
            raise ValueError(
                f"the LenVM's stream computes its body as the model does for {span} tokens (its context, "
                f"or its sliding window: the stream attends to the whole prefix), fewer than vLLM's "
                f"max_model_len of {vllm_config.model_config.max_model_len}: start vLLM with "
                f"max_model_len={span}"
            )
        check_tokenizer(self.lenvm.config, load_tokenizer(vllm_config.model_config.tokenizer), "vLLM's model")
        self.device = device
        # vLLM takes the ids its generator embeds, which a standalone LenVM's embedding may lack:
        # VLLMEngine refuses such a prompt, vLLM's server cannot (admission is shown no prompt).
        self.vocab_size = embedding_matrix(self.lenvm.backbone).shape[0]
        self.eos = torch.tensor(self.lenvm.config.eos_token_ids, device=device)
        self.slots: dict[int, _Row] = {}  # vLLM's batch slot -> controlled request
        self.admitted: dict[int, Any] = {}  # V2: slot -> a controlled request's params (rows built in apply)
        self.order: list[_Row] = []  # the scorer's rows
        self.scorer: Scorer | None = None
        self.lookahead = False  # whether the scorer was built for rows that look ahead
        self.ids: torch.Tensor | None = None  # [B, k] candidates fed last step (pending in the cache)

    def is_argmax_invariant(self) -> bool:
        return False  # it changes the argmax: vLLM must apply it to greedy requests too

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        # An added or moved-into slot overwrites what was there (vLLM reuses slots without
        # listing them as removed); the order is removed, added, moved.
        if batch_update is None:
            return
        for slot in batch_update.removed:
            self.slots.pop(slot, None)
        for slot, params, prompt, output in batch_update.added:
            self.slots.pop(slot, None)
            row = self._row(slot, params, prompt, output)
            if row is not None:
                self.slots[slot] = row
        for a, b, direction in batch_update.moved:
            moving, there = self.slots.pop(a, None), self.slots.pop(b, None)
            if moving is not None:
                self.slots[b] = moving
            if there is not None and direction == MoveDirectionality.SWAP:
                self.slots[a] = there

    def add_request(self, req_idx: int, sampling_params) -> bool:
        """Model Runner V2: a request takes slot ``req_idx`` (new, or resumed after preemption;
        whatever held the slot has left). True where it has a control: only then is ``apply``
        called for its batch. Its token ids are read in ``apply``, once vLLM has written them.
        V2 never says when a request finishes: the LenVM's cache of finished requests goes at the
        next step with a controlled request, or here, once new requests have taken every slot
        that held one (no ``apply`` may come to free it)."""
        self.slots.pop(req_idx, None)
        self.admitted.pop(req_idx, None)
        if not self.slots and not self.admitted:
            self._drop()
        try:
            control = control_from_keys(sampling_params.extra_args or {}, KEYS)
        except Exception as err:  # admission checked the keys; never take vLLM's engine down
            logger.warning("lenvm: request in slot %d is decoded without length control: %s", req_idx, err)
            return False
        if control is not None:
            self.admitted[req_idx] = sampling_params
        return control is not None

    def apply(self, logits: torch.Tensor, ctx=None) -> torch.Tensor:
        """V1 calls it with the batch's logits, rows in slot order; Model Runner V2 with ``ctx``,
        its step's rows (reordered every step) and their slots."""
        try:
            slots, index = self._live_v1() if ctx is None else self._live_v2(ctx)
        except Exception:  # an error here would kill vLLM's engine: this step goes unguided
            logger.exception("lenvm: length control failed for this step; the LenVM's cache is rebuilt")
            self._drop()
            return logits
        if not slots:
            self._drop()
            return logits
        live = [self.slots[s] for s in slots]
        try:
            return self._guide(logits, live, index)
        except Exception:  # likewise, but the controlled rows keep their own sampling
            logger.exception("lenvm: length control failed for this step; the LenVM's cache is rebuilt")
            self._drop()
            try:
                return self._unguided(logits, live, index)
            except Exception:  # never into vLLM's engine, which would fail every request
                logger.exception("lenvm: these controlled requests are sampled untruncated this step")
                return logits

    # -- internals ------------------------------------------------------------------------

    def _row(self, slot: int, params, prompt: list[int] | None, output: list[int]) -> _Row | None:
        """The row of the request in ``slot`` (see :meth:`_Row.of`), with a warning where it goes
        without its control; None without one. Never raises: vLLM's engine would go down."""
        try:
            row = _Row.of(params, prompt, output, self.vocab_size)
        except Exception as err:  # admission checked the keys
            logger.warning("lenvm: request in slot %d is decoded without length control: %s", slot, err)
            return None
        if row is not None and row.refused is not None:
            logger.warning(
                "lenvm: request in slot %d is decoded without length control: %s", slot, row.refused
            )
        return row

    def _readable(self, row: _Row) -> bool:
        """Whether the row is guided: not refused, and the LenVM can read its answer. A row about
        to join the cache is checked (one in it was when it joined, and took candidates only); an
        id that an unguided step let into its answer leaves it refused from then on."""
        if (
            row.refused is None
            and row.fed < 0
            and (why := outside_vocabulary(row.output, self.vocab_size, "the answer"))
        ):
            row.refused = f"the LenVM reads the answer with an embedding of its own: {why}"
            logger.warning("lenvm: a request is decoded without length control from here: %s", row.refused)
        return row.refused is None

    def _unguided(self, logits: torch.Tensor, live: list[_Row], index_rows: list[int]) -> torch.Tensor:
        """Rows ``live`` (logits rows ``index_rows``) as vLLM would sample them without a control:
        admission took their top-k, top-p and min-p over, so they are applied here (times the
        temperature that vLLM divides by afterwards)."""
        index = torch.tensor(index_rows, device=logits.device)
        rows = Rows.build([r.sampling for r in live], [None] * len(live), [0] * len(live), self.device)
        probs = sampling_distribution(logits[index].to(self.device, torch.float32), rows)
        logits[index] = (probs.log() * rows.temperature[:, None]).to(logits.device, logits.dtype)
        return logits

    def _live_v1(self) -> tuple[list[int], list[int]]:
        """The controlled slots (V1 keeps each request's live output list in its row) and their
        logits rows: V1's rows are its slots."""
        slots = sorted(self.slots)
        return slots, slots

    def _live_v2(self, ctx) -> tuple[list[int], list[int]]:
        """Model Runner V2: the controlled slots that sample this step, in slot order, and their
        logits rows; each row's token ids brought up to date. A row's last token is the one the
        runner feeds this step; a row seen first (or out of step) reads the tokens before it from
        the runner's token buffer. Rows of a prefill chunk sample nothing and are skipped."""
        state = self.state
        found: dict[int, int] = {}  # slot -> logits row
        lengths: dict[int, int] = {}  # slot -> tokens so far, the one fed this step included
        for r, s in enumerate(ctx.idx_mapping_np.tolist()):
            if s not in self.slots and s not in self.admitted:
                continue
            length = int(ctx.seq_lens_upper_bound_np[r])  # exact without speculative decoding
            if length >= int(state.prefill_len.np[s]):
                found[s], lengths[s] = r, length
        if not found:
            return [], []
        rows = torch.tensor(list(found.values()), device=ctx.input_ids.device)
        fed = dict(zip(found, ctx.input_ids[rows].tolist(), strict=True))
        for s, length in lengths.items():
            row = self.slots.get(s)
            if row is not None and len(row.prompt) + len(row.output) == length - 1:
                row.output.append(fed[s])
                continue
            ids = state.all_token_ids.gpu[s, : length - 1].tolist() + [fed[s]]
            prompt_length = int(state.prompt_len.np[s])
            params = self.admitted.pop(s) if s in self.admitted else self.slots.pop(s).params
            row = self._row(s, params, ids[:prompt_length], ids[prompt_length:])
            if row is None:
                del found[s]
            else:
                self.slots[s] = row
        slots = sorted(found)
        return slots, [found[s] for s in slots]

    def _guide(self, logits: torch.Tensor, live: list[_Row], index_rows: list[int]) -> torch.Tensor:
        """The decoding step for the controlled requests ``live``, whose logits are rows
        ``index_rows``; those refused their control are sampled as vLLM would without it."""
        guided = [self._readable(r) for r in live]
        if not all(guided):
            pairs = list(zip(live, index_rows, strict=True))
            refused = [pair for pair, ok in zip(pairs, guided, strict=True) if not ok]
            logits = self._unguided(logits, [r for r, _ in refused], [i for _, i in refused])
            live = [r for r, ok in zip(live, guided, strict=True) if ok]
            index_rows = [i for i, ok in zip(index_rows, guided, strict=True) if ok]
            if not live:
                self._drop()
                return logits
        scorer = self._sync(live)
        position = {id(r): i for i, r in enumerate(self.order)}
        order = [position[id(r)] for r in live]
        if order != list(range(len(order))):  # vLLM moved rows: follow its order
            scorer.select(torch.tensor(order, device=self.device))
            self.order = live
        rows = Rows.build(
            [r.sampling for r in live], [r.control for r in live], [len(r.output) for r in live], self.device
        )
        index = torch.tensor(index_rows, device=logits.device)
        # The controlled rows' own copy: ids the LenVM cannot read are no candidates of theirs.
        scores = forbid_unreadable(logits[index].to(self.device, torch.float32), self.lenvm)
        d = decide(scores, rows, scorer, self.num_candidates, self.eos, self.lenvm.gamma)
        self.ids = d.ids
        # vLLM divides by the temperature afterwards: T·log q samples q.
        temperature = torch.tensor([r.temperature for r in live], device=self.device, dtype=torch.float64)
        out = as_logits(d, rows, scores.shape[-1], scale=temperature)
        logits[index] = out.to(logits.device, logits.dtype)
        return logits

    def _sync(self, live: list[_Row]) -> Scorer:
        """Bring the LenVM's cache in line with vLLM's batch (``live``, at least one row): keep the
        candidate each row took, drop rows that left, and prefill rows that joined or whose tokens
        the cache cannot follow (several tokens at once, a token that was not a candidate, a
        resumed request). Returns the cache's scorer."""
        alive = {id(r) for r in live}
        if self.scorer is not None:
            kept = self._advance(self.scorer, alive)
            if len(kept) < len(self.order):
                for i in set(range(len(self.order))) - set(kept):
                    self.order[i].fed = -1
                if kept:
                    self.scorer.select(torch.tensor(kept, device=self.device))
                    self.order = [self.order[i] for i in kept]
                else:
                    self._drop()
        joining = [r for r in live if r.fed < 0]
        if joining and self.scorer is not None and not self.lookahead and any(r.lookahead for r in joining):
            self._drop()  # the cache runs below the final layer only: rebuild it whole
            joining = live
        if joining:
            if self.scorer is None:  # a cache of its own stays shallow unless a row looks ahead
                self.lookahead = any(r.lookahead for r in joining)
            rows = [r.prompt + list(r.output) for r in joining]
            part = scorer_for(self.lenvm).prefill(self.lenvm, rows, lookahead=self.lookahead)
            self.scorer = part if self.scorer is None else Scorer.cat([self.scorer, part])
            self.order = self.order + joining
            for r in joining:
                r.fed = len(r.output)
        return cast(Scorer, self.scorer)  # every live row is in the cache now: it has one

    def _advance(self, scorer: Scorer, alive: set[int]) -> list[int]:
        """Move every row of the cache (``scorer``'s) one token on; returns the rows that followed
        their request."""
        ids, self.ids = self.ids, None
        if ids is None:  # nothing pending: rows whose request did not move on stay as they are
            return [i for i, r in enumerate(self.order) if id(r) in alive and r.fed == len(r.output)]
        choice, token, kept = [], [], []
        for i, r in enumerate(self.order):
            new = r.output[r.fed :]
            hit: torch.Tensor | list[int] = (
                (ids[i] == new[0]).nonzero() if id(r) in alive and len(new) == 1 else []
            )
            if len(hit):
                kept.append(i)
                r.fed += 1
            choice.append(int(hit[0]) if len(hit) else 0)
            token.append(new[0] if len(hit) else int(ids[i, 0]))
        # Rows that did not follow advance too (the cache moves as one) and are dropped next.
        scorer.advance(torch.tensor(choice, device=self.device), torch.tensor(token, device=self.device))
        return kept

    def _drop(self) -> None:
        for r in self.order:
            r.fed = -1
        self.order, self.scorer, self.ids = [], None, None


def _use_vllm_cpu_gemm(body: torch.nn.Module) -> None:
    """On a CPU, run the linear layers of the LenVM's body with the GEMM kernels vLLM picks for its
    own (oneDNN with prepacked weights where available): at the few rows of a candidate block they
    are about 1.1-1.9x faster than PyTorch's, and the candidate block is most of a guided step's
    cost. Each layer's weight moves into the kernel's packed copy (the layer keeps an empty one)."""
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    for layer in body.modules():
        if isinstance(layer, torch.nn.Linear) and layer.weight.device.type == "cpu":
            dispatch_cpu_unquantized_gemm(layer, remove_weight=True)
            layer.forward = functools.partial(_packed_linear, layer)  # type: ignore[method-assign]  # this layer's own


def _packed_linear(layer: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    # The kernels take 2-D inputs; a candidate block is [B, k, H].
    cpu_linear = cast(Callable[..., torch.Tensor], layer.cpu_linear)  # set by dispatch_cpu_unquantized_gemm
    out = cpu_linear(x.reshape(-1, x.shape[-1]), layer.weight, layer.bias)
    return out.view(*x.shape[:-1], layer.out_features)


def _standalone_rows(path: str | os.PathLike) -> int | None:
    """The rows of a standalone LenVM's own embedding, from its backbone's config (None for a LenVM
    that reads the generator's states), without loading it: vLLM's worker loads it."""
    from transformers import AutoConfig

    from lenvm.model import BACKBONE_DIR, read_config

    if read_config(path).kind != "standalone":
        return None
    return AutoConfig.from_pretrained(Path(path) / BACKBONE_DIR).get_text_config().vocab_size


def _cpu_defaults() -> dict[str, Any]:
    """vLLM settings for a machine without a GPU. Eager mode: compiling the graphs takes minutes
    on a CPU. A 2 GiB KV cache unless ``VLLM_CPU_KVCACHE_SPACE`` says otherwise: by default vLLM
    reserves most of the machine's memory for it. And vLLM in this process: its multiprocess mode
    keeps a core for its scheduler (half the cores of a 2-core machine) unless
    ``VLLM_ENABLE_V1_MULTIPROCESSING`` is set."""
    if torch.cuda.is_available():
        return {}
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    defaults: dict[str, Any] = {"enforce_eager": True}
    if not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
        defaults["kv_cache_memory_bytes"] = 2 * 2**30
    return defaults


class VLLMEngine:
    """vLLM as a generation backend behind our request types: ``stream`` and ``generate`` take
    :class:`~lenvm.decoding.Request` objects and give :class:`~lenvm.decoding.Result` objects, like
    :class:`lenvm.decoding.Engine` (one pass: no retries, no ``best_of``, no values).

    ``lenvm``: a LenVM folder for requests with a control (the processor above). ``logprobs``:
    report each result's mean log-probability and final EOS probability under the generator
    (vLLM's raw log-probabilities; the first request that asks for them compiles a kernel).
    The LenVM runs in ``dtype``, the generator's, unless the environment variable ``LENVM_DTYPE``
    names another (``bfloat16`` halves the cost of its matrix products on CPUs that run them natively).
    ``engine_args`` go to ``vllm.LLM`` (e.g. ``max_num_seqs``, ``max_model_len``); on a machine
    without a GPU, vLLM runs in this process, in eager mode, with a 2 GiB KV cache unless they or
    vLLM's environment variables say otherwise."""

    def __init__(
        self,
        model: str,
        lenvm: str | os.PathLike | None = None,
        num_candidates: int = 8,
        dtype: str = "float32",
        logprobs: bool = True,
        **engine_args: Any,
    ):
        from vllm import LLM

        from lenvm.hub import eos_token_ids_of, load_tokenizer, resolve

        location = resolve(model)
        args: dict[str, Any] = {"model": location, "dtype": dtype, "seed": 0, **_cpu_defaults()}
        args.update(engine_args)
        if lenvm is not None:
            args["logits_processors"] = [LenVMLogitsProcessor]
            extra = {
                "lenvm_path": str(lenvm),
                "lenvm_num_candidates": num_candidates,
                "lenvm_dtype": os.environ.get("LENVM_DTYPE", dtype),  # the generator's unless set
            }
            args["additional_config"] = {**extra, **args.get("additional_config", {})}
        self.llm = LLM(**args)
        # The ids a prompt may hold, as our engine counts them: the generator's embedding rows, and a
        # standalone LenVM's, which reads the prompt too.
        self.vocab_size = self.llm.llm_engine.model_config.get_vocab_size()
        if lenvm is not None and (rows := _standalone_rows(lenvm)) is not None:
            self.vocab_size = min(self.vocab_size, rows)
        self.tokenizer = load_tokenizer(location)
        self.eos_ids = eos_token_ids_of(location, self.tokenizer)
        self.lenvm = lenvm
        self.logprobs = logprobs
        self._calls = 0  # stream calls so far: request names stay unique across them

    def close(self) -> None:
        """Shut vLLM down now (its worker processes and KV cache), not whenever the engine is
        garbage-collected."""
        core = getattr(self.llm.llm_engine, "engine_core", None)
        if core is not None:
            core.shutdown()

    def generate(
        self, requests: list[Request], batch_size: int | None = None, progress: bool = False
    ) -> list[Result]:
        results = dict(self.stream(requests, batch_size))
        return [results[index] for index in range(len(requests))]

    def stream(self, requests: list[Request], batch_size: int | None = None) -> Iterator[tuple[int, Result]]:
        """Results as they finish, ``(request index, result)``. vLLM sizes its own batches:
        ``batch_size`` is accepted for a drop-in swap with our engine and not used."""
        from vllm.inputs import TokensPrompt

        engine = self.llm.llm_engine
        # Every request is checked before any is added, as our engine does: a refused one leaves
        # nothing behind in vLLM for the next call.
        checked = [self._checked(i, request) for i, request in enumerate(requests)]
        self._calls += 1
        names = [f"{self._calls}-{i}" for i in range(len(checked))]  # unique across calls
        pending = set(names)
        try:
            for name, (ids, params) in zip(names, checked, strict=True):
                engine.add_request(name, TokensPrompt(prompt_token_ids=ids), params)
            while engine.has_unfinished_requests():
                for out in engine.step():
                    if out.finished:
                        pending.discard(out.request_id)
                        i = int(out.request_id.split("-")[1])
                        yield i, self._result(checked[i][0], out.outputs[0])
        finally:  # an error, or a caller that stopped reading: drop what is left
            if pending:
                engine.abort_request(sorted(pending))

    def _checked(self, index: int, request: Request) -> tuple[list[int], Any]:
        """Request ``index``'s prompt ids and vLLM parameters, or :class:`RequestError` where our
        engine would refuse it."""
        from lenvm.prompts import as_prompt, encode_prompt, is_token_ids

        if not isinstance(request, Request):
            raise RequestError(index, f"expected a Request, got {type(request).__name__}")
        context = self.llm.llm_engine.model_config.max_model_len
        prompt = request.prompt
        if is_token_ids(prompt):
            ids = list(prompt)
            if (why := outside_vocabulary(ids, self.vocab_size)) is not None:
                raise RequestError(index, why)
        else:
            ids = encode_prompt(self.tokenizer, as_prompt(prompt, str(index)))
        request, named = request.fitted(index, len(ids), context)  # as our engine: not cut short by vLLM
        limit, control = cast(int, request.sampling.max_new_tokens), request.control  # fitted: set
        if control is not None and (why := control.unreachable(limit, named)) is not None:
            raise RequestError(index, why)
        return ids, self._params(index, request)

    def _params(self, index: int, request: Request):
        from vllm import SamplingParams as VllmParams

        control = request.control
        if control is not None and control.active:
            if self.lenvm is None:
                raise RequestError(index, "a length control needs a LenVM")
            if control.best_of > 1 or control.retries:
                raise RequestError(index, "retries and best_of need lenvm's own engine")
        if request.return_values:
            raise RequestError(index, "return_values needs lenvm's own engine")
        s = request.sampling
        return VllmParams(
            temperature=s.temperature,
            top_p=s.top_p,
            top_k=s.top_k,
            min_p=s.min_p,
            seed=s.seed,
            max_tokens=s.max_new_tokens,
            ignore_eos=s.ignore_eos,
            logprobs=0 if self.logprobs else None,
            extra_args=length_args(control),
        )

    def _result(self, prompt_ids: list[int], out) -> Result:
        ids = list(out.token_ids)
        if out.finish_reason not in ("stop", "length"):
            raise RuntimeError(f"vLLM ended a request with {out.finish_reason!r}")
        ended = out.finish_reason == "stop" and bool(ids) and ids[-1] in self.eos_ids
        logprobs = [step[t].logprob for step, t in zip(out.logprobs or [], ids, strict=False)]
        return Result(
            prompt_token_ids=prompt_ids,
            token_ids=ids,
            text=self.tokenizer.decode(ids, skip_special_tokens=True),
            num_tokens=len(ids) - ended,
            finish_reason="stop" if out.finish_reason == "stop" else "length",
            values=None,
            mean_logprob=sum(logprobs) / len(logprobs) if logprobs else math.nan,
            eos_prob=math.exp(logprobs[-1]) if ended and logprobs else None,
            decoded_tokens=len(ids),
        )
