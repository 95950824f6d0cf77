"""Peak memory of training on a large rollout set: streamed against loaded.

Writes ``--records`` synthetic rollout records (prompts of 16 tokens, completions of random
length, a tenth of them cut) for a tiny random model, then runs ``lenvm train`` on them once
per path (``head``: an attached head on cached hidden states; ``full``: fine-tuning a standalone
LenVM) and mode (``stream``: records re-read on each pass; ``load``: records loaded into memory),
each in a process of its own, one epoch. A sampler reads the process's ``/proc`` status
every 0.1 s: the peak resident set (``VmHWM``: everything resident, page cache of
memory-mapped files included) and the peak anonymous memory (``RssAnon``: what the process
itself holds; memory-mapped pages are file-backed and the kernel drops them under pressure).
Linux only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from lenvm.bench.common import Run, markdown_table
from lenvm.cli import options
from lenvm.io import InputError

TABLE = "table.md"
PATHS = ("head", "full")
MODES = ("stream", "load")
MODEL_FLAG = None  # no --model, --device or --dtype: it trains a tiny model of its own on the CPU


def add_arguments(p) -> None:
    p.add_argument("--records", type=options.positive_int, default=100_000, help="synthetic rollout records")
    p.add_argument(
        "--max-completion", type=options.positive_int, default=64, help="longest completion, in tokens"
    )
    p.add_argument(
        "--paths", nargs="+", choices=PATHS, default=list(PATHS), help="head training and/or full fine-tuning"
    )
    p.add_argument(
        "--modes",
        nargs="+",
        choices=MODES,
        default=list(MODES),
        help="streaming the rollouts and/or loading them",
    )
    p.add_argument(
        "--source",
        type=options.path,
        help="train with the lenvm package in this source folder (its src/), to compare another version",
    )


def main(args) -> None:
    run_train_memory(
        args.out,
        records=args.records,
        max_completion=args.max_completion,
        paths=args.paths,
        modes=args.modes,
        source=args.source,
        progress=args.progress,
    )


def synthetic_rollouts(path: Path, tokenizer, records: int, max_completion: int, seed: int = 0) -> None:
    """``records`` rollout records, 8 per prompt, completion lengths uniform in 8..max_completion."""
    rng = np.random.default_rng(seed)
    eos = tokenizer.eos_token_id
    vocab = len(tokenizer)
    with path.open("w", encoding="utf-8") as fh:
        for i in range(records):
            prompt = [int(t) for t in rng.integers(3, vocab, 16)]
            n = int(rng.integers(8, max_completion + 1))
            cut = rng.random() < 0.1
            body = [int(t) for t in rng.integers(3, vocab, n - 1)]
            ids = body if cut else body + [eos]
            record = {
                "prompt_id": str(i // 8),
                "sample_index": i % 8,
                "prompt": tokenizer.decode(prompt),  # what the tokens read as, as a real record
                "prompt_token_ids": prompt,
                "completion": "",
                "completion_token_ids": ids,
                "finish_reason": "length" if cut else "stop",
                "num_tokens": len(ids),
                "generator": "tiny",
                "sampling": {"temperature": 1.0},
            }
            fh.write(json.dumps(record) + "\n")


def _memory(pid: int) -> dict[str, int]:
    fields = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "RssAnon"):
                fields[key] = int(value.split()[0]) * 1024
    return fields


def measure(command: list[str], env: dict[str, str]) -> dict[str, Any]:
    """Run ``command``; its exit status, wall time and peak memory (bytes)."""
    started = time.perf_counter()
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = {"VmHWM": 0, "RssAnon": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            try:
                for key, value in _memory(proc.pid).items():
                    peak[key] = max(peak[key], value)
            except (FileNotFoundError, ProcessLookupError, ValueError):
                return
            done.wait(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, stderr = proc.communicate()
    done.set()
    sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({proc.returncode}):\n{stderr[-2000:]}")
    return {
        "seconds": round(time.perf_counter() - started, 1),
        "peak_rss_bytes": peak["VmHWM"],
        "peak_anon_bytes": peak["RssAnon"],
        "stdout": stdout,
    }


def run_train_memory(
    out: str | os.PathLike,
    records: int = 100_000,
    max_completion: int = 64,
    paths=PATHS,
    modes=MODES,
    source: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    if not Path("/proc/self/status").is_file():
        raise InputError("train-memory reads /proc to sample memory: Linux only")
    from lenvm.hub import load_tokenizer
    from lenvm.testing import tiny_model

    settings = {"records": records, "max_completion": max_completion, "source": source}
    with Run(out, settings) as run:
        model = tiny_model(run.path("tiny")) if not run.path("tiny").is_dir() else run.path("tiny")
        rollouts = run.path("rollouts.jsonl")
        if not rollouts.is_file():
            tmp = run.path("rollouts.jsonl.tmp")
            synthetic_rollouts(tmp, load_tokenizer(model), records, max_completion)
            os.replace(tmp, rollouts)
        env = dict(os.environ)
        if source:
            env["PYTHONPATH"] = str(Path(source) / "src")
        jobs = [(p, m) for p in paths for m in modes if f"{p}-{m}" not in run.done]
        for path, mode in tqdm(jobs, desc="training runs", disable=not progress):
            kind = ["--kind", "attached"] if path == "head" else ["--kind", "standalone", "--batch-size", "8"]
            command = [sys.executable, "-m", "lenvm.cli", "train", "--rollouts", str(rollouts)]
            command += ["--base", str(model), "--out", str(run.path(f"lenvm-{path}-{mode}")), *kind]
            command += ["--epochs", "1", "--no-bf16"]
            if not source:  # an older version has no such flag: it always loads
                command += ["--stream" if mode == "stream" else "--no-stream"]
            result = measure(command, env)
            printed = json.loads(result.pop("stdout") or "{}")
            run.add(
                [
                    {
                        "key": f"{path}-{mode}",
                        "path": path,
                        "mode": mode,
                        **result,
                        "metrics": printed.get("metrics"),
                    }
                ]
            )
        rows = [run.done[f"{p}-{m}"] for p in paths for m in modes]
        results = {"settings": settings, "file_bytes": rollouts.stat().st_size, "rows": rows}
        run.write_json("results.json", results)
        gib = 2**30
        table = markdown_table(
            ["path", "mode", "peak RSS (GiB)", "peak anonymous (GiB)", "seconds"],
            [
                (
                    r["path"],
                    r["mode"],
                    f"{r['peak_rss_bytes'] / gib:.2f}",
                    f"{r['peak_anon_bytes'] / gib:.2f}",
                    r["seconds"],
                )
                for r in rows
            ],
        )
        run.write_text(
            TABLE, f"{records:,} records, {rollouts.stat().st_size / 2**20:.0f} MiB of JSONL\n\n" + table
        )
    return results
