"""Plumbing shared by the benchmarks: models, sampling settings, resumable results folders.

A results folder holds ``settings.json`` (what every item depends on), ``items.jsonl`` (one
line per finished item, appended as it completes, keyed by a stable ``key``) and the final
files. A rerun with the same settings skips the items already in ``items.jsonl``.
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from lenvm.decoding import Engine, Request
from lenvm.io import (
    InputError,
    JsonlAppender,
    atomic_path,
    iter_jsonl,
    repair_jsonl_tail,
    write_json,
    write_text,
)
from lenvm.model import LengthValueModel
from lenvm.models import DEFAULT_MODEL, load_generator
from lenvm.prompts import encode_prompt

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Models:
    """A loaded generator and, optionally, a LenVM sharing it."""

    generator: Any
    tokenizer: Any
    lenvm: LengthValueModel | None = None
    name: str = DEFAULT_MODEL
    lenvm_name: str | None = None

    def identity(self) -> dict[str, Any]:
        """What a results folder depends on: the models by name, and the LenVM's gamma and head
        weights (a LenVM retrained into the same folder must not reuse old results)."""
        head = None
        if self.lenvm is not None:
            weights = b"".join(
                t.detach().float().cpu().numpy().tobytes() for t in self.lenvm.head.state_dict().values()
            )
            head = hashlib.sha256(weights).hexdigest()[:16]
        return {
            "model": self.name,
            "lenvm": self.lenvm_name,
            "gamma": self.lenvm.gamma if self.lenvm is not None else None,
            "lenvm_head": head,
        }

    def fits(self, prompt, max_new_tokens: int, max_prompt_tokens: int | None = None) -> bool:
        """Whether ``prompt`` plus ``max_new_tokens`` fits the generator's context window, and
        the prompt is at most ``max_prompt_tokens`` long (when given)."""
        config = self.generator.config.get_text_config()
        context = getattr(config, "max_position_embeddings", None) or float("inf")
        length = len(encode_prompt(self.tokenizer, prompt))
        return length + max_new_tokens <= context and length <= (max_prompt_tokens or float("inf"))

    def require_lenvm(self, what: str) -> LengthValueModel:
        if self.lenvm is None:
            raise InputError(f"{what} needs a LenVM (--lenvm)")
        return self.lenvm


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a benchmark's ``dtype`` option."""
    if name not in DTYPES:
        raise InputError(f"unknown dtype {name!r}; expected one of {sorted(DTYPES)}")
    return DTYPES[name]


def load_models(
    model: str | os.PathLike = DEFAULT_MODEL,
    lenvm: str | os.PathLike | None = None,
    device: str = "cpu",
    dtype: str = "float32",
) -> Models:
    """Load the generator and, if given, a LenVM folder on top of it."""
    generator, tokenizer = load_generator(model, device=device, dtype=torch_dtype(dtype))
    value_model = None
    if lenvm is not None:
        value_model = LengthValueModel.from_pretrained(
            lenvm, generator=(generator, tokenizer), device=device, dtype=torch_dtype(dtype)
        )
    return Models(generator, tokenizer, value_model, str(model), str(lenvm) if lenvm else None)


