"""Scheduling with predicted lengths: does shortest-predicted-first cut a server's latency?

Replay: answers sampled from the generator (rollouts files: their real lengths and prompts) are
drawn at random as requests arriving as a Poisson process at a chosen load, and run through the
continuous-batching server model of :mod:`lenvm.scheduling` (``batch_size`` rows, one token per
row per step). Admission orders, all but FCFS with the same ageing (:mod:`lenvm.decoding.queue`):

- ``fcfs``: first come, first served;
- ``lenvm``: shortest first by the LenVM's prediction from the prompt alone;
- ``prompt_length``: shortest prompt first (prompt tokens as the predicted length);
- ``oracle``: shortest first by the true length of each answer (known only in hindsight).

The load is the offered work as a share of the server's rows (``load · batch_size / mean length``
requests arrive per step); the measured utilization is reported beside it. Mean, p50 and p99
latency and time to first token per policy, in steps, at the chosen load and over a sweep of
loads (``schedule.png``), plus the ageing trade-off of the LenVM order; each figure is the mean
over ``replicates`` workloads drawn with successive seeds.

Live (``live > 0``): the same comparison in the real engine. Prompts drawn from the same pool
arrive at the same load (in engine steps) at a :class:`lenvm.decoding.Scheduler` whose engine
admits FCFS or LenVM-shortest-first (``Engine(queue=...)``); answers are generated for real with
the LenVM's training policy (each request with its own seed, the same under both orders), and
latency and time to first token are measured in steps and in wall-clock seconds.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, cast

import numpy as np
from tqdm.auto import tqdm

from lenvm.bench.common import Models, Run, bench_sampling, item_request, load_models, markdown_table
from lenvm.bench.predict import check_generator, sample_length
from lenvm.cli import options
from lenvm.decoding.queue import DEFAULT_AGING, QueueOrder, check_queue, priority
from lenvm.figures import subplots
from lenvm.io import InputError, file_digest, positive_count
from lenvm.prompts import Prompt
from lenvm.rollouts import read_rollouts, record_prompt
from lenvm.scheduling import Timeline, poisson_arrivals, rate_for_load, simulate

POLICIES = {
    "fcfs": "FCFS",
    "lenvm": "LenVM shortest first",
    "prompt_length": "shortest prompt first",
    "oracle": "oracle shortest first",
}
LIVE_POLICIES: dict[str, QueueOrder] = {"fcfs": "fcfs", "lenvm": "shortest"}  # policy -> Engine(queue=...)
DEFAULT_LOADS = (0.5, 0.7, 0.8, 0.9, 0.95, 1.0)
AGINGS = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


@dataclass
class Pool:
    """Answers to replay: one entry per completion."""

    prompt_ids: list[str]
    prompts: dict[str, Prompt]  # prompt id -> prompt
    prompt_tokens: np.ndarray
    length: np.ndarray  # output tokens, EOS included
    max_new_tokens: int

    @classmethod
    def read(cls, paths: Sequence[str | os.PathLike], generator: str) -> Pool:
        """The completions of the rollout files ``paths``, answers of ``generator``."""
        records = [r for path in paths for r in read_rollouts(path)]
        check_generator(records, generator, "the rollouts")
        if not records:
            raise InputError("the rollouts hold no completions to replay")
        prompts: dict[str, Prompt] = {}
        for r in records:
            prompt = record_prompt(r)
            if prompts.setdefault(prompt.id, prompt).key() != prompt.key():
                raise InputError(f"prompt id {r['prompt_id']!r} names two different prompts in the rollouts")
        return cls(
            [r["prompt_id"] for r in records],
            prompts,
            np.array([len(r["prompt_token_ids"]) for r in records]),
            np.array([sample_length(r) for r in records]),
            max(int(r["sampling"].get("max_new_tokens", 0)) for r in records)
            or int(max(sample_length(r) for r in records)),
        )


def policy_keys(
    policy: str, arrival: np.ndarray, true_length: np.ndarray, predicted: np.ndarray,
    prompt_tokens: np.ndarray, aging: float,
) -> np.ndarray:  # fmt: skip
    """The queue key of every request under ``policy`` (lower is admitted first)."""
    if policy == "fcfs":
        return arrival
    guess = {"lenvm": predicted, "prompt_length": prompt_tokens, "oracle": true_length}[policy]
    return np.array([priority(float(g), float(a), aging) for g, a in zip(guess, arrival, strict=True)])


def replay(
    pool: Pool, predicted: dict[str, float], batch_size: int, load: float, requests: int, aging: float,
    seed: int, prefill_per_token: float = 0.0, policies: Sequence[str] = tuple(POLICIES),
) -> dict[str, Timeline]:  # fmt: skip
    """One workload (``requests`` answers drawn from ``pool``, Poisson arrivals at ``load``) under
    each policy."""
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, len(pool.length), size=requests)
    length = pool.length[pick]
    prompt_tokens = pool.prompt_tokens[pick]
    guess = np.array([predicted[pool.prompt_ids[i]] for i in pick])
    arrival = poisson_arrivals(requests, rate_for_load(load, float(pool.length.mean()), batch_size), seed)
    return {
        policy: simulate(
            arrival,
            length,
            policy_keys(policy, arrival, length, guess, prompt_tokens, aging),
            batch_size,
            prompt_tokens,
            prefill_per_token,
        )  # fmt: skip
        for policy in policies
    }


def replay_stats(pool: Pool, predicted: dict[str, float], replicates: int, seed: int, **kwargs) -> dict:
    """:func:`replay`'s statistics per policy, each the mean over ``replicates`` workloads (seeds
    ``seed``, ``seed + 1``, ...): one heavy-tailed workload alone moves a mean latency by tens of
    percent."""
    runs = [replay(pool, predicted, seed=seed + r, **kwargs) for r in range(replicates)]
    return {
        policy: {k: float(np.mean([run[policy].stats()[k] for run in runs])) for k in runs[0][policy].stats()}
        for policy in runs[0]
    }


def run_schedule(
    out: str | os.PathLike,
    *,
    rollouts: Sequence[str | os.PathLike],
    model: str | os.PathLike | None = None,
    lenvm: str | os.PathLike | None = None,
    batch_size: int = 8,
    load: float = 0.9,
    loads: Sequence[float] = DEFAULT_LOADS,
    requests: int = 4000,
    replicates: int = 5,
    aging: float = DEFAULT_AGING,
    prefill_per_token: float = 0.0,
    live: int = 0,
    seed: int = 0,
    device: str | None = None,
    dtype: str = "float32",
    progress: bool = True,
    models: Models | None = None,
) -> dict[str, Any]:
    """Replay ``rollouts`` through the server model under every policy (and, with ``live``
    requests, through the engine); writes ``results.json``, ``table.md`` and ``schedule.png``.
    The LenVM must not have been trained on these rollouts' prompts."""
    started = time.perf_counter()
    if not rollouts:
        raise InputError("give rollouts to replay")
    if not load > 0 or not all(x > 0 for x in loads):
        raise InputError("loads must be positive")
    loads = sorted({float(x) for x in loads})  # keys of the sweep, and a line along the load axis
    replicates = positive_count(replicates, "replicates")
    check_queue("shortest", aging)
    models = models or load_models(model, lenvm, device, dtype)
    pool = Pool.read(rollouts, models.name)
    value_model = models.require_lenvm("shortest-predicted-first scheduling")
    settings = {
        **models.identity(),
        "rollouts": [str(r) for r in rollouts],
        "rollouts_digest": [file_digest(r) for r in rollouts],
        "batch_size": batch_size,
        "load": load,
        "loads": list(loads),
        "requests": requests,
        "replicates": replicates,
        "aging": aging,
        "prefill_per_token": prefill_per_token,
        "seed": seed,
        "live": live,
    }
    Run(out, settings).close()  # other settings in this folder are refused before any work
    ids = list(pool.prompts)
    clock = time.perf_counter()
    lengths = value_model.predict_length([pool.prompts[i] for i in ids], batch_size=32)
    predict_seconds = time.perf_counter() - clock
    predicted = dict(zip(ids, lengths, strict=True))

    common = {"batch_size": batch_size, "requests": requests, "prefill_per_token": prefill_per_token}
    at_load = replay_stats(pool, predicted, replicates, seed, load=load, aging=aging, **common)
    sweep = {
        str(x): replay_stats(pool, predicted, replicates, seed, load=x, aging=aging, **common) for x in loads
    }
    agings = {
        str(a): replay_stats(
            pool, predicted, replicates, seed, load=load, aging=a, policies=("lenvm",), **common
        )["lenvm"]
        for a in AGINGS
    }
    results = {
        "benchmark": "schedule",
        "pool": {
            "completions": len(pool.length),
            "prompts": len(pool.prompts),
            "mean_length": float(pool.length.mean()),
            "max_new_tokens": pool.max_new_tokens,
        },
        "prediction_seconds": round(predict_seconds, 2),
        "simulated": {
            "load": load,
            "aging": aging,
            "replicates": replicates,
            "seed": seed,
            **common,
            "policies": at_load,
        },
        "load_sweep": sweep,
        "aging_sweep": agings,
        "settings": settings,
    }
    if live:
        results["live"] = _live(
            Path(out), pool, models, settings, batch_size, load, aging, live, seed, progress
        )
    results["seconds_this_run"] = round(time.perf_counter() - started, 1)
    out = Path(out)
    with Run(out, settings) as run:
        run.write_json("results.json", results)
        run.write_text("table.md", _markdown(results))
        _plot(run, results)
    return results


