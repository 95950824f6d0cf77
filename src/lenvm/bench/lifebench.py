"""LIFEBench with token-level length constraints (the LenVM paper's Table 2).

Each row's template ends in a requirement such as "... must be {word_count_type} {word_count}
words long" (English) or "字数必须{word_count_type} {word_count}字" (Chinese). A token-level run
fills in the constraint and the target and swaps the unit for tokens; output lengths are the
generator's own token counts, EOS excluded. Methods: the prompt alone, and LenVM control whose
kind is the row's constraint and whose target is the row's target, with either the paper's
decision rules or ours.
"""

from __future__ import annotations

import itertools
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, cast

from lenvm.bench import lifebench_score
from lenvm.bench.common import (
    Job,
    Models,
    Run,
    bench_sampling,
    item_request,
    load_models,
    positive_counts,
    settings_of,
)
from lenvm.cli import options
from lenvm.decoding import Control, SamplingParams
from lenvm.decoding.params import ControlKind
from lenvm.figures import subplots
from lenvm.io import InputError, iter_jsonl
from lenvm.prompts import Prompt

DEFAULT_DATA = "../shared/data/lifebench/data_lite.jsonl"
DEFAULT_TARGETS = (32, 64, 128, 256, 512, 1024)
# method -> (decision rule of the LenVM control, or None for the prompt alone; table label)
METHODS: dict[str, tuple[Literal["ours", "paper"] | None, str]] = {
    "prompt": (None, "prompt only"),
    "lenvm-paper": ("paper", "+ LenVM (paper rules)"),
    "lenvm-ours": ("ours", "+ LenVM (our rules)"),
}
CONSTRAINT_WORDS = {
    "en": {"equal_to": "equal to", "at_most": "at most", "at_least": "at least"},
    "zh": {"equal_to": "等于", "at_most": "至多有", "at_least": "至少有"},
}
_CHINESE = {"cn", "zh", "zh-cn", "zh_cn", "chinese"}
_CJK = re.compile(r"[\u4e00-\u9fff]")
# The unit right after the count: "{word_count} words", "{word_count}-word", "{word_count}个字".
_EN_UNIT = re.compile(r"\{word_count\}(\s*|-)words?\b", re.IGNORECASE)
_ZH_UNIT = re.compile(r"\{word_count\}\s*个?[字词]")
_EN_PHRASES = [(re.compile(r"\bword count\b", re.IGNORECASE), "token count")]
_ZH_PHRASES = [(re.compile("字数"), "token数")]


@dataclass
class Row:
    """One LIFEBench row; fields the benchmark does not use are kept in ``extra``."""

    id: str
    task: str
    lang: str  # "en" or "zh"
    category: str = "unknown"
    type: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def read_lifebench(path: str | os.PathLike = DEFAULT_DATA) -> list[Row]:
    """Read LIFEBench rows (the lite file or the original public files; extra fields are kept)."""
    rows: list[Row] = []
    seen: set[str] = set()
    for index, record in enumerate(iter_jsonl(path)):
        where = f"{path}: record {index + 1}"
        task = record.get("task")
        if not isinstance(task, str) or "{word_count}" not in task:
            raise InputError(f"{where}: needs a 'task' string with a {{word_count}} placeholder")
        row_id = str(record.get("id", index))
        if row_id in seen:
            raise InputError(f"{where}: duplicate id {row_id!r}")
        seen.add(row_id)
        known = ("id", "task", "lang", "category", "type")
        rows.append(
            Row(
                id=row_id,
                task=task,
                lang=_language(record.get("lang"), task),
                category=str(record.get("category", "unknown")),
                type=str(record.get("type", "")),
                extra={k: v for k, v in record.items() if k not in known},
            )
        )
    if not rows:
        raise InputError(f"{path}: no rows")
    return rows


def _language(lang: Any, task: str) -> str:
    if isinstance(lang, str) and lang.strip():
        return "zh" if lang.strip().lower() in _CHINESE else "en"
    return "zh" if _CJK.search(_requirement(task)[1]) else "en"


def _requirement(task: str) -> tuple[str, str]:
    """Split the template before the line that holds the length requirement."""
    anchor = task.find("{word_count_type}")
    if anchor < 0:
        anchor = task.find("{word_count}")
    start = task.rfind("\n", 0, anchor) + 1
    return task[:start], task[start:]


