"""Length-space metrics of a LenVM's values on held-out completions."""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from lenvm.dataset import Example
from lenvm.returns import length_to_value, return_consistent_mean_length, value_to_length

# Relative positions in a completion where the remaining-length error is reported, as the
# released training recipes track them.
FRACTIONS = (0.0, 0.3, 0.6, 0.9)
# The figures logged during training: prompt-boundary and positional errors.
PROGRESS_KEYS = ("prompt_mre", *(f"rel_error_at_{round(f * 100)}" for f in FRACTIONS), "value_mse")


def length_metrics(
    examples: list[Example], values: list[np.ndarray], gamma: float, baseline_length: float
) -> dict[str, float]:
    """Compare predicted and true remaining lengths on finished completions.

    ``values[i]`` holds ``V(s_0) .. V(s_{L-1})`` of ``examples[i]``. ``baseline_length`` is the
    naive predictor's total length (the training mean); its remaining length at ``t`` is
    ``max(baseline - t, 1)``. Keys:

    - ``token_mae`` / ``baseline_token_mae``: mean absolute error in tokens over all states;
    - ``rel_error_at_{0,30,60,90}``: mean relative error of the predicted remaining length at
      state ``int(f * L)`` of each finished completion of ``L`` tokens, ``f`` in :data:`FRACTIONS`;
    - ``prompt_mre`` / ``baseline_prompt_mre``: prompt-boundary mean relative error against
      :func:`prompt_length_truth` of each prompt's samples, over the ``eval_prompts`` prompts that
      have one (``eval_prompts_cut``: prompts left out because most samples were cut);
    - ``value_mse``: mean squared error in value space;
    - ``eval_finished``: the held-out completions that ended with EOS (the per-token figures' base).

    Per-token figures use finished completions only: a cut one's remaining length is unknown.
    Without any, only the counts ``eval_prompts``, ``eval_prompts_cut`` and ``eval_finished``
    are given.
    """
    pairs = [(e, np.asarray(v, dtype=np.float64)) for e, v in zip(examples, values, strict=True)]
    finished = [(e, v) for e, v in pairs if e.finished]
    if not finished:
        prompts = len({e.prompt_id for e in examples})
        return {"eval_prompts": 0, "eval_prompts_cut": prompts, "eval_finished": 0}
    abs_err, base_err, sq_err = [], [], []
    rel_at: dict[float, list[float]] = {f: [] for f in FRACTIONS}
    first_values: dict[str, list[float]] = defaultdict(list)
    for e, v in pairs:
        first_values[e.prompt_id].append(float(v[0]))
    for e, v in finished:
        true_rem = np.arange(e.length, 0, -1, dtype=np.float64)
        pred_rem = value_to_length(v, gamma)
        abs_err.append(np.abs(pred_rem - true_rem))
        base_err.append(np.abs(np.maximum(baseline_length - np.arange(e.length), 1.0) - true_rem))
        sq_err.append((v - length_to_value(true_rem, gamma)) ** 2)
        for f in FRACTIONS:
            t = int(f * e.length + 1e-9)  # 0.3 * 10 must give state 3, not 2
            rel_at[f].append(abs(pred_rem[t] - true_rem[t]) / true_rem[t])
    prompt_err, prompt_base_err = [], []
    truths = prompt_truths(examples, gamma)
    for prompt_id, v0 in first_values.items():
        truth = truths[prompt_id]
        if truth is None:
            continue
        predicted = value_to_length(float(np.mean(v0)), gamma)
        prompt_err.append(abs(predicted - truth) / truth)
        prompt_base_err.append(abs(baseline_length - truth) / truth)
    metrics = {
        "token_mae": float(np.mean(np.concatenate(abs_err))),
        "baseline_token_mae": float(np.mean(np.concatenate(base_err))),
        "prompt_mre": float(np.mean(prompt_err)) if prompt_err else float("nan"),
        "baseline_prompt_mre": float(np.mean(prompt_base_err)) if prompt_err else float("nan"),
        "value_mse": float(np.mean(np.concatenate(sq_err))),
        "eval_prompts": len(prompt_err),
        "eval_prompts_cut": len(truths) - len(prompt_err),
        "eval_finished": len(finished),
    }
    for f in FRACTIONS:
        metrics[f"rel_error_at_{round(f * 100)}"] = float(np.mean(rel_at[f]))
    return metrics