def _live(
    out: Path, pool: Pool, models: Models, settings: dict, batch_size: int, load: float, aging: float,
    requests: int, seed: int, progress: bool,
) -> dict[str, Any]:  # fmt: skip
    """The engine under each live policy on one workload; each policy's figures are kept in the
    results folder's item log, so an interrupted run resumes with the next policy."""
    rng = np.random.default_rng([seed, 1])
    ids = list(pool.prompts)
    pick = rng.choice(len(ids), size=requests)
    # Arrivals in engine steps: the load is the offered work of the replayed answers per row.
    arrival = poisson_arrivals(requests, rate_for_load(load, float(pool.length.mean()), batch_size), seed)
    sampling = bench_sampling(models, pool.max_new_tokens, seed=seed)
    workload = [
        (float(arrival[k]), item_request(sampling, pool.prompts[ids[i]], f"live-{k}"))
        for k, i in enumerate(pick)
    ]
    out.mkdir(parents=True, exist_ok=True)
    with Run(out, settings) as run:
        if any(policy not in run.done for policy in LIVE_POLICIES):
            # Untimed first, under every policy: a process's first forwards are slow (allocation,
            # kernel choice), which counted against whichever policy ran first.
            warm = [
                (0.0, replace(r, sampling=replace(r.sampling, max_new_tokens=4)))
                for _, r in workload[:batch_size]
            ]
            for queue in LIVE_POLICIES.values():
                _serve(models, queue, aging, batch_size, warm, False, "warm-up")
        for policy, queue in LIVE_POLICIES.items():
            if policy in run.done:
                continue
            record = {"key": policy, **_serve(models, queue, aging, batch_size, workload, progress, policy)}
            run.add([record])
        return {policy: {k: v for k, v in run.done[policy].items() if k != "key"} for policy in LIVE_POLICIES}


