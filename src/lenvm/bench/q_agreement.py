"""How well a length Q-head agrees with exact candidate scoring.

A Q-head (LenVM kind ``q``) predicts ``V(s_t + x)`` for every next token ``x`` from the hidden
state of ``s_t`` alone, so guided decoding needs no candidate forward; exact scoring runs the
candidates through a LenVM (``attached`` or ``standalone``). This benchmark asks whether the
cheap one ranks the candidates like the exact one.

For each held-out completion, at up to ``positions_per_completion`` states ``s_t`` (one drawn at
random, seeded, in each of that many equal slices of the completion, from the prompt boundary to
the last state before EOS), the candidates are the generator's ``num_candidates`` most probable
next tokens (the engine's rule, at the q LenVM's training temperature). EOS tokens are left out:
the engine gives EOS the value 0 without asking either head, so an EOS candidate would be a free
agreement. The exact values come from one KV-cached forward over the completion and a candidate
block per state (:class:`~lenvm.decoding.streams.Stream`), the Q-head values from the same
forward's hidden states.

Reported per scorer against the exact values: Spearman rank correlation over the candidates of
each state (states where either side has all-equal values are skipped and counted), how often
both pick the same highest-value (shortest) and lowest-value (longest) candidate, and for the
Q-head the mean absolute difference in value and in predicted remaining tokens and the Pearson
correlation over all (state, candidate) pairs. The reference scorer is the generator's own
log-probability of each candidate: a Q-head that ranks no better is not worth having. Values of
a Q-head trained with another gamma are compared in the exact LenVM's gamma (through the length).
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from lenvm.bench.common import Models, Run, markdown_table
from lenvm.cli import options
from lenvm.dataset import held_out_prompts
from lenvm.decoding.policies import top_candidates, truncate
from lenvm.decoding.streams import Hidden, Stream, cache_argument
from lenvm.figures import subplots
from lenvm.hub import eos_token_ids, load_generator, torch_dtype
from lenvm.io import InputError, file_digest, outside_vocabulary, positive_count
from lenvm.model import LengthValueModel, generator_for, read_config
from lenvm.returns import length_to_value, value_to_length
from lenvm.rollouts import read_rollouts

SCORERS = {"q_head": "Q-head", "probabilities": "generator log-probability"}


def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks along the last axis; tied entries share the mean of their ranks."""
    x = np.asarray(x, dtype=np.float64)
    below = (x[..., None, :] < x[..., :, None]).sum(-1)
    equal = (x[..., None, :] == x[..., :, None]).sum(-1)
    return below + (equal + 1) / 2


def pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation along the last axis; NaN where either side is constant."""
    da = np.asarray(a, dtype=np.float64)
    db = np.asarray(b, dtype=np.float64)
    da = da - da.mean(-1, keepdims=True)
    db = db - db.mean(-1, keepdims=True)
    norm = np.sqrt((da**2).sum(-1) * (db**2).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (da * db).sum(-1) / norm
    return np.where(norm > 0, np.clip(r, -1.0, 1.0), np.nan)


def spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman rank correlation along the last axis (average ranks for ties); NaN where either
    side has all-equal values."""
    return pearson(average_ranks(a), average_ranks(b))


def sample_positions(num_states: int, count: int, rng: np.random.Generator) -> list[int]:
    """``min(count, num_states)`` distinct states in ``[0, num_states)``: one drawn uniformly in
    each of that many equal slices, so they spread over the whole completion."""
    m = min(count, num_states)
    bounds = np.floor(np.linspace(0, num_states, m + 1)).astype(int)
    return rng.integers(bounds[:-1], bounds[1:]).tolist()


