"""Length-space metrics of a LenVM's values on held-out completions."""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from lenvm.dataset import Example
from lenvm.returns import length_to_value, return_consistent_mean_length, value_to_length

FRACTIONS = (0.0, 0.25, 0.5, 0.75)


def length_metrics(
    examples: list[Example], values: list[np.ndarray], gamma: float, baseline_length: float
) -> dict[str, float]:
    """Compare predicted and true remaining lengths on finished completions.

    ``values[i]`` holds ``V(s_0) .. V(s_{L-1})`` of ``examples[i]``. ``baseline_length`` is the
    naive predictor's total length (the training mean); its remaining length at ``t`` is
    ``max(baseline - t, 1)``. Keys:

    - ``token_mae`` / ``baseline_token_mae``: mean absolute error in tokens over all states;
    - ``rel_error_at_{0,25,50,75}``: mean relative error at that share of the completion;
    - ``prompt_mre`` / ``baseline_prompt_mre``: prompt-boundary mean relative error against the
      return-consistent mean length of each prompt's samples (METHOD.md section 5);
    - ``value_mse``: mean squared error in value space.
    """
    finished = [
        (e, np.asarray(v, dtype=np.float64)) for e, v in zip(examples, values, strict=True) if e.finished
    ]
    if not finished:
        return {}
    abs_err, base_err, sq_err = [], [], []
    rel_at = {f: [] for f in FRACTIONS}
    by_prompt: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for e, v in finished:
        true_rem = np.arange(e.length, 0, -1, dtype=np.float64)
        pred_rem = value_to_length(v, gamma)
        abs_err.append(np.abs(pred_rem - true_rem))
        base_err.append(np.abs(np.maximum(baseline_length - np.arange(e.length), 1.0) - true_rem))
        sq_err.append((v - length_to_value(true_rem, gamma)) ** 2)
        for f in FRACTIONS:
            t = int(f * e.length)
            rel_at[f].append(abs(pred_rem[t] - true_rem[t]) / true_rem[t])
        by_prompt[e.prompt_id].append((e.length, float(v[0])))
    prompt_err, prompt_base_err = [], []
    for samples in by_prompt.values():
        truth = return_consistent_mean_length([n for n, _ in samples], gamma)
        predicted = value_to_length(float(np.mean([v0 for _, v0 in samples])), gamma)
        prompt_err.append(abs(predicted - truth) / truth)
        prompt_base_err.append(abs(baseline_length - truth) / truth)
    metrics = {
        "token_mae": float(np.mean(np.concatenate(abs_err))),
        "baseline_token_mae": float(np.mean(np.concatenate(base_err))),
        "prompt_mre": float(np.mean(prompt_err)),
        "baseline_prompt_mre": float(np.mean(prompt_base_err)),
        "value_mse": float(np.mean(np.concatenate(sq_err))),
        "eval_prompts": len(by_prompt),
        "eval_completions": len(finished),
    }
    for f in FRACTIONS:
        metrics[f"rel_error_at_{int(f * 100)}"] = float(np.mean(rel_at[f]))
    return metrics