@dataclass(frozen=True)
class Sampling:
    """The decoding policy of a benchmark run; every item's seed derives from ``seed``."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int = 0
    num_candidates: int = 8

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise InputError("max_new_tokens must be at least 1")

    @classmethod
    def for_models(cls, models: Models, max_new_tokens: int, **options: Any) -> Sampling:
        """Options left at None take the LenVM's training policy (a value function is only right
        for the policy that produced its rollouts), else the plain-sampling defaults."""
        trained = (models.lenvm.config.sampling or {}) if models.lenvm is not None else {}
        chosen = {}
        for name, value in options.items():
            if value is None:
                value = trained.get(name)
            if value is not None:
                chosen[name] = value
        return cls(max_new_tokens=max_new_tokens, **chosen)

    def request(self, prompt, seed_key: str, control=None):
        """A decoding request whose seed depends only on ``seed`` and ``seed_key``, so an item
        draws the same randomness whatever the batch it lands in, before and after a resume."""
        return Request(
            prompt,
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            seed=zlib.crc32(f"{self.seed}:{seed_key}".encode()),
            control=control,
        )


@dataclass
class Job:
    """One generation of a benchmark: its key, request, and fields copied into its record."""

    key: str
    request: Any
    fields: dict[str, Any] = field(default_factory=dict)


class Run:
    """A results folder that resumes: settings check, per-item log, atomic final files."""

    def __init__(self, out: str | os.PathLike, settings: dict[str, Any]):
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        settings = json.loads(json.dumps(settings))  # tuples -> lists, as stored
        settings_path = self.out / "settings.json"
        if settings_path.is_file():
            stored = json.loads(settings_path.read_text(encoding="utf-8"))
            changed = sorted(k for k in stored.keys() | settings.keys() if stored.get(k) != settings.get(k))
            if changed:
                raise InputError(
                    f"{self.out} holds results made with other settings ({', '.join(changed)}); "
                    "use another output folder or delete this one"
                )
        else:
            write_json(settings_path, settings)
        self.items_path = self.out / "items.jsonl"
        self.done: dict[str, dict[str, Any]] = {}
        if self.items_path.is_file():
            repair_jsonl_tail(self.items_path)  # a crash may have cut the last line
            self.done = {r["key"]: r for r in iter_jsonl(self.items_path)}
        self._log: JsonlAppender | None = None

    def add(self, records: list[dict[str, Any]]) -> None:
        if self._log is None:
            self._log = JsonlAppender(self.items_path)
        self._log.write(records)
        self.done.update((r["key"], r) for r in records)

    def close(self) -> None:
        if self._log is not None:
            self._log.close()

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def path(self, name: str) -> Path:
        return self.out / name

    def write_json(self, name: str, data: Any) -> None:
        write_json(self.path(name), data)

    def write_text(self, name: str, text: str) -> None:
        write_text(self.path(name), text)

    def save_figure(self, figure, name: str) -> None:
        with atomic_path(self.path(name)) as tmp:
            figure.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
        pyplot().close(figure)

    def run_jobs(
        self,
        jobs: Sequence[Job],
        models: Models,
        sampling: Sampling,
        batch_size: int,
        desc: str,
        progress: bool = True,
        judge: Callable[[Job, Any], dict[str, Any]] | None = None,
    ) -> list[dict[str, Any]]:
        """Generate every job not yet done, appending a record per job as its batch finishes;
        return the records of all ``jobs`` in order. ``judge(job, result)`` adds fields."""
        if batch_size < 1:
            raise InputError("batch size must be at least 1")
        keys = [job.key for job in jobs]
        if len(set(keys)) != len(keys):
            raise ValueError("benchmark item keys must be unique")
        todo = [job for job in jobs if job.key not in self.done]
        if todo:
            engine = _engine(models, sampling, needs_lenvm=any(_controlled(j) for j in todo))
            with tqdm(total=len(jobs), initial=len(jobs) - len(todo), desc=desc, disable=not progress) as bar:
                # Each record is saved as soon as its generation ends.
                for index, result in engine.stream([j.request for j in todo], batch_size=batch_size):
                    self.add([_record(todo[index], result, judge)])
                    bar.update(1)
        return [self.done[key] for key in keys]


def _controlled(job: Job) -> bool:
    control = job.request.control
    return control is not None and control.kind != "none"


def _engine(models: Models, sampling: Sampling, needs_lenvm: bool) -> Engine:
    lenvm = models.require_lenvm("a LenVM-guided method") if needs_lenvm else None
    return Engine(models.generator, models.tokenizer, lenvm=lenvm, num_candidates=sampling.num_candidates)


def _record(job: Job, result, judge) -> dict[str, Any]:
    record = {
        "key": job.key,
        **job.fields,
        "num_tokens": result.num_tokens,
        "finish_reason": result.finish_reason,
        "mean_logprob": result.mean_logprob,
        "eos_prob": result.eos_prob,
        "retries": result.retries,
        "decoded_tokens": result.decoded_tokens,
        "text": result.text,
    }
    if judge is not None:
        record.update(judge(job, result))
    return record


def settings_of(models: Models, sampling: Sampling, **extra: Any) -> dict[str, Any]:
    """The settings every item of a run depends on."""
    return {**models.identity(), **asdict(sampling), **extra}


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (benchmarks run headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines.extend("| " + " | ".join(str(c) for c in row) + " |" for row in rows)
    return "\n".join(lines) + "\n"