def prompt_truths(examples: list[Example], gamma: float) -> dict[str, float | None]:
    """:func:`prompt_length_truth` of each prompt's samples among ``examples``."""
    samples: dict[str, list[Example]] = defaultdict(list)
    for e in examples:
        samples[e.prompt_id].append(e)
    return {
        prompt_id: prompt_length_truth([e.length for e in group], [e.finished for e in group], gamma)
        for prompt_id, group in samples.items()
    }


def prompt_length_truth(lengths: list[int], finished: list[bool], gamma: float) -> float | None:
    """The ground-truth length of one prompt: ``ln(1 - mean_i(1 - gamma**L_i)) / ln(gamma)`` over
    its samples (docs/method.md, section 5), a sample cut at ``max_new_tokens`` counted at its cut.

    A cut sample's return lies between ``-(1 - gamma**L)`` and ``-1``, so counting it at ``L``
    misplaces it by under ``gamma**L`` in value space (under 0.01 at the p99 rule's gamma), where
    dropping it would bias the truth toward the short samples. With most samples cut the truth
    is only a lower bound: ``None`` then.
    """
    if not lengths or 2 * sum(finished) < len(lengths):
        return None
    return return_consistent_mean_length(lengths, gamma)


def ranks(x) -> np.ndarray:
    """Ranks from 1, tied values sharing the mean of their ranks."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    # each run of equal values gets the mean of the positions it spans
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], len(x)]
    out = np.empty(len(x))
    for s, e in zip(starts, ends, strict=True):
        out[order[s:e]] = (s + e + 1) / 2
    return out


def spearman(x, y) -> float:
    """Spearman's rank correlation of two equally long sequences (ties take mean ranks); NaN when
    there are fewer than two values or either side is constant."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(x) != len(y):
        raise ValueError("spearman needs two sequences of the same length")
    if len(x) < 2 or np.all(x == x[0]) or np.all(y == y[0]):
        return float("nan")
    return float(np.corrcoef(ranks(x), ranks(y))[0, 1])


def truth_reliability(samples: list[list[int]], gamma: float, splits: int = 200, seed: int = 0) -> float:
    """How well the sampled truth of a set of prompts ranks them, before any predictor: the
    split-half rank reliability of :func:`prompt_length_truth` over ``samples`` (each prompt's
    sample lengths), stepped up to the full sample count (Spearman-Brown).

    Each split halves every prompt's samples at random and correlates (Spearman) the truths of
    the two halves; the mean over ``splits`` splits, ``r``, becomes ``2r / (1 + r)``. A predictor
    that knew each prompt's expected length exactly would reach a Spearman correlation of about
    ``sqrt(reliability)`` with the sampled truth: the ceiling of the measured one. NaN with fewer
    than two prompts or a prompt with fewer than two samples."""
    if len(samples) < 2 or any(len(s) < 2 for s in samples):
        return float("nan")
    rng = np.random.default_rng(seed)
    rhos = []
    for _ in range(splits):
        halves: tuple[list[float], list[float]] = ([], [])
        for lengths in samples:
            order = rng.permutation(len(lengths))
            half = len(lengths) // 2
            for side, index in zip(halves, (order[:half], order[half:]), strict=True):
                side.append(return_consistent_mean_length([lengths[i] for i in index], gamma))
        rho = spearman(*halves)
        if not np.isnan(rho):
            rhos.append(rho)
    if not rhos:
        return float("nan")
    r = float(np.mean(rhos))
    return 2 * r / (1 + r) if r > -1 else float("nan")
