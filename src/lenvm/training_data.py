"""What a training run reads: rollout records, scanned once, then streamed as examples.

Records come from memory (a list), a rollouts JSONL file or a Hugging Face ``datasets`` folder.
A file is either loaded once (small sets) or **streamed**: read afresh on every pass, so
that memory does not grow with the number of records. One scanning pass collects what training
needs to know in advance, in memory proportional to the number of records (8 bytes each, for
the gamma rule) and of prompts, never of tokens: every completion's length (for the p99 gamma
rule), per-prompt counts (for the held-out split and the step counts), that every token id
lies in the vocabulary, and a fingerprint of the run's data (for resuming).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np

from lenvm.dataset import (
    DatasetReport,
    Example,
    TruncatedPolicy,
    held_out_prompts,
    iter_examples,
    nothing_usable,
)
from lenvm.decoding.params import POLICY_SETTINGS, SamplingParams
from lenvm.io import InputError, is_pipe, outside_vocabulary
from lenvm.prompts import image_references, prompt_key
from lenvm.quoting import shortened

# A rollouts file larger than this is streamed unless asked otherwise: loaded, its records take
# several times their size in Python objects.
STREAM_ABOVE_BYTES = 256 * 2**20


class RolloutSource:
    """Rollout records to iterate, possibly several times.

    ``stream=None`` streams a ``datasets`` folder and a JSONL file over
    :data:`STREAM_ABOVE_BYTES`, and loads a smaller file or a pipe; a list is always in memory.
    Streaming a pipe is refused: it can be read only once. A stream's later passes read as many
    records as its first (the scan) read: records appended since (by a rollout run still writing
    the file) were not checked, nor counted in the held-out split and the run's fingerprint.
    """

    def __init__(self, rollouts: str | os.PathLike | Iterable[dict[str, Any]], stream: bool | None = None):
        from lenvm.rollouts import read_rollouts

        self.path: Path | None = None
        self.records: list[dict[str, Any]] | None = None
        self._first_pass: int | None = None  # records a stream's first whole pass read
        if isinstance(rollouts, str | os.PathLike):
            self.path = Path(rollouts)
            if stream and is_pipe(self.path):
                raise InputError(
                    f"{self.path}: streaming reads the rollouts afresh on every pass, and a pipe can be "
                    "read only once: give a file, not a pipe (or stream=False, to hold its records)"
                )
            if stream is None:
                stream = self.path.is_dir() or (
                    self.path.is_file() and self.path.stat().st_size > STREAM_ABOVE_BYTES
                )
            if not stream:
                self.records = read_rollouts(self.path)
        else:
            self.records = list(rollouts)

    @property
    def streamed(self) -> bool:
        return self.records is None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.records) if self.records is not None else self._stream()

    def _stream(self) -> Iterator[dict[str, Any]]:
        from lenvm.rollouts import iter_rollouts

        with contextlib.closing(iter_rollouts(cast(Path, self.path))) as records:  # only a path streams
            if self._first_pass is not None:
                yield from itertools.islice(records, self._first_pass)
                return
            count = 0
            for record in records:
                count += 1
                yield record
            self._first_pass = count


@dataclass
class _PromptCounts:
    completions: int = 0  # usable ones (examples)
    states: int = 0
    finished: int = 0
    finished_tokens: int = 0
    tokens: int = 0


@dataclass
class Scan:
    """What one pass over the records found."""

    records: int
    lengths: np.ndarray  # num_tokens of every record (the gamma rule)
    length_prompts: list[str]  # the prompt id of each of them
    # The prompt of every record, usable or not (its prompt_key), with the prompt ids it came under.
    record_prompts: dict[str, set[str]]
    prompts: dict[str, _PromptCounts]  # of the usable examples
    report: DatasetReport
    digest: str = ""  # of every record's prompt id, tokens and ending (the run's fingerprint)
    policy: dict[str, Any] = field(default_factory=dict)  # the first record's generator and sampling
    repeated: int = 0  # records that repeat an earlier one: prompt, sample index and tokens alike

    def counts(self, prompt_ids: Iterable[str]) -> _PromptCounts:
        total = _PromptCounts()
        for pid in prompt_ids:
            c = self.prompts[pid]
            total.completions += c.completions
            total.states += c.states
            total.finished += c.finished
            total.finished_tokens += c.finished_tokens
            total.tokens += c.tokens
        return total


def scan(
    source: Iterable[dict[str, Any]],
    eos_token_ids: list[int],
    truncated: TruncatedPolicy,
    max_length: int | None,
    vocab_size: int,
    vocab_name: str,
    sees_images: bool = True,
    tokenizer=None,
    what: str = "rollout records to train on",
    context: int | None = None,
) -> Scan:
    """One pass: lengths, prompt counts, the vocabulary check (and, for a text-only model
    ``sees_images=False``, that no prompt has images), that every record was sampled under one
    decoding policy, and the run's fingerprint data. Given the model's ``tokenizer``, the first
    records' prompt tokens must read back as their prompt text (else the rollouts came from a
    generator with another tokenizer). ``what`` names the records in the error when there are
    none. Given the model's ``context``, a record longer than it is an error, unless ``max_length``
    (no longer than the context) leaves it out."""
    lengths: list[int] = []
    length_prompts: list[str] = []
    record_prompts: dict[str, set[str]] = {}
    digest = hashlib.sha256()
    policy: dict[str, Any] = {}
    seen: set[bytes] = set()
    repeated = 0

    def checked() -> Iterator[dict[str, Any]]:
        nonlocal repeated
        first_policy = None
        one_policy = "a LenVM models one decoding policy; train it on rollouts of one"
        for i, record in enumerate(source):
            settings = _check_record(
                record, i, vocab_size, vocab_name, tokenizer, first_policy, "the first", one_policy
            )
            first_policy = first_policy or settings
            if context is not None and (max_length is None or max_length > context):
                check_length(
                    record, i, context, vocab_name, f"train with --max-length {context} to leave them out"
                )
            if not sees_images and image_references(record.get("prompt")):
                raise InputError(
                    f"rollout record {i + 1}'s prompt has images, which {vocab_name!r} (text-only) "
                    "cannot read"
                )
            lengths.append(record["num_tokens"])
            length_prompts.append(str(record.get("prompt_id", i)))
            key = prompt_key(record)
            record_prompts.setdefault(key, set()).add(str(record.get("prompt_id", i)))
            if i == 0:
                policy.update(generator=record.get("generator"), sampling=record.get("sampling"))
            # Every record counts: a features cache or checkpoint is reused only on the same data.
            digest.update(f"{record.get('prompt_id', i)}\0{record['finish_reason']}\0".encode())
            prompt_ids, completion_ids = (
                np.asarray(record[key], dtype=np.int64).tobytes()
                for key in ("prompt_token_ids", "completion_token_ids")
            )
            digest.update(prompt_ids + b"\0" + completion_ids + b"\0")
            # The same sample twice: two runs wrote into one file (different seeds give other tokens).
            sample = f"{record.get('prompt_id')}\0{record.get('sample_index')}\0".encode()
            same = hashlib.sha256(sample + completion_ids).digest()[:16]
            if same in seen:
                repeated += 1
            seen.add(same)
            yield record

    report = DatasetReport(0, 0, 0, 0, 0, 0)
    prompts: dict[str, _PromptCounts] = {}
    for e in iter_examples(checked(), eos_token_ids, truncated, max_length, report):
        c = prompts.setdefault(e.prompt_id, _PromptCounts())
        c.completions += 1
        c.states += e.num_states
        c.tokens += e.length
        if e.finished:
            c.finished += 1
            c.finished_tokens += e.length
    if not lengths:
        raise InputError(f"no {what}")
    if not prompts:
        raise nothing_usable(report, truncated, max_length)
    return Scan(
        len(lengths),
        np.asarray(lengths, dtype=np.int64),
        length_prompts,
        record_prompts,
        prompts,
        report,
        digest.hexdigest(),
        policy,
        repeated,
    )


class ExampleStream:
    """The examples of some prompts of a source, re-read on each iteration (or held, when the
    source is in memory). ``len()`` is known from the scan. Held examples are in a canonical order
    (by prompt id, then tokens), so that the same records train the same LenVM however a file
    holds them (a resumed rollout run, or another batch size, writes them in another order); a
    stream's order follows its file."""

    def __init__(
        self,
        source: RolloutSource,
        eos_token_ids: list[int],
        truncated: TruncatedPolicy,
        max_length: int | None,
        keep: set[str] | None = None,
        drop: set[str] | None = None,
        size: int | None = None,
    ):
        self.source, self.eos, self.truncated, self.max_length = source, eos_token_ids, truncated, max_length
        self.keep, self.drop = keep, drop
        self._held = (
            None if source.streamed else sorted(self._read(), key=lambda e: (e.prompt_id, e.input_ids))
        )
        self.size = len(self._held) if self._held is not None else size

    def _read(self) -> Iterator[Example]:
        for e in iter_examples(self.source, self.eos, self.truncated, self.max_length):
            if (self.keep is None or e.prompt_id in self.keep) and (
                self.drop is None or e.prompt_id not in self.drop
            ):
                yield e

    @property
    def held(self) -> list[Example] | None:
        """The examples, when the source is in memory; None when they are streamed."""
        return self._held

    def __iter__(self) -> Iterator[Example]:
        return iter(self._held) if self._held is not None else self._read()

    def __len__(self) -> int:
        if self.size is None:  # a TypeError, as list() takes it: no length hint, nothing more
            raise TypeError("the examples are streamed and were not counted: their number is unknown")
        return self.size