@torch.no_grad()
def score_completion(
    generator,
    exact: LengthValueModel,
    q: LengthValueModel,
    prompt_ids: list[int],
    completion_ids: list[int],
    positions: list[int],
    num_candidates: int,
    temperature: float,
    eos_ids: list[int],
) -> dict[str, list]:
    """Candidates of the states ``s_t`` (``t`` in ``positions``: prompt plus ``t`` completion
    tokens) and their exact values, Q-head values and generator log-probabilities."""
    from transformers import DynamicCache

    device = exact.device
    prompt_len = len(prompt_ids)
    ids = torch.tensor([prompt_ids + completion_ids[: max(positions)]], device=device)
    width = ids.shape[1]
    shared = exact.attached  # an attached exact head reads the generator's own hidden states
    cache = DynamicCache()
    body = generator.base_model
    out = body(
        input_ids=ids,
        use_cache=shared,
        output_hidden_states=q.feature_layer != -1,
        **{cache_argument(type(body)): cache if shared else None},
    )
    hidden = Hidden.of(out, q.feature_layer)[0]
    if not shared:
        exact.body(input_ids=ids, use_cache=True, **{cache_argument(type(exact.body)): cache})
    states = hidden[torch.tensor(positions, device=device) + prompt_len - 1]  # each state's last token
    logits = generator.get_output_embeddings()(states.last).float()
    temperatures = torch.full((len(positions),), float(temperature), device=device)
    eos = torch.tensor(eos_ids, device=device)
    probs = truncate(logits, temperatures)
    probs[:, eos] = 0.0
    cand, cand_probs = top_candidates(logits, probs, num_candidates, eos, None, temperatures)
    logprobs = (logits / temperatures[:, None]).log_softmax(-1).gather(1, cand)
    q_values = q.next_values_from_hidden(states.features, cand).float()
    exact_values = torch.empty_like(q_values)
    columns = torch.arange(width, device=device)
    for i, t in enumerate(positions):
        # The candidate block sees the cached columns of s_t only, at the position after them.
        view = Stream(
            exact.body,
            cache,
            (columns < prompt_len + t)[None],
            torch.tensor([prompt_len + t], device=device),
            exact.feature_layer,
        )
        exact_values[i] = exact.values_from_hidden(view.forward(cand[i][None]).features[0]).float()
        view.discard()
    return {
        "candidates": cand.tolist(),
        "exact": exact_values.tolist(),
        "q": q_values.tolist(),
        "logprobs": logprobs.tolist(),
        "mass": cand_probs.sum(-1).tolist(),
    }


def run_q_agreement(
    out: str | os.PathLike,
    *,
    model: str | os.PathLike | None = None,
    exact: str | os.PathLike,
    q: str | os.PathLike,
    rollouts: str | os.PathLike,
    num_candidates: int = 8,
    positions_per_completion: int = 16,
    max_completions: int | None = None,
    held_out: bool = False,
    seed: int = 0,
    device: str | None = None,
    dtype: str = "float32",
    progress: bool = True,
) -> dict[str, Any]:
    """Agreement of the Q-head LenVM ``q`` with exact candidate scoring by the LenVM ``exact`` on
    the completions of ``rollouts`` (both LenVMs for the generator ``model``); writes
    ``results.json``, ``table.md``, ``q_vs_exact.png`` and a per-completion ``items.jsonl``.

    ``max_completions`` takes a seeded random subset of the completions. ``held_out`` keeps only
    the prompts that the q LenVM's training held out, when ``rollouts`` is its training file.
    """
    started = time.perf_counter()
    num_candidates = positive_count(num_candidates, "num_candidates")
    positions_per_completion = positive_count(positions_per_completion, "positions_per_completion")
    if max_completions is not None:
        max_completions = positive_count(max_completions, "max_completions")
    torch_dtype(dtype)  # an unknown name fails here, before anything is read
    if read_config(exact).kind == "q":
        raise InputError(f"{exact}: the exact scorer must be an attached or standalone LenVM, not kind 'q'")
    q_kind = read_config(q).kind
    if q_kind != "q":
        raise InputError(f"{q}: expected a LenVM of kind 'q', got {q_kind!r}")
    records = read_rollouts(rollouts)
    if not records:
        raise InputError(f"{rollouts}: no rollouts")
    chosen = list(range(len(records)))
    if held_out:
        training = read_config(q).training or {}
        if "eval_fraction" not in training:
            raise InputError(f"{q}: its config records no training split to hold prompts out by")
        prompts = held_out_prompts(
            [r["prompt_id"] for r in records], training["eval_fraction"], training.get("seed", 0)
        )
        chosen = [i for i in chosen if records[i]["prompt_id"] in prompts]
        if not chosen:
            raise InputError(f"{rollouts}: none of its prompts was held out of {q}'s training")
    if max_completions is not None and max_completions < len(chosen):
        picked = np.random.default_rng(seed).choice(len(chosen), max_completions, replace=False)
        chosen = sorted(chosen[j] for j in picked.tolist())

    model = generator_for(model, exact)
    generator, tokenizer = load_generator(model, device=device, dtype=torch_dtype(dtype))
    loaded = {}
    for name, path in (("exact", exact), ("q", q)):
        loaded[name] = LengthValueModel.from_pretrained(
            path, generator=(generator, tokenizer), device=device, dtype=torch_dtype(dtype)
        )
    exact_vm, q_vm = loaded["exact"], loaded["q"]
    eos = eos_token_ids(generator, tokenizer)
    vocab = generator.get_output_embeddings().weight.shape[0]
    if num_candidates > vocab - len(eos):
        raise InputError(f"num_candidates must be at most {vocab - len(eos)} (the non-EOS vocabulary)")
    for i in chosen:
        ids = records[i]["prompt_token_ids"] + records[i]["completion_token_ids"]
        if (why := outside_vocabulary(ids, vocab, f"record {i + 1}")) is not None:
            raise InputError(f"{rollouts}: {why} of {model}: were the rollouts made with another generator?")
    temperature = float((q_vm.config.sampling or {}).get("temperature") or 1.0)  # 0 (greedy): as at 1

    settings = {
        "exact": Models(generator, tokenizer, exact_vm, str(model), str(exact)).identity(),
        "q": Models(generator, tokenizer, q_vm, str(model), str(q)).identity(),
        "rollouts": str(rollouts),
        "rollouts_digest": file_digest(rollouts),
        "num_candidates": num_candidates,
        "positions_per_completion": positions_per_completion,
        "max_completions": max_completions,
        "held_out": held_out,
        "seed": seed,
        "temperature": temperature,
        "dtype": dtype,
    }
    keys = [str(i) for i in chosen]
    with Run(out, settings) as run:
        for i in tqdm(chosen, desc="q agreement", unit="completion", disable=not progress):
            if str(i) in run.done:
                continue
            record = records[i]
            completion = record["completion_token_ids"]
            # The state after EOS is terminal; a cut completion still has its last state to score.
            num_states = len(completion) + (record["finish_reason"] != "stop")
            positions = sample_positions(
                num_states, positions_per_completion, np.random.default_rng([seed, i])
            )
            scores = score_completion(
                generator,
                exact_vm,
                q_vm,
                record["prompt_token_ids"],
                completion,
                positions,
                num_candidates,
                temperature,
                eos,
            )
            run.add(
                [
                    {
                        "key": str(i),
                        "prompt_id": record["prompt_id"],
                        "sample_index": record["sample_index"],
                        "num_states": num_states,
                        "positions": positions,
                        **scores,
                    }
                ]
            )
        items = [run.done[key] for key in keys]
        results = _results(items, exact_vm.gamma, q_vm.gamma)
        results.update(
            settings=settings,
            exact_kind=exact_vm.config.kind,
            seconds_this_run=round(time.perf_counter() - started, 1),
        )
        run.write_json("results.json", results)
        run.write_text("table.md", _markdown(results))
        _plot(run, items, results)
    return results


