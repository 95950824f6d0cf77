"""Prompt-boundary length prediction against sampled ground truth, with two baselines.

For each held-out prompt, ``samples`` answers are drawn from the generator; the ground truth
is the return-consistent mean length ``L_GT = ln(1 - mean_i(1 - gamma**L_i)) / ln(gamma)``
(lengths count the EOS token, as the LenVM's do), by the rule training's evaluation uses
(:func:`lenvm.evaluation.prompt_length_truth`): a cut answer counts at its cut, and a prompt
with most answers cut has no truth and is reported apart. The LenVM predicts from ``V(s_0)`` alone.
Baselines, fitted on the LenVM's training rollouts: the training-set mean length, and a ridge
regression of ``log L_GT`` on prompt features (token count, the number the prompt asks for).
"""

from __future__ import annotations

import math
import os
import re
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from lenvm.bench.common import (
    Job,
    Models,
    Run,
    bench_sampling,
    item_request,
    load_models,
    markdown_table,
    pyplot,
    settings_of,
)
from lenvm.cli import options
from lenvm.evaluation import prompt_length_truth
from lenvm.hub import DEFAULT_MODEL
from lenvm.io import InputError
from lenvm.prompts import Prompt, as_prompt, encode_prompt, read_prompts
from lenvm.returns import return_consistent_mean_length
from lenvm.rollouts import read_rollouts

PREDICTORS = {"lenvm": "LenVM V(s_0)", "mean": "training mean", "ridge": "ridge on prompt features"}
# "List 7 ...", "write 3 ...", "64 tokens", "64个token", "300字": the count a prompt asks for.
_ASKED = [
    re.compile(r"\b(?:list|name|give|write|suggest)\s+(?:me\s+)?(\d+)\b", re.IGNORECASE),
    re.compile(r"(\d+)\s*(?:个)?\s*(?:tokens?|words?|sentences?|items?|paragraphs?|字)", re.IGNORECASE),
]


def asked_number(text: str) -> int | None:
    """The count a prompt asks for ("List 7 fruits" -> 7), or None."""
    for pattern in _ASKED:
        match = pattern.search(text)
        if match:
            return int(match.group(1))
    return None


def prompt_features(tokenizer, prompt: Prompt) -> list[float]:
    """``[log(1 + prompt tokens), log(1 + asked number), asks for a number]``."""
    text = prompt.text if prompt.text is not None else "\n".join(m["content"] for m in prompt.messages)
    asked = asked_number(text)
    return [
        math.log1p(len(encode_prompt(tokenizer, prompt))),
        math.log1p(asked or 0),
        float(asked is not None),
    ]


@dataclass
class Ridge:
    """Ridge regression in closed form on standardized features (the intercept is not shrunk)."""

    coef: np.ndarray
    intercept: float

    @classmethod
    def fit(cls, x: np.ndarray, y: np.ndarray, alpha: float = 1.0) -> Ridge:
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        mean = x.mean(axis=0)
        scale = x.std(axis=0)
        scale[scale == 0] = 1.0
        z = (x - mean) / scale
        # Least squares on [z; sqrt(alpha)·I] is the ridge solution (z'z + alpha·I)^-1 z'y, and
        # stays defined (minimum norm) when a feature never varies in the training set.
        rows = np.vstack([z, math.sqrt(alpha) * np.eye(z.shape[1])])
        target = np.concatenate([y - y.mean(), np.zeros(z.shape[1])])
        w = np.linalg.lstsq(rows, target, rcond=None)[0]
        coef = w / scale
        return cls(coef, float(y.mean() - mean @ coef))

    def predict(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x, dtype=np.float64) @ self.coef + self.intercept


def sample_length(record: dict[str, Any]) -> int:
    """Generated tokens with the EOS counted when the answer ended, as in rollout records."""
    return record["num_tokens"] + (record["finish_reason"] != "length")


def _train_prompts(path: str | os.PathLike) -> tuple[list[Prompt], list[list[int]]]:
    """Prompts and completion lengths (EOS included) of a rollouts file, grouped by prompt."""
    prompts: dict[str, Prompt] = {}
    lengths: dict[str, list[int]] = defaultdict(list)
    for record in read_rollouts(path):
        pid = record["prompt_id"]
        prompts.setdefault(pid, as_prompt(record["prompt"], pid))
        lengths[pid].append(record["num_tokens"])
    if not prompts:
        raise InputError(f"{path}: no rollouts")
    return list(prompts.values()), [lengths[pid] for pid in prompts]


