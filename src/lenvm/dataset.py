"""From rollout records to supervised value targets.

A completion of ``L`` generated tokens supervises the states ``s_0 .. s_{L-1}``: from the last
prompt token to the last non-EOS token. A finished one (ended by EOS) has Monte-Carlo targets
``-(1 - gamma**(L - t))``. A cut one (``finish_reason == "length"``, ``T`` tokens, no EOS)
either bootstraps from the model's value at the cut, ``V(s_T)``, or is dropped.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from lenvm import vision
from lenvm.io import InputError, is_int
from lenvm.prompts import image_references
from lenvm.returns import length_to_value

TruncatedPolicy = Literal["bootstrap", "drop"]


@dataclass(frozen=True)
class Example:
    """One completion, ready for the model.

    ``input_ids`` is prompt + completion. State ``s_t`` ends at index ``start + t``; states
    ``t = 0 .. num_states - 1`` are supervised. For a cut completion the bootstrap state
    ``s_T`` ends at index ``start + num_states`` (its last token). ``images``: the references of
    the prompt's images, whose tokens lie inside the prompt (never states). ``record``: the rollout
    record it came from, counted from 1 (None for a completion given otherwise).
    """

    prompt_id: str
    input_ids: list[int]
    start: int
    num_states: int
    finished: bool
    images: tuple[str, ...] = ()
    record: int | None = None

    @property
    def name(self) -> str:
        """How errors name it: its rollout record, where it came from one, and its prompt id."""
        if self.record is None:
            return f"prompt {self.prompt_id!r}"
        return f"rollout record {self.record} (prompt id {self.prompt_id!r})"

    @property
    def length(self) -> int:
        """Generated tokens, EOS included for a finished completion."""
        return self.num_states

    @property
    def bootstrap_index(self) -> int | None:
        return None if self.finished else self.start + self.num_states


@dataclass
class DatasetReport:
    completions: int
    finished: int
    truncated: int
    dropped: int
    prompts: int
    supervised_tokens: int

    def to_dict(self) -> dict[str, int]:
        return self.__dict__.copy()


def examples_from_records(
    records: Iterable[dict[str, Any]],
    eos_token_ids: list[int],
    truncated: TruncatedPolicy = "bootstrap",
    max_length: int | None = None,
) -> tuple[list[Example], DatasetReport]:
    """Turn rollout records into :class:`Example` objects and count what was kept."""
    report = DatasetReport(0, 0, 0, 0, 0, 0)
    examples = list(iter_examples(records, eos_token_ids, truncated, max_length, report))
    if not examples:
        raise nothing_usable(report, truncated, max_length)
    return examples, report


def nothing_usable(report: DatasetReport, truncated: TruncatedPolicy, max_length: int | None) -> InputError:
    """The error for rollouts of which no completion trains, with what became of them."""
    limit = f"prompt and completion longer than max_length {max_length}" if max_length else None
    causes = [c for c in ("truncated with truncated='drop'" if truncated == "drop" else None, limit) if c]
    return InputError(
        f"no usable completions in the rollouts: of {report.completions}, {report.finished} finished, "
        f"{report.truncated} truncated, {report.dropped} dropped"
        + (f" ({' or '.join(causes)})" if causes else "")
    )


def iter_examples(
    records: Iterable[dict[str, Any]],
    eos_token_ids: list[int],
    truncated: TruncatedPolicy = "bootstrap",
    max_length: int | None = None,
    report: DatasetReport | None = None,
) -> Iterator[Example]:
    """:func:`examples_from_records` one at a time; counts into ``report`` as it goes (its
    ``prompts`` field is complete once the iterator is exhausted)."""
    if truncated not in ("bootstrap", "drop"):
        raise InputError(f"truncated must be 'bootstrap' or 'drop', got {truncated!r}")
    report = report if report is not None else DatasetReport(0, 0, 0, 0, 0, 0)
    eos = set(eos_token_ids)
    prompts: set[str] = set()
    for i, record in enumerate(records):
        prompt_ids = record.get("prompt_token_ids")
        completion = record.get("completion_token_ids")
        if not prompt_ids or completion is None:
            raise InputError(f"rollout record {i + 1} has no prompt_token_ids or completion_token_ids")
        finished = record.get("finish_reason") == "stop"
        completion = list(completion)
        report.completions += 1
        if finished:
            report.finished += 1
            if not completion or completion[-1] not in eos:
                # Stopped by a stop string rather than EOS: the EOS is implied.
                completion.append(eos_token_ids[0])
            input_ids = list(prompt_ids) + completion[:-1]  # EOS is never an input state
        else:
            report.truncated += 1
            if truncated == "drop" or not completion:
                report.dropped += 1
                continue
            input_ids = list(prompt_ids) + completion
        if max_length is not None and len(input_ids) > max_length:
            report.dropped += 1
            continue
        images = tuple(image_references(record.get("prompt")))
        prompt_id = str(record.get("prompt_id", i))
        example = Example(prompt_id, input_ids, len(prompt_ids) - 1, len(completion), finished, images, i + 1)
        prompts.add(example.prompt_id)
        report.prompts = len(prompts)
        report.supervised_tokens += example.num_states
        yield example


def forward_images(tokenizer, examples: list[Example], device) -> dict[str, torch.Tensor]:
    """The forward keyword arguments with the pixel inputs of ``examples``' prompt images
    (:func:`lenvm.vision.forward_images`); an image that cannot be read names the record that
    referenced it, which a large rollouts file needs."""
    rows = [(e.input_ids, e.images) for e in examples]
    return vision.forward_images(tokenizer, rows, device, [e.name for e in examples])


def held_out_prompts(prompt_ids: list[str], eval_fraction: float, seed: int = 0) -> set[str]:
    """The prompt ids held out of training, whole prompts so that evaluation never sees a prompt
    trained on: ``eval_fraction`` of the distinct ids (at least one where it is above 0, never
    all), drawn by ``seed``."""
    unique = sorted(set(prompt_ids))
    random.Random(seed).shuffle(unique)
    n_eval = round(len(unique) * eval_fraction)
    if eval_fraction > 0 and n_eval == 0:
        n_eval = 1
    n_eval = min(n_eval, len(unique) - 1)  # keep at least one prompt to train on
    return set(unique[:n_eval])


@dataclass
class Batch:
    """Right-padded sequences with per-position targets.

    ``mc`` holds the Monte-Carlo part of each target and ``discount`` the factor on the
    bootstrap value ``gamma**(T - t)`` (0 for finished completions); ``boot_index`` is the
    position of the bootstrap state in the same row (0 where unused); ``states`` the number of
    supervised states of each row's completion.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    supervised: torch.Tensor
    mc: torch.Tensor
    discount: torch.Tensor
    boot_index: torch.Tensor
    states: torch.Tensor

    def to(self, device) -> Batch:
        return Batch(*(t.to(device) for t in self.__dict__.values()))


