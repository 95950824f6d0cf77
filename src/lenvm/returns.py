"""The gamma-return math of a Length Value Model.

Every generated token earns a reward of ``-(1 - gamma)``; the discounted return from a state
with ``l`` tokens left is ``-(1 - gamma**l)``. These are pure functions that accept numpy arrays,
torch tensors or Python numbers and return the same kind; a list or tuple of numbers gives a
numpy array.
"""

from __future__ import annotations

import math
from typing import TypeVar

import numpy as np
import torch

from lenvm.io import InputError

Array = TypeVar("Array", np.ndarray, torch.Tensor, float)


def _check_gamma(gamma: float) -> None:
    if not (0.0 < float(gamma) < 1.0) or not math.isfinite(float(gamma)):
        raise InputError(f"gamma must lie in (0, 1), got {gamma!r}")


def _xp(x):
    return torch if isinstance(x, torch.Tensor) else np


def _as_array(x):
    return x if isinstance(x, torch.Tensor | np.ndarray) else np.asarray(x, dtype=np.float64)


def _like_input(result, original):
    if isinstance(original, torch.Tensor | np.ndarray | list | tuple):
        return result
    return float(result)


def length_to_value(remaining: Array, gamma: float) -> Array:
    """``-(1 - gamma**remaining)``: the discounted return with ``remaining`` tokens left."""
    _check_gamma(gamma)
    x = _as_array(remaining)
    # expm1 keeps precision for gamma close to 1, where 1 - gamma**l is tiny.
    result = _xp(x).expm1(x * math.log(gamma))
    return _like_input(result, remaining)


def value_to_length(value: Array, gamma: float) -> Array:
    """Inverse of :func:`length_to_value`: ``log(1 + value) / log(gamma)``.

    Values are clipped into ``(-1, 0]`` first, so a model output of exactly -1 maps to a large
    finite length instead of infinity. Applied to a predicted *mean* value this is the
    return-consistent length, which under-estimates the mean remaining length (Jensen).
    """
    _check_gamma(gamma)
    x = _as_array(value)
    xp = _xp(x)
    # Integers, and halves whose coarse eps would put -1 at a few hundred tokens, go up to float32.
    if isinstance(x, torch.Tensor) and (not x.is_floating_point() or x.element_size() < 4):
        x = x.float()
    elif isinstance(x, np.ndarray) and (x.dtype.kind != "f" or x.dtype.itemsize < 4):
        x = x.astype(np.float32)
    eps = torch.finfo(x.dtype).eps if isinstance(x, torch.Tensor) else np.finfo(x.dtype).eps
    floor = -1.0 + 2 * eps
    x = xp.clip(x, floor, 0.0)
    result = xp.log1p(x) / math.log(gamma) + 0.0  # + 0.0: no tokens left is 0, not -0
    return _like_input(result, value)


def gamma_for_horizon(length: float, coverage: float = 0.99) -> float:
    """The gamma for which a completion of ``length`` tokens has ``1 - gamma**length == coverage``."""
    if not (length > 0 and math.isfinite(length)):
        raise InputError(f"length must be a positive finite number, got {length!r}")
    if not 0.0 < coverage < 1.0:
        raise InputError(f"coverage must lie in (0, 1), got {coverage!r}")
    gamma = (1.0 - coverage) ** (1.0 / float(length))
    if not 0.0 < gamma < 1.0:  # a horizon so long (or short) that gamma rounds to 1 (or 0)
        raise InputError(f"no gamma in (0, 1) gives a horizon of {length!r} tokens: it rounds to {gamma}")
    return gamma


def gamma_from_lengths(lengths, quantile: float = 0.99, coverage: float = 0.99) -> float:
    """The p99 rule: pick gamma from the ``quantile`` of observed completion lengths."""
    arr = np.asarray(lengths, dtype=np.float64)
    if arr.size == 0:
        raise InputError("need at least one completion length to choose gamma")
    return gamma_for_horizon(max(float(np.quantile(arr, quantile)), 1.0), coverage)


def return_consistent_mean_length(lengths, gamma: float) -> float:
    """``ln(1 - mean_i(1 - gamma**L_i)) / ln(gamma)``: the length whose return is the mean return."""
    arr = np.asarray(lengths, dtype=np.float64)
    if arr.size == 0:
        raise InputError("need at least one length")
    return float(value_to_length(np.mean(length_to_value(arr, gamma)), gamma))


def mc_targets(num_generated: int, gamma: float) -> np.ndarray:
    """Monte-Carlo targets of a finished completion of ``num_generated`` tokens (EOS included).

    Returns ``G_t`` for states ``t = 0 .. L-1``: ``s_0`` ends at the last prompt token and
    ``s_{L-1}`` at the last non-EOS token.
    """
    if num_generated < 1:
        raise InputError("a finished completion has at least one token (its EOS)")
    remaining = np.arange(num_generated, 0, -1, dtype=np.float64)
    return length_to_value(remaining, gamma)


