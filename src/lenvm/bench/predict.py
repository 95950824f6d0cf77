"""Prompt-boundary length prediction against sampled ground truth, in and across domains.

What a scheduler needs from a length predictor: for each held-out prompt (prompt files with a
``domain`` per prompt, and GSM8K problems), ``samples`` answers are drawn from the generator
(stored as a rollouts file, ``samples.jsonl``, which resumes and which ``lenvm bench schedule``
replays). The ground truth of a prompt is the return-consistent mean length of its samples
(:func:`lenvm.evaluation.prompt_length_truth`, the rule training's evaluation uses): a cut answer
counts at its cut, and a prompt with most answers cut has no truth and is reported apart.

Predictors: the LenVM (``V(s_0)`` alone), and baselines fitted on the LenVM's training rollouts
that stay inside what they saw: the training mean length; ``log L`` linear in the log prompt
length; and a ridge regression of ``log L`` on prompt features (prompt length, the number the
prompt asks for). Features are clipped to their training range and predictions to the training
lengths' range, so a prompt unlike any training prompt gets a length a training prompt had, not
an extrapolation. Scores per domain and overall: mean relative error, mean absolute error
(tokens) and Spearman's rank correlation (what a shortest-first queue depends on).

Existing rollouts can serve as the ground truth instead (``truth_rollouts``: say the held-out
answers a demo or a training run sampled): their prompts are the held-out prompts, their answers
the samples, nothing is drawn; they must come from the generator under one sampling policy.

In domain: every predictor as trained. Across domains (``cross_domain``): for each named domain a
LenVM is trained, like the given one, on its training rollouts without that domain, and scored on
that domain's prompts, beside baselines fitted without it too.
"""

from __future__ import annotations

import math
import os
import re
import time
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, cast

import numpy as np

from lenvm.bench import tasks
from lenvm.bench.common import (
    Models,
    bench_sampling,
    load_models,
    markdown_table,
    refuse_model_folder,
)
from lenvm.cli import options
from lenvm.evaluation import prompt_length_truth, spearman, truth_reliability
from lenvm.figures import save_png, subplots, text_label
from lenvm.hub import model_name
from lenvm.io import InputError, RunLock, fingerprint, positive_count, write_json, write_text
from lenvm.prompts import Prompt, encode_prompt, prompt_key, read_prompts
from lenvm.returns import return_consistent_mean_length
from lenvm.rollouts import read_rollouts, rollout