def _stack(items: list[dict[str, Any]], field: str) -> np.ndarray:
    return np.array([row for item in items for row in item[field]], dtype=np.float64)


def _q_in_exact_space(items: list[dict[str, Any]], exact_gamma: float, q_gamma: float) -> np.ndarray:
    q = _stack(items, "q")
    if q_gamma == exact_gamma:
        return q
    return length_to_value(value_to_length(q, q_gamma), exact_gamma)


def _number(x: float) -> float | None:
    """JSON has no NaN: an undefined statistic is null."""
    return None if np.isnan(x) else float(x)


def _ranking(exact: np.ndarray, other: np.ndarray) -> dict[str, Any]:
    rho = spearman(exact, other)
    ranked = rho[~np.isnan(rho)]
    return {
        "positions": len(rho),
        "ranked_positions": len(ranked),
        "tied_positions": len(rho) - len(ranked),
        "spearman_mean": _number(ranked.mean()) if len(ranked) else None,
        "spearman_median": _number(np.median(ranked)) if len(ranked) else None,
        "same_argmax": float(np.mean(exact.argmax(-1) == other.argmax(-1))),
        "same_argmin": float(np.mean(exact.argmin(-1) == other.argmin(-1))),
    }


def _results(items: list[dict[str, Any]], exact_gamma: float, q_gamma: float) -> dict[str, Any]:
    exact = _stack(items, "exact")
    q = _q_in_exact_space(items, exact_gamma, q_gamma)
    exact_length = value_to_length(exact, exact_gamma)
    q_length = value_to_length(_stack(items, "q"), q_gamma)
    metrics = {
        "q_head": {
            **_ranking(exact, q),
            "value_mae": float(np.abs(q - exact).mean()),
            "length_mae": float(np.abs(q_length - exact_length).mean()),
            "pearson": _number(float(pearson(exact.ravel(), q.ravel()))),  # of 1-D rows: one number
        },
        "probabilities": _ranking(exact, _stack(items, "logprobs")),
    }
    return {
        "benchmark": "q_agreement",
        "metrics": metrics,
        "completions": len(items),
        "positions": len(exact),
        "candidates": exact.shape[1],
        "exact_gamma": exact_gamma,
        "q_gamma": q_gamma,
        # How far apart the candidates' exact predictions lie: near 0, rankings are mostly noise.
        "exact_length_range_mean": float((exact_length.max(-1) - exact_length.min(-1)).mean()),
        "candidate_mass_mean": float(np.mean([m for item in items for m in item["mass"]])),
    }