def token_task(row: Row, constraint: str, target: int) -> str:
    """The row's prompt with a token-level constraint, e.g. "must be at most 64 tokens long".

    Only the requirement line is rewritten, so words like "word count" inside the task's own
    text stay as they are. A template whose unit is not recognized is an error rather than a
    prompt that silently still asks for words.
    """
    if constraint not in lifebench_score.CONSTRAINTS:
        raise InputError(f"unknown constraint {constraint!r}; expected one of {lifebench_score.CONSTRAINTS}")
    head, requirement = _requirement(row.task)
    if row.lang == "zh":
        unit, new_unit, phrases = _ZH_UNIT, lambda m: f"{target}个token", _ZH_PHRASES
    else:
        # "64 words" -> "64 tokens", "a 64-word essay" -> "a 64-token essay"
        unit, phrases = _EN_UNIT, _EN_PHRASES
        new_unit = lambda m: f"{target}-token" if m.group(1) == "-" else f"{target} tokens"  # noqa: E731
    requirement, count = unit.subn(new_unit, requirement)
    if count == 0:
        raise InputError(f"LIFEBench row {row.id}: no length unit after {{word_count}} to turn into tokens")
    for pattern, replacement in phrases:
        requirement = pattern.sub(replacement, requirement)
    requirement = requirement.replace("{word_count_type}", CONSTRAINT_WORDS[row.lang][constraint])
    return head + requirement.replace("{word_count}", str(target))


def run_lifebench(
    out: str | os.PathLike,
    *,
    model: str | os.PathLike | None = None,
    lenvm: str | os.PathLike | None = None,
    data: str | os.PathLike = DEFAULT_DATA,
    targets: Sequence[int] = DEFAULT_TARGETS,
    constraints: Sequence[str] = lifebench_score.CONSTRAINTS,
    methods: Sequence[str] | None = None,
    rows: int | None = None,
    langs: Sequence[str] | None = None,
    skip_rows: int = 0,
    row_ids: Sequence[str] | None = None,
    max_new_tokens: int = 2048,
    max_prompt_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    min_p: float | None = None,
    num_candidates: int = 8,
    best_of: int = 1,
    retries: int | None = None,
    seed: int = 0,
    device: str | None = None,
    dtype: str = "float32",
    batch_size: int = 8,
    progress: bool = True,
    models: Models | None = None,
    backend: str = "engine",
) -> dict[str, Any]:
    """Run token-level LIFEBench and write ``results.json``, ``table.md`` and plots to ``out``.

    ``methods`` defaults to every method the models allow (the prompt alone without a LenVM).
    ``rows`` keeps N rows, taken in turn from each (language, category) group, after the
    ``row_ids`` and ``langs`` filters ("en"/"zh"), after leaving out the first ``skip_rows`` of
    that order and rows too long for the generator's context or longer than
    ``max_prompt_tokens`` (a small CPU run can skip the long source texts); see
    :func:`select_rows`. Targets at or above ``max_new_tokens`` are skipped (LIFEBench skips
    those above; one equal to it leaves no room for the EOS).
    Sampling options left at None follow the LenVM's training policy. ``best_of`` > 1 gives the
    LenVM methods' Equal To requests that many attempts and ``retries`` sets how often the LenVM
    methods' requests resample an end that is not natural (None: the control's default; see
    :class:`lenvm.decoding.Control`). ``models`` passes already loaded models (then ``model``,
    ``lenvm``, ``device`` and ``dtype`` are not used).
    """
    started = time.perf_counter()
    models = models or load_models(model, lenvm, device, dtype, backend)
    methods = list(methods or (METHODS if models.lenvm is not None else ["prompt"]))
    unknown = [m for m in methods if m not in METHODS]
    unknown += [c for c in constraints if c not in lifebench_score.CONSTRAINTS]
    if unknown:
        raise InputError(f"unknown LIFEBench method or constraint: {', '.join(unknown)}")
    if any(METHODS[m][0] is not None for m in methods):
        models.require_lenvm("LenVM-controlled LIFEBench methods")
    targets = positive_counts(targets, "the targets")
    # A target of max_new_tokens or more leaves no room for the EOS that ends an Equal To or
    # At Least answer (Control.unreachable), so every control skips it alike.
    kept = [t for t in targets if t < max_new_tokens]
    skipped = [t for t in targets if t >= max_new_tokens]
    if not kept:
        raise InputError(f"every target is at or above max_new_tokens={max_new_tokens}")
    every = read_lifebench(data)
    table, too_long = fitting_rows(every, models, max_new_tokens, max_prompt_tokens)
    if every and not table:
        cap = f", or its prompt is over --max-prompt-tokens {max_prompt_tokens}" if max_prompt_tokens else ""
        raise InputError(
            f"every LIFEBench row is too long: its prompt plus --max-new-tokens {max_new_tokens} exceeds "
            f"the generator's context{cap}"
        )
    table = select_rows(table, rows, langs, skip_rows, row_ids)
    # Too long among the rows of the languages asked for, the pool rows are drawn from (named rows
    # that are too long were refused above).
    asked = [] if row_ids is not None else select_rows(every, None, langs)
    too_long = [r.id for r in asked if r.id in set(too_long)]
    sampling = bench_sampling(
        models,
        max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        min_p=min_p,
        seed=seed,
    )
    jobs = [
        _job(row, constraint, target, method, sampling, best_of, retries)
        for method in methods
        for constraint in constraints
        for target in kept
        for row in table
    ]
    settings = settings_of(
        models,
        sampling,
        num_candidates=num_candidates,
        data=str(data),
        max_prompt_tokens=max_prompt_tokens,
        best_of=best_of,
        retries=retries,
    )
    with Run(out, settings) as run:
        items = run.run_jobs(jobs, models, batch_size, "lifebench", progress, num_candidates=num_candidates)
        summary = lifebench_score.summarize(items)
        labels = {m: METHODS[m][1] for m in methods}
        results = {
            "benchmark": "lifebench",
            "summary": summary,
            "methods": labels,
            "targets": kept,
            "skipped_targets": skipped,
            "rows": len(table),
            "row_ids": [r.id for r in table],
            "rows_too_long": too_long,
            "languages": sorted({r.lang for r in table}),
            "settings": settings,
            "seconds_this_run": round(time.perf_counter() - started, 1),
        }
        run.write_json("results.json", results)
        run.write_text("table.md", _markdown(summary, labels, kept, skipped, len(table), too_long))
        _plot(run, summary, items, labels)
    return results