def run_prediction(
    out: str | os.PathLike,
    *,
    prompts: str | os.PathLike,
    model: str | os.PathLike = DEFAULT_MODEL,
    lenvm: str | os.PathLike | None = None,
    train_rollouts: str | os.PathLike | None = None,
    samples: int = 64,
    limit: int | None = None,
    domain_field: str = "domain",
    ridge_alpha: float = 1.0,
    max_new_tokens: int = 1024,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    min_p: float | None = None,
    seed: int = 0,
    device: str | None = None,
    dtype: str = "float32",
    batch_size: int = 8,
    progress: bool = True,
    models: Models | None = None,
    backend: str = "engine",
) -> dict[str, Any]:
    """Prompt-boundary length prediction on held-out ``prompts`` (a prompts JSONL whose records
    carry ``domain_field``); writes ``results.json``, ``table.md`` and ``prediction.png``.

    ``train_rollouts`` (the LenVM's training rollouts) fits the two baselines; without it only
    the LenVM is scored. Sampling options left at None follow the LenVM's training policy, which
    is the policy its values describe.
    """
    started = time.perf_counter()
    if samples < 1:
        raise InputError("samples must be at least 1")
    models = models or load_models(model, lenvm, device, dtype, backend)
    value_model = models.require_lenvm("length prediction")
    held_out = read_prompts(prompts)[:limit]
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
        Job(
            f"{p.id}/{i}",
            item_request(sampling, p, f"{p.id}/{i}"),
            {"prompt_id": p.id, "sample": i, "domain": str(p.extra.get(domain_field, "all"))},
        )
        for p in held_out
        for i in range(samples)
    ]
    settings = settings_of(models, sampling, prompts=str(prompts), samples=samples)
    with Run(out, settings) as run:
        items = run.run_jobs(jobs, models, batch_size, "prediction samples", progress)
        gamma = value_model.gamma
        by_prompt: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for item in items:
            by_prompt[item["prompt_id"]].append(item)
        truths = {
            p.id: prompt_length_truth(
                [sample_length(i) for i in by_prompt[p.id]],
                [i["finish_reason"] != "length" for i in by_prompt[p.id]],
                gamma,
            )
            for p in held_out
        }
        mostly_cut = [pid for pid, t in truths.items() if t is None]
        held_out = [p for p in held_out if truths[p.id] is not None]
        if not held_out:
            raise InputError(
                f"every prompt had most of its samples cut at max_new_tokens={max_new_tokens}: raise it"
            )
        truth = np.array([truths[p.id] for p in held_out])
        predictions = {"lenvm": np.array(value_model.predict_length(held_out, batch_size=batch_size))}
        baselines = {}
        if train_rollouts is not None:
            predictions.update(_baselines(models.tokenizer, held_out, train_rollouts, gamma, ridge_alpha))
            baselines = {"train_rollouts": str(train_rollouts), "ridge_alpha": ridge_alpha}
        domains = [str(p.extra.get(domain_field, "all")) for p in held_out]
        metrics = _metrics(truth, predictions, domains)
        per_prompt = [
            {
                "prompt_id": p.id,
                "domain": d,
                "truth": float(t),
                "cut_samples": sum(i["finish_reason"] == "length" for i in by_prompt[p.id]),
                **{name: float(pred[k]) for name, pred in predictions.items()},
            }
            for k, (p, d, t) in enumerate(zip(held_out, domains, truth, strict=True))
        ]
        results = {
            "benchmark": "predict",
            "metrics": metrics,
            "gamma": gamma,
            "prompts": len(held_out),
            "prompts_mostly_cut": mostly_cut,
            "samples": samples,
            "cut_samples": sum(i["finish_reason"] == "length" for i in items),
            "per_prompt": per_prompt,
            "baselines": baselines,
            "settings": settings,
            "seconds": round(time.perf_counter() - started, 1),
        }
        run.write_json("results.json", results)
        run.write_text(
            "table.md", _markdown(metrics, samples, results["cut_samples"], len(items), len(mostly_cut))
        )
        _plot(run, truth, predictions, metrics)
    return results


def _baselines(tokenizer, held_out, train_rollouts, gamma: float, alpha: float) -> dict[str, np.ndarray]:
    train, lengths = _train_prompts(train_rollouts)
    mean_length = float(np.mean([n for group in lengths for n in group]))
    x_train = np.array([prompt_features(tokenizer, p) for p in train])
    y_train = np.log([return_consistent_mean_length(group, gamma) for group in lengths])
    ridge = Ridge.fit(x_train, y_train, alpha)
    x_test = np.array([prompt_features(tokenizer, p) for p in held_out])
    return {
        "mean": np.full(len(held_out), mean_length),
        "ridge": np.exp(ridge.predict(x_test)),
    }


