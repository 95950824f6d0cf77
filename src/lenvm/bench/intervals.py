"""95% intervals for benchmark figures measured on a few dozen answers.

A share such as "ended naturally" on 36 answers moves by 3 points with a single answer, so a
figure is reported with the range the true rate plausibly lies in: Wilson's score interval for a
share (it stays inside [0, 1] and is not degenerate at 0 or n successes, unlike the normal
approximation), and a percentile bootstrap for a mean over groups such as LIFEBench's Length
Score (answers resampled within each target, so every target keeps its weight).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

LEVEL = 0.95
Z = 1.959963984540054  # the standard normal quantile of (1 + LEVEL) / 2
RESAMPLES = 2000


def wilson_interval(successes: int, n: int, z: float = Z) -> tuple[float, float]:
    """Wilson's score interval for a share of ``successes`` out of ``n``."""
    if n < 1 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n and n >= 1, got {successes} of {n}")
    p = successes / n
    shrink = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / shrink
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / shrink
    # Exact at the ends: rounding must not put 0 or 1 outside the interval it belongs to.
    lo = 0.0 if successes == 0 else max(0.0, centre - half)
    hi = 1.0 if successes == n else min(1.0, centre + half)
    return lo, hi


def bootstrap_interval(
    groups: Sequence[Sequence[float]], resamples: int = RESAMPLES, seed: int = 0, level: float = LEVEL
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean over ``groups`` of each group's mean: each
    resample draws every group's values again with replacement, keeping its size. Seeded, so the
    same values always give the same interval."""
    if not groups or any(len(g) == 0 for g in groups):
        raise ValueError("need at least one group, and no empty group")
    rng = np.random.default_rng(seed)
    means = np.zeros(resamples)
    for group in groups:
        values = np.asarray(group, dtype=float)
        means += values[rng.integers(0, len(values), (resamples, len(values)))].mean(axis=1)
    means /= len(groups)
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return float(lo), float(hi)
