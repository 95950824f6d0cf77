"""The main job, end to end on one model: rollouts, training, held-out evaluation, a value view.

The LenVM trains on a broad prompt mix, so that it predicts lengths beyond the prompts it saw:
the built-in prompts (10% of them held out for the evaluation), GSM8K training problems
(``gsm8k``) and generated writing, question-answering and reasoning prompts with and without
length instructions (``generated``). Every step writes under one folder and is skipped or
resumed when run again.
"""

from __future__ import annotations

import json
import random
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from lenvm import hub
from lenvm.io import InputError, RunLock, changed_settings, write_json, write_text
from lenvm.losses import Loss
from lenvm.prompts import Prompt

DEFAULT_GSM8K_TRAIN = "../shared/data/gsm8k/train.jsonl"


@dataclass
class DemoConfig:
    out: Path = Path("lenvm-demo")
    model: str = hub.DEFAULT_MODEL
    prompts: int = 240  # built-in prompts; eval_fraction of them are held out
    n: int = 3  # completions per built-in training prompt (4 before the mix: the mix took the time)
    gsm8k: int = 120  # GSM8K training problems in the mix (0: none)
    gsm8k_path: str = DEFAULT_GSM8K_TRAIN  # the GSM8K *train* file: test problems stay unseen
    generated: int = 120  # generated writing / QA / reasoning prompts in the mix (0: none)
    # The same kinds of prompt in Chinese (0: none): a LenVM that has seen the generator answer in
    # Chinese ends more Chinese Equal To and At Least answers naturally (docs/benchmarks.md).
    generated_zh: int = 0
    mix_n: int = 2  # completions per GSM8K or generated prompt
    eval_samples: int = 12  # completions per held-out prompt: the ground truth is their mean
    max_new_tokens: int = 256
    temperature: float = 0.7  # a 135M model rambles at 1.0; the LenVM models whatever policy is used
    eval_fraction: float = 0.1
    # Cross-entropy rather than the paper's squared error: the same fixed point (the mean return),
    # but errors on long remainders, where returns crowd near -1, weigh more; predictions from the
    # prompt generalize better across domains (docs/benchmarks.md, "the demo's loss").
    loss: Loss = "bce"
    # An end head (lenvm.end_head) from the same rollouts: target rules wrap up toward where the
    # generator could next end; on unseen English rows At Least ended more answers naturally at
    # less decoding, Equal To scored the same at less (docs/benchmarks.md, "An end head").
    end_head: bool = True
    batch_size: int = 32  # on 2 CPU cores, 32 rows decode about 30% more tokens/s than 16
    backend: str = "auto"  # rollouts: vLLM where installed (faster), else our engine (lenvm.rollouts)
    seed: int = 0
    device: str | None = None  # default: the first accelerator, else the CPU
    dtype: str = "float32"
    progress: bool = True  # progress bars of the rollouts, the training and the end head


# What a demo's results depend on: a rerun into its folder with other values would mix two runs'
# prompts in one rollouts file.
DEMO_SETTINGS = (
    "model", "prompts", "n", "gsm8k", "gsm8k_path", "generated", "generated_zh", "mix_n",
    "eval_samples", "max_new_tokens", "temperature", "eval_fraction", "loss", "seed",
)  # fmt: skip


def _claim_folder(out: Path, config: DemoConfig) -> None:
    """The demo writes its files into ``out`` and resumes from them: refuse a folder that holds
    other files (they would be overwritten) or a demo run's results made with other settings."""
    settings = {k: getattr(config, k) for k in DEMO_SETTINGS}
    marker = out / "settings.json"
    made = any((out / name).exists() for name in ("rollouts.jsonl", "eval_rollouts.jsonl", "lenvm"))
    if any(out.iterdir()):  # run_demo made the folder
        if made and marker.is_file():
            changed = changed_settings(json.loads(marker.read_text(encoding="utf-8")), settings)
            if changed:
                raise InputError(
                    f"{out} holds a demo run with other settings ({', '.join(changed)}): use another "
                    "folder (--out), or delete this one"
                )
        elif not made and any(p.name != marker.name for p in out.iterdir()):
            raise InputError(
                f"{out} holds files that are not a demo's; the demo would overwrite them: use another "
                "folder (--out)"
            )
    write_json(marker, settings)


