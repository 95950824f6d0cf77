"""Length predictions for a file of prompts, written as they come and resumed after a stop.

    stats = predict_file(lenvm, read_prompts("requests.jsonl"), "predictions.jsonl", batch_size=32)

One JSON line per prompt, ``{"id", "predicted_length", "prompt_tokens", "prompt_sha",
"lenvm"}``, appended a chunk of batches at a time (an interruption loses at most the chunk in
flight); run again on the same output file, only the prompts not yet in it are predicted. The
last two fingerprint the prompt's tokens and the LenVM's config, so that a rerun with another
LenVM, or with a prompt changed under the same id, is refused rather than mixed in; so is a file
whose lines lack them (an older lenvm's), which cannot be checked. Prompts run sorted by length,
one forward per batch, so that little of a forward is padding; once every prompt is in the file,
its lines are put back in the order of the prompts.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from lenvm.hub import model_name
from lenvm.io import (
    InputError,
    JsonlAppender,
    RunLock,
    fingerprint,
    json_text,
    positive_count,
    read_jsonl,
    read_jsonl_to_append,
    refuse_renamed,
    replaceable,
    write_text,
)
from lenvm.model import LengthValueConfig, LengthValueModel
from lenvm.prompts import Prompt

BATCHES_PER_CHUNK = 8


@dataclass
class PredictionStats:
    """What one :func:`predict_file` call did; ``seconds`` counts the forwards, not the loading."""

    prompts: int  # in the file
    predicted: int  # by this call
    skipped: int  # already in the output file
    seconds: float
    batch_size: int

    @property
    def prompts_per_second(self) -> float:
        return self.predicted / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "prompts_per_second": round(self.prompts_per_second, 1)}


def predict_file(
    lenvm: LengthValueModel,
    prompts: list[Prompt],
    out: str | os.PathLike,
    batch_size: int = 32,
    progress: bool = True,
) -> PredictionStats:
    """Predict the answer length of every prompt into the JSONL file ``out`` (see the module doc).
    Every prompt is encoded and checked (context length) before any forward runs."""
    if not prompts:
        raise InputError("no prompts to predict for")
    batch_size = positive_count(batch_size, "batch_size")
    ids = [p.id for p in prompts]
    if len(set(ids)) != len(ids):
        raise InputError("prompt ids must be unique: resuming matches predictions by prompt id")
    out = replaceable(out)  # a link's file, never a device
    every = lenvm.encode_prompts(prompts)
    shas = {p.id: fingerprint(e.ids) for p, e in zip(prompts, every, strict=True)}
    # The LenVM, and what its values also depend on: the generator it was loaded with, the dtype.
    weights = next(lenvm.backbone.parameters())
    model = fingerprint(
        [_identity(lenvm.config), model_name(getattr(lenvm.backbone, "name_or_path", "")), str(weights.dtype)]
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    with RunLock(out, "predicting into this file"):
        done = set()
        other_ids: dict[str, str] = {}  # a prompt's fingerprint -> an id it has in the file, not among ours
        for record in read_jsonl_to_append(out, _prediction_problem, "predictions"):
            _check_resumable(record, out, model, shas)
            done.add(pid := str(record.get("id")))
            if pid not in shas:
                other_ids.setdefault(record["prompt_sha"], pid)
        todo = [p for p in prompts if p.id not in done]
        for prompt in todo:
            refuse_renamed(out, prompt.id, other_ids.get(shas[prompt.id]))
        encoded = [e for p, e in zip(prompts, every, strict=True) if p.id not in done]
        # Sorted by length: batches of similar lengths, little padding; a chunk is written at once.
        order = sorted(range(len(todo)), key=lambda i: len(encoded[i].ids))
        chunk = batch_size * BATCHES_PER_CHUNK
        seconds = 0.0
        with (
            JsonlAppender(out) as appender,
            tqdm(total=len(prompts), initial=len(prompts) - len(todo), unit="prompt", desc="predicting",
                 disable=not progress) as bar,
        ):  # fmt: skip
            for start in range(0, len(order), chunk):
                part = order[start : start + chunk]
                clock = time.perf_counter()
                values = lenvm.values_of_prompts([encoded[i] for i in part], batch_size)
                seconds += time.perf_counter() - clock
                lengths = lenvm.lengths_from_values(values)
                appender.write(
                    [
                        {
                            "id": todo[i].id,
                            "predicted_length": round(n, 2),
                            "prompt_tokens": len(encoded[i].ids),
                            "prompt_sha": shas[todo[i].id],
                            "lenvm": model,
                        }
                        for i, n in zip(part, lengths, strict=True)
                    ]
                )
                bar.update(len(part))
        _in_prompt_order(out, ids)
    return PredictionStats(len(prompts), len(todo), len(prompts) - len(todo), seconds, batch_size)


def _prediction_problem(record: dict[str, Any]) -> str | None:
    missing = [k for k in ("id", "predicted_length") if k not in record]
    return f"no {' or '.join(missing)}" if missing else None


def _in_prompt_order(out: Path, ids: list[str]) -> None:
    """Rewrite ``out`` (atomically) with its lines in the order of ``ids``; lines of prompts that
    are not among them (an earlier run's) go last, in their order."""
    records = read_jsonl(out)
    rank = {pid: i for i, pid in enumerate(ids)}
    ordered = sorted(records, key=lambda r: rank.get(str(r.get("id")), len(ids)))
    if ordered != records:
        write_text(out, "".join(json_text(r, ensure_ascii=False) + "\n" for r in ordered))  # as appended


def _identity(config: LengthValueConfig) -> dict[str, Any]:
    """The fields of ``config`` that tell one LenVM's predictions from another's: neither the
    folder's format version nor fields this lenvm does not know change a value (and leaving them
    out resumes files written before the config had them)."""
    return {k: v for k, v in asdict(config).items() if k not in ("format_version", "extra_fields")}


def _check_resumable(record: dict[str, Any], out: Path, model: str, shas: dict[str, str]) -> None:
    """Refuse to resume into ``out`` when ``record`` came from another LenVM or another prompt
    under its id, or cannot be checked for either (an older lenvm wrote no fingerprints)."""
    if "lenvm" not in record or "prompt_sha" not in record:
        raise InputError(
            f"{out} was written by an older lenvm, without the fingerprints of the LenVM and the prompt "
            "that show its predictions are this run's: they cannot be checked; predict into a new file, "
            "or delete it to start over"
        )
    if record["lenvm"] != model:
        raise InputError(
            f"{out} holds predictions of another LenVM (or of this one on another generator or dtype, or "
            "written by another lenvm version, which fingerprints a LenVM differently): predict into a "
            "new file, or delete it to start over"
        )
    pid = str(record.get("id"))
    if pid in shas and record["prompt_sha"] != shas[pid]:
        raise InputError(
            f"{out}: prompt {pid!r} is not the prompt predicted under that id before: predict into a new "
            "file, or delete it to start over"
        )
