"""Cost/quality trade-off: LenVM exponential tilting against a hard token budget.

On the same sampled generator, each problem is answered once per tilt strength ``beta``
(``beta = 0`` is plain sampling): ``p'(x) ∝ p(x)·exp(beta·v(x))``, where ``v`` is the LenVM value
of the next state; values are negative and closer to 0 means fewer tokens left, so a positive
``beta`` favours shorter answers. The hard budget ``B`` needs no extra generation: it cuts the
plain answers at ``B`` tokens, a cut answer counts as wrong, and its cost is the mean of
``min(length, B)``.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from lenvm.bench import tasks
from lenvm.bench.common import (
    Job,
    Models,
    Run,
    bench_sampling,
    item_request,
    load_models,
    markdown_table,
    settings_of,
)
from lenvm.cli import options
from lenvm.decoding import Control, SamplingParams
from lenvm.figures import subplots
from lenvm.io import InputError

DEFAULT_BETAS = (0.0, 2.0, 5.0, 10.0, 20.0, 50.0)
EVAL_SEED = 1  # the arithmetic problems scored here; training prompts use other seeds


def load_datasets(
    gsm8k: str | os.PathLike | None,
    gsm8k_problems: int | None,
    arithmetic_problems: int,
    arithmetic_levels: Sequence[int],
) -> dict[str, list[tasks.Problem]]:
    datasets = {}
    if gsm8k and gsm8k_problems != 0:
        datasets["gsm8k"] = tasks.read_gsm8k(gsm8k, gsm8k_problems)
    for level in arithmetic_levels if arithmetic_problems > 0 else ():
        datasets[f"word_problem_l{level}"] = tasks.arithmetic_problems(arithmetic_problems, level, EVAL_SEED)
    if not datasets:
        raise InputError("no trade-off dataset: give a GSM8K file or arithmetic problems")
    return datasets


def run_tradeoff(
    out: str | os.PathLike,
    *,
    model: str | os.PathLike | None = None,
    lenvm: str | os.PathLike | None = None,
    gsm8k: str | os.PathLike | None = tasks.DEFAULT_GSM8K,
    gsm8k_problems: int | None = 200,
    arithmetic_problems: int = 100,
    arithmetic_levels: Sequence[int] = (1, 2, 3),
    betas: Sequence[float] = DEFAULT_BETAS,
    budgets: Sequence[int] | None = None,
    max_new_tokens: int = 512,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    min_p: float | None = None,
    num_candidates: int = 8,
    seed: int = 0,
    device: str | None = None,
    dtype: str = "float32",
    batch_size: int = 8,
    progress: bool = True,
    models: Models | None = None,
    backend: str = "engine",
) -> dict[str, Any]:
    """Pass@1 against mean generated length, tilting vs hard budget; writes ``results.json``,
    ``table.md`` and ``pareto.png`` to ``out``.

    ``gsm8k=None`` skips GSM8K; ``arithmetic_problems=0`` skips the generated problems.
    ``budgets`` defaults to the deciles of the plain answers' lengths. ``beta = 0`` (plain
    sampling) is always run, since the budget curve is cut from it. Sampling options left at
    None follow the LenVM's training policy.
    """
    started = time.perf_counter()
    models = models or load_models(model, lenvm, device, dtype, backend)
    betas = sorted({0.0, *(float(b) for b in betas)})
    if any(b != 0 for b in betas):
        models.require_lenvm("tilting")
    datasets = load_datasets(gsm8k, gsm8k_problems, arithmetic_problems, arithmetic_levels)
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
        _job(name, problem, beta, sampling)
        for beta in betas
        for name, problems in datasets.items()
        for problem in problems
    ]
    settings = settings_of(
        models, sampling, num_candidates=num_candidates, gsm8k=str(gsm8k) if gsm8k else None
    )
    with Run(out, settings) as run:
        items = run.run_jobs(jobs, models, batch_size, "trade-off", progress, _judge, num_candidates)
        curves = {
            name: curves_for([i for i in items if i["dataset"] == name], betas, budgets) for name in datasets
        }
        results = {
            "benchmark": "tradeoff",
            "curves": curves,
            "problems": {name: len(problems) for name, problems in datasets.items()},
            "settings": settings,
            "seconds_this_run": round(time.perf_counter() - started, 1),
        }
        run.write_json("results.json", results)
        run.write_text("table.md", _markdown(curves, max_new_tokens))
        _plot(run, curves)
    return results


def _job(dataset: str, problem: tasks.Problem, beta: float, sampling: SamplingParams) -> Job:
    control = Control(kind="tilt", beta=beta) if beta else None
    item = f"{dataset}/{problem.id}"
    fields = {"dataset": dataset, "problem": problem.id, "beta": beta, "answer": problem.answer}
    return Job(f"{item}/beta={beta:g}", item_request(sampling, problem.prompt(), item, control), fields)


def _judge(job: Job, result) -> dict[str, Any]:
    predicted = tasks.extract_answer(result.text)
    correct = result.finish_reason == "stop" and tasks.is_correct(result.text, job.fields["answer"])
    return {"predicted": predicted, "correct": bool(correct)}


def _point(lengths: np.ndarray, correct: np.ndarray, **label: Any) -> dict[str, Any]:
    p = float(correct.mean())
    return {
        **label,
        "mean_length": float(lengths.mean()),
        "pass_at_1": p,
        "stderr": math.sqrt(p * (1 - p) / len(correct)),
        "n": int(len(correct)),
    }


def curves_for(
    items: list[dict[str, Any]], betas: Sequence[float], budgets: Sequence[int] | None = None
) -> dict[str, list[dict[str, Any]]]:
    """The tilt curve (one point per beta) and the hard-budget curve cut from the plain answers.

    An answer cut at ``max_new_tokens`` is wrong on either curve; under budget ``B`` an answer
    counts only if it ended (EOS) within ``B`` tokens, and costs ``min(length, B)``.
    """
    tilt = []
    for beta in betas:
        mine = [i for i in items if i["beta"] == beta]
        if mine:
            lengths = np.array([i["num_tokens"] for i in mine], dtype=np.float64)
            tilt.append(_point(lengths, np.array([i["correct"] for i in mine]), beta=beta))
    plain = [i for i in items if i["beta"] == 0]
    lengths = np.array([i["num_tokens"] for i in plain], dtype=np.float64)
    correct = np.array([i["correct"] for i in plain], dtype=bool)
    caps = (
        budgets
        if budgets is not None
        else np.ceil(np.quantile(lengths, np.linspace(0.1, 1.0, 10))).astype(int)
    )
    budget = [
        _point(np.minimum(lengths, b), correct & (lengths <= b), budget=int(b))
        for b in sorted({max(int(b), 1) for b in caps})
    ]
    # Pass@1 the hard budget reaches at each tilt point's mean length (linear in between).
    xs = [p["mean_length"] for p in budget]
    ys = [p["pass_at_1"] for p in budget]
    for point in tilt:
        point["budget_pass_at_1_same_length"] = float(np.interp(point["mean_length"], xs, ys))
    return {"tilt": tilt, "budget": budget}


def _markdown(curves: dict[str, Any], max_new_tokens: int) -> str:
    parts = [
        "Pass@1 against mean generated tokens. Tilting: p'(x) ∝ p(x)·exp(beta·v(x)), beta > 0 "
        f"shortens. Hard budget B: plain answers cut at B tokens count as wrong (cost "
        f"min(length, B)). Answers still running at {max_new_tokens} tokens count as wrong.\n"
    ]
    for name, curve in curves.items():
        rows = [
            [
                "plain" if p["beta"] == 0 else f"tilt beta={p['beta']:g}",
                f"{p['mean_length']:.1f}",
                f"{100 * p['pass_at_1']:.1f}%",
                f"{100 * p['budget_pass_at_1_same_length']:.1f}%",
                p["n"],
            ]
            for p in curve["tilt"]
        ]
        rows += [
            [
                f"hard budget B={p['budget']}",
                f"{p['mean_length']:.1f}",
                f"{100 * p['pass_at_1']:.1f}%",
                "",
                p["n"],
            ]
            for p in curve["budget"]
        ]
        header = ["method", "mean tokens", "pass@1", "hard budget at same length", "n"]
        parts.append(f"\n**{name}**\n\n" + markdown_table(header, rows))
    return "".join(parts)


def _plot(run: Run, curves: dict[str, Any]) -> None:
    fig, axes = subplots(1, len(curves), figsize=(5 * len(curves), 4), squeeze=False)
    for ax, (name, curve) in zip(axes[0], curves.items(), strict=True):
        budget, tilt = curve["budget"], curve["tilt"]
        ax.plot(
            [p["mean_length"] for p in budget],
            [100 * p["pass_at_1"] for p in budget],
            "s--",
            color="tab:gray",
            label="hard token budget",
        )
        ax.plot(
            [p["mean_length"] for p in tilt],
            [100 * p["pass_at_1"] for p in tilt],
            "o-",
            color="tab:blue",
            label="LenVM tilting",
        )
        for p in tilt:
            ax.annotate(f"β={p['beta']:g}", (p["mean_length"], 100 * p["pass_at_1"]), fontsize=7)
        top = max(p["pass_at_1"] for p in budget + tilt)
        ax.set_ylim(0, max(5.0, 115 * top))
        ax.set_title(name)
        ax.set_xlabel("mean generated tokens")
        ax.set_ylabel("pass@1 (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    run.save_figure(fig, "pareto.png")


# -- command line ---------------------------------------------------------------------------

TABLE = "table.md"


def add_arguments(p) -> None:
    p.add_argument("--lenvm", type=options.path, help="LenVM folder")
    p.add_argument("--gsm8k", type=options.path, default=tasks.DEFAULT_GSM8K, help="GSM8K test JSONL")
    p.add_argument("--no-gsm8k", action="store_true", help="built-in word problems only")
    p.add_argument(
        "--gsm8k-problems", type=options.non_negative_int, default=200, help="GSM8K test problems (0: none)"
    )
    p.add_argument("--arithmetic-problems", type=options.non_negative_int, default=100, help="per level")
    p.add_argument(
        "--levels",
        type=int,
        nargs="+",
        default=[1, 2, 3],
        help="difficulty levels of the arithmetic problems",
    )
    p.add_argument(
        "--betas",
        type=float,
        nargs="+",
        default=list(DEFAULT_BETAS),
        help="tilt strengths to sweep (0: unguided)",
    )
    p.add_argument(
        "--budgets", type=options.positive_int, nargs="+", help="hard budgets (default: from the lengths)"
    )
    options.add_backend(p)
    options.add_sampling(p, seed_help="every item's seed derives from it (default 0)", max_new_tokens=512)
    options.add_decoding(p, batch_size=8)


def main(args) -> None:
    run_tradeoff(
        args.out,
        model=args.model,
        lenvm=args.lenvm,
        gsm8k=None if args.no_gsm8k else args.gsm8k,
        gsm8k_problems=args.gsm8k_problems,
        arithmetic_problems=args.arithmetic_problems,
        arithmetic_levels=args.levels,
        betas=args.betas,
        budgets=args.budgets,
        max_new_tokens=args.max_new_tokens,
        num_candidates=args.num_candidates,
        seed=args.seed,
        batch_size=args.batch_size,
        device=args.device,
        dtype=args.dtype,
        progress=args.progress,
        backend=args.backend,
        **options.sampling_overrides(args),
    )