def _step(title: str) -> None:
    print(f"\n== {title}", flush=True)


def run_demo(config: DemoConfig, generator=None) -> dict:
    """Run the whole pipeline; returns (and writes) the summary.

    ``generator`` may pass the model named in ``config.model`` already loaded as
    ``(model, tokenizer)``.
    """
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: a file, not a folder for the demo")
    _gsm8k_missing(config)  # a file given that is not there: refused before anything is made
    out.mkdir(parents=True, exist_ok=True)
    # Two demos in one folder would append to one rollouts file.
    with RunLock(out, "running the demo in this folder"):
        _claim_folder(out, config)
        return _run(config, out, generator)


def _run(config: DemoConfig, out: Path, generator) -> dict:
    from lenvm.dataset import held_out_prompts
    from lenvm.decoding import SamplingParams
    from lenvm.model import LengthValueModel
    from lenvm.prompt_sets import builtin_prompts
    from lenvm.rollouts import read_rollouts, rollout
    from lenvm.training import TrainConfig, train
    from lenvm.values_view import render_html, token_values

    started = time.perf_counter()

    prompts = builtin_prompts(config.prompts, seed=config.seed)  # bad counts fail before loading
    mix = mix_prompts(config)
    held_ids = held_out_prompts([p.id for p in prompts], config.eval_fraction, config.seed)
    train_prompts = [p for p in prompts if p.id not in held_ids]
    eval_prompts = [p for p in prompts if p.id in held_ids]
    if not eval_prompts or not (train_prompts or mix):
        raise InputError(
            f"{len(prompts)} built-in prompts leave {len(eval_prompts)} held out and {len(train_prompts)} "
            "to train on: use more of them (--num-prompts)"
        )
    _step(f"1/4 generator: {config.model}")
    generator = generator or hub.load_generator(config.model, device=config.device, dtype=config.dtype)

    extra = f" and {len(mix)} GSM8K and generated prompts x {config.mix_n}" if mix else ""
    _step(
        f"2/4 rollouts: {len(train_prompts)} built-in prompts x {config.n}{extra} to train on, "
        f"{len(eval_prompts)} held-out prompts x {config.eval_samples}"
    )
    sampling = SamplingParams(
        temperature=config.temperature, max_new_tokens=config.max_new_tokens, seed=config.seed
    )
    rollout_started = time.perf_counter()
    summaries = [
        rollout(
            config.model,
            chosen,
            out / name,
            n=n,
            sampling=sampling,
            batch_size=config.batch_size,
            backend=config.backend,
            loaded=generator,
            device=config.device,
            dtype=config.dtype,
            progress=config.progress,
        )
        for chosen, name, n in [
            (train_prompts, "rollouts.jsonl", config.n),
            (mix, "rollouts.jsonl", config.mix_n),
            (eval_prompts, "eval_rollouts.jsonl", config.eval_samples),
        ]
        if chosen
    ]
    rollout_seconds = time.perf_counter() - rollout_started
    # Written once the rollouts are there: a rerun that they refuse (other sampling settings) keeps
    # the record of the prompts they were drawn for.
    write_text(
        out / "prompts.jsonl",
        "".join(
            json.dumps({"id": p.id, "prompt": p.text, **p.extra}, ensure_ascii=False) + "\n"
            for p in prompts + mix
        ),
    )
    records = read_rollouts(out / "rollouts.jsonl")
    eval_records = read_rollouts(out / "eval_rollouts.jsonl")

    _step("3/4 training an attached LenVM (head on the generator's frozen hidden states)")
    lenvm_dir = out / "lenvm"
    earlier = saved_end_head(lenvm_dir)  # training replaces the folder
    train_config = TrainConfig(kind="attached", loss=config.loss, seed=config.seed)
    result = train(
        records,
        config.model,
        lenvm_dir,
        train_config,
        generator=generator,
        eval_rollouts=eval_records,
        overwrite=True,  # the demo's own LenVM, trained again when the demo is run again
        progress=config.progress,
    )
    lenvm = LengthValueModel.from_pretrained(lenvm_dir, generator=generator)
    end_head = None
    if config.end_head:
        end_head = add_end_head(
            lenvm, lenvm_dir, records, eval_records, config.seed, earlier, config.progress
        )

    _step("4/4 held-out evaluation")
    by_id = {p.id: p for p in prompts}
    held = [by_id[i] for i in sorted(held_ids)]
    domains = by_domain(lenvm, held, eval_records, result.metrics["baseline_length"])
    # Show the longest held-out completion that ended by itself (or the longest at all).
    example = max(eval_records, key=lambda r: (r["finish_reason"] == "stop", r["num_tokens"]))
    trace = token_values(
        lenvm,
        by_id[example["prompt_id"]],
        example["completion_token_ids"],
        finished=example["finish_reason"] == "stop",
    )
    write_text(out / "values.html", render_html(trace, title=f"LenVM values: {example['prompt_id']}"))

    m = result.metrics
    every = records + eval_records
    report = {
        "config": {k: str(v) for k, v in asdict(config).items()},
        "gamma": result.gamma,
        "feature_layer": lenvm.feature_layer,
        "rollouts": {
            "backend": ", ".join(sorted({s.backend for s in summaries})),
            "completions": len(every),
            "finished": sum(r["finish_reason"] == "stop" for r in every),
            "seconds_this_run": round(rollout_seconds, 1),
            "tokens_per_second_this_run": round(
                sum(s.tokens_generated for s in summaries)
                / max(sum(s.seconds_this_run for s in summaries), 1e-9),
                1,
            ),
        },
        "training": {
            "seconds_this_run": round(result.seconds_this_run, 1),
            "data": result.data.to_dict(),
            "by_domain": training_mix(records),
        },
        "held_out": m,
        "held_out_by_domain": domains,
        "end_head": end_head,
        "wall_seconds": round(time.perf_counter() - started, 1),
        "files": {
            "lenvm": str(lenvm_dir),
            "values_html": str(out / "values.html"),
            "loss_curve": str(lenvm_dir / "loss.png"),
            "rollouts": str(out / "rollouts.jsonl"),
            "eval_rollouts": str(out / "eval_rollouts.jsonl"),
        },
    }
    write_json(out / "summary.json", report)
    write_text(out / "summary.md", _markdown(report))
    print("\n" + _markdown(report))
    return report