PREDICTORS = {
    "lenvm": "LenVM V(s_0)",
    "ridge": "ridge on prompt features",
    "prompt_length": "prompt length",
    "mean": "training mean (every answer, a cut one at its cut)",
    "mean_rc": "training mean, return-consistent",
}
# "List 7 ...", "write 3 ...", "64 tokens", "64个token", "300字": the count a prompt asks for.
_ASKED = [
    re.compile(r"\b(?:list|name|give|write|suggest)\s+(?:me\s+)?(\d+)\b", re.IGNORECASE),
    re.compile(
        r"(\d+)\s*(?:个)?\s*(?:tokens?|words?|sentences?|items?|paragraphs?|bullet points?|字)", re.IGNORECASE
    ),
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
    asked = asked_number(prompt.plain_text())
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


@dataclass
class ClippedRidge:
    """A ridge regression that never leaves its training data's range: inputs are clipped to the
    training features' range and outputs to the training targets' range."""

    ridge: Ridge
    x_low: np.ndarray
    x_high: np.ndarray
    y_low: float
    y_high: float

    @classmethod
    def fit(cls, x: np.ndarray, y: np.ndarray, alpha: float = 1.0) -> ClippedRidge:
        x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
        return cls(Ridge.fit(x, y, alpha), x.min(axis=0), x.max(axis=0), float(y.min()), float(y.max()))

    def predict(self, x: np.ndarray) -> np.ndarray:
        inside = np.clip(np.asarray(x, dtype=np.float64), self.x_low, self.x_high)
        return np.clip(self.ridge.predict(inside), self.y_low, self.y_high)


def sample_length(record: dict[str, Any]) -> int:
    """Generated tokens, the EOS among them when the answer ended: what a LenVM's length counts
    and a rollout record's ``num_tokens`` already is."""
    return record["num_tokens"]


def record_domain(record: dict[str, Any], field: str = "domain") -> str:
    """The domain a rollout record's prompt carried (``all`` when none)."""
    return str((record.get("meta") or {}).get(field, "all"))


def truths_of(records: list[dict[str, Any]], gamma: float) -> dict[str, float | None]:
    """The ground-truth length of each prompt id of a rollouts file (None: most samples cut)."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        groups[r["prompt_id"]].append(r)
    return {
        pid: prompt_length_truth(
            [sample_length(r) for r in group], [r["finish_reason"] != "length" for r in group], gamma
        )
        for pid, group in groups.items()
    }


@dataclass
class Baselines:
    """Length predictors from the prompt alone, fitted on training rollouts (see the module doc)."""

    mean_length: float  # the arithmetic mean of the training answers' lengths
    mean_rc_length: float  # their return-consistent mean: what the truth and the LenVM measure
    prompt_length: ClippedRidge
    ridge: ClippedRidge

    @classmethod
    def fit(cls, tokenizer, records: list[dict[str, Any]], gamma: float, alpha: float = 1.0) -> Baselines:
        """The regressions fit each training prompt's return-consistent mean length (cut answers
        at their cut: the baselines learn what the rollouts show); the constants are the mean of
        every training answer's length, arithmetic (``mean``) and return-consistent (``mean_rc``,
        on the truth's footing: lower where lengths have a long tail)."""
        lengths: dict[str, list[int]] = defaultdict(list)
        for r in records:
            lengths[r["prompt_id"]].append(sample_length(r))
        prompts = _prompts_of(records)
        x = np.array([prompt_features(tokenizer, p) for p in prompts])
        y = np.log([return_consistent_mean_length(lengths[p.id], gamma) for p in prompts])
        return cls(
            mean_length=float(np.mean([sample_length(r) for r in records])),
            mean_rc_length=return_consistent_mean_length([sample_length(r) for r in records], gamma),
            prompt_length=ClippedRidge.fit(x[:, :1], y, alpha),
            ridge=ClippedRidge.fit(x, y, alpha),
        )

    def predict(self, tokenizer, prompts: list[Prompt]) -> dict[str, np.ndarray]:
        x = np.array([prompt_features(tokenizer, p) for p in prompts])
        return {
            "ridge": np.exp(self.ridge.predict(x)),
            "prompt_length": np.exp(self.prompt_length.predict(x[:, :1])),
            "mean": np.full(len(prompts), self.mean_length),
            "mean_rc": np.full(len(prompts), self.mean_rc_length),
        }


def _prompts_of(records: list[dict[str, Any]]) -> list[Prompt]:
    from lenvm.rollouts import record_prompt

    prompts: dict[str, Prompt] = {}
    for r in records:
        prompts.setdefault(r["prompt_id"], record_prompt(r))
    return list(prompts.values())


def evaluation_prompts(
    prompts: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    gsm8k: str | os.PathLike | None = None,
    gsm8k_rows: tuple[int, int] | None = None,
    limit: int | None = None,
) -> list[Prompt]:
    """Prompts from prompt files (the first ``limit`` of each) and GSM8K problems (rows
    ``gsm8k_rows[0]`` up to ``gsm8k_rows[1]`` of the file, domain ``math``)."""
    paths = [prompts] if isinstance(prompts, str | os.PathLike) else list(prompts or [])
    chosen = [p for path in paths for p in read_prompts(path)[:limit]]
    if gsm8k is not None:
        start, stop = gsm8k_rows or (0, None)
        problems = tasks.read_gsm8k(gsm8k, stop)[start:]
        if not problems:
            raise InputError(f"{gsm8k}: no problems in rows {start}:{stop}")
        chosen += [p.prompt() for p in problems]
    if not chosen:
        raise InputError("no held-out prompts: give prompt files or GSM8K problems")
    ids = [p.id for p in chosen]
    if len(set(ids)) != len(ids):
        raise InputError("held-out prompt ids must be unique across the prompt sources")
    return chosen


