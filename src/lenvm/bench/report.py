"""Run every benchmark into one folder and write ``report.md``.

Without a LenVM, :func:`run_all` first makes one: it samples rollouts on a training prompt
pool (built-in prompts, GSM8K train, word problems, LIFEBench rows that are not evaluated) and
trains an attached head on them. Every step resumes, so an interrupted ``bench all`` picks up
where it stopped. ``quick`` picks settings that finish in well under half an hour on two CPU
cores with the built-in 135M model; the full settings are meant for a GPU.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Set as AbstractSet
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypedDict

from lenvm.bench import lifebench, tasks
from lenvm.bench.common import Models, load_models, refuse_model_folder
from lenvm.bench.length_tokens import run_length_tokens
from lenvm.bench.lifebench_score import CONSTRAINTS
from lenvm.bench.predict import run_prediction
from lenvm.bench.tradeoff import DEFAULT_BETAS, EVAL_SEED, run_tradeoff
from lenvm.cli import options
from lenvm.decoding import SamplingParams
from lenvm.io import write_json, write_text
from lenvm.model import LengthValueModel
from lenvm.prompt_sets import builtin_prompts
from lenvm.prompts import Prompt, prompt_key
from lenvm.rollouts import read_rollouts, rollout
from lenvm.training import TrainConfig, train

DEFAULT_GSM8K_TRAIN = "../shared/data/gsm8k/train.jsonl"
TRAIN_SEED = 0
INSTRUCTION_TARGETS = (16, 32, 64, 128, 256)  # token targets of LIFEBench-style pool prompts
# section folder -> title, in report order; a folder another tool fills (speed) joins when present
SECTIONS = {
    "lifebench": "Token-level LIFEBench",
    "tradeoff": "Cost/quality trade-off",
    "predict": "Prompt-boundary length prediction",
    "length_tokens": "Length tokens",
    "speed": "Decoding speed",
}
PAPER_NOTE = (
    "For scale, the paper reports for Qwen2.5-7B-Instruct: prompt only Equal To deviation 71%, "
    "LS 30.9 / At Most 98.5 / At Least 89.1; with a 1.5B LenVM 44%, 64.8 / 96.1 / 99.5."
)


@dataclass(frozen=True)
class Preset:
    """Sizes of a ``bench all`` run. Pools map a prompt source to a prompt count: ``builtin``
    (the built-in prompt set), ``math`` (GSM8K), ``word_problem``, ``instruction`` (LIFEBench)."""

    temperature: float
    max_prompt_tokens: int | None  # leave out longer prompts (LIFEBench sources) everywhere
    train_pool: dict[str, int]
    train_samples: int
    train_max_new_tokens: int
    lifebench_rows: int | None
    lifebench_targets: tuple[int, ...]
    lifebench_max_new_tokens: int
    tradeoff_gsm8k: int
    tradeoff_arithmetic: int
    tradeoff_levels: tuple[int, ...]
    tradeoff_betas: tuple[float, ...]
    tradeoff_max_new_tokens: int
    predict_pool: dict[str, int]
    predict_samples: int
    predict_max_new_tokens: int


# Sized from about 35 tokens/s for plain sampling at batch 8 on two cores, half that guided.
QUICK = Preset(
    temperature=0.7,  # the 135M model rambles at 1.0; every step shares the policy anyway
    max_prompt_tokens=384,  # long source texts slow every CPU decoding step down several times
    train_pool={"builtin": 8, "math": 4, "word_problem": 4, "instruction": 8},
    train_samples=4,
    train_max_new_tokens=192,
    lifebench_rows=4,
    lifebench_targets=(32, 64),
    lifebench_max_new_tokens=192,
    tradeoff_gsm8k=8,
    tradeoff_arithmetic=16,
    tradeoff_levels=(1,),
    tradeoff_betas=(0.0, 5.0, 20.0),
    tradeoff_max_new_tokens=256,
    predict_pool={"builtin": 6, "math": 2, "word_problem": 2, "instruction": 2},
    predict_samples=6,
    predict_max_new_tokens=192,
)
FULL = Preset(
    temperature=1.0,  # the paper's policy
    max_prompt_tokens=None,
    train_pool={"builtin": 400, "math": 800, "word_problem": 300, "instruction": 300},
    train_samples=8,
    train_max_new_tokens=2048,
    lifebench_rows=None,
    lifebench_targets=lifebench.DEFAULT_TARGETS,
    lifebench_max_new_tokens=2048,
    tradeoff_gsm8k=500,
    tradeoff_arithmetic=200,
    tradeoff_levels=(1, 2, 3),
    tradeoff_betas=DEFAULT_BETAS,
    tradeoff_max_new_tokens=1024,
    predict_pool={"builtin": 60, "math": 40, "word_problem": 30, "instruction": 30},
    predict_samples=64,
    predict_max_new_tokens=2048,
)


class _Common(TypedDict):
    """The arguments every step of :func:`run_all` takes alike."""

    models: Models
    batch_size: int
    progress: bool
    seed: int


def run_all(
    out: str | os.PathLike,
    *,
    model: str | os.PathLike | None = None,
    lenvm: str | os.PathLike | None = None,
    train_rollouts: str | os.PathLike | None = None,
    quick: bool = False,
    lifebench_data: str | os.PathLike = lifebench.DEFAULT_DATA,
    gsm8k: str | os.PathLike = tasks.DEFAULT_GSM8K,
    gsm8k_train: str | os.PathLike = DEFAULT_GSM8K_TRAIN,
    seed: int = 0,
    device: str | None = None,
    dtype: str = "float32",
    batch_size: int = 8,
    progress: bool = True,
    preset: Preset | None = None,
) -> dict[str, Any]:
    """Run LIFEBench, the trade-off, length prediction and length tokens into ``out`` and write
    ``out/report.md``.

    Without ``lenvm`` a LenVM is trained first (rollouts and model under ``out/lenvm``), and its
    rollouts fit the prediction baselines and feed the length-token statistics. With ``lenvm``,
    ``train_rollouts`` (its training rollouts) does that; without them both are skipped. The
    sampling policy is the LenVM's training policy throughout. ``preset`` overrides the sizes
    that ``quick`` picks.
    """
    out = Path(out)
    refuse_model_folder(out)
    preset = preset or (QUICK if quick else FULL)
    timings: dict[str, float] = {}
    clock = time.perf_counter()
    models = load_models(model, lenvm, device, dtype)
    rows, _ = lifebench.fitting_rows(
        lifebench.read_lifebench(lifebench_data),
        models,
        preset.lifebench_max_new_tokens,
        preset.max_prompt_tokens,
    )
    eval_rows = preset.lifebench_rows
    if lenvm is None and eval_rows is None:
        eval_rows = len(rows) // 2  # the other half trains the LenVM
    evaluated = {r.id for r in lifebench.select_rows(rows, eval_rows, None)}
    held_out = _pool(
        preset.predict_pool,
        rows=[r for r in rows if r.id in evaluated],
        gsm8k=gsm8k,
        seed=EVAL_SEED,
        models=models,
        max_new_tokens=preset.predict_max_new_tokens,
        max_prompt_tokens=preset.max_prompt_tokens,
    )
    if lenvm is None:
        train = _pool(
            preset.train_pool,
            rows=[r for r in rows if r.id not in evaluated],
            gsm8k=gsm8k_train,
            seed=TRAIN_SEED,
            models=models,
            max_new_tokens=preset.train_max_new_tokens,
            max_prompt_tokens=preset.max_prompt_tokens,
            exclude={p.text for p in held_out if p.text is not None},  # every pool prompt is text
            gsm8k_prefix="gsm8k-train",  # ids apart from the test file's
        )
        train_rollouts = _train_lenvm(out / "lenvm", models, train, preset, seed, batch_size, progress)
    trained = _rollout_prompts(train_rollouts)
    held_out = [p for p in held_out if p.key() not in trained]
    _write_prompts(out / "prompts" / "held_out.jsonl", held_out)
    timings["setup"] = time.perf_counter() - clock

    common = _Common(models=models, batch_size=batch_size, progress=progress, seed=seed)
    steps = {
        "lifebench": lambda: lifebench.run_lifebench(
            out / "lifebench",
            data=lifebench_data,
            rows=eval_rows,
            targets=preset.lifebench_targets,
            max_new_tokens=preset.lifebench_max_new_tokens,
            max_prompt_tokens=preset.max_prompt_tokens,
            **common,
        ),
        "tradeoff": lambda: run_tradeoff(
            out / "tradeoff",
            gsm8k=gsm8k,
            gsm8k_problems=preset.tradeoff_gsm8k,
            arithmetic_problems=preset.tradeoff_arithmetic,
            arithmetic_levels=preset.tradeoff_levels,
            betas=preset.tradeoff_betas,
            max_new_tokens=preset.tradeoff_max_new_tokens,
            **common,
        ),
        "predict": lambda: run_prediction(
            out / "predict",
            prompts=out / "prompts" / "held_out.jsonl",
            train_rollouts=train_rollouts,
            samples=preset.predict_samples,
            max_new_tokens=preset.predict_max_new_tokens,
            **common,
        ),
    }
    if train_rollouts is not None:
        steps["length_tokens"] = lambda: run_length_tokens(
            out / "length_tokens",
            rollouts=train_rollouts,
            models=models,
            batch_size=batch_size,
            progress=progress,
        )
    results = {}
    for name, step in steps.items():
        clock = time.perf_counter()
        results[name] = step()
        timings[name] = time.perf_counter() - clock
    summary = {
        "model": models.name,
        "lenvm": str(lenvm) if lenvm else str(out / "lenvm" / "model"),
        "preset": "quick" if preset == QUICK else "full" if preset == FULL else "custom",
        "gamma": models.lenvm.gamma if models.lenvm is not None else None,
        "lenvm_training": (models.lenvm.config.training or {}) if models.lenvm is not None else {},
        "sizes": asdict(preset),
        "seconds_this_run": {k: round(v, 1) for k, v in timings.items()},
    }
    write_json(out / "summary.json", summary)
    write_report(out, summary)
    return {"summary": summary, **results}


def _pool(
    sizes: dict[str, int],
    rows: list[lifebench.Row],
    gsm8k: str | os.PathLike,
    seed: int,
    models: Models,
    max_new_tokens: int,
    max_prompt_tokens: int | None,
    exclude: AbstractSet[str] = frozenset(),
    gsm8k_prefix: str = "gsm8k",
) -> list[Prompt]:
    """A prompt pool with a ``domain`` on every prompt, keeping prompts that fit the context with
    ``max_new_tokens``; ``exclude`` drops texts used elsewhere."""
    prompts: list[Prompt] = []
    if sizes.get("builtin"):
        for p in builtin_prompts(sizes["builtin"], seed=seed):
            prompts.append(Prompt(f"s{seed}-{p.id}", text=p.text, extra=p.extra))
    if sizes.get("math"):
        # held-out math prompts come from the test file, training ones from the train file
        prompts += [p.prompt() for p in tasks.read_gsm8k(gsm8k, sizes["math"], id_prefix=gsm8k_prefix)]
    if sizes.get("word_problem"):
        count = sizes["word_problem"]
        for level in (1, 2, 3):
            problems = tasks.arithmetic_problems(count // 3 + (level <= count % 3), level, seed)
            prompts += [p.prompt() for p in problems]
    if sizes.get("instruction") and rows:
        # distinct (row, constraint, target) combinations, in a seeded order
        combos = [(r, c, t) for r in rows for c in CONSTRAINTS for t in INSTRUCTION_TARGETS]
        random.Random(f"lenvm-instruction-{seed}").shuffle(combos)
        for row, constraint, target in combos[: sizes["instruction"]]:
            text = lifebench.token_task(row, constraint, target)
            extra = {"domain": "instruction", "constraint": constraint, "target": target}
            prompts.append(Prompt(f"life-{row.id}-{constraint}-{target}", text=text, extra=extra))
    return [p for p in prompts if p.text not in exclude and models.fits(p, max_new_tokens, max_prompt_tokens)]


def _write_prompts(path: Path, prompts: list[Prompt]) -> None:
    lines = [json.dumps({"id": p.id, "prompt": p.text, **p.extra}, ensure_ascii=False) for p in prompts]
    write_text(path, "\n".join(lines) + "\n")


def _rollout_prompts(rollouts: str | os.PathLike | None) -> set[str]:
    """The prompts (their prompt_key) a rollouts file holds: those a LenVM was trained on."""
    if rollouts is None:
        return set()
    return {prompt_key(r) for r in read_rollouts(rollouts)}


def _train_lenvm(
    folder: Path,
    models: Models,
    prompts: list[Prompt],
    preset: Preset,
    seed: int,
    batch_size: int,
    progress: bool,
) -> Path:
    """Rollouts on the training pool and an attached LenVM on them (both resume); loads the
    LenVM into ``models`` and returns the rollouts path."""
    generator = (models.generator, models.tokenizer)
    rollouts = folder / "rollouts.jsonl"
    _write_prompts(folder / "prompts.jsonl", prompts)
    sampling = SamplingParams(
        temperature=preset.temperature, max_new_tokens=preset.train_max_new_tokens, seed=seed
    )
    rollout(
        models.name,
        prompts,
        rollouts,
        n=preset.train_samples,
        sampling=sampling,
        batch_size=batch_size,
        backend="auto",  # vLLM where installed
        loaded=generator,
        dtype=models.dtype,
        progress=progress,
    )
    target = folder / "model"
    if not (target / "head.safetensors").is_file():
        config = TrainConfig(kind="attached", seed=seed)
        train(rollouts, models.name, target, config, generator=generator, progress=progress, overwrite=True)
    models.lenvm = LengthValueModel.from_pretrained(
        target, generator=generator, device=models.generator.device
    )
    models.lenvm_name = str(target)
    return rollouts


def write_report(out: str | os.PathLike, summary: dict[str, Any] | None = None) -> Path:
    """``out/report.md`` from every section folder that holds a ``table.md``, with its plots.

    ``summary`` defaults to ``out/summary.json`` (written by :func:`run_all`), so a section added
    afterwards (e.g. ``out/speed``) joins the report by calling this again."""
    out = Path(out)
    if summary is None and (out / "summary.json").is_file():
        summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    lines = ["# lenvm benchmark report", ""]
    if summary:
        lines += [
            f"- generator: `{summary['model']}`",
            f"- LenVM: `{summary['lenvm']}` (gamma {summary['gamma']:.4g}, "
            f"{summary['lenvm_training'].get('train_completions', '?')} training completions)",
            f"- settings: {summary['preset']}",
            "- seconds this run: "
            + ", ".join(f"{k} {v:.0f}" for k, v in summary["seconds_this_run"].items()),
            "",
        ]
    for folder, title in SECTIONS.items():
        table = out / folder / "table.md"
        if not table.is_file():
            continue
        lines += [f"## {title}", "", table.read_text(encoding="utf-8").strip(), ""]
        if folder == "lifebench":
            lines += [PAPER_NOTE, ""]
        lines += [f"![{png.stem}]({folder}/{png.name})" for png in sorted((out / folder).glob("*.png"))]
        lines.append("")
    path = out / "report.md"
    write_text(path, "\n".join(lines))
    return path


# -- command line ---------------------------------------------------------------------------

TABLE = "report.md"


def add_arguments(p) -> None:
    p.add_argument("--lenvm", type=options.path, help="LenVM folder (default: train one first)")
    p.add_argument("--quick", action="store_true", help="small settings: under 30 minutes on 2 CPU cores")
    p.add_argument(
        "--train-rollouts",
        type=options.path,
        help="the --lenvm's training rollouts (baselines, length tokens)",
    )
    p.add_argument("--data", type=options.path, default=lifebench.DEFAULT_DATA, help="LIFEBench JSONL")
    p.add_argument("--gsm8k", type=options.path, default=tasks.DEFAULT_GSM8K, help="GSM8K test JSONL")
    p.add_argument("--gsm8k-train", type=options.path, default=DEFAULT_GSM8K_TRAIN, help="GSM8K train JSONL")
    p.add_argument("--batch-size", type=options.positive_int, default=8, help="answers decoded together")
    p.add_argument(
        "--seed", type=int, default=0, help="the prompts drawn, the LenVM's training and the tasks' sampling"
    )


def main(args) -> None:
    run_all(
        args.out,
        model=args.model,
        lenvm=args.lenvm,
        train_rollouts=args.train_rollouts,
        quick=args.quick,
        lifebench_data=args.data,
        gsm8k=args.gsm8k,
        gsm8k_train=args.gsm8k_train,
        seed=args.seed,
        batch_size=args.batch_size,
        device=args.device,
        dtype=args.dtype,
        progress=args.progress,
    )
