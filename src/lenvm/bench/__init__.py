"""Benchmarks: token-level LIFEBench, the cost/quality trade-off, prompt-boundary length
prediction, shortest-predicted-first scheduling, length tokens, decoding speed, Q-head agreement
with exact candidate scoring, the server under load, peak memory of training, the
vision-language path timed on generated images, and a report that runs them all.

Each entry function writes ``results.json`` and ``table.md`` (and, but for the training-memory
and vision benchmarks, PNG plots) into its own results folder and resumes an interrupted run
from the per-item log in that folder. Each module also declares its ``lenvm bench`` subcommand,
named in ``COMMANDS``: ``TABLE`` (the file printed at the end), ``add_arguments(parser)`` and
``main(args)``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lenvm._lazy import lazy_exports

# The ``lenvm bench`` subcommands, in the order ``--help`` lists them: name, help, module. A module
# is imported when its subcommand runs (they need torch, which ``--help`` should not wait for).
COMMANDS = (
    ("all", "every benchmark into one folder, with report.md", "lenvm.bench.report"),
    ("lifebench", "token-level LIFEBench: Equal To / At Most / At Least", "lenvm.bench.lifebench"),
    ("tradeoff", "pass@1 vs mean length: tilting against a hard token budget", "lenvm.bench.tradeoff"),
    (
        "predict",
        "prompt-boundary length prediction in and across domains, against three baselines",
        "lenvm.bench.predict",
    ),
    (
        "schedule",
        "shortest-predicted-first scheduling: replayed answers through a batching server model, and live",
        "lenvm.bench.schedule",
    ),
    ("length-tokens", "tokens that push the length horizon (TD residuals)", "lenvm.bench.length_tokens"),
    ("speed", "tokens/s: plain, generate, and guided decoding by LenVM kind", "lenvm.bench.speed"),
    ("q-agreement", "Q-head candidate values against exact scoring", "lenvm.bench.q_agreement"),
    (
        "serve",
        "requests/s, tokens/s and latency of lenvm serve under concurrent clients",
        "lenvm.bench.serve",
    ),
    (
        "train-memory",
        "peak memory of training on many synthetic rollouts, streamed vs loaded",
        "lenvm.bench.train_memory",
    ),
    (
        "vision",
        "the vision-language path on generated images: rollouts, training, prediction, guided decoding",
        "lenvm.bench.vision",
    ),
)

# name -> module that defines it, loaded on first use
_EXPORTS = {
    "FULL": "lenvm.bench.report",
    "QUICK": "lenvm.bench.report",
    "Preset": "lenvm.bench.report",
    "run_all": "lenvm.bench.report",
    "write_report": "lenvm.bench.report",
    "run_length_tokens": "lenvm.bench.length_tokens",
    "run_lifebench": "lenvm.bench.lifebench",
    "run_prediction": "lenvm.bench.predict",
    "run_q_agreement": "lenvm.bench.q_agreement",
    "run_schedule": "lenvm.bench.schedule",
    "run_serve_bench": "lenvm.bench.serve",
    "run_speed": "lenvm.bench.speed",
    "run_tradeoff": "lenvm.bench.tradeoff",
    "run_train_memory": "lenvm.bench.train_memory",
    "run_vision": "lenvm.bench.vision",
}

__all__ = [
    "COMMANDS",
    "FULL",
    "QUICK",
    "Preset",
    "run_all",
    "run_length_tokens",
    "run_lifebench",
    "run_prediction",
    "run_q_agreement",
    "run_schedule",
    "run_serve_bench",
    "run_speed",
    "run_tradeoff",
    "run_train_memory",
    "run_vision",
    "write_report",
]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)


if TYPE_CHECKING:
    from lenvm.bench.length_tokens import run_length_tokens
    from lenvm.bench.lifebench import run_lifebench
    from lenvm.bench.predict import run_prediction
    from lenvm.bench.q_agreement import run_q_agreement
    from lenvm.bench.report import FULL, QUICK, Preset, run_all, write_report
    from lenvm.bench.schedule import run_schedule
    from lenvm.bench.serve import run_serve_bench
    from lenvm.bench.speed import run_speed
    from lenvm.bench.tradeoff import run_tradeoff
    from lenvm.bench.train_memory import run_train_memory
    from lenvm.bench.vision import run_vision