POLICY_KEYS = ("temperature", "top_p", "top_k", "min_p", "max_new_tokens")


def check_generator(records: list[dict[str, Any]], generator: str, what: str) -> None:
    """Refuse rollout ``records`` that hold answers of another generator than ``generator``."""
    named = model_name(generator)
    names = {str(r["generator"]) for r in records if r.get("generator") is not None}
    others = sorted(name for name in names if model_name(name) != named)
    if others:
        raise InputError(f"{what} hold answers of {', '.join(others)}, not of {generator}")


def truth_records(paths: Sequence[str | os.PathLike], generator: str) -> tuple[list[dict[str, Any]], dict]:
    """The records of rollout files whose answers are the ground truth, and the sampling policy
    they share. Refused: no records, answers of another generator, several policies (a mean
    length of a mix describes none of them), and one sample listed twice (the same prompt, sample
    index, seed and backend)."""
    records = [r for path in paths for r in read_rollouts(path)]
    if not records:
        raise InputError(f"no rollout records in {', '.join(map(str, paths))}")
    check_generator(records, generator, "the truth rollouts")
    policies = {tuple((r.get("sampling") or {}).get(k) for k in POLICY_KEYS) for r in records}
    if len(policies) > 1:
        shown = "; ".join(
            ", ".join(f"{k}={v}" for k, v in zip(POLICY_KEYS, p, strict=True)) for p in policies
        )
        raise InputError(f"the truth rollouts mix sampling policies ({shown}): give answers of one")
    seen = set()
    for r in records:
        drawn = r.get("sampling") or {}
        key = (r["prompt_id"], r.get("sample_index"), drawn.get("seed"), drawn.get("backend"))
        if key in seen:
            raise InputError(
                f"the truth rollouts hold sample {key[1]} of {key[0]!r} twice (same seed and backend)"
            )
        seen.add(key)
    return records, dict(zip(POLICY_KEYS, policies.pop(), strict=True))


