"""The loss and target math shared by both trainers (pure functions)."""

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from lenvm import losses as L
from lenvm import returns as R

gammas = st.floats(min_value=0.8, max_value=0.999)
values = st.floats(min_value=-0.999, max_value=-1e-4)


def _pairs(n_min=1, n_max=40):
    return st.lists(st.tuples(values, values), min_size=n_min, max_size=n_max)


@settings(deadline=None)  # the first call pays for torch's warm-up on a busy machine
@given(_pairs(), st.floats(min_value=0.01, max_value=2.0))
def test_huber_is_half_squared_error_inside_delta_and_below_it_outside(pairs, delta):
    v, g = (torch.tensor(x, dtype=torch.float64) for x in zip(*pairs, strict=True))
    huber = L.pointwise_loss(v, g, "huber", delta)
    half_sq = 0.5 * L.pointwise_loss(v, g, "mse")
    inside = (v - g).abs() <= delta
    torch.testing.assert_close(huber[inside], half_sq[inside])
    assert torch.all(huber[~inside] < half_sq[~inside])
    if delta >= 1.0:  # values lie in (-1, 0): the recipes' delta = 1 is half the MSE everywhere
        torch.testing.assert_close(huber, half_sq)


@settings(deadline=None)  # the first call pays for torch's warm-up on a busy machine
@given(_pairs())
def test_bce_is_a_divergence_zero_at_the_target(pairs):
    v, g = (torch.tensor(x, dtype=torch.float64) for x in zip(*pairs, strict=True))
    kl = L.pointwise_loss(v, g, "bce")
    assert torch.all(kl >= -1e-12)
    torch.testing.assert_close(L.pointwise_loss(g, g, "bce"), torch.zeros_like(g), atol=1e-12, rtol=0)
    # Its gradient in the logit z (V = -sigmoid(z)) is q - p: the usual cross-entropy gradient.
    z = torch.logit(-v).requires_grad_()
    L.pointwise_loss(-torch.sigmoid(z), g, "bce").sum().backward()
    torch.testing.assert_close(z.grad, (-v) - (-g), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_bce_stays_finite_where_the_head_saturates(dtype):
    """A head whose sigmoid rounds to 1 or 0 (V = -1 or 0) still gets a finite loss."""
    values = torch.tensor([-1.0, 0.0, -0.5], dtype=dtype)
    loss = L.pointwise_loss(values, torch.tensor([-0.5, -0.5, -0.5], dtype=dtype), "bce")
    assert torch.isfinite(loss).all() and loss[2] == 0


@settings(deadline=None)  # the first call pays for torch's warm-up on a busy machine
@given(gammas, st.lists(st.integers(1, 500), min_size=1, max_size=20), st.floats(0.5, 2.0))
def test_relative_error_reads_lengths(gamma, lengths, factor):
    true = torch.tensor(lengths, dtype=torch.float64)
    predicted = true * factor
    assume(gamma ** float(predicted.max()) > 1e-6)  # lengths a gamma resolves (p99 rule: 0.01)
    err = L.relative_length_error(R.length_to_value(predicted, gamma), R.length_to_value(true, gamma), gamma)
    torch.testing.assert_close(err, torch.full_like(true, abs(factor - 1)), atol=1e-6, rtol=1e-5)


def test_state_losses_adds_the_weighted_relative_term():
    v, g = torch.tensor([-0.3, -0.9]), torch.tensor([-0.5, -0.5])
    base = L.pointwise_loss(v, g, "mse")
    rel = L.relative_length_error(v, g, 0.95)
    torch.testing.assert_close(L.state_losses(v, g, 0.95, "mse", relative_weight=0.2), base + 0.2 * rel)


completions = st.lists(st.lists(st.floats(0.0, 1.0), min_size=1, max_size=12), min_size=1, max_size=10)


def _aggregate(per_completion, aggregation, parts=1):
    """The aggregated loss computed as the trainers do, with the batch split into ``parts``."""
    count = L.aggregation_count(sum(len(c) for c in per_completion), len(per_completion), aggregation)
    total = 0.0
    for p in range(parts):
        chunk = per_completion[p::parts]
        if not chunk:
            continue
        loss = torch.tensor([x for c in chunk for x in c], dtype=torch.float64)
        states = torch.tensor([len(c) for c in chunk for _ in c])
        total += float((loss * L.state_weights(states, aggregation).double()).sum()) / count
    return total


@settings(deadline=None)  # the first call pays for torch's warm-up on a busy machine
@given(completions, st.integers(1, 4))
def test_aggregations_and_any_split_of_the_batch(per_completion, parts):
    flat = [x for c in per_completion for x in c]
    expected = {
        "token-mean": np.mean(flat),
        "seq-mean-token-mean": np.mean([np.mean(c) for c in per_completion]),
        "seq-mean-token-sum": np.mean([np.sum(c) for c in per_completion]),
    }
    for aggregation, value in expected.items():
        assert _aggregate(per_completion, aggregation, parts) == pytest.approx(value, rel=1e-6, abs=1e-9)


@settings(deadline=None)  # the first call pays for torch's warm-up on a busy machine
@given(completions)
def test_sampled_positions_estimate_the_whole_set(per_completion):
    # Averaged over every batch of one state, the head path's estimate equals the set's loss.
    states = sum(len(c) for c in per_completion)
    for aggregation in L.AGGREGATIONS:
        count = L.sampled_states_count(1, states, len(per_completion), aggregation)
        estimates = [
            x * float(L.state_weights(torch.tensor([len(c)]), aggregation)[0]) / count
            for c in per_completion
            for x in c
        ]
        assert np.mean(estimates) == pytest.approx(
            _aggregate(per_completion, aggregation), rel=1e-9, abs=1e-12
        )
    assert L.sampled_states_count(64, states, len(per_completion), "token-mean") == 64


@settings(deadline=None)
@given(completions, st.floats(0.1, 50.0))
def test_prompt_weight_counts_each_completions_first_state_that_many_times(per_completion, weight):
    states = torch.tensor([len(c) for c in per_completion for _ in c])
    first = torch.tensor([j == 0 for c in per_completion for j in range(len(c))])
    loss = torch.tensor([x for c in per_completion for x in c], dtype=torch.float64)
    for aggregation in L.AGGREGATIONS:
        base = L.state_weights(states, aggregation).double()
        weighted = L.state_weights(states, aggregation, first, weight).double()
        extra = (weight - 1) * float((loss * base)[first].sum())
        assert float((loss * weighted).sum()) == pytest.approx(float((loss * base).sum()) + extra, rel=1e-6)
        torch.testing.assert_close(weighted[~first], base[~first])


def test_unknown_loss_and_aggregation():
    with pytest.raises(ValueError, match="loss"):
        L.pointwise_loss(torch.zeros(1), torch.zeros(1), "l1")
    with pytest.raises(ValueError, match="aggregation"):
        L.state_weights(torch.ones(1), "seq-mean-token-mean-max")


# -- TD(lambda) targets over a padded batch ------------------------------------------------


@st.composite
def completion_batches(draw):
    """Rows of [prompt | supervised states | cut state | padding] with random values."""
    gamma = draw(gammas)
    rows = draw(
        st.lists(st.tuples(st.integers(0, 3), st.integers(1, 15), st.booleans()), min_size=1, max_size=5)
    )
    width = max(p + n + 1 for p, n, _ in rows) + 2
    vals = draw(st.lists(values, min_size=len(rows) * width, max_size=len(rows) * width))
    return gamma, rows, width, torch.tensor(vals, dtype=torch.float64).reshape(len(rows), width)


def _layout(gamma, rows, width):
    mc, discount = (
        torch.zeros(len(rows), width, dtype=torch.float64),
        torch.zeros(len(rows), width, dtype=torch.float64),
    )
    supervised = torch.zeros(len(rows), width, dtype=torch.bool)
    for b, (p, n, finished) in enumerate(rows):
        steps = torch.arange(n, 0, -1, dtype=torch.float64)
        mc[b, p : p + n] = R.length_to_value(steps, gamma)
        discount[b, p : p + n] = 0.0 if finished else gamma**steps
        supervised[b, p : p + n] = True
    return mc, discount, supervised


@settings(deadline=None)  # the first call pays for torch's warm-up on a busy machine
@given(completion_batches(), st.floats(0.0, 1.0))
def test_lambda_returns_match_the_per_completion_recursion(batch, lam):
    gamma, rows, width, v = batch
    mc, discount, supervised = _layout(gamma, rows, width)
    boot = torch.tensor(
        [0.0 if f else float(v[b, p + n]) for b, (p, n, f) in enumerate(rows)], dtype=torch.float64
    )
    out = R.lambda_returns(mc, discount, boot, v, supervised, gamma, lam)
    for b, (p, n, finished) in enumerate(rows):
        reference = R.td_lambda_targets(v[b, p : p + n + 1].numpy(), gamma, lam, finished=finished)
        np.testing.assert_allclose(out[b, p : p + n].numpy(), reference, atol=1e-9)


@settings(deadline=None)  # the first call pays for torch's warm-up on a busy machine
@given(completion_batches())
def test_lambda_one_is_the_monte_carlo_target_bit_for_bit_and_zero_is_one_step(batch):
    gamma, rows, width, v = batch
    mc, discount, supervised = _layout(gamma, rows, width)
    boot = v[:, -1].clone()
    assert torch.equal(
        R.lambda_returns(mc, discount, boot, v, supervised, gamma, 1.0), mc + discount * boot[:, None]
    )
    one_step = R.lambda_returns(mc, discount, boot, v, supervised, gamma, 0.0)
    for b, (p, n, finished) in enumerate(rows):
        after = torch.cat(
            [v[b, p + 1 : p + n], torch.tensor([0.0 if finished else float(boot[b])], dtype=torch.float64)]
        )
        torch.testing.assert_close(one_step[b, p : p + n], -(1 - gamma) + gamma * after)