def _serve(
    models: Models, queue: QueueOrder, aging: float, batch_size: int, workload, progress: bool, desc: str
):
    """Run ``workload`` (arrival step, request) through a scheduler; latency and time to first
    token per request, in steps and in seconds."""
    from lenvm.decoding import Engine, Scheduler

    engine = Engine(
        models.generator, models.tokenizer, lenvm=models.lenvm if queue == "shortest" else None,
        queue=queue, queue_aging=aging,
    )  # fmt: skip
    scheduler = Scheduler(engine, batch_size)
    n = len(workload)
    arrived_step, arrived_s = np.zeros(n), np.zeros(n)
    first_step, first_s = np.full(n, np.nan), np.full(n, np.nan)
    done_step, done_s = np.full(n, np.nan), np.full(n, np.nan)
    tokens = np.zeros(n)
    nxt, busy_rows = 0, 0
    started = time.perf_counter()
    with tqdm(total=n, desc=f"live {desc}", unit="req", disable=not progress) as bar:
        while nxt < n or scheduler.busy:
            if not scheduler.busy and workload[nxt][0] > scheduler.steps:
                scheduler.steps = int(np.ceil(workload[nxt][0]))  # idle: jump to the next arrival
            now = time.perf_counter() - started
            while nxt < n and workload[nxt][0] <= scheduler.steps:
                scheduler.add(workload[nxt][1], nxt)
                arrived_step[nxt], arrived_s[nxt] = workload[nxt][0], now
                nxt += 1
            updates = scheduler.step()
            busy_rows += len({u.key for u in updates})
            now = time.perf_counter() - started
            for u in updates:
                i = cast(int, u.key)  # the workload index it was added under
                if np.isnan(first_step[i]):
                    first_step[i], first_s[i] = scheduler.steps, now
                if u.result is not None:
                    done_step[i], done_s[i] = scheduler.steps, now
                    tokens[i] = u.result.num_tokens
                    bar.update(1)
    seconds = time.perf_counter() - started
    latency, ttft = done_step - arrived_step, first_step - arrived_step
    latency_s, ttft_s = done_s - arrived_s, first_s - arrived_s

    def summary(x: np.ndarray) -> dict[str, float]:
        return {
            "mean": float(x.mean()),
            "p50": float(np.percentile(x, 50)),
            "p99": float(np.percentile(x, 99)),
        }

    return {
        "requests": n,
        "steps": scheduler.steps,
        "seconds": round(seconds, 1),
        "tokens": int(tokens.sum()),
        "tokens_per_second": round(float(tokens.sum()) / seconds, 1),
        "utilization": busy_rows / (batch_size * scheduler.steps),
        "latency_steps": summary(latency),
        "ttft_steps": summary(ttft),
        "latency_seconds": summary(latency_s),
        "ttft_seconds": summary(ttft_s),
    }