def run_prediction(
    out: str | os.PathLike,
    *,
    prompts: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    gsm8k: str | os.PathLike | None = None,
    gsm8k_rows: tuple[int, int] | None = None,
    model: str | os.PathLike | None = None,
    lenvm: str | os.PathLike | None = None,
    train_rollouts: str | os.PathLike | None = None,
    cross_domain: Sequence[str] = (),
    samples: int = 8,
    limit: int | None = None,
    domain_field: str = "domain",
    ridge_alpha: float = 1.0,
    max_new_tokens: int = 512,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    min_p: float | None = None,
    seed: int = 0,
    device: str | None = None,
    dtype: str = "float32",
    batch_size: int = 16,
    progress: bool = True,
    models: Models | None = None,
    backend: str = "engine",
    truth_rollouts: Sequence[str | os.PathLike] | None = None,
) -> dict[str, Any]:
    """Prompt-boundary length prediction on held-out prompts (see the module doc); writes
    ``samples.jsonl``, ``results.json``, ``table.md``, ``calibration.png`` and ``prediction.png``.

    ``train_rollouts`` (the LenVM's training rollouts) fits the baselines, guards against
    held-out prompts that were trained on, and trains the ``cross_domain`` LenVMs (under
    ``out/cross/``, in the folder :func:`cross_domain_folder` names; ``results.json``'s
    ``cross_domain_lenvm`` says where each is); without it only the LenVM is scored. Sampling
    options left at None follow the LenVM's training policy, the policy its values describe. The
    samples depend on the generator and the policy only, so other LenVMs can be scored on the
    same folder.
    ``truth_rollouts``: score on these rollouts' prompts and answers instead of prompts to sample
    (see :func:`truth_records`; ``samples`` and the sampling options then do not apply).
    """
    started = time.perf_counter()
    samples = positive_count(samples, "samples")
    if truth_rollouts and (prompts or gsm8k is not None):
        raise InputError("score on given rollouts or on prompts to sample, not both")
    # Given rollouts hold their own prompts (read below); else the prompts to sample, checked early.
    held_out = [] if truth_rollouts else evaluation_prompts(prompts, gsm8k, gsm8k_rows, limit)
    if cross_domain and train_rollouts is None:
        raise InputError("cross-domain tables train LenVMs without a domain: give the training rollouts")
    models = models or load_models(model, lenvm, device, dtype, backend)
    value_model = models.require_lenvm("length prediction")
    if truth_rollouts:
        records, policy = truth_records(truth_rollouts, models.name)
        held_out = _prompts_of(records)
        domain_of = {r["prompt_id"]: record_domain(r, domain_field) for r in records}
        counts = Counter(r["prompt_id"] for r in records).values()
        samples, fewest = max(counts), min(counts)
    else:
        domain_of = {p.id: str(p.extra.get(domain_field, "all")) for p in held_out}
        fewest = samples
    train_records = read_rollouts(train_rollouts) if train_rollouts is not None else None
    if train_records is not None:
        _check_not_trained_on(held_out, train_records)
    missing = sorted(set(cross_domain) - set(domain_of.values()))
    if missing:
        raise InputError(f"no held-out prompt has the cross-domain domain(s) {missing}")

    out = Path(out)
    refuse_model_folder(out)
    out.mkdir(parents=True, exist_ok=True)
    # Two runs into one folder would sample into one file and score each other's duplicates.
    with RunLock(out, "writing this results folder"):
        if not truth_rollouts:
            sampling = bench_sampling(
                models,
                max_new_tokens,
                temperature=temperature,
                top_p=top_p,
                top_k=top_k,
                min_p=min_p,
                seed=seed,
            )
            policy = sampling.policy()
            samples_path = out / "samples.jsonl"
            # The samples come from vLLM where it is installed (lenvm.rollouts: backend "auto"), and
            # from vLLM or nothing under --backend vllm.
            backend = "vllm" if models.backend == "vllm" else "auto"
            rollout(models.name, held_out, samples_path, n=samples, sampling=sampling, batch_size=batch_size,
                    backend=backend, loaded=(models.generator, models.tokenizer), dtype=models.dtype,
                    progress=progress)  # fmt: skip
            wanted = {p.id for p in held_out}
            records = [
                r
                for r in read_rollouts(samples_path)
                if r["prompt_id"] in wanted and r["sample_index"] < samples
            ]

        clock = time.perf_counter()
        lenvm_lengths = np.array(value_model.predict_length(held_out, batch_size=batch_size))
        prediction_seconds = time.perf_counter() - clock
        in_domain = _score(
            held_out, records, value_model.gamma, lenvm_lengths, models, train_records, domain_of, ridge_alpha
        )
        cross = {}
        # Cross-domain tables without training rollouts were refused above.
        cross_records = cast("list[dict[str, Any]]", train_records)
        for domain in cross_domain:
            subset = [p for p in held_out if domain_of[p.id] == domain]
            reduced = [r for r in cross_records if record_domain(r, domain_field) != domain]
            if len(reduced) == len(cross_records):
                raise InputError(f"the training rollouts hold no prompt of domain {domain!r}")
            folder = Path("cross", cross_domain_folder(domain))
            without = _lenvm_without(out / folder, reduced, value_model, models, progress)
            lengths = np.array(without.predict_length(subset, batch_size=batch_size))
            cross[domain] = _score(
                subset, records, without.gamma, lengths, models, reduced, domain_of, ridge_alpha
            )
            cross[domain]["lenvm"] = (folder / "lenvm").as_posix()
            cross[domain]["gamma"] = without.gamma

        results = {
            "benchmark": "predict",
            "metrics": in_domain["metrics"],
            "cross_domain": {d: c["metrics"][d] for d, c in cross.items()},
            "cross_domain_gamma": {d: c["gamma"] for d, c in cross.items()},  # their truths' gamma
            "cross_domain_lenvm": {d: c["lenvm"] for d, c in cross.items()},  # inside the results folder
            "gamma": value_model.gamma,
            "prompts": len(in_domain["per_prompt"]),
            "prompts_mostly_cut": in_domain["mostly_cut"],
            "samples": samples,  # per prompt, at most
            "samples_fewest": fewest,  # per prompt, at least (given rollouts may hold uneven counts)
            "cut_samples": sum(r["finish_reason"] == "length" for r in records),
            "per_prompt": in_domain["per_prompt"],
            "cross_per_prompt": {d: c["per_prompt"] for d, c in cross.items()},
            "prediction": {
                "prompts": len(held_out),
                "seconds": round(prediction_seconds, 3),
                "prompts_per_second": round(len(held_out) / max(prediction_seconds, 1e-9), 1),
                "batch_size": batch_size,
            },
            "baselines": {"train_rollouts": str(train_rollouts), "ridge_alpha": ridge_alpha}
            if train_records is not None
            else {},
            "settings": {
                **models.identity(),
                **policy,
                "samples": samples,
                "truth_rollouts": [str(path) for path in truth_rollouts or []],
                "held_out": [p.id for p in held_out],
            },
            "seconds_this_run": round(time.perf_counter() - started, 1),
        }
        write_json(out / "results.json", results)
        write_text(out / "table.md", _markdown(results, len(records)))
        _plot(out, results)
        return results


