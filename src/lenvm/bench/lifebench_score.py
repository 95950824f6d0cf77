"""LIFEBench length scoring: Length Deviation, Length Score and their aggregation.

``LD = (L_out - L_target) / L_target``; ``LS = 100·exp(5·LD)`` below the target and
``100·exp(-2·LD)`` above it. At Most scores 100 whenever ``LD <= 0``, At Least whenever
``LD >= 0``. Aggregates follow LIFEBench: average within each target first, then over targets,
so every target weighs the same whatever the number of rows that survived at it.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from lenvm.bench.common import markdown_table
from lenvm.bench.intervals import bootstrap_interval, wilson_interval
from lenvm.decoding.params import NATURAL_EOS

CONSTRAINTS: tuple[str, ...] = ("equal_to", "at_most", "at_least")
BOUNDS = ("at_most", "at_least")
UNGUIDED = "prompt"  # the method whose answers are the generator's own (no LenVM)
CONSTRAINT_LABELS = {"equal_to": "Equal To", "at_most": "At Most", "at_least": "At Least"}
# A guided answer's log-probability is set beside that of this many unguided natural answers
# closest to it in length (log scale), of the same language.
LENGTH_NEIGHBOURS = 8
UNDERSHOOT_RATE = 5.0  # LIFEBench punishes too-short answers harder than too-long ones
OVERSHOOT_RATE = 2.0


def length_deviation(length: float, target: float) -> float:
    """``(L_out - L_target) / L_target``: signed, relative to the target."""
    if target <= 0:
        raise ValueError(f"target length must be positive, got {target!r}")
    return (float(length) - float(target)) / float(target)


def length_score(length: float, target: float, constraint: str) -> float:
    """The LIFEBench Length Score (0-100) of one output under ``constraint``."""
    if constraint not in CONSTRAINTS:
        raise ValueError(f"unknown constraint {constraint!r}; expected one of {CONSTRAINTS}")
    deviation = length_deviation(length, target)
    if (constraint == "at_most" and deviation <= 0) or (constraint == "at_least" and deviation >= 0):
        return 100.0
    if deviation < 0:
        return 100.0 * math.exp(UNDERSHOOT_RATE * deviation)
    return 100.0 * math.exp(-OVERSHOOT_RATE * deviation)


def _by_target(items: list[Mapping[str, Any]], value: Callable[[Mapping], float]) -> list[list[float]]:
    """``value`` of every item, grouped by target."""
    groups: dict[int, list[float]] = defaultdict(list)
    for item in items:
        groups[int(item["target"])].append(value(item))
    return list(groups.values())


def _target_averaged(items: list[Mapping[str, Any]], value: Callable[[Mapping], float]) -> float:
    """Mean over targets of the per-target mean of ``value``."""
    return float(np.mean([np.mean(v) for v in _by_target(items, value)]))


def _metrics(items: list[Mapping[str, Any]]) -> dict[str, float | list[float]]:
    def deviation(item: Mapping) -> float:
        return length_deviation(item["num_tokens"], item["target"])

    def score(item: Mapping) -> float:
        return length_score(item["num_tokens"], item["target"], item["constraint"])

    return {
        "n": len(items),
        "deviation": _target_averaged(items, lambda i: abs(deviation(i))),
        "signed_deviation": _target_averaged(items, deviation),
        "score": _target_averaged(items, score),
        "score_interval": list(bootstrap_interval(_by_target(items, score))),
        "ended": _share(items, lambda i: i.get("finish_reason") == "stop"),
        "natural_end": _share(items, natural_end),
        "natural_end_interval": list(wilson_interval(sum(map(natural_end, items)), len(items))),
        "bound_stop": _share(items, stopped_by_bound),
        "cut": _share(items, lambda i: i.get("finish_reason") == "length"),
        "median_ratio": float(np.median([i["num_tokens"] / i["target"] for i in items])),
        "mean_logprob": float(np.mean([i.get("mean_logprob", np.nan) for i in items])),
        "decoding_cost": _decoding_cost(items),
    }


def _share(items: list[Mapping[str, Any]], test: Callable[[Mapping], bool]) -> float:
    return float(np.mean([test(i) for i in items]))


def natural_end(item: Mapping[str, Any]) -> bool:
    """Ended with an EOS that the generator itself gave at least ``NATURAL_EOS``."""
    return item.get("finish_reason") == "stop" and (item.get("eos_prob") or 0.0) >= NATURAL_EOS


def stopped_by_bound(item: Mapping[str, Any]) -> bool:
    """Ended by a bound rather than by the text: EOS forced by a hard cap (``finish_reason``
    ``"cap"``), or an At Most answer that ends exactly at its bound with an EOS the generator
    gave under ``NATURAL_EOS`` (the policy's only choice there). A natural end that happens to
    land on the bound does not count."""
    if item.get("finish_reason") == "cap":
        return True
    at_bound = item["constraint"] == "at_most" and item["num_tokens"] == item["target"]
    return at_bound and item.get("finish_reason") == "stop" and not natural_end(item)


def fits(item: Mapping[str, Any]) -> bool:
    """An answer that ended with EOS and meets its bound (At Most: at most the target; At Least:
    at least the target)."""
    if item.get("finish_reason") not in ("stop", "cap"):
        return False
    n, target = item["num_tokens"], item["target"]
    return n <= target if item["constraint"] == "at_most" else n >= target


def _decoding_cost(items: list[Mapping[str, Any]]) -> float:
    """Tokens decoded per token returned (EOS counted in both): 1 unless ends were resampled or
    several attempts made; NaN when the items do not say (older runs)."""
    if not all("decoded_tokens" in i for i in items):
        return float("nan")
    kept = sum(i["num_tokens"] + (i.get("finish_reason") in ("stop", "cap")) for i in items)
    return sum(i["decoded_tokens"] for i in items) / max(kept, 1)


def _grouped(items: list[Mapping[str, Any]], field: str) -> dict[str, dict[str, float | list[float]]]:
    groups: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for item in items:
        groups[str(item[field])].append(item)
    return {key: _metrics(group) for key, group in sorted(groups.items(), key=_natural)}


def _natural(kv: tuple[str, Any]) -> tuple[int, Any]:
    key = kv[0]
    return (0, int(key)) if key.isdigit() else (1, key)


def summarize(items: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Aggregate scored outputs by method and constraint.

    Each item needs ``method``, ``constraint``, ``target``, ``num_tokens`` (the output length,
    EOS excluded) and may carry ``row``, ``category``, ``lang``, ``finish_reason``, ``eos_prob``
    and ``text``. Returns, per method and constraint, the overall metrics plus ``by_target``,
    ``by_category`` and ``by_lang`` breakdowns; every metrics dict holds ``n``, ``deviation``
    (mean ``|LD|``), ``signed_deviation``, ``score``, ``ended`` (the share of outputs ended by an
    EOS that the model or policy chose, not cut at ``max_new_tokens`` or by a hard cap),
    ``natural_end`` (the share of outputs ended by an EOS the generator itself gave at least
    ``NATURAL_EOS``), ``bound_stop`` (the share stopped by a bound: :func:`stopped_by_bound`),
    ``cut`` (the share cut at ``max_new_tokens``), ``median_ratio`` (the median of output length
    over target), ``mean_logprob`` (the generator's mean log-probability per output token: a
    fluency proxy) and ``decoding_cost`` (tokens decoded per token returned, from
    ``decoded_tokens``); ``score_interval`` and ``natural_end_interval`` are 95% intervals of
    ``score`` (a bootstrap over the answers of each target) and ``natural_end`` (Wilson's), see
    :mod:`lenvm.bench.intervals`. For At Most and At Least, when the prompt-only method ran on the same
    items, a guided method also gets ``unguided_fit`` (how many of its items' unguided answers
    met the bound) and ``changed_fit`` (the share of those whose guided answer differs; None when
    none did); and for every constraint ``unguided_ended`` (how many of its items' unguided
    answers ended with EOS), ``logprob_where_unguided_ended`` and
    ``unguided_logprob_where_ended`` (the mean log-probability per token of the method's and of
    the unguided answers on those items; None when there are none); ``logprob_same_length``
    (the mean, over the method's answers, of the mean log-probability per token of the
    ``LENGTH_NEIGHBOURS`` unguided answers of any item of the run, in the same language, that
    ended naturally and are closest in length: what the generator's own answers of those lengths
    score; None when there are none) and ``same_length_pool`` (how many such unguided answers
    there were).
    """
    grouped: dict[str, dict[str, list[Mapping[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for item in items:
        grouped[item["method"]][item["constraint"]].append(item)
    unguided = {_item_key(i): i for group in grouped.get(UNGUIDED, {}).values() for i in group if "text" in i}
    summary: dict[str, dict[str, Any]] = {}
    for method, by_constraint in grouped.items():
        summary[method] = {}
        for constraint in CONSTRAINTS:
            group = by_constraint.get(constraint)
            if not group:
                continue
            summary[method][constraint] = {
                **_metrics(group),
                "by_target": _grouped(group, "target"),
                "by_category": _grouped([i for i in group if "category" in i], "category"),
                "by_lang": _grouped([i for i in group if "lang" in i], "lang"),
            }
            if method != UNGUIDED and unguided:
                summary[method][constraint].update(_logprob_where_unguided_ended(group, unguided))
                summary[method][constraint].update(_logprob_at_same_lengths(group, unguided.values()))
                if constraint in BOUNDS:
                    summary[method][constraint].update(_changed_fits(group, unguided))
    return summary


def _item_key(item: Mapping[str, Any]) -> tuple:
    return item.get("row"), item["constraint"], int(item["target"])


def _with_unguided(
    group: list[Mapping[str, Any]], unguided: Mapping[tuple, Mapping[str, Any]]
) -> list[tuple[Mapping[str, Any], Mapping[str, Any]]]:
    """Each item of ``group`` with the prompt-only item of the same row, constraint and target,
    where there is one."""
    return [(i, unguided[_item_key(i)]) for i in group if _item_key(i) in unguided]


def _changed_fits(group: list[Mapping[str, Any]], unguided: Mapping[tuple, Mapping[str, Any]]) -> dict:
    """How often guidance changed an answer that met its bound without it: the unguided answer
    of an item is the prompt-only method's, drawn with the same seed (the same random stream),
    so a guided answer that leaves it alone is the same text."""
    pairs = [(i, u) for i, u in _with_unguided(group, unguided) if "text" in i and fits(u)]
    changed = sum(i["text"] != u["text"] for i, u in pairs)
    return {"unguided_fit": len(pairs), "changed_fit": changed / len(pairs) if pairs else None}


def _logprob_where_unguided_ended(
    group: list[Mapping[str, Any]], unguided: Mapping[tuple, Mapping[str, Any]]
) -> dict:
    """The mean log-probability per token of a guided method and of unguided sampling on the
    items whose unguided answer ended with EOS (``unguided_ended`` of them). An unguided answer
    cut at ``max_new_tokens`` has often fallen into a loop, text the generator finds very likely,
    which an answer brought to an end cannot match: this compares like with like."""
    pairs = [(i, u) for i, u in _with_unguided(group, unguided) if u.get("finish_reason") == "stop"]
    if not pairs:
        return {
            "unguided_ended": 0,
            "logprob_where_unguided_ended": None,
            "unguided_logprob_where_ended": None,
        }
    return {
        "unguided_ended": len(pairs),
        "logprob_where_unguided_ended": float(np.mean([i.get("mean_logprob", np.nan) for i, _ in pairs])),
        "unguided_logprob_where_ended": float(np.mean([u.get("mean_logprob", np.nan) for _, u in pairs])),
    }


def _logprob_at_same_lengths(group: list[Mapping[str, Any]], unguided: Iterable[Mapping[str, Any]]) -> dict:
    """What the generator's own natural answers of the same lengths score: per-token
    log-probability rises with an answer's length (later tokens have more context, and loops
    cut at ``max_new_tokens`` score highest of all), so a control that shortens answers scores
    below unguided sampling on the same items even when its text reads as the generator's own.
    Each answer of ``group`` is set beside the ``LENGTH_NEIGHBOURS`` unguided answers of its
    language that ended naturally and are nearest in log length."""
    pools: dict[Any, list[tuple[float, float]]] = defaultdict(list)
    for u in unguided:
        if natural_end(u) and "mean_logprob" in u:
            pools[u.get("lang")].append((math.log(u["num_tokens"] + 1), u["mean_logprob"]))
    references = []
    for item in group:
        pool = pools.get(item.get("lang"))
        if pool:
            length = math.log(item["num_tokens"] + 1)
            nearest = sorted(pool, key=lambda p: abs(p[0] - length))[:LENGTH_NEIGHBOURS]
            references.append(np.mean([lp for _, lp in nearest]))
    size = sum(len(pools.get(lang, ())) for lang in {i.get("lang") for i in group})
    return {
        "logprob_same_length": float(np.mean(references)) if references else None,
        "same_length_pool": size,
    }


def _cell(metrics: Mapping[str, Any] | None, key: str, percent: bool = False) -> str:
    if metrics is None:
        return "–"
    value = metrics[key]
    return f"{100 * value:.0f}%" if percent else f"{value:.1f}"


def _cell_with_interval(metrics: Mapping[str, Any] | None, key: str, percent: bool = False) -> str:
    """``_cell`` followed by the figure's 95% interval, where the metrics hold one."""
    cell = _cell(metrics, key, percent)
    if metrics is None or f"{key}_interval" not in metrics:
        return cell
    lo, hi = metrics[f"{key}_interval"]
    return f"{cell} ({100 * lo:.0f}-{100 * hi:.0f}%)" if percent else f"{cell} ({lo:.1f}-{hi:.1f})"


def table2(summary: Mapping[str, Mapping[str, Any]], labels: Mapping[str, str] | None = None) -> str:
    """The paper's Table 2 layout: Equal To deviation and LS, At Most LS, At Least LS."""
    labels = labels or {}
    rows = []
    for method, by_constraint in summary.items():
        eq = by_constraint.get("equal_to")
        rows.append(
            [
                labels.get(method, method),
                _cell(eq, "deviation", percent=True),
                _cell_with_interval(eq, "score"),
                _cell_with_interval(by_constraint.get("at_most"), "score"),
                _cell_with_interval(by_constraint.get("at_least"), "score"),
            ]
        )
    header = ["method", "Equal To deviation", "Equal To LS", "At Most LS", "At Least LS"]
    return markdown_table(header, rows)


def breakdown_table(
    summary: Mapping[str, Mapping[str, Any]],
    field: str,
    labels: Mapping[str, str] | None = None,
) -> str:
    """Length Score per ``field`` (``by_target``, ``by_category`` or ``by_lang``), one row per
    method and constraint; Equal To cells also show the mean deviation."""
    labels = labels or {}
    keys = sorted(
        {k for by_constraint in summary.values() for m in by_constraint.values() for k in m[field]},
        key=lambda k: _natural((k, None)),
    )
    rows = []
    for method, by_constraint in summary.items():
        for constraint, metrics in by_constraint.items():
            cells = []
            for key in keys:
                m = metrics[field].get(key)
                cell = _cell(m, "score")
                if m is not None and constraint == "equal_to":
                    cell += f" ({_cell(m, 'deviation', percent=True)})"
                cells.append(cell)
            rows.append([labels.get(method, method), CONSTRAINT_LABELS[constraint], *cells])
    return markdown_table(["method", "constraint", *keys], rows)


def quality_table(summary: Mapping[str, Mapping[str, Any]], labels: Mapping[str, str] | None = None) -> str:
    """Per method and constraint: how the outputs ended (with EOS, naturally, stopped by a bound,
    cut at ``max_new_tokens``), their median length over the target, the generator's mean
    log-probability per token (control that hits lengths by garbling text shows up here), the
    same beside unguided sampling's on the items where that ended with EOS, what the generator's
    own natural answers of the same lengths score, the decoding cost, and how often guidance
    changed an answer that met its bound unguided."""
    labels = labels or {}
    rows = []
    for method, by_constraint in summary.items():
        for constraint, m in by_constraint.items():
            changed = likely = same_length = "–"
            if m.get("unguided_fit"):
                changed = f"{round(m['changed_fit'] * m['unguided_fit'])} of {m['unguided_fit']}"
            if m.get("unguided_ended"):
                likely = (
                    f"{m['logprob_where_unguided_ended']:.2f} against {m['unguided_logprob_where_ended']:.2f}"
                    f" ({m['unguided_ended']} items)"
                )
            if m.get("logprob_same_length") is not None:
                same_length = f"{m['logprob_same_length']:.2f}"
            rows.append(
                [
                    labels.get(method, method),
                    CONSTRAINT_LABELS[constraint],
                    f"{100 * m['ended']:.0f}%",
                    _cell_with_interval(m, "natural_end", percent=True),
                    f"{100 * m['bound_stop']:.0f}%",
                    f"{100 * m['cut']:.0f}%",
                    f"{m['median_ratio']:.2f}",
                    f"{m['mean_logprob']:.2f}",
                    likely,
                    same_length,
                    f"{m['decoding_cost']:.2f}x",
                    changed,
                ]
            )
    header = [
        "method",
        "constraint",
        "ended with EOS",
        f"natural end (generator p(EOS) >= {NATURAL_EOS:g}; 95% interval)",
        "stopped by a bound",
        "cut at max_new_tokens",
        "median length / target",
        "mean log-prob / token",
        "the same where unguided sampling ended (against unguided)",
        "unguided natural answers of the same lengths",
        "tokens decoded / returned",
        "fitting unguided answers changed",
    ]
    return markdown_table(header, rows)
