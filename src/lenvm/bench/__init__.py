"""Benchmarks: token-level LIFEBench, the cost/quality trade-off, prompt-boundary length
prediction, shortest-predicted-first scheduling, length tokens, decoding speed, Q-head agreement
with exact candidate scoring, the server under load, peak memory of training, the
vision-language path timed on generated images, and a report that runs them all.

Each entry function writes ``results.json``, ``table.md`` and PNG plots into its own results
folder and resumes an interrupted run from the per-item log in that folder. Each module also
declares its ``lenvm bench`` subcommand: ``COMMAND``, ``HELP``, ``TABLE`` (the file printed at the
end), ``add_arguments(parser)`` and ``main(args)``.
"""

from lenvm.bench import (
    length_tokens,
    lifebench,
    predict,
    q_agreement,
    report,
    schedule,
    serve,
    speed,
    tradeoff,
    train_memory,
    vision,
)
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

# The ``lenvm bench`` subcommands, in the order ``--help`` lists them.
COMMANDS = (
    report,
    lifebench,
    tradeoff,
    predict,
    schedule,
    length_tokens,
    speed,
    q_agreement,
    serve,
    train_memory,
    vision,
)

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
