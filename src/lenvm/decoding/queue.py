"""The order in which waiting requests are admitted to the batch.

``fcfs``: first come, first served. ``shortest``: the request with the shortest predicted answer
first, with ageing so that none waits forever. A request that arrived at time ``a`` with a
predicted length of ``p`` tokens has, at time ``t``, the priority ``p - aging · (t - a)`` (lower
goes first; time counts decoding steps, so ``aging`` is in predicted tokens per step waited).
Since every waiting request ages at the same rate, the order at any time is the order of the
fixed key ``p + aging · a`` (:func:`priority`): a heap, no re-sorting.

No starvation: a request ``r`` goes before every request that arrives more than ``p_r / aging``
steps after it (such a request's key exceeds ``r``'s whatever its own prediction, as predictions
are never negative), so only finitely many requests can ever overtake it.

The engine (:class:`lenvm.decoding.Scheduler`) and the scheduling benchmark
(:mod:`lenvm.bench.schedule`) share this rule.
"""

from __future__ import annotations

import math
from typing import Literal

from lenvm.io import InputError, is_real

QueueOrder = Literal["fcfs", "shortest"]
QUEUE_ORDERS = ("fcfs", "shortest")
# Predicted tokens of priority per step waited: a request predicted 10x longer than another
# waits at most (difference)/aging steps more. Chosen with `lenvm bench schedule` on training
# rollouts (docs/benchmarks.md): within a few percent of the best mean latency while the p99
# stays near FCFS's.
DEFAULT_AGING = 0.05


def check_queue(order: str, aging: float) -> None:
    """Raise :class:`InputError` for an unknown order or a negative or non-finite ageing rate."""
    if order not in QUEUE_ORDERS:
        raise InputError(f"queue must be one of {QUEUE_ORDERS}, got {order!r}")
    if not is_real(aging) or aging < 0:
        raise InputError(f"queue ageing must be a finite number >= 0, got {aging!r}")


def priority(predicted: float, arrival: float, aging: float) -> float:
    """The admission key of a request (lower first): its priority ``predicted - aging·(t - arrival)``
    at any time ``t``, shifted by the ``aging·t`` every waiting request shares."""
    if not (math.isfinite(predicted) and predicted >= 0):
        raise InputError(f"a predicted length must be finite and >= 0, got {predicted!r}")
    return predicted + aging * arrival