def fitting_rows(
    table: list[Row], models: Models, max_new_tokens: int, max_prompt_tokens: int | None = None
) -> tuple[list[Row], list[str]]:
    """Rows whose prompt leaves room for ``max_new_tokens`` in the generator's context (long
    summarization sources can exceed a small model's window) and is at most ``max_prompt_tokens``
    long, and the ids of the others."""
    fit = [
        r
        for r in table
        if models.fits(token_task(r, "equal_to", max_new_tokens), max_new_tokens, max_prompt_tokens)
    ]
    kept = {id(r) for r in fit}
    return fit, [r.id for r in table if id(r) not in kept]


def select_rows(
    table: list[Row],
    rows: int | None,
    langs: Sequence[str] | None,
    skip: int = 0,
    ids: Sequence[str] | None = None,
) -> list[Row]:
    """Rows of the wanted languages (and, given ``ids``, those rows only); then, with ``skip`` or a
    row limit, rows taken in turn from each (language, category) group so that a small run still
    covers both languages and every category: the first ``skip`` of that order are left out and
    the next ``rows`` kept. Tuning and reporting rows are thus disjoint by construction, e.g.
    ``rows=6`` to tune and ``skip=6`` to report."""
    if ids is not None:
        present = {r.id for r in table}
        missing = [i for i in ids if i not in present]
        if missing:
            raise InputError(
                f"LIFEBench rows not found (or left out as too long): {', '.join(map(str, missing))}"
            )
        wanted_ids = set(ids)
        table = [r for r in table if r.id in wanted_ids]
    if langs:
        unknown = [lang for lang in langs if str(lang).strip().lower() not in {"en", "english", *_CHINESE}]
        if unknown:
            raise InputError(
                f"unknown language(s) {unknown}: LIFEBench rows are English (en) or Chinese (zh)"
            )
        wanted = {_language(lang, "") for lang in langs}
        table = [r for r in table if r.lang in wanted]
    if skip < 0 or (rows is not None and rows < 1):
        raise InputError("--skip-rows must be at least 0 and --rows at least 1")
    if rows is not None or skip:
        groups: dict[tuple[str, str], list[Row]] = {}
        for row in table:
            groups.setdefault((row.lang, row.category), []).append(row)
        order = [row for tier in itertools.zip_longest(*groups.values()) for row in tier if row]
        chosen = {id(row) for row in order[skip : None if rows is None else skip + rows]}
        table = [row for row in table if id(row) in chosen]
    if not table:
        raise InputError("no LIFEBench rows left after the row and language selection")
    return table


