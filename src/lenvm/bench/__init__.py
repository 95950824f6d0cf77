"""Benchmarks: token-level LIFEBench, the cost/quality trade-off, prompt-boundary length
prediction, length tokens, decoding speed, Q-head agreement with exact candidate scoring, and a
report that runs them all.

Each entry function writes ``results.json``, ``table.md`` and PNG plots into its own results
folder and resumes an interrupted run from the per-item log in that folder.
"""

from lenvm.bench.length_tokens import run_length_tokens
from lenvm.bench.lifebench import run_lifebench
from lenvm.bench.predict import run_prediction
from lenvm.bench.q_agreement import run_q_agreement
from lenvm.bench.report import FULL, QUICK, Preset, run_all, write_report
from lenvm.bench.speed import run_speed
from lenvm.bench.tradeoff import run_tradeoff

__all__ = [
    "FULL",
    "QUICK",
    "Preset",
    "run_all",
    "run_length_tokens",
    "run_lifebench",
    "run_prediction",
    "run_q_agreement",
    "run_speed",
    "run_tradeoff",
    "write_report",
]