@dataclass
class TrainingData:
    """Training examples (streamed or held), held-out examples (always held), and their counts."""

    train: ExampleStream
    eval: list[Example]
    report: DatasetReport
    gamma_lengths: np.ndarray
    train_states: int
    train_completions: int
    baseline_length: float  # the mean length of the finished training completions
    fingerprint_data: list[Any]
    policy: dict[str, Any]
    repeated: int = 0  # training records that repeat an earlier one (they count twice)


_DEFAULT_SAMPLING = SamplingParams()  # what a record that leaves a setting out sampled with
TOKENIZER_CHECKS = 4  # records whose prompt tokens are read back (the first of the file)


def decoding_policy(sampling: dict[str, Any] | None) -> dict[str, Any]:
    """The settings of a record's ``sampling`` that make its decoding policy (not its length
    limit or backend): rollouts that share them sample the same distribution."""
    return {k: (sampling or {}).get(k, getattr(_DEFAULT_SAMPLING, k)) for k in POLICY_SETTINGS}


def check_rollouts_for(lenvm, records: list[dict[str, Any]], purpose: str) -> None:
    """Rollouts that ``lenvm`` reads after training (to ``purpose`` them): token ids within its
    vocabulary, prompt tokens that its tokenizer reads back, and sampled under the decoding policy
    that its training rollouts were."""
    from lenvm.model import embedding_matrix

    vocab_size = embedding_matrix(lenvm.backbone).shape[0]
    name = lenvm.config.base_model
    trained = decoding_policy(lenvm.config.sampling) if lenvm.config.sampling is not None else None
    whose, advice = "the LenVM's training rollouts", f"{purpose} rollouts of the policy it models"
    fix = f"{purpose} rollouts of {name!r}"
    for i, record in enumerate(records):
        _check_record(record, i, vocab_size, name, lenvm.tokenizer, trained, whose, advice, fix)
        check_length(record, i, lenvm.context, name, f"{purpose} rollouts that fit it")


