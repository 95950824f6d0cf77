"""Benchmarks: token-level LIFEBench, the cost/quality trade-off, prompt-boundary length
prediction, length tokens, and a report that runs them all.

Each entry function writes ``results.json``, ``table.md`` and PNG plots into its own results
folder and resumes an interrupted run from the per-item log in that folder.
"""

from lenvm.bench.lifebench import lifebench
from lenvm.bench.predict import predict
from lenvm.bench.tradeoff import tradeoff

__all__ = ["lifebench", "predict", "tradeoff"]