def _markdown(results: dict[str, Any]) -> str:
    def fmt(x, spec=".3f"):
        return "n/a" if x is None else format(x, spec)

    header = [
        "scorer",
        "ranked states",
        "tied (skipped)",
        "mean Spearman",
        "median Spearman",
        "same argmax (shortest)",
        "same argmin (longest)",
        "value MAE",
        "length MAE (tokens)",
        "Pearson (all pairs)",
    ]
    rows = []
    for name, label in SCORERS.items():
        m = results["metrics"][name]
        rows.append(
            [
                label,
                m["ranked_positions"],
                m["tied_positions"],
                fmt(m["spearman_mean"]),
                fmt(m["spearman_median"]),
                f"{100 * m['same_argmax']:.1f}%",
                f"{100 * m['same_argmin']:.1f}%",
                fmt(m.get("value_mae"), ".4f"),
                fmt(m.get("length_mae"), ".2f"),
                fmt(m.get("pearson")),
            ]
        )
    note = (
        f"Agreement with exact candidate scoring ({results['exact_kind']} LenVM): "
        f"{results['positions']} states of {results['completions']} completions, the "
        f"{results['candidates']} most probable non-EOS tokens each (mean probability mass "
        f"{results['candidate_mass_mean']:.2f}). Spearman over each state's candidates; states "
        "where either side ranks all candidates equal are skipped. The generator's log-probability "
        "is the reference: a Q-head should rank the candidates closer to the exact values than it. "
        f"Mean spread of the exact predicted remaining length over a state's candidates: "
        f"{results['exact_length_range_mean']:.1f} tokens.\n\n"
    )
    return note + markdown_table(header, rows)


def _plot(run: Run, items: list[dict[str, Any]], results: dict[str, Any]) -> None:
    exact = _stack(items, "exact")
    q = _q_in_exact_space(items, results["exact_gamma"], results["q_gamma"])
    fig, (left, right) = subplots(1, 2, figsize=(11, 4.2))
    left.scatter(exact.ravel(), q.ravel(), s=5, alpha=0.35)
    edge = [min(exact.min(), q.min()), max(exact.max(), q.max())]
    left.plot(edge, edge, "k--", lw=1)
    left.set_xlabel("exact V(s_t + x)")
    left.set_ylabel("Q-head V(s_t + x)")
    r = results["metrics"]["q_head"]["pearson"]
    left.set_title(f"Pearson {'n/a' if r is None else format(r, '.3f')}", fontsize=10)
    left.grid(alpha=0.3)
    bins = np.linspace(-1, 1, 21)
    for name, other in (("q_head", q), ("probabilities", _stack(items, "logprobs"))):
        rho = spearman(exact, other)
        right.hist(rho[~np.isnan(rho)], bins=bins, alpha=0.55, label=SCORERS[name])
    right.set_xlabel("Spearman with exact values, per state")
    right.set_ylabel("states")
    right.legend(fontsize=8)
    right.grid(alpha=0.3)
    run.save_figure(fig, "q_vs_exact.png")


# -- command line ---------------------------------------------------------------------------

TABLE = "table.md"


def add_arguments(p) -> None:
    p.add_argument("--exact", type=options.path, required=True, help="attached or standalone LenVM folder")
    p.add_argument("--q", type=options.path, required=True, help="q LenVM folder")
    p.add_argument("--rollouts", type=options.path, required=True, help="held-out rollouts JSONL")
    p.add_argument(
        "--num-candidates", type=options.positive_int, default=8, help="candidates scored per position"
    )
    p.add_argument("--positions", type=options.positive_int, default=16, help="positions per completion")
    p.add_argument("--held-out", action="store_true", help="only the prompts the q LenVM's training held out")
    p.add_argument(
        "--limit", type=options.positive_int, help="a seeded random subset of N completions (default: all)"
    )
    p.add_argument(
        "--seed", type=int, default=0, help="which positions (and completions, with a limit) are drawn"
    )


def main(args) -> None:
    run_q_agreement(
        args.out,
        model=args.model,
        exact=args.exact,
        q=args.q,
        rollouts=args.rollouts,
        num_candidates=args.num_candidates,
        positions_per_completion=args.positions,
        max_completions=args.limit,
        held_out=args.held_out,
        seed=args.seed,
        device=args.device,
        dtype=args.dtype,
        progress=args.progress,
    )