def check_length(record: dict[str, Any], index: int, context: int, name: str, advice: str) -> None:
    """Refuse record ``index`` if its prompt and answer together are longer than ``context``: the
    model cannot read it whole (rollouts made elsewhere, with a longer context)."""
    n = len(record["prompt_token_ids"]) + len(record["completion_token_ids"])
    if n > context:
        raise InputError(
            f"rollout record {index + 1} is {n} tokens long (prompt and answer), beyond the context of "
            f"{name!r} ({context} tokens): were the rollouts made with a longer context? {advice}"
        )


def _check_record(
    record: dict[str, Any],
    index: int,
    vocab_size: int,
    name: str,
    tokenizer,
    policy: dict[str, Any] | None,
    whose: str,
    advice: str,
    fix: str = "train on the generator that sampled them (--base)",
) -> dict[str, Any]:
    """Record ``index`` as a LenVM on the model ``name`` reads it: token ids within its
    vocabulary, prompt tokens its ``tokenizer`` reads back (the first records, given a tokenizer)
    and, given a ``policy`` (``whose``), sampled under it. Returns the record's decoding policy."""
    ids = record["prompt_token_ids"] + record["completion_token_ids"]
    if (why := outside_vocabulary(ids, vocab_size, f"rollout record {index + 1}")) is not None:
        raise InputError(f"{why} of {name!r}: were the rollouts made with another tokenizer?")
    if tokenizer is not None and index < TOKENIZER_CHECKS:
        check_prompt_tokens(record, index, tokenizer, name, fix)
    settings = decoding_policy(record.get("sampling"))
    if policy is not None and settings != policy:
        raise InputError(
            f"rollout record {index + 1} was sampled with {settings}, {whose} with {policy}: {advice}"
        )
    return settings


def check_prompt_tokens(
    record: dict[str, Any],
    index: int,
    tokenizer,
    name: str,
    fix: str = "train on the generator that sampled them (--base)",
) -> None:
    """Refuse rollout record ``index`` (0-based) when its prompt token ids do not read back as its
    prompt with ``tokenizer`` (of the model ``name``): they came from another tokenizer; ``fix``
    says what to do instead."""
    prompt = record.get("prompt")
    if isinstance(prompt, list) and prompt and isinstance(prompt[-1], dict):
        prompt = prompt[-1].get("content")  # the last message, when its content is plain text
    if not isinstance(prompt, str) or not prompt.strip():
        return
    decoded = tokenizer.decode(record["prompt_token_ids"])
    if "".join(prompt.split()) not in "".join(decoded.split()):
        raise InputError(
            f"rollout record {index + 1}'s prompt tokens do not read back as its prompt with the tokenizer "
            f"of {name!r}: the rollouts came from {record.get('generator')!r}, whose tokenizer differs; {fix}"
        )


