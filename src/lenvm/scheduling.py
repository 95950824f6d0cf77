"""A discrete-event model of a continuous-batching server, for comparing admission orders.

Time is counted in decoding steps. The server runs at most ``batch_size`` requests at once; one
step generates one token for every running request and lasts one time unit, plus, when modelled,
the prefill of the requests that join at its start (``prefill_per_token`` steps per prompt
token). A request of ``L`` output tokens (EOS included) runs for ``L`` steps. Requests arrive at
given times (e.g. :func:`poisson_arrivals`) and wait in a queue; whenever rows are free at the
start of a step, the waiting requests with the lowest keys take them (ties: the earlier arrival).
An idle server starts its next step at the next arrival. Keys come from
:func:`lenvm.decoding.queue.priority` (shortest predicted first with ageing) or are the arrival
times themselves (first come, first served).

For each request: ``admitted`` (start of its first step), ``first_token`` (end of its first step),
``finished`` (end of its last step). Latency is ``finished - arrival``, time to first token
``first_token - arrival``.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

from lenvm.io import InputError, positive_count


@dataclass
class Timeline:
    """What :func:`simulate` did to each request (arrays in request order) and to the server."""

    arrival: np.ndarray
    admitted: np.ndarray
    first_token: np.ndarray
    finished: np.ndarray
    busy_row_steps: float  # sum over steps of (running rows x step duration)
    makespan: float  # from the first arrival to the last finish
    batch_size: int

    @property
    def latency(self) -> np.ndarray:
        return self.finished - self.arrival

    @property
    def ttft(self) -> np.ndarray:
        return self.first_token - self.arrival

    @property
    def utilization(self) -> float:
        """Share of the server's row-time that ran a request."""
        return self.busy_row_steps / (self.batch_size * self.makespan) if self.makespan > 0 else 0.0

    def stats(self) -> dict[str, float]:
        """Mean, p50 and p99 of latency and time to first token, and the utilization."""
        return {
            "mean_latency": float(self.latency.mean()),
            "p50_latency": float(np.percentile(self.latency, 50)),
            "p99_latency": float(np.percentile(self.latency, 99)),
            "mean_ttft": float(self.ttft.mean()),
            "p50_ttft": float(np.percentile(self.ttft, 50)),
            "p99_ttft": float(np.percentile(self.ttft, 99)),
            "utilization": self.utilization,
        }


def poisson_arrivals(n: int, rate: float, seed: int = 0) -> np.ndarray:
    """``n`` arrival times of a Poisson process of ``rate`` requests per step, from time 0."""
    n = positive_count(n, "the number of requests")
    if not rate > 0:
        raise InputError(f"the arrival rate must be positive, got {rate!r}")
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, size=n)
    return np.cumsum(gaps) - gaps[0]


def rate_for_load(load: float, mean_length: float, batch_size: int) -> float:
    """The arrival rate (requests per step) at which the offered work fills ``load`` of the
    server's rows: ``load · batch_size / mean_length`` (prefill not counted)."""
    return load * batch_size / mean_length


def simulate(
    arrival: ArrayLike,
    length: ArrayLike,
    key: ArrayLike,
    batch_size: int,
    prompt_tokens: ArrayLike | None = None,
    prefill_per_token: float = 0.0,
) -> Timeline:
    """Run the requests through the server; ``key[i]`` orders request ``i`` in the queue (lower
    first). ``arrival`` must be sorted; ``length`` holds output lengths (at least 1)."""
    arrivals = np.asarray(arrival, dtype=np.float64)
    lengths = np.asarray(length, dtype=np.int64)
    keys = np.asarray(key, dtype=np.float64)
    n = len(arrivals)
    if n == 0:
        raise InputError("no requests to schedule")
    if len(lengths) != n or len(keys) != n:
        raise InputError("arrival, length and key must have one entry per request")
    batch_size = positive_count(batch_size, "batch_size")
    if np.any(np.diff(arrivals) < 0) or not np.all(np.isfinite(arrivals)):
        raise InputError("arrival times must be finite and sorted")
    if np.any(lengths < 1):
        raise InputError("every request generates at least one token")
    if not np.all(np.isfinite(keys)):
        raise InputError("queue keys must be finite")
    prompts = np.zeros(n) if prompt_tokens is None else np.asarray(prompt_tokens, dtype=np.float64)
    if prefill_per_token < 0:
        raise InputError("prefill_per_token must be >= 0")

    admitted = np.full(n, np.nan)
    first_token = np.full(n, np.nan)
    finished = np.full(n, np.nan)
    waiting: list[tuple[float, float, int]] = []  # (key, arrival, index)
    running: dict[int, int] = {}  # index -> tokens still to generate
    now, nxt, busy = float(arrivals[0]), 0, 0.0
    while nxt < n or waiting or running:
        while nxt < n and arrivals[nxt] <= now:
            heapq.heappush(waiting, (keys[nxt], arrivals[nxt], nxt))
            nxt += 1
        if not waiting and not running:
            now = float(arrivals[nxt])  # idle until the next arrival
            continue
        joining = []
        while waiting and len(running) < batch_size:
            _, _, i = heapq.heappop(waiting)
            running[i] = int(lengths[i])
            admitted[i] = now
            joining.append(i)
        duration = 1.0 + prefill_per_token * float(prompts[joining].sum()) if joining else 1.0
        now += duration
        busy += duration * len(running)
        for i in joining:
            first_token[i] = now
        for i in list(running):
            running[i] -= 1
            if running[i] == 0:
                finished[i] = now
                del running[i]
    return Timeline(arrivals, admitted, first_token, finished, busy, now - float(arrivals[0]), batch_size)