def _markdown(results: dict) -> str:
    sim = results["simulated"]
    pool = results["pool"]
    header = ["policy", "mean latency", "p50", "p99", "mean TTFT", "p50 TTFT", "p99 TTFT", "vs FCFS (mean)"]
    fcfs = sim["policies"]["fcfs"]["mean_latency"]
    rows = [
        [POLICIES[p], *(f"{s[k]:.0f}" for k in ("mean_latency", "p50_latency", "p99_latency", "mean_ttft",
                                                 "p50_ttft", "p99_ttft")),
         f"{100 * (s['mean_latency'] / fcfs - 1):+.0f}%"]
        for p, s in sim["policies"].items()
    ]  # fmt: skip
    text = (
        f"Replay of {pool['completions']} sampled answers ({pool['prompts']} prompts, mean length "
        f"{pool['mean_length']:.0f} tokens) as {sim['requests']} requests (mean of {sim['replicates']} "
        f"workloads), Poisson arrivals at load "
        f"{sim['load']} on a batch of {sim['batch_size']} rows (FCFS utilization "
        f"{sim['policies']['fcfs']['utilization']:.0%}); ageing {sim['aging']} predicted tokens per step "
        f"waited. Times in decoding steps.\n\n" + markdown_table(header, rows)
    )
    loads = list(results["load_sweep"])
    text += "\nMean latency (steps) over loads:\n\n" + markdown_table(
        ["policy", *loads],
        [
            [POLICIES[p], *(f"{results['load_sweep'][x][p]['mean_latency']:.0f}" for x in loads)]
            for p in POLICIES
        ],
    )
    text += "\nLenVM order by ageing rate (predicted tokens per step waited), at the chosen load:\n\n"
    text += markdown_table(
        ["ageing", "mean latency", "p99 latency", "p99 TTFT"],
        [[a, f"{s['mean_latency']:.0f}", f"{s['p99_latency']:.0f}", f"{s['p99_ttft']:.0f}"]
         for a, s in results["aging_sweep"].items()],
    )  # fmt: skip
    if "live" in results:
        live = results["live"]
        header = ["engine queue", "requests", "tokens/s", "mean latency (steps / s)", "p50", "p99",
                  "mean TTFT (steps / s)", "p99 TTFT"]  # fmt: skip

        def pair(r, what, stat):
            return f"{r[what + '_steps'][stat]:.0f} / {r[what + '_seconds'][stat]:.1f}"

        rows = [
            [POLICIES[p], r["requests"], r["tokens_per_second"], pair(r, "latency", "mean"),
             pair(r, "latency", "p50"), pair(r, "latency", "p99"), pair(r, "ttft", "mean"),
             pair(r, "ttft", "p99")]
            for p, r in live.items()
        ]  # fmt: skip
        text += "\nLive, in the engine (generated for real, same arrivals and seeds):\n\n" + markdown_table(
            header, rows
        )
    return text