@dataclass
class SavedEndHead:
    """An end head saved in a LenVM folder, and the value head file it was trained beside."""

    settings: dict
    weights: dict[str, torch.Tensor]
    value_head: bytes


def saved_end_head(lenvm_dir: Path) -> SavedEndHead | None:
    """The end head of the LenVM folder ``lenvm_dir``, if it has one."""
    from safetensors.torch import load_file

    from lenvm.model import END_HEAD_NAME, HEAD_NAME, read_config

    if not (lenvm_dir / END_HEAD_NAME).is_file():
        return None
    settings = read_config(lenvm_dir).end_head
    if settings is None:
        return None
    weights = load_file(str(lenvm_dir / END_HEAD_NAME))
    return SavedEndHead(settings, weights, (lenvm_dir / HEAD_NAME).read_bytes())


def add_end_head(
    lenvm,
    lenvm_dir: Path,
    records: list[dict],
    eval_records: list[dict],
    seed: int,
    earlier: SavedEndHead | None,
    progress: bool = True,
) -> dict | None:
    """Give the demo's LenVM (saved at ``lenvm_dir``) an end head trained on its rollouts, and save
    it there. A resumed run whose value head came out the same as before (the same rollouts and
    settings) keeps the end head ``earlier`` trained beside it instead of spending another
    forward over every rollout. Returns the end head's training figures, or None with a note when
    no rollout ever reached a natural end."""
    from lenvm.end_head import train_end_head
    from lenvm.model import END_HEAD_NAME, HEAD_NAME, ValueHead, save_config

    if earlier is not None and earlier.value_head == (lenvm_dir / HEAD_NAME).read_bytes():
        head = ValueHead(lenvm.config.hidden_size, lenvm.config.head_hidden_size)
        head.load_state_dict(earlier.weights)
        lenvm.end_head, lenvm.config.end_head = head.to(lenvm.device).eval(), earlier.settings
        print("kept the end head trained beside the same value head before", flush=True)
    else:
        print("training its end head: tokens until the generator could next end naturally", flush=True)
        try:
            train_end_head(lenvm, records, eval_records, seed=seed, progress=progress)
        except InputError as e:  # nothing to learn from
            print(f"note: no end head ({e})", flush=True)
            return None
    save_config(lenvm_dir, lenvm.config, weights={END_HEAD_NAME: lenvm.end_head.state_dict()})
    return lenvm.config.end_head["training"]