def _scores(truth: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    error = np.abs(predicted - truth)
    return {"mre": float(np.mean(error / truth)), "mae": float(np.mean(error))}


def _metrics(truth: np.ndarray, predictions: dict[str, np.ndarray], domains: Sequence[str]) -> dict:
    """Per domain (and ``all``): prompt count, mean ground truth and each predictor's MRE/MAE."""
    groups = {d: np.array([x == d for x in domains]) for d in sorted(set(domains))}
    if len(groups) > 1:
        groups["all"] = np.ones(len(domains), dtype=bool)
    return {
        domain: {
            "prompts": int(mask.sum()),
            "mean_truth": float(truth[mask].mean()),
            **{name: _scores(truth[mask], pred[mask]) for name, pred in predictions.items()},
        }
        for domain, mask in groups.items()
    }


def _markdown(metrics: dict, samples: int, cut: int, total: int, mostly_cut: int) -> str:
    names = [n for n in PREDICTORS if n in next(iter(metrics.values()))]
    header = ["domain", "prompts", "mean L_GT"]
    for name in names:
        header += [f"{PREDICTORS[name]} MRE", f"{PREDICTORS[name]} MAE"]
    rows = []
    for domain, m in metrics.items():
        row = [domain, m["prompts"], f"{m['mean_truth']:.1f}"]
        for name in names:
            row += [f"{100 * m[name]['mre']:.1f}%", f"{m[name]['mae']:.1f}"]
        rows.append(row)
    note = (
        f"Prompt-boundary length prediction: ground truth from {samples} samples per prompt "
        f"(return-consistent mean length, EOS counted); MRE = mean |pred - L_GT| / L_GT, "
        f"MAE in tokens. {cut} of {total} samples hit max_new_tokens (counted at their cut); "
        f"{mostly_cut} prompts with most samples cut have no ground truth and are left out.\n\n"
    )
    return note + markdown_table(header, rows)


def _plot(run: Run, truth: np.ndarray, predictions: dict[str, np.ndarray], metrics: dict) -> None:
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, pred in predictions.items():
        left.scatter(truth, pred, s=14, alpha=0.7, label=PREDICTORS[name])
    edge = [max(1.0, min(truth.min(), *(p.min() for p in predictions.values()))),
            max(truth.max(), *(p.max() for p in predictions.values()))]  # fmt: skip
    left.plot(edge, edge, "k--", lw=1)
    left.set_xscale("log")
    left.set_yscale("log")
    left.set_xlabel("ground truth L_GT (tokens)")
    left.set_ylabel("predicted length (tokens)")
    left.legend(fontsize=8)
    left.grid(alpha=0.3)
    domains = list(metrics)
    width = 0.8 / len(predictions)
    for k, name in enumerate(predictions):
        right.bar(
            np.arange(len(domains)) + k * width,
            [100 * metrics[d][name]["mre"] for d in domains],
            width,
            label=PREDICTORS[name],
        )
    right.set_xticks(
        np.arange(len(domains)) + width * (len(predictions) - 1) / 2, domains, rotation=35, ha="right"
    )
    right.set_ylabel("mean relative error (%)")
    right.legend(fontsize=8)
    right.grid(alpha=0.3, axis="y")
    run.save_figure(fig, "prediction.png")


# -- command line ---------------------------------------------------------------------------

COMMAND = "predict"
HELP = "prompt-boundary length prediction against two baselines"
TABLE = "table.md"


def add_arguments(p) -> None:
    p.add_argument("--lenvm", help="LenVM folder")
    p.add_argument("--prompts", required=True, help="held-out prompts JSONL (with a 'domain' field)")
    p.add_argument("--train-rollouts", help="rollouts the baselines are fitted on")
    p.add_argument("--samples", type=int, default=64, help="completions per prompt")
    p.add_argument("--limit", type=int, help="first N prompts")
    options.add_backend(p)
    options.add_sampling(p, seed_help="every sample's seed derives from it (default 0)")
    p.add_argument("--batch-size", type=int, default=8, help="requests decoded at once")


def main(args) -> None:
    run_prediction(
        args.out,
        model=args.model,
        lenvm=args.lenvm,
        prompts=args.prompts,
        train_rollouts=args.train_rollouts,
        samples=args.samples,
        limit=args.limit,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        batch_size=args.batch_size,
        device=args.device,
        dtype=args.dtype,
        progress=args.progress,
        backend=args.backend,
        **options.sampling_overrides(args),
    )