def _job(
    row: Row,
    constraint: str,
    target: int,
    method: str,
    sampling: SamplingParams,
    best_of: int,
    retries: int | None,
) -> Job:
    rule = METHODS[method][0]
    control = None
    if rule is not None:
        control = Control(
            kind=cast(ControlKind, constraint),  # one of CONSTRAINTS: run_lifebench checks it
            target=target,
            rule=rule,
            best_of=best_of if constraint == "equal_to" else 1,
            retries=retries,
        )
    prompt = Prompt(row.id, text=token_task(row, constraint, target))
    # The seed ignores the method: every method meets the same random numbers on an item.
    item = f"{row.id}/{constraint}/{target}"
    fields = {
        "row": row.id,
        "constraint": constraint,
        "target": target,
        "method": method,
        "category": row.category,
        "lang": row.lang,
    }
    return Job(f"{item}/{method}", item_request(sampling, prompt, item, control), fields)


def _markdown(summary, labels, targets, skipped, n_rows, too_long) -> str:
    parts = [
        f"Token-level LIFEBench: {n_rows} rows, targets {', '.join(map(str, targets))} tokens"
        + (f" (skipped at or above max_new_tokens: {', '.join(map(str, skipped))})" if skipped else "")
        + (
            f"; {len(too_long)} rows of the data set in these languages are too long for the "
            "generator's context and were never drawn"
            if too_long
            else ""
        )
        + ". Length Score 0-100, its 95% interval in brackets (a bootstrap over the answers of "
        "each target); deviation = mean |L_out - L_target| / L_target.\n",
        lifebench_score.table2(summary, labels),
        "\nLength Score by target (Equal To: score and deviation):\n",
        lifebench_score.breakdown_table(summary, "by_target", labels),
        "\nLength Score by category:\n",
        lifebench_score.breakdown_table(summary, "by_category", labels),
        "\nLength Score by language:\n",
        lifebench_score.breakdown_table(summary, "by_lang", labels),
        "\nHow outputs ended: by an EOS that the model or policy chose (not cut at max_new_tokens "
        f"or by a hard cap); naturally (an EOS the generator itself gave at least "
        f"{lifebench_score.NATURAL_EOS:g}); stopped by a bound (EOS forced by a hard cap, or an At "
        "Most answer ending exactly at its bound with an EOS that is not natural); cut at "
        "max_new_tokens. Then the median output length over the target, the generator's mean "
        "log-probability per token under its own distribution, the same on the items whose "
        "prompt-only answer ended with EOS beside that answer's (one cut at max_new_tokens has "
        "often fallen into a loop, text the generator finds very likely), what the "
        f"{lifebench_score.LENGTH_NEIGHBOURS} prompt-only answers of the run that ended naturally "
        "nearest each answer in length score, averaged over the answers (shorter answers score "
        "lower per token), the tokens decoded per "
        "token returned (above 1 where ends were resampled or several attempts made), and how many "
        "answers that met their bound without guidance (the prompt-only answer of the same item, "
        "drawn with the same random stream) guidance changed:\n",
        lifebench_score.quality_table(summary, labels),
    ]
    return "\n".join(parts)