def _check_not_trained_on(held_out: list[Prompt], train_records: list[dict[str, Any]]) -> None:
    trained = {prompt_key(r) for r in train_records}
    overlap = [p.id for p in held_out if p.key() in trained]
    if overlap:
        raise InputError(
            f"{len(overlap)} held-out prompt(s) were trained on, for example {overlap[0]!r}: "
            "a held-out prompt must not be in the training rollouts"
        )


def _score(held_out, records, gamma, lenvm_lengths, models, train_records, domain_of, alpha) -> dict:
    """Truths, every predictor's predictions and the metrics over ``held_out``."""
    truths = truths_of([r for r in records if r["prompt_id"] in {p.id for p in held_out}], gamma)
    keep = [k for k, p in enumerate(held_out) if truths.get(p.id) is not None]
    if not keep:
        raise InputError("every prompt had most of its samples cut at max_new_tokens: raise it")
    kept = [held_out[k] for k in keep]
    predictions = {"lenvm": lenvm_lengths[keep]}
    if train_records is not None:
        baselines = Baselines.fit(models.tokenizer, train_records, gamma, alpha)
        predictions.update(baselines.predict(models.tokenizer, kept))
    truth = np.array([truths[p.id] for p in kept])
    domains = [domain_of[p.id] for p in kept]
    cut: defaultdict[str, int] = defaultdict(int)
    samples: defaultdict[str, list[int]] = defaultdict(list)
    # In sample order, not file order (which a resumed run changes): the split-halves depend on it.
    for r in sorted(records, key=lambda r: r.get("sample_index", 0)):
        cut[r["prompt_id"]] += r["finish_reason"] == "length"
        samples[r["prompt_id"]].append(sample_length(r))
    per_prompt = [
        {
            "prompt_id": p.id,
            "domain": d,
            "truth": float(t),
            "cut_samples": cut[p.id],
            **{name: float(pred[k]) for name, pred in predictions.items()},
        }
        for k, (p, d, t) in enumerate(zip(kept, domains, truth, strict=True))
    ]
    return {
        "metrics": prediction_metrics(truth, predictions, domains, [samples[p.id] for p in kept], gamma),
        "per_prompt": per_prompt,
        "mostly_cut": [p.id for p in held_out if truths.get(p.id) is None],
    }


# A domain named like this names its folder as it is: lowercase ASCII (case-blind and
# Unicode-normalizing file systems keep such names apart), no dot (every derived name has one),
# and not a name Windows keeps for a device.
_PLAIN_FOLDER = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
_DEVICE_NAMES = re.compile(r"con|prn|aux|nul|com[0-9]|lpt[0-9]")


