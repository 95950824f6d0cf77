"""The decoding engine: batched generation with KV caches, optionally guided by a LenVM.

    lenvm = LengthValueModel.from_pretrained("my-lenvm", generator=(model, tokenizer))
    engine = Engine(model, tokenizer, lenvm=lenvm, num_candidates=8)
    results = engine.generate([Request("Hi", control=Control("equal_to", target=64))])

Without a LenVM (``lenvm=None``) the engine decodes plainly: a request with a length control or
``return_values`` is refused.

Requests run in a batch of at most ``batch_size`` rows; a finished row leaves the batch and a
waiting request takes its place (continuous batching; each request's state lives in the
engine, :mod:`lenvm.decoding.sequence`). One step of the batch (:mod:`lenvm.decoding.batch`):

1. the generator's next-token logits come from the hidden state of each row's last token (a
   vision-language generator's image placeholder tokens are never generated, nor ids past the
   rows of a standalone LenVM's embedding);
2. :func:`lenvm.decoding.step.decide` truncates each row's distribution (temperature, top-k,
   top-p, min-p), takes the candidates (a controlled row's ``num_candidates`` most probable
   tokens, plus EOS where the control must be able to end; a plain row samples its token, its
   only candidate), has the LenVM's scorer value the state after each candidate, and applies
   the row's control policy;
3. each row draws from its policy's distribution with its own random stream (argmax when
   greedy); a hard cap sends EOS instead;
4. the caches keep the chosen token only. The scorer decides what a step costs
   (:mod:`lenvm.decoding.scorers`): ``attached`` feeds the candidate block through the
   generator's body, which is also the generator's next step (one forward per step); ``q`` reads
   every candidate's value off the hidden state that gave the logits (one single-token
   forward); ``standalone`` runs its own block forward beside the generator's single-token one.
   ``candidate_scoring="naive"`` feeds the candidates one by one instead (for speed comparisons).

Waiting requests join the batch first come, first served; ``Engine(queue="shortest")`` admits
the one with the shortest answer the LenVM predicts from its prompt instead, with ageing so that
no request waits forever (:mod:`lenvm.decoding.queue`): a server's mean latency drops when short
answers no longer wait behind long ones. Predictions cost one forward over each prompt, batched
over the requests that arrived since the last step.

A finished answer to a target control first ends, if it can, where its own text let the
generator end naturally (its EOS at least ``Control.natural_eos``; :meth:`Sequence.end_earlier`):
At Most and At Least where the answer did not end naturally and the bound holds, Equal To where
that is nearer the target than the answer's own end. One that still did not end naturally goes
back to decoding from an earlier point, further back on each retry (:attr:`Control.retries`):
the row leaves the batch keeping its caches over its prompt and the tokens it keeps, and rejoins
from them with one single-token forward instead of a new prefill (one whose prompt has images
and that keeps none of its answer is prefilled again), so only the answers that miss pay for a
second try, and only for the tokens they decode again.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Hashable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Literal, cast

import torch

from lenvm import vision
from lenvm.decoding.batch import Batch
from lenvm.decoding.params import Control, Request, RequestError, Result
from lenvm.decoding.queue import DEFAULT_AGING, check_queue, priority
from lenvm.decoding.scorers import BlockScorer, scorer_for
from lenvm.decoding.sequence import Sequence, best_of, target_of
from lenvm.decoding.step import readable_vocab_size
from lenvm.decoding.streams import attention_span
from lenvm.io import InputError, is_int, outside_vocabulary, positive_count
from lenvm.model import (
    LengthValueModel,
    check_generator,
    check_lenvm,
    check_tokenizer,
    context_length,
    embedding_matrix,
)
from lenvm.prompts import as_prompt, is_token_ids

SENTENCE_ENDS = (".", "!", "?", "。", "！", "？")


class Engine:
    """Batched generation with a generator, optionally guided by a LenVM (see the module doc)."""

    def __init__(
        self,
        model,
        tokenizer,
        lenvm: LengthValueModel | None = None,
        num_candidates: int = 8,
        candidate_scoring: Literal["block", "naive"] = "block",
        queue: Literal["fcfs", "shortest"] = "fcfs",
        queue_aging: float = DEFAULT_AGING,
    ):
        check_generator(model, tokenizer, "Engine's generator")
        if lenvm is not None:
            check_lenvm(lenvm, "Engine")
        if not is_int(num_candidates) or num_candidates < 2:
            raise InputError(
                f"num_candidates must be an integer of at least 2 (with one, a control has nothing to choose "
                f"from), got {num_candidates!r}"
            )
        if candidate_scoring not in ("block", "naive"):
            raise InputError(f"candidate_scoring must be 'block' or 'naive', got {candidate_scoring!r}")
        self.scorer_type = scorer_for(lenvm) if lenvm is not None else None
        if candidate_scoring == "naive" and not (
            self.scorer_type and issubclass(self.scorer_type, BlockScorer)
        ):
            raise InputError(
                "naive candidate scoring needs a LenVM that scores candidates with a forward pass"
            )
        tokenizer = vision.as_tokenizer(tokenizer)
        vision.check_supported(model.config, "the generator")
        span = attention_span(model, "the generator")
        check_queue(queue, queue_aging)
        if queue == "shortest" and lenvm is None:
            raise InputError(
                "queue='shortest' ranks waiting requests by a LenVM's predicted length: give lenvm"
            )
        if lenvm is not None:
            check_tokenizer(lenvm.config, tokenizer, what="the generator's tokenizer")
            if lenvm.attached and lenvm.backbone is not model:
                raise InputError(
                    f"a LenVM of kind {lenvm.config.kind!r} reads the generator's own hidden states: "
                    "load it with generator=(model, tokenizer) of this engine's model"
                )
            if not lenvm.attached:
                span = min(span, attention_span(lenvm.backbone, "the LenVM"))
        from lenvm.hub import eos_token_ids

        self.model = model.eval()
        self.tokenizer = tokenizer
        self.lenvm = lenvm.eval() if lenvm is not None else None
        self.num_candidates = num_candidates
        self.naive = candidate_scoring == "naive"
        self.queue = queue
        self.queue_aging = float(queue_aging)
        self.body = model.base_model
        self.lm_head = model.get_output_embeddings()
        self.device = self.lm_head.weight.device
        self.eos_ids = eos_token_ids(model, tokenizer)
        self.eos = torch.tensor(self.eos_ids, device=self.device)
        self.eos_set = set(self.eos_ids)
        # The generator's stream also yields the head's features when the head reads the generator.
        self.generator_features = lenvm.feature_layer if lenvm is not None and lenvm.attached else -1
        context = context_length(model)
        # The ids a prompt may hold: every row of the embeddings of the models that read it, those a
        # model pads its embedding with past the tokenizer's ids included (they are ids the model
        # reads, and vLLM takes them).
        self.vocab_size = embedding_matrix(model).shape[0]
        # The ids no answer may hold: an image placeholder stands for no image in an answer; and
        # those a standalone LenVM cannot read (forbid_unreadable, each step), for every row, since
        # the LenVM reads every row's answer once one row is scored.
        never = vision.placeholder_ids(model.config)
        self.never_generated = torch.tensor(never, device=self.device) if never else None
        if lenvm is not None and not lenvm.attached:
            context = min(context, lenvm.context)
        if (readable := readable_vocab_size(lenvm)) is not None:
            self.vocab_size = min(self.vocab_size, readable)
        # The most tokens a request may span: the models' contexts, or a shorter sliding window.
        self.context = min(context, span)
        self.windowed = span < context
        # Where a retry restarts. Only a length control retries, and it needs a LenVM; found here,
        # as decoding the whole vocabulary at the first retry would stall every running request.
        self.sentence_ends = sentence_end_ids(tokenizer) if lenvm is not None else frozenset()

    # -- public ---------------------------------------------------------------------------

    def __repr__(self) -> str:
        lenvm = (
            self.lenvm and f"LengthValueModel(kind={self.lenvm.config.kind!r}, gamma={self.lenvm.gamma:.6g})"
        )
        return (
            f"Engine(generator={getattr(self.model, 'name_or_path', '')!r}, lenvm={lenvm}, "
            f"num_candidates={self.num_candidates}, device={self.device}, dtype={self.model.dtype})"
        )

    def generate(
        self, requests: Iterable[Request], batch_size: int = 8, progress: bool = False
    ) -> list[Result]:
        """Generate for every request; results come back in request order."""
        requests = list(_request_list(requests, "generate"))
        results = dict(self.stream(requests, batch_size, progress))
        return [results[index] for index in range(len(requests))]

    def stream(
        self, requests: Iterable[Request], batch_size: int = 8, progress: bool = False
    ) -> Iterator[tuple[int, Result]]:
        """Generate for every request, yielding ``(request index, result)`` as each one finishes,
        so that a caller can save or show finished work while the rest is still decoding. Every
        request is checked (and its images loaded) in this call, before anything is decoded or
        yielded. ``progress`` shows a bar of the requests done and the tokens decoded."""
        requests = list(_request_list(requests, "stream"))
        scheduler = self._scheduled(requests, batch_size)
        finished = _counted(_finished(scheduler, bar := _progress(len(requests), progress)), bar)
        return cast(Iterator[tuple[int, Result]], finished)  # _scheduled keys each request by its index

    def _scheduled(self, requests: Iterable[Request], batch_size: int) -> Scheduler:
        scheduler = Scheduler(self, batch_size)
        for index, request in enumerate(requests):
            scheduler.add(request, index)
        return scheduler

    @property
    def context_note(self) -> str:
        """What follows the context in messages about it: that it is the model's sliding window,
        where it is."""
        if not self.windowed:
            return ""
        return " (its sliding window: the engine attends to the whole prefix, as the model does within it)"

    def sequences(self, key: Hashable, request: Request) -> list[Sequence]:
        """The attempts of one request (one, or ``best_of``), after checking it against the models."""
        if not isinstance(request, Request):
            raise RequestError(key, f"expected a Request, got {type(request).__name__}")
        prompt = request.prompt
        if not is_token_ids(prompt):
            try:
                prompt = as_prompt(prompt, default_id=str(key))  # its id names it in errors
            except InputError as err:
                raise RequestError(key, str(err)) from None
        encoded = vision.encode(self.tokenizer, prompt)
        prompt_ids = encoded.ids
        if not prompt_ids:
            raise RequestError(key, "the prompt encodes to no tokens")
        if (why := outside_vocabulary(prompt_ids, self.vocab_size)) is not None:
            raise RequestError(key, why)
        lenvm = self.lenvm
        if encoded.images is not None and lenvm is not None and not lenvm.sees_images:
            raise RequestError(key, "the prompt has images, which the text-only LenVM cannot read")
        of_images = f", {encoded.image_tokens} of them for its images" if encoded.image_tokens else ""
        request, limit = request.fitted(key, len(prompt_ids), self.context, of_images, self.context_note)
        max_new_tokens = cast(int, request.sampling.max_new_tokens)  # Request.fitted sets it
        control = request.control or Control()
        if (control.active or request.return_values) and self.lenvm is None:
            raise RequestError(key, "a length control or return_values needs an engine with a LenVM")
        if control.target is not None and control.target > self.context:
            raise RequestError(key, f"target {control.target} exceeds the model's context of {self.context}")
        if (why := control.unreachable(max_new_tokens, limit)) is not None:
            raise RequestError(key, why)
        if control.active and lenvm is not None and (why := control.beyond_horizon(lenvm.gamma)) is not None:
            raise RequestError(key, why)
        if request.sampling.top_k >= self.lm_head.weight.shape[0]:  # keeps every token: the filter is off
            request = replace(request, sampling=replace(request.sampling, top_k=0))
        images = encoded.images.to(self.device) if encoded.images is not None else None
        return [
            Sequence.start(key, request, prompt_ids, a, self.device, images) for a in range(request.attempts)
        ]


def sentence_end_ids(tokenizer) -> frozenset[int]:
    """Ids of the tokens that end a sentence or a line (where a retry restarts), in Latin and CJK
    punctuation."""
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    return frozenset(
        i for i, text in enumerate(texts) if "\n" in text or text.rstrip().endswith(SENTENCE_ENDS)
    )


@dataclass
class Update:
    """What one step did to one request: ``tokens`` now stand from position ``start`` of attempt
    ``attempt``'s answer (a ``start`` below the length seen so far means the answer was cut back
    there: to an earlier natural end, or for a retry to resample its end), and ``result`` is set
    once the request is finished. The result is the answer returned, which is an earlier
    attempt's where retries or ``best_of`` found nothing better than it. ``logprobs``,
    ``top_logprobs`` and ``values`` go with ``tokens`` as in :class:`Result` (``values`` are 0 for
    a row without a LenVM)."""

    key: Hashable
    attempt: int
    start: int
    tokens: list[int]
    result: Result | None = None
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    values: list[float] = field(default_factory=list)


class Scheduler:
    """The decoding loop of one engine: requests wait in a queue, run in one batch of at most
    ``batch_size`` rows, and come back as they finish. :meth:`add`, :meth:`abort` and
    :meth:`step` may be interleaved: a request added while others run joins the batch at the
    next step, and an aborted one leaves it at once. Which waiting request joins first is the
    engine's ``queue`` order; :attr:`steps` (steps run so far) is the clock its ageing counts."""

    def __init__(self, engine: Engine, batch_size: int = 8):
        self.batch_size = positive_count(batch_size, "batch_size")
        self.engine = engine
        self.waiting: deque[Sequence] = deque()
        self.batch: Batch | None = None
        self.tried: dict[Hashable, dict[int, Result]] = {}  # best_of requests: finished attempts
        self.steps = 0
        self.arrived: dict[Hashable, int] = {}  # shortest queue: the step each waiting request came
        self.predicted: dict[Hashable, float] = {}  # shortest queue: predicted length per request

    @property
    def busy(self) -> bool:
        return bool(self.waiting) or self.batch is not None

    @property
    def running(self) -> int:
        """Rows in the batch."""
        return 0 if self.batch is None else len(self.batch.seqs)

    def add(self, request: Request, key: Hashable) -> None:
        """Queue ``request``; its updates come back from :meth:`step` under ``key``, which no
        request waiting or running may hold already."""
        taken = any(s.index == key for s in self.waiting) or (
            self.batch is not None and any(s.index == key for s in self.batch.seqs)
        )
        if taken or key in self.tried:
            raise InputError(f"request {key!r} is already queued or running: give each request its own key")
        self.waiting.extend(self.engine.sequences(key, request))
        if self.engine.queue == "shortest":
            self.arrived[key] = self.steps

    def abort(self, key: Hashable) -> None:
        """Drop request ``key``, waiting or running; its row is free for the next step."""
        self.waiting = deque(s for s in self.waiting if s.index != key)
        self.tried.pop(key, None)
        self._forget(key)
        if self.batch is not None:
            rows = [i for i, s in enumerate(self.batch.seqs) if s.index == key]
            if rows:
                with torch.inference_mode():
                    self.batch = self.batch.leave(self.engine, rows)

    def _forget(self, key: Hashable) -> None:
        self.arrived.pop(key, None)
        self.predicted.pop(key, None)

    def _admit(self, count: int) -> list[Sequence]:
        """Take ``count`` sequences off the queue, in the engine's queue order."""
        if self.engine.queue == "fcfs":
            return [self.waiting.popleft() for _ in range(count)]
        unranked = {
            s.index: vision.Encoded(s.prompt_ids, s.images)
            for s in self.waiting
            if not s.missed and s.index not in self.predicted
        }
        if unranked:
            lenvm = cast(LengthValueModel, self.engine.lenvm)  # Engine refuses queue="shortest" without one
            values = lenvm.values_of_prompts(list(unranked.values()), batch_size=len(unranked))
            self.predicted.update(zip(unranked, lenvm.lengths_from_values(values), strict=True))

        def key(seq: Sequence) -> float:
            if seq.missed:  # a retry: first in line, as its request is nearly done
                return -math.inf
            return priority(self.predicted[seq.index], self.arrived[seq.index], self.engine.queue_aging)

        chosen = heapq.nsmallest(count, self.waiting, key=key)  # stable: ties go by arrival
        taken = {id(s) for s in chosen}
        self.waiting = deque(s for s in self.waiting if id(s) not in taken)
        for seq in chosen:
            if not any(s.index == seq.index for s in self.waiting):  # best_of: every attempt admitted
                self._forget(seq.index)
        return chosen

    def step(self) -> list[Update]:
        """Admit waiting rows, generate one token for every row, and report what changed (nothing,
        when no request is waiting or running)."""
        if not self.busy:
            return []
        engine = self.engine
        # Inference mode per step, not around a loop: a caller's code between steps must not
        # run inside it.
        with torch.inference_mode():
            free = self.batch_size - self.running
            if self.waiting and free > 0:
                joining = self._admit(min(free, len(self.waiting)))
                self.batch = Batch.join(engine, self.batch, joining)
            batch = cast(Batch, self.batch)  # busy: rows run, or the rows just admitted form a batch
            seqs = batch.seqs
            finished = batch.step(engine)
            self.steps += 1
        updates = {id(seq): _last_token(seq) for seq in seqs}
        retrying = []
        for row in finished:
            seq = seqs[row]
            update = updates[id(seq)]
            result = seq.result(engine.tokenizer)
            if seq.end_earlier(result):  # the answer now ends earlier: its update says from where
                result = seq.result(engine.tokenizer)
                update = updates[id(seq)] = _last_token(seq)
            if seq.may_retry(result):
                seq.retry(result, engine.sentence_ends)
                retrying.append(row)
                self.waiting.appendleft(seq)  # first in line: its request is nearly done
                continue
            result, attempts = seq.final(result), seq.request.attempts
            if attempts == 1:
                update.result = result
                continue
            tried = self.tried.setdefault(seq.index, {})
            tried[seq.attempt] = result
            if len(tried) == attempts:
                results = [r for _, r in sorted(self.tried.pop(seq.index).items())]  # ties: first attempt
                chosen = best_of(results, target_of(seq.control), seq.control.natural_eos, seq.control.kind)
                update.result = replace(chosen, decoded_tokens=sum(r.decoded_tokens for r in results))
        if finished:  # once the retries are known: they keep the caches they rejoin from
            with torch.inference_mode():
                self.batch = batch.leave(engine, finished, retrying)
        return list(updates.values())