def _plot(run: Run, summary, items, labels) -> None:
    # A panel per constraint that ran, ticks at the targets that ran.
    ran = [c for c in lifebench_score.CONSTRAINTS if any(c in by for by in summary.values())]
    fig, axes = subplots(1, len(ran), figsize=(4.4 * len(ran), 3.8), sharey=True, squeeze=False)
    axes = axes[0]
    for ax, constraint in zip(axes, ran, strict=True):
        targets: set[int] = set()
        for k, (method, by_constraint) in enumerate(summary.items()):
            if constraint in by_constraint:
                by_target = sorted(by_constraint[constraint]["by_target"].items(), key=lambda tm: int(tm[0]))
                targets.update(int(t) for t, _ in by_target)
                # methods that score alike would hide each other: later ones drawn smaller, dashed
                ax.plot(
                    [int(t) for t, _ in by_target], [m["score"] for _, m in by_target],
                    "o-" if k == 0 else "s--", markersize=max(7 - 2 * k, 3), label=labels[method],
                )  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(targets), [str(t) for t in sorted(targets)])
        ax.minorticks_off()
        ax.set_title(lifebench_score.CONSTRAINT_LABELS[constraint])
        ax.set_xlabel("target (tokens)")
        ax.set_ylim(0, 105)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("Length Score")
    plotted = [ax for ax in axes if ax.lines]
    if plotted:
        plotted[0].legend(fontsize=8)
    run.save_figure(fig, "length_score.png")

    equal = [i for i in items if i["constraint"] == "equal_to"]
    if not equal:  # a plot of an earlier run's Equal To would pass for this one's
        run.path("equal_to_lengths.png").unlink(missing_ok=True)
    else:
        fig, ax = subplots(figsize=(5.5, 4.5))
        for k, method in enumerate(summary):
            shift = 1 + 0.05 * (k - (len(summary) - 1) / 2)  # side by side, not on top
            for cut in (False, True):  # answers cut at max_new_tokens are crosses, not ends
                mine = [
                    i for i in equal if i["method"] == method and (i.get("finish_reason") == "length") == cut
                ]
                if mine:
                    ax.scatter(
                        [i["target"] * shift for i in mine],
                        [max(i["num_tokens"], 1) for i in mine],  # an empty answer drawn at 1 (log axis)
                        label=labels[method] + (" (cut at max_new_tokens)" if cut else ""),
                        alpha=0.6,
                        s=18,
                        marker="x" if cut else "o",
                        color=f"C{k}",
                    )
        equal_targets = sorted({i["target"] for i in equal})
        ax.plot(equal_targets, equal_targets, "k--", lw=1, label="L_out = target")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.set_xlabel("target (tokens)")
        ax.set_ylabel("output length (tokens, EOS excluded; 0 drawn at 1)")
        ax.set_title("Equal To: output length against target")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        run.save_figure(fig, "equal_to_lengths.png")


# -- command line ---------------------------------------------------------------------------

TABLE = "table.md"


def add_arguments(p) -> None:
    p.add_argument("--lenvm", type=options.path, help="LenVM folder")
    p.add_argument("--data", type=options.path, default=DEFAULT_DATA, help="LIFEBench JSONL")
    p.add_argument(
        "--targets",
        type=options.positive_int,
        nargs="+",
        default=list(DEFAULT_TARGETS),
        help="target lengths in tokens",
    )
    p.add_argument(
        "--constraints",
        nargs="+",
        choices=list(lifebench_score.CONSTRAINTS),
        default=list(lifebench_score.CONSTRAINTS),
        help="length controls to run (default: all three)",
    )
    p.add_argument("--methods", nargs="+", choices=list(METHODS), help="default: all")
    p.add_argument(
        "--rows",
        type=options.positive_int,
        help="evaluate N rows, taken in turn from each (language, category)",
    )
    p.add_argument(
        "--skip-rows",
        type=options.non_negative_int,
        default=0,
        help="leave out the first N rows of that order",
    )
    p.add_argument("--row-ids", nargs="+", help="evaluate these LIFEBench row ids only")
    p.add_argument("--langs", nargs="+", choices=["en", "zh"], help="languages of the rows (default: both)")
    p.add_argument("--max-prompt-tokens", type=options.positive_int, help="leave out longer prompts")
    p.add_argument(
        "--best-of",
        type=options.positive_int,
        default=1,
        help="Equal To with a LenVM: keep the best of K answers",
    )
    p.add_argument(
        "--retries",
        type=options.non_negative_int,
        help="with a LenVM: resample an end that is not natural up to R times",
    )
    options.add_backend(p)
    options.add_sampling(p, seed_help="every item's seed derives from it (default 0)", max_new_tokens=2048)
    options.add_decoding(p, batch_size=8)


def main(args) -> None:
    run_lifebench(
        args.out,
        model=args.model,
        lenvm=args.lenvm,
        data=args.data,
        targets=args.targets,
        constraints=args.constraints,
        methods=args.methods,
        rows=args.rows,
        langs=args.langs,
        skip_rows=args.skip_rows,
        row_ids=args.row_ids,
        max_new_tokens=args.max_new_tokens,
        max_prompt_tokens=args.max_prompt_tokens,
        num_candidates=args.num_candidates,
        best_of=args.best_of,
        retries=args.retries,
        seed=args.seed,
        batch_size=args.batch_size,
        device=args.device,
        dtype=args.dtype,
        progress=args.progress,
        backend=args.backend,
        **options.sampling_overrides(args),
    )