def cross_domain_folder(domain: str) -> str:
    """The folder, inside ``cross/``, of the LenVM trained without ``domain``: the domain itself
    where it is a plain name (lowercase ASCII letters, digits, ``-`` and ``_``), else a readable
    ASCII form of it, a dot and a hash of it. So every domain gets a folder of its own inside
    ``cross/``, whatever it holds (``..``, ``/``, a ``|``, any script)."""
    if _plain_folder(domain):
        return domain
    ascii_form = unicodedata.normalize("NFKD", domain).encode("ascii", "ignore").decode().lower()
    readable = re.sub(r"[^a-z0-9]+", "-", ascii_form).strip("-")[:40].rstrip("-")
    return f"{readable if _plain_folder(readable) else 'domain'}.{fingerprint(domain)}"


def _plain_folder(name: str) -> bool:
    return bool(_PLAIN_FOLDER.fullmatch(name)) and not _DEVICE_NAMES.fullmatch(name)


def _lenvm_without(folder: Path, records, like, models: Models, progress: bool):
    """A LenVM trained as ``like`` was, on ``records``: trained once, then loaded while the
    records and the settings stay the same (``trained_on`` in ``folder`` says what it was
    trained on), trained again when they change."""
    from lenvm.model import LengthValueModel
    from lenvm.training import TrainConfig, train

    target, marker = folder / "lenvm", folder / "trained_on"
    generator = (models.generator, models.tokenizer)
    known = {f.name for f in fields(TrainConfig)}
    stored = {k: v for k, v in (like.config.training or {}).items() if k in known}
    stored["gamma"] = None if stored.get("gamma_rule", "p99") == "p99" else like.gamma
    config = TrainConfig(**{**stored, "kind": like.config.kind, "feature_layer": like.feature_layer})
    made_from = fingerprint([models.name, asdict(config), records])
    fresh = (target / "head.safetensors").is_file() and marker.is_file() and marker.read_text() == made_from
    if not fresh:
        train(records, models.name, target, config, generator=generator, progress=progress, overwrite=True)
        write_text(marker, made_from)
    return LengthValueModel.from_pretrained(target, generator=generator)


def _scores(truth: np.ndarray, predicted: np.ndarray) -> dict[str, float | None]:
    error = np.abs(predicted - truth)
    rho = spearman(predicted, truth)
    return {
        "mre": float(np.mean(error / truth)),
        "mae": float(np.mean(error)),
        "spearman": None if math.isnan(rho) else rho,  # None: a constant prediction ranks nothing
    }


def prediction_metrics(
    truth: np.ndarray,
    predictions: dict[str, np.ndarray],
    domains: Sequence[str],
    samples: Sequence[list[int]] | None = None,
    gamma: float | None = None,
) -> dict:
    """Per domain (and ``all`` over every prompt when there are several domains): prompt count,
    mean ground truth, and each predictor's MRE, MAE and Spearman correlation with the truth.
    With each prompt's sample lengths (``samples``, and ``gamma``), also the truth's own split-half
    reliability and the Spearman correlation a perfect predictor would reach against it
    (:func:`lenvm.evaluation.truth_reliability`)."""
    groups = {d: np.array([x == d for x in domains]) for d in sorted(set(domains))}
    if len(groups) > 1:
        groups["all"] = np.ones(len(domains), dtype=bool)
    metrics = {}
    for domain, mask in groups.items():
        metrics[domain] = {
            "prompts": int(mask.sum()),
            "mean_truth": float(truth[mask].mean()),
            **{name: _scores(truth[mask], pred[mask]) for name, pred in predictions.items()},
        }
        if samples is not None:
            if gamma is None:
                raise InputError("the truth's reliability needs gamma, the discount of the samples' truths")
            reliability = truth_reliability([s for s, m in zip(samples, mask, strict=True) if m], gamma)
            known = not math.isnan(reliability)
            metrics[domain]["truth_reliability"] = reliability if known else None
            metrics[domain]["spearman_ceiling"] = math.sqrt(max(reliability, 0.0)) if known else None
    return metrics


