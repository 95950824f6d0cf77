"""Plumbing shared by the benchmarks: models, sampling settings, resumable results folders.

A results folder holds ``settings.json`` (what every item depends on), ``items.jsonl`` (one
line per finished item, appended as it completes, keyed by a stable ``key``) and the final
files. A rerun with the same settings skips the items already in ``items.jsonl``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from lenvm.decoding import Engine, Request, SamplingParams
from lenvm.figures import save_png
from lenvm.hub import DEFAULT_MODEL, load_generator
from lenvm.io import (
    InputError,
    JsonlAppender,
    RunLock,
    changed_settings,
    iter_jsonl,
    json_text,
    positive_count,
    repair_jsonl_tail,
    write_json,
    write_text,
)
from lenvm.model import LengthValueModel, generator_for
from lenvm.prompts import encode_prompt

if TYPE_CHECKING:
    from matplotlib.figure import Figure

BACKENDS = ("engine", "vllm")
# Tokens of the short untimed call that precedes timing: enough to run every one-off cost (lazy
# imports, allocations, kernel selection) once, few enough not to double a run.
WARMUP_TOKENS = 8


@dataclass
class Models:
    """A loaded generator and, optionally, a LenVM sharing it."""

    generator: Any
    tokenizer: Any
    lenvm: LengthValueModel | None = None
    name: str = DEFAULT_MODEL
    lenvm_name: str | None = None
    backend: str = "engine"  # what generates: our engine, or vLLM with the LenVM's processor

    @property
    def dtype(self) -> str:
        """The generator's dtype by name (``float32``), for a backend that loads it again."""
        return str(next(self.generator.parameters()).dtype).removeprefix("torch.")

    def identity(self) -> dict[str, Any]:
        """What a results folder depends on: the models by name, and the LenVM's gamma, head
        weights and calibration (a LenVM retrained or calibrated in its folder must not reuse old
        results)."""
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
            "calibration": self.lenvm.config.calibration if self.lenvm is not None else None,
            "backend": self.backend,
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


def load_models(
    model: str | os.PathLike | None = None,
    lenvm: str | os.PathLike | None = None,
    device: str | None = None,
    dtype: str = "float32",
    backend: str = "engine",
) -> Models:
    """Load the generator and, if given, a LenVM folder on top of it. ``backend="vllm"``
    generates with vLLM and the LenVM's logits processor instead of our engine (one pass: no
    retries, no best_of; the models loaded here still check prompts and read the LenVM)."""
    if backend not in BACKENDS:
        raise InputError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    model = generator_for(model, lenvm)
    generator, tokenizer = load_generator(model, device=device, dtype=dtype)
    value_model = None
    if lenvm is not None:
        value_model = LengthValueModel.from_pretrained(lenvm, generator=(generator, tokenizer), dtype=dtype)
    return Models(generator, tokenizer, value_model, str(model), str(lenvm) if lenvm else None, backend)


def bench_sampling(
    models: Models,
    max_new_tokens: int,
    seed: int | None = 0,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    min_p: float | None = None,
) -> SamplingParams:
    """A benchmark's decoding policy; every item's seed derives from ``seed`` (None: 0).
    Options left at None take the LenVM's training policy (a value function is only right for
    the policy that produced its rollouts), else the plain-sampling defaults."""
    trained = models.lenvm.config.sampling if models.lenvm is not None else None
    chosen = {"temperature": temperature, "top_p": top_p, "top_k": top_k, "min_p": min_p}
    return SamplingParams.from_policy(
        {k: v for k, v in (trained or {}).items() if k in chosen},
        max_new_tokens=max_new_tokens,
        seed=seed or 0,
        **{k: v for k, v in chosen.items() if v is not None},
    )


def item_request(sampling: SamplingParams, prompt, seed_key: str, control=None) -> Request:
    """A decoding request whose seed depends only on ``sampling.seed`` and ``seed_key``, so an
    item draws the same randomness whatever the batch it lands in, before and after a resume."""
    seed = zlib.crc32(f"{sampling.seed}:{seed_key}".encode())
    return Request(prompt, replace(sampling, seed=seed), control=control)


@dataclass
class Job:
    """One generation of a benchmark: its key, request, and fields copied into its record."""

    key: str
    request: Any
    fields: dict[str, Any] = field(default_factory=dict)


def refuse_model_folder(out: str | os.PathLike) -> None:
    """Results never go into a model's or a LenVM's folder (one that holds a ``config.json``)."""
    if (Path(out) / "config.json").is_file():
        raise InputError(f"{out} is a model's folder (it holds config.json): use another output folder")


