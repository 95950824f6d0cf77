import math

import numpy as np
import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from lenvm import returns as R

gammas = st.floats(min_value=0.5, max_value=0.9999)
lengths = st.integers(min_value=0, max_value=5000)


@given(gammas, lengths)
def test_value_bounded_and_round_trips(gamma, n):
    v = R.length_to_value(n, gamma)
    assert -1.0 <= v <= 0.0  # -1 is reached only when gamma**n underflows
    if gamma**n > 1e-9:
        assert v > -1.0
        assert R.value_to_length(v, gamma) == pytest.approx(n, abs=1e-6 * max(1, n) + 1e-6)


@given(gammas, st.integers(min_value=0, max_value=2000))
def test_value_strictly_decreasing_in_remaining_length(gamma, n):
    assume(gamma**n > 1e-12)  # beyond that, float64 cannot tell -1 + gamma**n from -1
    assert R.length_to_value(n + 1, gamma) < R.length_to_value(n, gamma)


@given(gammas, st.integers(min_value=1, max_value=500))
def test_bellman_recursion(gamma, n):
    lhs = R.length_to_value(n, gamma)
    rhs = -(1 - gamma) + gamma * R.length_to_value(n - 1, gamma)
    assert lhs == pytest.approx(rhs, abs=1e-12)


@pytest.mark.parametrize(
    "value",
    [
        np.array([0, -1]),
        np.array([0.0, -1.0]),
        np.array([0.0, -1.0], dtype=np.float16),
        torch.tensor([0, -1]),
        torch.tensor([0.0, -1.0]),
        torch.tensor([0.0, -1.0], dtype=torch.bfloat16),
        torch.tensor([0.0, -1.0], dtype=torch.float16),
    ],
)
def test_a_value_of_minus_one_is_a_long_finite_length_in_any_dtype(value):
    """The head's floor reads as a long answer, not infinity, and not a short one in half
    precision (whose eps alone would put -1 a few hundred tokens out at gamma 0.99)."""
    lengths = np.asarray(R.value_to_length(value, 0.99), dtype=np.float64)
    assert lengths[0] == 0 and np.isfinite(lengths[1]) and lengths[1] > 1000


def test_numpy_and_torch_agree():
    n = np.arange(0, 50)
    a = R.length_to_value(n, 0.97)
    b = R.length_to_value(torch.arange(0, 50, dtype=torch.float64), 0.97)
    assert isinstance(b, torch.Tensor)
    np.testing.assert_allclose(a, b.numpy(), rtol=1e-12)
    np.testing.assert_allclose(R.value_to_length(a, 0.97), n, atol=1e-6)


@pytest.mark.parametrize("gamma", [0.0, 1.0, -0.5, 1.5, float("nan")])
def test_gamma_outside_unit_interval_rejected(gamma):
    from lenvm.io import InputError

    with pytest.raises(InputError):  # what the library's bad-input errors derive from
        R.length_to_value(3, gamma)
    with pytest.raises(InputError):
        R.value_to_length(-0.5, gamma)
    with pytest.raises(InputError):
        R.gamma_for_horizon(0)


@given(gammas, st.lists(st.integers(min_value=0, max_value=2000), min_size=1, max_size=8), st.booleans())
def test_a_list_or_tuple_gives_an_array(gamma, ns, as_tuple):
    given_ns = tuple(ns) if as_tuple else ns
    values = R.length_to_value(given_ns, gamma)
    assert isinstance(values, np.ndarray)
    np.testing.assert_array_equal(values, R.length_to_value(np.array(ns, dtype=np.float64), gamma))
    lengths = R.value_to_length(tuple(values) if as_tuple else list(values), gamma)
    np.testing.assert_array_equal(lengths, R.value_to_length(values, gamma))


@given(gammas)
def test_no_tokens_left_is_zero_not_minus_zero(gamma):
    for zero in (R.value_to_length(0.0, gamma), *R.value_to_length(np.zeros(1), gamma)):
        assert zero == 0.0 and math.copysign(1.0, zero) == 1.0