def _rows(metrics: dict) -> list[list]:
    rows = []
    for domain, m in metrics.items():
        ceiling = m.get("spearman_ceiling")
        for i, name in enumerate(n for n in PREDICTORS if n in m):
            rho = m[name]["spearman"]
            rows.append(
                [domain, m["prompts"], f"{m['mean_truth']:.1f}", PREDICTORS[name],
                 f"{100 * m[name]['mre']:.1f}%", f"{m[name]['mae']:.1f}",
                 "n/a" if rho is None else f"{rho:.2f}",
                 "" if i or ceiling is None else f"{ceiling:.2f}"]
            )  # fmt: skip
    return rows


def _markdown(results: dict, total: int) -> str:
    header = [
        "domain",
        "prompts",
        "mean L_GT",
        "predictor",
        "MRE",
        "MAE (tokens)",
        "Spearman",
        "Spearman ceiling",
    ]
    speed = results["prediction"]
    text = (
        f"Prompt-boundary length prediction: ground truth from {_samples(results)} samples per "
        f"prompt (return-consistent mean length, EOS counted); MRE = mean |pred - L_GT| / L_GT, MAE "
        f"in tokens, Spearman = rank correlation of predicted and true lengths; Spearman ceiling = "
        f"what a predictor of each prompt's expected length would reach against this sampled truth "
        f"(the square root of the truth's split-half reliability): sampling noise caps the rest. "
        f"{results['cut_samples']} of {total} samples hit max_new_tokens (counted at their cut); "
        f"{len(results['prompts_mostly_cut'])} prompts with most samples cut have no ground truth and "
        f"are left out. LenVM predictions: {speed['prompts']} prompts in {speed['seconds']:.2f} s "
        f"({speed['prompts_per_second']:.0f} prompts/s, batch {speed['batch_size']}).\n\n"
        "In domain (every predictor trained on its full training data):\n\n"
        + markdown_table(header, _rows(results["metrics"]))
    )
    if results["cross_domain"]:
        text += (
            "\nAcross domains (each domain scored by a LenVM and baselines trained without it):\n\n"
            + markdown_table(header, _rows(results["cross_domain"]))
        )
    return text