def mix_prompts(config: DemoConfig) -> list[Prompt]:
    """The training mix besides the built-in prompts: ``config.gsm8k`` GSM8K training problems
    (drawn with the seed; none, with a note, when the default file is missing) and
    ``config.generated`` generated prompts and ``config.generated_zh`` generated Chinese ones,
    each with a ``domain``."""
    from lenvm.bench.tasks import read_gsm8k
    from lenvm.prompt_sets import generated_prompts

    mix = []
    if _gsm8k_missing(config):
        print(f"note: no GSM8K training file at {config.gsm8k_path}; training without GSM8K", flush=True)
    elif config.gsm8k:
        problems = read_gsm8k(config.gsm8k_path, id_prefix="gsm8k-train")
        chosen = random.Random(f"lenvm-demo-gsm8k-{config.seed}").sample(
            problems, min(config.gsm8k, len(problems))
        )
        mix += [p.prompt() for p in chosen]
    if config.generated:
        mix += generated_prompts(config.generated, seed=config.seed)
    if config.generated_zh:
        mix += generated_prompts(config.generated_zh, seed=config.seed, lang="zh")
    return mix


def _gsm8k_missing(config: DemoConfig) -> bool:
    """Whether the mix goes without the GSM8K problems it asks for because the default file is
    not there (a checkout without the shared data); a file named otherwise must be there."""
    if not config.gsm8k or Path(config.gsm8k_path).is_file():
        return False
    if config.gsm8k_path != DEFAULT_GSM8K_TRAIN:
        raise InputError(
            f"no GSM8K training file at {config.gsm8k_path}: give GSM8K's train.jsonl (--gsm8k), or "
            "leave GSM8K out of the mix (--gsm8k-problems 0)"
        )
    return True


