"""Length tokens: which tokens push a completion longer or shorter, as a table and a plot.

A thin wrapper of :func:`lenvm.horizon_tokens.length_token_stats` that writes the benchmark
layout (``results.json``, ``table.md``, ``length_tokens.png``). The statistics are one pass of
the LenVM over the rollouts; a rerun with the same settings reuses ``results.json``.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from lenvm.bench.common import Models, Run, load_models, markdown_code, markdown_table
from lenvm.cli import options
from lenvm.horizon_tokens import length_token_stats
from lenvm.io import file_digest
from lenvm.rollouts import read_rollouts


def run_length_tokens(
    out: str | os.PathLike,
    *,
    rollouts: str | os.PathLike,
    model: str | os.PathLike | None = None,
    lenvm: str | os.PathLike | None = None,
    threshold: float | None = None,
    min_count: int = 3,
    top: int = 20,
    limit: int | None = None,
    device: str | None = None,
    dtype: str = "float32",
    batch_size: int = 8,
    progress: bool = True,
    models: Models | None = None,
) -> dict[str, Any]:
    """TD-residual token statistics over ``rollouts`` (the first ``limit`` records), with the
    ``top`` tokens per direction in ``table.md`` and a bar chart in ``length_tokens.png``."""
    started = time.perf_counter()
    models = models or load_models(model, lenvm, device, dtype)
    value_model = models.require_lenvm("length-token statistics")
    settings = {
        **models.identity(),
        "rollouts": str(rollouts),
        "rollouts_digest": file_digest(rollouts),
        "threshold": threshold,
        "min_count": min_count,
        "limit": limit,
    }
    with Run(out, settings) as run:
        done = run.path("results.json")
        if done.is_file():
            previous = json.loads(done.read_text(encoding="utf-8"))
            if previous.get("top") == top:
                return previous
        records = read_rollouts(rollouts)[:limit]
        stats = length_token_stats(
            value_model,
            records,
            threshold=threshold,
            min_count=min_count,
            batch_size=batch_size,
            progress=progress,
        )
        results = {
            "benchmark": "length_tokens",
            "top": top,
            **stats.to_dict(top),
            "settings": settings,
            "seconds": round(time.perf_counter() - started, 1),
        }
        stats.plot(run.path("length_tokens.png"), n=min(top, 15))
        run.write_text("table.md", _markdown(results))
        run.write_json("results.json", results)
    return results


def _markdown(results: dict[str, Any]) -> str:
    parts = [
        f"TD residual per token over {results['completions']} completions "
        f"({results['tokens']} tokens, gamma {results['gamma']:.4g}); a token pushes longer when "
        f"its residual is below -{results['threshold']:g}, shorter when above "
        f"+{results['threshold']:g}"
        + (" (the strongest tenth of the residuals)" if results["settings"]["threshold"] is None else "")
        + f". Tokens seen at least {results['min_count']} times.\n"
    ]
    for direction in ("longer", "shorter"):
        rows = [
            [
                markdown_code(repr(s["token"])),
                s["count"],
                f"{100 * s[f'{direction}_fraction']:.0f}%",
                f"{s['mean_residual']:+.4f}",
            ]
            for s in results[direction]
        ]
        header = ["token", "count", f"pushes {direction}", "mean residual"]
        parts.append(f"\n**Pushes {direction}**\n\n" + markdown_table(header, rows))
    return "".join(parts)


# -- command line ---------------------------------------------------------------------------

TABLE = "table.md"


def add_arguments(p) -> None:
    p.add_argument("--lenvm", type=options.path, help="LenVM folder")
    p.add_argument(
        "--rollouts", type=options.path, required=True, help="rollouts JSONL of the LenVM's generator"
    )
    p.add_argument(
        "--threshold",
        type=float,
        help="a TD residual beyond +-this pushes the horizon (default: the 90th percentile of the "
        "residuals' magnitudes over these rollouts, the strongest tenth)",
    )
    p.add_argument(
        "--min-count", type=options.positive_int, default=3, help="tokens seen fewer times are left out"
    )
    p.add_argument("--top", type=options.positive_int, default=20, help="tokens listed each way")
    p.add_argument("--limit", type=options.positive_int, help="first N completions")
    p.add_argument("--batch-size", type=options.positive_int, default=8, help="completions per forward")


def main(args) -> None:
    run_length_tokens(
        args.out,
        model=args.model,
        lenvm=args.lenvm,
        rollouts=args.rollouts,
        threshold=args.threshold,
        min_count=args.min_count,
        top=args.top,
        limit=args.limit,
        batch_size=args.batch_size,
        device=args.device,
        dtype=args.dtype,
        progress=args.progress,
    )
