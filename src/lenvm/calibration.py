"""Calibration: a monotone map from a LenVM's values to the returns its states go on to realize.

A head trained on some prompts fits them closely and can be biased on others. A LenVM trained
on the built-in prompts, on rollouts of prompts it never saw, said 8 tokens were left where about
13 were, and 32 where about 44 were (docs/benchmarks.md): a rule steering an answer toward its
target then plans the ending too late and overshoots. Calibrating fits, on rollouts of held-out
prompts, the non-decreasing function of the predicted value that best predicts the realized
return (isotonic regression, by pooling adjacent violators) and applies it to every value the
LenVM gives. Being monotone it never reorders states: the shortest and longest candidates stay
so; only the number of tokens a value stands for moves.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from numpy.typing import ArrayLike

from lenvm._lazy import LazyModule
from lenvm.io import InputError

if TYPE_CHECKING:
    from lenvm import model
else:  # lenvm.model imports this module (its Calibration): it is imported when the hints are read
    model = LazyModule("lenvm.model")

# What ``import *`` binds: not the modules imported above (the stand-in ``model`` among them).
__all__ = [
    "Calibration",
    "CalibrationFit",
    "KNOTS",
    "calibrate",
    "fit_calibration",
    "fit_on_rollouts",
    "isotonic",
    "length_map",
    "realized_returns",
]

KNOTS = 64  # interpolation points over the range of the values seen


@dataclass(frozen=True)
class Calibration:
    """A piecewise-linear, non-decreasing map from value to value, given by its knots: the
    ``returns`` at strictly increasing ``values``, both within ``[-1, 0]``. Outside the knots the
    end returns hold. Knots given as any sequence of numbers are kept as tuples of Python floats,
    so that calibrations compare, hash and print as their numbers."""

    values: tuple[float, ...]
    returns: tuple[float, ...]

    def __post_init__(self) -> None:
        for name in ("values", "returns"):
            try:
                knots = tuple(map(float, getattr(self, name)))
            except (TypeError, ValueError):
                raise InputError(f"calibration {name} must be a sequence of numbers") from None
            object.__setattr__(self, name, knots)
        v, r = np.asarray(self.values), np.asarray(self.returns)
        if len(v) < 2 or len(v) != len(r):
            raise InputError("a calibration needs at least two knots, as many values as returns")
        if not (np.all(np.diff(v) > 0) and np.all(np.diff(r) >= 0)):
            raise InputError("calibration knots must have increasing values and non-decreasing returns")
        if v.min() < -1 or v.max() > 0 or r.min() < -1 or r.max() > 0:
            raise InputError("calibration knots must lie in [-1, 0]")

    @functools.cached_property
    def _knots(self) -> tuple[torch.Tensor, torch.Tensor]:
        # Built once: the map runs at every decoding step.
        return torch.tensor(self.values, dtype=torch.float64), torch.tensor(self.returns, dtype=torch.float64)

    def __call__(self, values: torch.Tensor) -> torch.Tensor:
        """The calibrated values, same shape, dtype and device."""
        xs, ys = (t.to(values.device) for t in self._knots)
        v = values.detach().double().clamp(xs[0], xs[-1])
        right = torch.searchsorted(xs, v.contiguous()).clamp(1, len(xs) - 1)
        x0, x1, y0, y1 = xs[right - 1], xs[right], ys[right - 1], ys[right]
        out = y0 + (v - x0) / (x1 - x0) * (y1 - y0)
        return out.to(values.dtype)

    def to_dict(self) -> dict[str, list[float]]:
        return {"values": list(self.values), "returns": list(self.returns)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Calibration:
        """The map :meth:`to_dict` wrote (a LenVM's ``config.json`` keeps it)."""
        if not isinstance(data, dict) or not {"values", "returns"} <= data.keys():
            raise InputError('a calibration is an object with the knots\' "values" and "returns"')
        return cls(data["values"], data["returns"])


def isotonic(x: ArrayLike, y: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """The least-squares non-decreasing fit of ``y`` on ``x``: the distinct ``x`` in increasing
    order and the fitted value at each (pool adjacent violators; tied ``x`` share one value)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) == 0 or len(x) != len(y):
        raise ValueError("need as many x as y, at least one")
    xs, inverse = np.unique(x, return_inverse=True)
    weight = np.bincount(inverse).astype(float)
    mean = np.bincount(inverse, weights=y) / weight
    # Blocks of (mean, weight, count); merge a block into the one before while it is lower.
    means, weights, counts = [], [], []
    for m, w in zip(mean, weight, strict=True):
        means.append(m)
        weights.append(w)
        counts.append(1)
        while len(means) > 1 and means[-2] > means[-1]:
            w2 = weights[-2] + weights[-1]
            means[-2:] = [(means[-2] * weights[-2] + means[-1] * weights[-1]) / w2]
            weights[-2:] = [w2]
            counts[-2:] = [counts[-2] + counts[-1]]
    return xs, np.repeat(means, counts)


def fit_calibration(values: Iterable[float], returns: Iterable[float], knots: int = KNOTS) -> Calibration:
    """Fit a :class:`Calibration` to predicted ``values`` and the ``returns`` realized after them:
    the isotonic fit, read at ``knots`` evenly spaced values across the range seen, with the
    ends of the value range (-1 and 0) mapped to themselves where they lie outside it."""
    v, r = np.asarray(list(values), dtype=float), np.asarray(list(returns), dtype=float)
    if len(v) < 2 or len(v) != len(r):
        raise InputError("calibrating needs at least two states, each with its realized return")
    xs, fit = isotonic(v, np.clip(r, -1.0, 0.0))
    if len(xs) < 2:
        raise InputError("calibrating needs states of at least two different values")
    at = np.linspace(xs[0], xs[-1], knots)
    knot_values, knot_returns = list(at), list(np.interp(at, xs, fit))
    if knot_values[0] > -1.0:
        knot_values.insert(0, -1.0)
        knot_returns.insert(0, -1.0)
    if knot_values[-1] < 0.0:
        knot_values.append(0.0)
        knot_returns.append(0.0)
    return Calibration(tuple(knot_values), tuple(np.maximum.accumulate(knot_returns)))


@torch.no_grad()
def realized_returns(
    lenvm: model.LengthValueModel,
    records: Iterable[dict[str, Any]],
    batch_size: int = 8,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """The LenVM's own (uncalibrated) value of every state of the rollouts ``records`` and the
    return realized after it: Monte-Carlo for an answer that ended, bootstrapped from the value at
    the cut for one cut at ``max_new_tokens``, as in training."""
    from lenvm.dataset import forward_images, padded_batches
    from lenvm.returns import lambda_returns

    values, returns = [], []
    for chunk, batch in padded_batches(lenvm, records, "calibrate on", batch_size, progress, "calibrating"):
        images = forward_images(lenvm.tokenizer, chunk, lenvm.device)
        v = lenvm(batch.input_ids, batch.attention_mask, calibrated=False, **images).double()
        boot = v.gather(1, batch.boot_index[:, None]).squeeze(1)
        # Realized returns: training's lambda = 1 targets (Monte-Carlo, bootstrapped at a cut).
        target = lambda_returns(
            batch.mc.double(), batch.discount.double(), boot, v, batch.supervised, lenvm.gamma, 1.0
        )
        values.append(v[batch.supervised].cpu().numpy())
        returns.append(target[batch.supervised].cpu().numpy())
    return np.concatenate(values), np.concatenate(returns)


@dataclass(frozen=True)
class CalibrationFit:
    """A calibration with what it was fitted on: the ``states`` of its ``rollouts``, the range of
    remaining lengths the head gave them (``seen``: within it the map follows the answers, beyond
    it only its fixed ends), and the squared error of the values against the realized returns
    before and after the map, on those same states (in-sample: held-out rollouts tell more)."""

    calibration: Calibration
    states: int
    seen: tuple[float, float]
    mse_before: float
    mse_after: float
    rollouts: int


def fit_on_rollouts(
    lenvm: model.LengthValueModel,
    records: Iterable[dict[str, Any]] | str | os.PathLike,
    batch_size: int = 8,
    progress: bool = False,
) -> CalibrationFit:
    """Fit a calibration of ``lenvm`` on rollouts (records, or a rollouts file; see
    :func:`calibrate`) without setting it."""
    from lenvm.returns import value_to_length

    if isinstance(records, str | os.PathLike):
        from lenvm.rollouts import read_rollouts

        records = read_rollouts(records)
    records = list(records)
    if records and not any(r.get("finish_reason") == "stop" for r in records):
        warnings.warn(
            "no rollout ended with EOS: every realized return is bootstrapped from the LenVM's own "
            "values, so the map can only echo them (raise max_new_tokens for the rollouts)",
            stacklevel=2,
        )
    values, returns = realized_returns(lenvm, records, batch_size, progress)
    calibration = fit_calibration(values, returns)
    mapped = calibration(torch.from_numpy(values)).numpy()
    shortest, longest = sorted(
        float(n) for n in value_to_length(np.array([values.min(), values.max()]), lenvm.gamma)
    )
    return CalibrationFit(
        calibration,
        len(values),
        (shortest, longest),
        float(np.mean((values - returns) ** 2)),
        float(np.mean((mapped - returns) ** 2)),
        len(records),
    )


def calibrate(
    lenvm: model.LengthValueModel,
    records: Iterable[dict[str, Any]] | str | os.PathLike,
    batch_size: int = 8,
    progress: bool = False,
) -> Calibration:
    """Fit ``lenvm``'s calibration on rollouts of prompts it was not trained on, and set it (the
    map also goes into its config, so :meth:`save_pretrained` keeps it). Returns the map."""
    calibration = fit_on_rollouts(lenvm, records, batch_size, progress).calibration
    lenvm.config.calibration = calibration.to_dict()
    return calibration


def length_map(calibration: Calibration, gamma: float, lengths: Sequence[float]) -> list[tuple[float, float]]:
    """For each predicted remaining length, the length its calibrated value stands for."""
    from lenvm.returns import length_to_value, value_to_length

    values = torch.tensor(np.asarray(length_to_value(np.asarray(lengths, dtype=float), gamma)))
    out = value_to_length(calibration(values).numpy(), gamma)
    return [(float(a), float(b)) for a, b in zip(lengths, out, strict=True)]