def position_targets(example: Example, gamma: float) -> tuple[np.ndarray, np.ndarray]:
    """Monte-Carlo part and bootstrap discount of each supervised state's target."""
    steps = np.arange(example.num_states, 0, -1, dtype=np.float64)
    discount = np.zeros_like(steps) if example.finished else gamma**steps
    return length_to_value(steps, gamma), discount


def collate(examples: list[Example], gamma: float, pad_id: int = 0) -> Batch:
    width = max(len(e.input_ids) for e in examples)
    shape = (len(examples), width)
    ids = torch.full(shape, pad_id, dtype=torch.long)
    mask = torch.zeros(shape, dtype=torch.long)
    supervised = torch.zeros(shape, dtype=torch.bool)
    mc = torch.zeros(shape)
    discount = torch.zeros(shape)
    boot = torch.zeros(len(examples), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        mask[row, :n] = 1
        span = slice(e.start, e.start + e.num_states)
        supervised[row, span] = True
        row_mc, row_discount = position_targets(e, gamma)
        mc[row, span] = torch.from_numpy(row_mc).float()
        discount[row, span] = torch.from_numpy(row_discount).float()
        boot[row] = e.bootstrap_index or 0
    states = torch.tensor([e.num_states for e in examples])
    return Batch(ids, mask, supervised, mc, discount, boot, states)


def padded_batches(
    lenvm,
    records: Iterable[dict[str, Any]] | str | os.PathLike,
    purpose: str,
    batch_size: int = 8,
    progress: bool = False,
    desc: str = "rollouts",
) -> Iterator[tuple[list[Example], Batch]]:
    """The completions of ``records`` as examples in padded batches for one forward of ``lenvm``
    each (collated with its gamma and pad token, on its device), shortest first so that a batch
    pads little. Raises a clear error, naming ``purpose``, when there are none or they do not fit
    the LenVM (:func:`lenvm.training_data.check_rollouts_for`)."""
    from tqdm.auto import tqdm

    from lenvm.rollouts import read_rollouts
    from lenvm.training_data import check_rollouts_for

    if not is_int(batch_size) or batch_size < 1:
        raise InputError(f"batch_size must be an integer of at least 1, got {batch_size!r}")
    records = read_rollouts(records) if isinstance(records, str | os.PathLike) else list(records)
    check_rollouts_for(lenvm, records, purpose)
    examples = sorted(iter_examples(records, lenvm.config.eos_token_ids), key=lambda e: len(e.input_ids))
    if not examples:
        raise InputError(f"no rollouts to {purpose}")
    pad = lenvm.tokenizer.pad_token_id or 0
    for start in tqdm(range(0, len(examples), batch_size), desc=desc, unit="batch", disable=not progress):
        chunk = examples[start : start + batch_size]
        yield chunk, collate(chunk, lenvm.gamma, pad).to(lenvm.device)