def _plot(run: Run, results: dict) -> None:
    fig, (left, right) = subplots(1, 2, figsize=(11, 4.2))
    sweep = sorted(results["load_sweep"].items(), key=lambda item: float(item[0]))
    colours = {p: f"C{i}" for i, p in enumerate(POLICIES)}  # one colour per policy in both panels
    for p, label in POLICIES.items():
        left.plot(
            [float(x) for x, _ in sweep], [r[p]["mean_latency"] for _, r in sweep], "o-", label=label,
            color=colours[p],
        )  # fmt: skip
    left.set_xlabel("load (offered work / rows)")
    left.set_ylabel("mean latency (steps)")
    left.set_yscale("log")
    left.grid(alpha=0.3, which="both")
    left.legend(fontsize=8)
    sim = results["simulated"]["policies"]
    stats = ["mean_latency", "p50_latency", "p99_latency", "mean_ttft", "p99_ttft"]
    width = 0.8 / len(sim)
    for k, (p, s) in enumerate(sim.items()):
        right.bar(
            np.arange(len(stats)) + k * width,
            [s[x] for x in stats],
            width,
            label=POLICIES[p],
            color=colours[p],
        )
    right.set_xticks(
        np.arange(len(stats)) + width * (len(sim) - 1) / 2,
        [s.replace("_", " ") for s in stats],
        rotation=20,
        ha="right",
    )
    right.legend(fontsize=8)
    right.set_yscale("log")
    right.set_ylabel("steps")
    right.set_title(f"load {results['simulated']['load']}", fontsize=9)
    right.grid(alpha=0.3, axis="y", which="both")
    run.save_figure(fig, "schedule.png")


# -- command line ---------------------------------------------------------------------------

TABLE = "table.md"


def add_arguments(p) -> None:
    p.add_argument(
        "--lenvm",
        type=options.path,
        required=True,
        help="LenVM folder (not trained on the rollouts' prompts)",
    )
    p.add_argument(
        "--rollouts",
        type=options.path,
        nargs="+",
        required=True,
        help="rollouts JSONL file(s) whose answers to replay",
    )
    p.add_argument("--batch-size", type=options.positive_int, default=8, help="rows of the server's batch")
    p.add_argument("--load", type=float, default=0.9, help="offered work as a share of the rows")
    p.add_argument("--loads", type=float, nargs="+", default=list(DEFAULT_LOADS), help="loads of the sweep")
    p.add_argument(
        "--requests", type=options.positive_int, default=4000, help="simulated requests per workload"
    )
    p.add_argument("--replicates", type=int, default=5, help="workloads (seeds) each figure is the mean of")
    p.add_argument("--aging", type=float, default=DEFAULT_AGING, help="predicted tokens per step waited")
    p.add_argument("--prefill-per-token", type=float, default=0.0, help="steps of prefill per prompt token")
    p.add_argument(
        "--live",
        type=options.non_negative_int,
        default=0,
        metavar="N",
        help="also serve N requests live in the engine",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="the workloads (requests, arrival times) and live sampling"
    )


def main(args) -> None:
    run_schedule(
        args.out,
        rollouts=args.rollouts,
        model=args.model,
        lenvm=args.lenvm,
        batch_size=args.batch_size,
        load=args.load,
        loads=args.loads,
        requests=args.requests,
        replicates=args.replicates,
        aging=args.aging,
        prefill_per_token=args.prefill_per_token,
        live=args.live,
        seed=args.seed,
        device=args.device,
        dtype=args.dtype,
        progress=args.progress,
    )