def _last_token(seq: Sequence) -> Update:
    """The update of a row that has just generated a token."""
    return Update(
        seq.index,
        seq.attempt,
        len(seq.tokens) - 1,
        seq.tokens[-1:],
        logprobs=seq.logprobs[-1:],
        top_logprobs=seq.top_logprobs[-1:],
        values=seq.values[-1:],
    )


def _finished(scheduler: Scheduler, bar=None) -> Iterator[tuple[Hashable, Result]]:
    """Step ``scheduler`` until it is idle, yielding ``(key, result)`` as each request finishes;
    a progress ``bar`` also shows the tokens decoded (retries included: long controlled answers
    show they are moving before any request finishes)."""
    decoded = 0
    while scheduler.busy:
        for update in scheduler.step():
            decoded += len(update.tokens)
            if update.result is not None:
                yield update.key, update.result
        if bar is not None:
            bar.set_postfix_str(f"{decoded} tokens decoded", refresh=False)
            bar.update(0)  # redrawn at most every tenth of a second


def _request_list(requests: Iterable[Request], call: str) -> Iterable[Request]:
    if isinstance(requests, Request):
        raise InputError(f"{call} takes a list of requests: wrap one request in a list")
    return requests


def _counted(finished: Iterator[tuple[Hashable, Result]], bar) -> Iterator[tuple[Hashable, Result]]:
    """``finished`` with each result counted on ``bar``, closed at the end (or when abandoned)."""
    try:
        for item in finished:
            bar.update(1)
            yield item
    finally:
        bar.close()


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def set_postfix_str(self, text: str, refresh: bool = True) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="req", desc="generate")