@pytest.mark.parametrize("length", [float("inf"), float("nan"), 1e300, 1e-300, 0, -3])
def test_a_horizon_without_a_gamma_in_the_unit_interval_is_refused(length):
    from lenvm.io import InputError

    with pytest.raises(InputError, match="length must be a positive finite number|no gamma in \\(0, 1\\)"):
        R.gamma_for_horizon(length)


def test_gamma_p99_rule():
    g = R.gamma_for_horizon(1500)
    assert 1 - g**1500 == pytest.approx(0.99)
    assert g == pytest.approx(0.997, abs=5e-4)  # the paper's Qwen2.5 gamma
    lens = list(range(1, 101))
    assert R.gamma_from_lengths(lens) == pytest.approx(R.gamma_for_horizon(np.quantile(lens, 0.99)))
    with pytest.raises(ValueError):
        R.gamma_from_lengths([])


@given(gammas, st.integers(min_value=1, max_value=300))
def test_mc_targets(gamma, L):
    g = R.mc_targets(L, gamma)
    assert len(g) == L
    assert g[-1] == pytest.approx(-(1 - gamma))
    assert g[0] == pytest.approx(-(1 - gamma**L))
    assert np.all(np.diff(g) >= 0)  # fewer tokens left -> closer to zero
    if gamma**L > 1e-12:
        assert np.all(np.diff(g) > 0)


@given(gammas, st.integers(min_value=1, max_value=300), st.floats(min_value=-0.999, max_value=0.0))
def test_bootstrap_targets_satisfy_bellman(gamma, T, v_cut):
    g = R.bootstrap_targets(T, gamma, v_cut)
    nxt = np.append(g[1:], v_cut)
    np.testing.assert_allclose(g, -(1 - gamma) + gamma * nxt, atol=1e-12)


def test_bootstrap_with_true_value_equals_mc():
    # A completion of 30 tokens cut after 10: bootstrapping from the true value at the cut
    # reproduces the Monte-Carlo targets of the first 10 states.
    gamma = 0.95
    full = R.mc_targets(30, gamma)
    cut = R.bootstrap_targets(10, gamma, full[10])
    np.testing.assert_allclose(cut, full[:10], atol=1e-12)


@given(gammas, st.lists(st.floats(min_value=-0.99, max_value=0.0), min_size=2, max_size=60))
def test_td_lambda_one_equals_mc_and_zero_is_one_step(gamma, values):
    T = len(values) - 1
    np.testing.assert_allclose(R.td_lambda_targets(values, gamma, 1.0), R.mc_targets(T, gamma), atol=1e-9)
    np.testing.assert_allclose(
        R.td_lambda_targets(values, gamma, 1.0, finished=False),
        R.bootstrap_targets(T, gamma, values[-1]),
        atol=1e-9,
    )
    v = np.array(values)
    v[-1] = 0.0
    np.testing.assert_allclose(
        R.td_lambda_targets(values, gamma, 0.0), -(1 - gamma) + gamma * v[1:], atol=1e-12
    )


@given(gammas, st.integers(min_value=1, max_value=200))
def test_td_residual_zero_on_exact_values(gamma, L):
    values = np.append(R.mc_targets(L, gamma), 0.0)
    np.testing.assert_allclose(R.td_residual(values, gamma), 0.0, atol=1e-12)


def test_td_residual_sign_for_a_token_that_lengthens():
    gamma = 0.9
    # Expected 5 tokens left; after the token, 10 are left instead of 4: it pushed longer.
    values = np.array([R.length_to_value(5, gamma), R.length_to_value(10, gamma)])
    assert R.td_residual(values, gamma)[0] < 0


def test_return_consistent_mean_length():
    assert R.return_consistent_mean_length([10, 10, 10], 0.97) == pytest.approx(10)
    m = R.return_consistent_mean_length([1, 100], 0.97)
    assert 1 < m < 50.5  # below the arithmetic mean (Jensen)
    assert not math.isnan(m)