def bootstrap_targets(num_generated: int, gamma: float, value_at_cut: float) -> np.ndarray:
    """Targets of a completion cut after ``num_generated`` tokens without EOS.

    ``G_t = -(1 - gamma**(T-t)) + gamma**(T-t) * V(s_T)`` for ``t = 0 .. T-1``, where ``V(s_T)``
    is the model's value of the state at the cut.
    """
    if num_generated < 1:
        raise InputError("a truncated completion has at least one token")
    steps = np.arange(num_generated, 0, -1, dtype=np.float64)
    return length_to_value(steps, gamma) + gamma**steps * float(value_at_cut)


def td_lambda_targets(values, gamma: float, lam: float, finished: bool = True) -> np.ndarray:
    """TD(lambda) returns for states ``t = 0 .. T-1`` of one completion.

    ``values`` holds ``V(s_0) .. V(s_T)``: ``T + 1`` numbers. For a finished completion the last
    state follows EOS and its value is taken as 0 whatever is passed; for a cut one it bootstraps.
    ``lam = 1`` gives the Monte-Carlo (or bootstrapped) return, ``lam = 0`` one-step TD.
    """
    _check_gamma(gamma)
    if not 0.0 <= lam <= 1.0:
        raise InputError(f"lambda must lie in [0, 1], got {lam!r}")
    v = np.asarray(values, dtype=np.float64).copy()
    if v.ndim != 1 or v.size < 2:
        raise InputError("values must hold V(s_0) .. V(s_T) with T >= 1")
    if finished:
        v[-1] = 0.0
    reward = -(1.0 - gamma)
    out = np.empty(v.size - 1)
    next_return = v[-1]
    for t in range(v.size - 2, -1, -1):
        next_return = reward + gamma * ((1.0 - lam) * v[t + 1] + lam * next_return)
        out[t] = next_return
    return out


def td_residual(values: Array, gamma: float) -> Array:
    """``delta_t = -(1 - gamma) + gamma * V_t - V_{t-1}`` along the last axis.

    ``values`` holds ``V_0 .. V_T``; the result has ``T`` entries, one per generated token.
    Values are negative and closer to 0 means fewer tokens left, so a *negative* residual means
    the token pushed toward a longer continuation than expected ("wait", "but") and a positive
    one toward a shorter one ("therefore"). The paper, whose code uses the positive mirror
    ``1 - gamma**l``, reports the opposite sign.
    """
    _check_gamma(gamma)
    x = _as_array(values)
    return -(1.0 - gamma) + gamma * x[..., 1:] - x[..., :-1]


def lambda_returns(
    mc: torch.Tensor,
    discount: torch.Tensor,
    boot_values: torch.Tensor,
    values: torch.Tensor,
    supervised: torch.Tensor,
    gamma: float,
    lam: float,
) -> torch.Tensor:
    """TD(lambda) targets of a batch of completions laid out one per row (``[B, T]``).

    Row ``b`` supervises a contiguous run of positions (``supervised``); ``mc + discount *
    boot_values[:, None]`` is their lambda = 1 target (Monte-Carlo, plus the bootstrap at the
    cut for a cut completion; see :func:`lenvm.dataset.position_targets`) and ``values`` holds
    the current model's ``V`` at every position (no gradient is taken through it). The state
    after the last supervised one is terminal (value 0 after EOS) or the cut, whose value is
    ``boot_values``; there the lambda-return equals the lambda = 1 target, so the result is that
    target plus a correction ``D`` with

        D_t = gamma * (1 - lam) * (V_{t+1} - G1_{t+1}) + gamma * lam * D_{t+1}

    over supervised ``t + 1`` (``G1``: the lambda = 1 target), which is
    :func:`td_lambda_targets` rearranged. ``lam = 1`` returns the lambda = 1 target bit for bit,
    ``lam = 0`` one-step TD: ``-(1 - gamma) + gamma * V(s_{t+1})``. Unsupervised positions of
    the result are meaningless.
    """
    _check_gamma(gamma)
    if not 0.0 <= lam <= 1.0:
        raise InputError(f"lambda must lie in [0, 1], got {lam!r}")
    full = mc + discount * boot_values.unsqueeze(-1)
    if lam == 1.0:
        return full
    values = values.detach().to(full.dtype)
    # A[:, t] = gamma (1 - lam) (V_{t+1} - G1_{t+1}) where t + 1 is supervised, else 0.
    step = torch.zeros_like(full)
    step[:, :-1] = gamma * (1.0 - lam) * (values[:, 1:] - full[:, 1:]) * supervised[:, 1:]
    correction = torch.zeros_like(full)
    carry = torch.zeros_like(full[:, 0])
    for t in range(full.shape[1] - 1, -1, -1):
        # Reset at the end of each run: past it every A is 0, so the carry is 0 there already.
        carry = step[:, t] + gamma * lam * carry
        correction[:, t] = carry
    return full + correction