class Run:
    """A results folder that resumes: settings check, per-item log, atomic final files."""

    def __init__(self, out: str | os.PathLike, settings: dict[str, Any]):
        self.out = Path(out)
        settings_path = self.out / "settings.json"
        if self.out.exists() and not self.out.is_dir():
            raise InputError(f"{self.out}: a file, not a results folder")
        if self.out.is_dir() and any(self.out.iterdir()) and not settings_path.is_file():
            raise InputError(
                f"{self.out} holds files that are not a benchmark's results (a model's folder?); "
                "use another output folder"
            )
        self.out.mkdir(parents=True, exist_ok=True)
        # Two runs into one folder would mix their settings and answers: the second is refused.
        self._lock = RunLock(self.out, "writing this results folder")
        try:
            self._open(settings_path, settings)
        except BaseException:
            self._lock.release()
            raise
        self._log: JsonlAppender | None = None

    def _open(self, settings_path: Path, settings: dict[str, Any]) -> None:
        settings = json.loads(json_text(settings))  # as stored: tuples as lists, NumPy numbers as plain ones
        if settings_path.is_file() and _holds_results(self.out):
            stored = json.loads(settings_path.read_text(encoding="utf-8"))
            changed = changed_settings(stored, settings)
            if changed:
                raise InputError(
                    f"{self.out} holds results made with other settings ({', '.join(changed)}); "
                    "use another output folder or delete this one"
                )
        else:  # new, or nothing made under the settings stored (a run refused before it began)
            write_json(settings_path, settings)
        self.items_path = self.out / "items.jsonl"
        self.done: dict[str, dict[str, Any]] = {}
        if self.items_path.is_file():
            repair_jsonl_tail(self.items_path)  # a crash may have cut the last line
            self.done = {r["key"]: r for r in iter_jsonl(self.items_path)}

    def add(self, records: list[dict[str, Any]]) -> None:
        if self._log is None:
            self._log = JsonlAppender(self.items_path)
        self._log.write(records)
        self.done.update((r["key"], r) for r in records)

    def close(self) -> None:
        if self._log is not None:
            self._log.close()
        self._lock.release()

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

    def save_figure(self, figure: Figure, name: str) -> None:
        save_png(figure, self.path(name), crop=True)

    def run_jobs(
        self,
        jobs: Sequence[Job],
        models: Models,
        batch_size: int,
        desc: str,
        progress: bool = True,
        judge: Callable[[Job, Any], dict[str, Any]] | None = None,
        num_candidates: int = 8,
    ) -> list[dict[str, Any]]:
        """Generate every job not yet done, appending a record per job as it finishes; return
        the records of all ``jobs`` in order. ``judge(job, result)`` adds fields;
        ``num_candidates`` is the candidate count of controlled jobs."""
        batch_size = positive_count(batch_size, "batch_size")
        keys = [job.key for job in jobs]
        if len(set(keys)) != len(keys):
            raise ValueError("benchmark item keys must be unique")
        todo = [job for job in jobs if job.key not in self.done]
        if todo:
            engine = _engine(models, num_candidates, needs_lenvm=any(_controlled(j) for j in todo))
            with tqdm(total=len(jobs), initial=len(jobs) - len(todo), desc=desc, disable=not progress) as bar:
                # Each record is saved as soon as its generation ends.
                for index, result in engine.stream([j.request for j in todo], batch_size=batch_size):
                    self.add([_record(todo[index], result, judge)])
                    bar.update(1)
        return [self.done[key] for key in keys]


def _holds_results(out: Path) -> bool:
    """Whether ``out`` holds anything besides its settings (an empty item log is nothing)."""
    return any(
        p.name != "settings.json" and not (p.name == "items.jsonl" and p.stat().st_size == 0)
        for p in out.iterdir()
    )


def _controlled(job: Job) -> bool:
    control = job.request.control
    return control is not None and control.kind != "none"


def _engine(models: Models, num_candidates: int, needs_lenvm: bool):
    lenvm = models.require_lenvm("a LenVM-guided method") if needs_lenvm else None
    if models.backend == "vllm":
        from lenvm.integrations.vllm import VLLMEngine

        path = models.lenvm_name if lenvm is not None else None
        return VLLMEngine(models.name, lenvm=path, num_candidates=num_candidates, dtype=models.dtype)
    return Engine(models.generator, models.tokenizer, lenvm=lenvm, num_candidates=num_candidates)


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


def positive_counts(values: int | Iterable[int], what: str) -> tuple[int, ...]:
    """The counts ``values`` (one, or several) as sorted distinct plain ints; an
    :class:`InputError` naming ``what`` where one is not a positive integer."""
    values = tuple(values) if isinstance(values, Iterable) and not isinstance(values, str) else (values,)
    return tuple(sorted({positive_count(v, f"each of {what}") for v in values}))


def settings_of(models: Models, sampling: SamplingParams, **extra: Any) -> dict[str, Any]:
    """The settings every item of a run depends on."""
    return {**models.identity(), **sampling.policy(), **extra}


def markdown_table(header: Sequence[Any], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table; every cell, header cells too, stays one cell whatever its
    text (a domain, a category, a token from data): see :func:`_markdown_cell`. Markdown in a
    cell's text (emphasis, HTML) still renders as such."""
    lines = [_markdown_row(header), "|" + "---|" * len(header)]
    lines.extend(_markdown_row(row) for row in rows)
    return "\n".join(lines) + "\n"


def _markdown_row(cells: Sequence[Any]) -> str:
    return "| " + " | ".join(_markdown_cell(c) for c in cells) + " |"


_LINE_BREAK = re.compile(r"\r\n|\r|\n")


def _markdown_cell(value: Any) -> str:
    """``value`` as a table cell's text: a ``|`` escaped (it would end the cell; escaped, it is a
    plain ``|`` in a code span too), a line break as ``<br>`` (it would end the row)."""
    return _LINE_BREAK.sub("<br>", str(value).replace("|", r"\|"))


def markdown_code(text: str) -> str:
    """``text`` as a Markdown code span that shows it exactly (CommonMark): fenced by one backtick
    more than its longest run of backticks, and padded with a space where the text would
    otherwise merge with the fence (a backtick at an end) or lose a space at each end (a span
    that starts and ends with a space loses one)."""
    fence = "`" * (max(map(len, re.findall("`+", text)), default=0) + 1)
    ends = text[:1] + text[-1:]
    pad = " " if "`" in ends or (ends == "  " and text.strip(" ")) else ""
    return f"{fence}{pad}{text}{pad}{fence}"