def training_data(
    source: RolloutSource,
    eval_source: RolloutSource | None,
    eos_token_ids: list[int],
    truncated: TruncatedPolicy,
    max_length: int | None,
    eval_fraction: float,
    seed: int,
    vocab_size: int,
    vocab_name: str,
    sees_images: bool = True,
    tokenizer=None,
    context: int | None = None,
) -> TrainingData:
    """Scan the sources (see :func:`scan`), hold out prompts, and set up the training stream."""
    if not 0.0 <= eval_fraction < 1.0:
        raise InputError(f"eval fraction must lie in [0, 1), got {eval_fraction}")
    found = scan(
        source, eos_token_ids, truncated, max_length, vocab_size, vocab_name, sees_images, tokenizer,
        context=context,
    )  # fmt: skip
    if eval_source is not None:
        held_scan = scan(
            eval_source,
            eos_token_ids,
            truncated,
            None,
            vocab_size,
            vocab_name,
            sees_images,
            tokenizer,
            what="evaluation rollout records",
            context=context,
        )
        ours, theirs = (decoding_policy(s.policy.get("sampling")) for s in (found, held_scan))
        if ours != theirs:
            raise InputError(
                f"the evaluation rollouts were sampled with {theirs}, the training rollouts with {ours}: "
                "held-out figures must come from the same decoding policy"
            )
        # By the prompt itself, not its id: two files' default ids (0, 1, ...) name other prompts.
        shared = found.record_prompts.keys() & held_scan.record_prompts.keys()
        if shared:
            raise InputError(
                f"{len(shared)} prompt(s) are in both the training and the evaluation rollouts, "
                f"for example {shortened(sorted(shared)[0])}: held-out prompts must not be trained on"
            )
        held: set[str] = set()
        evaluation = list(iter_examples(eval_source, eos_token_ids, truncated))
    else:
        held = held_out_prompts(list(found.prompts), eval_fraction, seed)
        # The split goes by prompt id: one prompt under several ids (a request id per sample, from
        # another tool) may land on both sides of it.
        leaked = sorted(t for t, ids in found.record_prompts.items() if ids & held and ids - held)
        if leaked:
            warnings.warn(
                f"{len(leaked)} held-out prompt(s) are trained on too, under other prompt ids (for example "
                f"{shortened(leaked[0])}): the held-out figures flatter the LenVM; give each prompt one id, "
                "or hold prompts out in a file of their own (eval_rollouts)",
                stacklevel=3,
            )
        evaluation = list(ExampleStream(source, eos_token_ids, truncated, max_length, keep=held))
    train_ids = [p for p in found.prompts if p not in held]
    counts = found.counts(train_ids)
    train = ExampleStream(source, eos_token_ids, truncated, max_length, drop=held, size=counts.completions)
    baseline = (
        counts.finished_tokens / counts.finished if counts.finished else counts.tokens / counts.completions
    )
    return TrainingData(
        train=train,
        eval=evaluation,
        report=found.report,
        # The p99 rule over the training prompts' completions: none of the held-out lengths leak in.
        gamma_lengths=found.lengths[[p not in held for p in found.length_prompts]],
        train_states=counts.states,
        train_completions=counts.completions,
        baseline_length=float(baseline),
        fingerprint_data=[found.records, found.digest],
        policy=found.policy,
        repeated=found.repeated,
    )


def shuffled(examples: Iterable[Example], seed: list[int], buffer: int) -> Iterator[Example]:
    """``examples`` in random order: a full permutation of a list, a bounded-buffer shuffle of a
    stream.

    The buffer shuffle holds ``buffer`` examples and emits a random one of them as each new one
    arrives, so an example moves at most about ``buffer`` places earlier and a few buffer
    lengths later: rollout files group a prompt's samples together, and a buffer much larger
    than the samples per prompt spreads them over many batches, but it cannot mix the start
    of a file with its end the way a full permutation does.
    """
    rng = np.random.default_rng(seed)
    held = examples.held if isinstance(examples, ExampleStream) else examples
    if isinstance(held, list):
        for i in rng.permutation(len(held)):
            yield held[i]
        return
    pool: list[Example] = []
    for e in examples:
        if len(pool) < buffer:
            pool.append(e)
            continue
        j = int(rng.integers(len(pool)))
        yield pool[j]
        pool[j] = e
    for j in rng.permutation(len(pool)):
        yield pool[j]