def training_mix(records: list[dict]) -> dict[str, dict]:
    """Prompts, completions, mean length and cut completions of the training rollouts per domain
    (and language, for prompts not in English)."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        meta = r.get("meta") or {}
        domain = str(meta.get("domain", "all"))
        groups[f"{domain} ({meta['lang']})" if "lang" in meta else domain].append(r)
    return {
        d: {
            "prompts": len({r["prompt_id"] for r in group}),
            "completions": len(group),
            "mean_tokens": float(np.mean([r["num_tokens"] for r in group])),
            "cut": sum(r["finish_reason"] == "length" for r in group),
        }
        for d, group in sorted(groups.items())
    }


def by_domain(lenvm, prompts: list, eval_records: list[dict], baseline: float) -> dict[str, dict]:
    """Prompt-boundary MRE of the LenVM and of the ``baseline`` length per prompt domain, over the
    held-out ``prompts`` whose samples in ``eval_records`` give a ground truth."""
    from lenvm.dataset import examples_from_records
    from lenvm.evaluation import prompt_truths

    predicted = lenvm.predict_length(prompts)
    truths = prompt_truths(examples_from_records(eval_records, lenvm.config.eos_token_ids)[0], lenvm.gamma)
    pairs: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for prompt, guess in zip(prompts, predicted, strict=True):
        truth = truths.get(prompt.id)
        if truth is not None:
            pairs[prompt.extra["domain"]].append((guess, truth))
    return {
        d: {
            "prompts": len(group),
            "lenvm_mre": float(np.mean([abs(p - t) / t for p, t in group])),
            "baseline_mre": float(np.mean([abs(baseline - t) / t for _, t in group])),
        }
        for d, group in sorted(pairs.items())
    }


def _markdown(report: dict) -> str:
    m = report["held_out"]
    lines = [
        "# lenvm demo summary",
        "",
        f"gamma {report['gamma']:.4f} (p99 rule); {report['rollouts']['completions']} completions, "
        f"{report['rollouts']['finished']} ended with EOS (rollouts by {report['rollouts']['backend']}); "
        f"wall time of this run {report['wall_seconds']:.0f} s.",
        "",
        f"Held-out prompts: {m.get('eval_prompts', 0)} with a ground truth (the return-consistent mean "
        "length of their samples), "
        f"{m.get('eval_prompts_cut', 0)} more where most samples hit max_new_tokens; "
        f"{m.get('eval_finished', 0)} held-out completions ended with EOS.",
        "",
    ]
    if "prompt_mre" not in m:
        lines += ["No held-out completion ended with EOS: raise --max-new-tokens.", ""]
        return "\n".join(lines)
    lines += [
        "| metric | LenVM | baseline: the mean length of the training answers that ended |",
        "|---|---|---|",
        f"| prompt-boundary mean relative error | {_share(m['prompt_mre'])} "
        f"| {_share(m['baseline_prompt_mre'])} |",
        f"| per-token MAE of remaining length (tokens) | {m['token_mae']:.1f} "
        f"| {m['baseline_token_mae']:.1f} |",
        "",
        "| domain | prompts | LenVM MRE | baseline MRE |",
        "|---|---|---|---|",
    ]
    for domain, d in report["held_out_by_domain"].items():
        lines.append(
            f"| {domain} | {d['prompts']} | {_share(d['lenvm_mre'])} | {_share(d['baseline_mre'])} |"
        )
    end = report.get("end_head") or {}
    if "eval_mae" in end:
        lines += [
            "",
            f"End head: tokens until the generator could next end naturally, mean absolute error "
            f"{end['eval_mae']:.1f} on held-out states (the training median alone: "
            f"{end['eval_mae_constant']:.1f}).",
        ]
    lines += [
        "",
        "Training mix:",
        "",
        "| domain | prompts | completions | mean tokens | cut at max_new_tokens |",
        "|---|---|---|---|---|",
    ]
    for domain, d in report["training"]["by_domain"].items():
        lines.append(
            f"| {domain} | {d['prompts']} | {d['completions']} | {d['mean_tokens']:.0f} | {d['cut']} |"
        )
    lines += [
        "",
        "To score it on unseen prompts (GSM8K test problems, other domains) and against baselines: "
        "`lenvm bench predict --lenvm "
        f"{report['files']['lenvm']} --train-rollouts {report['files']['rollouts']} --gsm8k "
        "../shared/data/gsm8k/test.jsonl --gsm8k-rows 0:40`.",
        "",
        "Files: " + ", ".join(f"{k}: {v}" for k, v in report["files"].items()),
        "",
    ]
    return "\n".join(lines)


def _share(x: float | None) -> str:
    """A relative error as a percentage, or n/a where nothing was measured (NaN, or None once
    read back from JSON)."""
    return "n/a" if x is None or x != x else f"{x:.1%}"
