"""The main job, end to end on one model: rollouts, training, held-out evaluation, a value view.

Every step writes under one folder and is skipped or resumed when run again.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from lenvm import hub
from lenvm.io import write_json, write_text


@dataclass
class DemoConfig:
    out: Path = Path("lenvm-demo")
    model: str = hub.DEFAULT_MODEL
    prompts: int = 240
    n: int = 4  # completions per training prompt
    eval_samples: int = 12  # completions per held-out prompt: the ground truth is their mean
    max_new_tokens: int = 256
    temperature: float = 0.7  # a 135M model rambles at 1.0; the LenVM models whatever policy is used
    eval_fraction: float = 0.1
    batch_size: int = 32  # on 2 CPU cores, 32 rows decode about 30% more tokens/s than 16
    seed: int = 0
    device: str | None = None  # default: the first accelerator, else the CPU
    dtype: str = "float32"


def _step(title: str) -> None:
    print(f"\n== {title}", flush=True)


def run_demo(config: DemoConfig, generator=None) -> dict:
    """Run the whole pipeline; returns (and writes) the summary.

    ``generator`` may pass the model named in ``config.model`` already loaded as
    ``(model, tokenizer)``.
    """
    from lenvm.dataset import held_out_prompts
    from lenvm.decoding import SamplingParams
    from lenvm.model import LengthValueModel
    from lenvm.prompt_sets import builtin_prompts
    from lenvm.rollouts import read_rollouts, rollout
    from lenvm.training import TrainConfig, train
    from lenvm.values_view import render_html, token_values

    started = time.perf_counter()
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)

    prompts = builtin_prompts(config.prompts, seed=config.seed)  # bad counts fail before loading
    _step(f"1/4 generator: {config.model}")
    generator = generator or hub.load_generator(config.model, device=config.device, dtype=config.dtype)
    write_text(
        out / "prompts.jsonl",
        "".join(json.dumps({"id": p.id, "prompt": p.text, **p.extra}) + "\n" for p in prompts),
    )
    held_ids = held_out_prompts([p.id for p in prompts], config.eval_fraction, config.seed)
    train_prompts = [p for p in prompts if p.id not in held_ids]
    eval_prompts = [p for p in prompts if p.id in held_ids]

    _step(
        f"2/4 rollouts: {len(train_prompts)} training prompts x {config.n}, "
        f"{len(eval_prompts)} held-out prompts x {config.eval_samples}"
    )
    sampling = SamplingParams(
        temperature=config.temperature, max_new_tokens=config.max_new_tokens, seed=config.seed
    )
    rollout_started = time.perf_counter()
    summaries = [
        rollout(generator, chosen, out / name, n=n, sampling=sampling, batch_size=config.batch_size)
        for chosen, name, n in [
            (train_prompts, "rollouts.jsonl", config.n),
            (eval_prompts, "eval_rollouts.jsonl", config.eval_samples),
        ]
    ]
    rollout_seconds = time.perf_counter() - rollout_started
    records = read_rollouts(out / "rollouts.jsonl")
    eval_records = read_rollouts(out / "eval_rollouts.jsonl")

    _step("3/4 training an attached LenVM (head on the generator's frozen hidden states)")
    lenvm_dir = out / "lenvm"
    train_config = TrainConfig(kind="attached", seed=config.seed)
    result = train(
        records, config.model, lenvm_dir, train_config, generator=generator, eval_rollouts=eval_records
    )
    lenvm = LengthValueModel.from_pretrained(lenvm_dir, generator=generator)

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
            "completions": len(every),
            "finished": sum(r["finish_reason"] == "stop" for r in every),
            "seconds_this_run": round(rollout_seconds, 1),
            "tokens_per_second_this_run": round(
                sum(s.tokens_generated for s in summaries) / max(sum(s.seconds for s in summaries), 1e-9), 1
            ),
        },
        "training": {"seconds": round(result.seconds, 1), "data": result.data.to_dict()},
        "held_out": m,
        "held_out_by_domain": domains,
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
        f"{report['rollouts']['finished']} ended with EOS; wall time {report['wall_seconds']:.0f} s.",
        "",
        f"Held-out prompts: {m.get('eval_prompts', 0)} with a ground truth (the mean of their samples), "
        f"{m.get('eval_prompts_cut', 0)} more where most samples hit max_new_tokens; "
        f"{m.get('eval_completions', 0)} held-out completions ended with EOS.",
        "",
    ]
    if "prompt_mre" not in m:
        lines += ["No held-out completion ended with EOS: raise --max-new-tokens.", ""]
        return "\n".join(lines)
    lines += [
        "| metric | LenVM | mean-length baseline |",
        "|---|---|---|",
        f"| prompt-boundary mean relative error | {m['prompt_mre']:.1%} | {m['baseline_prompt_mre']:.1%} |",
        f"| per-token MAE of remaining length (tokens) | {m['token_mae']:.1f} "
        f"| {m['baseline_token_mae']:.1f} |",
        "",
        "| domain | prompts | LenVM MRE | baseline MRE |",
        "|---|---|---|---|",
    ]
    for domain, d in report["held_out_by_domain"].items():
        lines.append(f"| {domain} | {d['prompts']} | {d['lenvm_mre']:.1%} | {d['baseline_mre']:.1%} |")
    lines += ["", "Files: " + ", ".join(f"{k}: {v}" for k, v in report["files"].items()), ""]
    return "\n".join(lines)