def _plot(out: Path, results: dict) -> None:
    tables = {"in domain": results["per_prompt"]}
    tables.update({f"{d}, trained without it": rows for d, rows in results["cross_per_prompt"].items()})
    names = [n for n in PREDICTORS if n in results["per_prompt"][0]]
    fig, axes = subplots(
        len(tables), len(names), figsize=(3.6 * len(names), 3.4 * len(tables)), squeeze=False
    )
    # a domain keeps its colour in every row (a cross-domain row holds only some of them)
    every = sorted({p["domain"] for rows in tables.values() for p in rows})
    colours = {d: f"C{i % 10}" for i, d in enumerate(every)}
    for row, (title, per_prompt) in zip(axes, tables.items(), strict=True):
        truth = np.array([p["truth"] for p in per_prompt])
        domains = sorted({p["domain"] for p in per_prompt})
        for ax, name in zip(row, names, strict=True):
            pred = np.array([p[name] for p in per_prompt])
            points = []
            for domain in domains:
                mask = np.array([p["domain"] == domain for p in per_prompt])
                points.append(ax.scatter(truth[mask], pred[mask], s=12, alpha=0.75, color=colours[domain]))
            edge = [max(1.0, min(truth.min(), pred.min())) * 0.8, max(truth.max(), pred.max()) * 1.25]
            ax.plot(edge, edge, "k--", lw=1)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlim(edge)
            ax.set_ylim(edge)
            ax.set_title(f"{PREDICTORS[name]} ({text_label(title)})", fontsize=9)
            ax.set_xlabel("true length L_GT (tokens)")
            ax.set_ylabel("predicted (tokens)")
            ax.grid(alpha=0.3, which="both")
            if ax is row[0]:  # labels passed with their points: a domain starting with "_" stays in
                ax.legend(points, [text_label(d) for d in domains], fontsize=7)
    fig.tight_layout()  # the panels' axis labels would overlap their neighbours
    save_png(fig, out / "calibration.png", crop=True)

    metrics = results["metrics"]
    domains = list(metrics)
    fig, ax = subplots(figsize=(max(6.0, 1.1 * len(domains) * len(names) / 2), 4))
    width = 0.8 / len(names)
    for k, name in enumerate(names):
        ax.bar(np.arange(len(domains)) + k * width, [100 * metrics[d][name]["mre"] for d in domains],
               width, label=PREDICTORS[name])  # fmt: skip
    ticks = np.arange(len(domains)) + width * (len(names) - 1) / 2
    ax.set_xticks(ticks, [text_label(d) for d in domains], rotation=35, ha="right")
    ax.set_ylabel("mean relative error (%)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    save_png(fig, out / "prediction.png", crop=True)


# -- command line ---------------------------------------------------------------------------

TABLE = "table.md"


def _rows_arg(text: str) -> tuple[int, int]:
    import argparse

    match = re.fullmatch(r"(\d+):(\d+)", text)
    if not match or int(match.group(1)) >= int(match.group(2)):
        raise argparse.ArgumentTypeError(f"rows must be START:STOP with START < STOP, got {text!r}")
    return int(match.group(1)), int(match.group(2))


def add_arguments(p) -> None:
    p.add_argument("--lenvm", type=options.path, help="LenVM folder")
    p.add_argument(
        "--prompts",
        type=options.path,
        nargs="+",
        help="held-out prompts JSONL file(s), with a 'domain' field",
    )
    p.add_argument(
        "--gsm8k", type=options.path, help="GSM8K JSONL to take held-out problems from (domain 'math')"
    )
    p.add_argument(
        "--gsm8k-rows", type=_rows_arg, metavar="START:STOP", help="rows of --gsm8k (default: all)"
    )
    p.add_argument(
        "--truth-rollouts", type=options.path, nargs="+", metavar="ROLLOUTS",
        help="score on these rollouts' prompts and answers instead of sampling (one generator and policy)",
    )  # fmt: skip
    p.add_argument(
        "--train-rollouts",
        type=options.path,
        help="the LenVM's training rollouts (baselines, cross-domain LenVMs)",
    )
    p.add_argument(
        "--cross-domain", nargs="+", default=[], metavar="DOMAIN",
        help="also train a LenVM without each DOMAIN and score it on that domain",
    )  # fmt: skip
    p.add_argument(
        "--samples",
        type=options.positive_int,
        default=8,
        help="completions per prompt (the truth is their mean)",
    )
    p.add_argument("--limit", type=options.positive_int, help="first N prompts of each prompts file")
    options.add_backend(p)
    options.add_sampling(p, seed_help="every sample's seed derives from it (default 0)", max_new_tokens=512)
    p.add_argument(
        "--batch-size",
        type=options.positive_int,
        default=16,
        help="requests decoded (and prompts predicted) at once",
    )


def main(args) -> None:
    if not args.prompts and not args.gsm8k and not args.truth_rollouts:
        raise InputError("give --prompts FILE ... and/or --gsm8k FILE, or --truth-rollouts FILE ...")
    run_prediction(
        args.out,
        model=args.model,
        lenvm=args.lenvm,
        prompts=args.prompts,
        gsm8k=args.gsm8k,
        gsm8k_rows=args.gsm8k_rows,
        truth_rollouts=args.truth_rollouts,
        train_rollouts=args.train_rollouts,
        cross_domain=args.cross_domain,
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


def _samples(results: dict) -> str:
    """The samples per prompt behind the truths: one count, or the range of uneven ones."""
    most, fewest = results["samples"], results.get("samples_fewest", results["samples"])
    return str(most) if fewest == most else f"{fewest}-{most}"
