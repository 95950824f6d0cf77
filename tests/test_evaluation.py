import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lenvm.dataset import Example
from lenvm.evaluation import length_metrics, prompt_length_truth, ranks, spearman, truth_reliability
from lenvm.returns import length_to_value, return_consistent_mean_length

GAMMA = 0.98


def test_prompt_truth_counts_cut_samples_at_their_cut():
    assert prompt_length_truth([10, 20], [True, True], GAMMA) == pytest.approx(
        return_consistent_mean_length([10, 20], GAMMA)
    )
    with_cut = prompt_length_truth([10, 20, 256], [True, True, False], GAMMA)
    assert with_cut == pytest.approx(return_consistent_mean_length([10, 20, 256], GAMMA))
    assert with_cut > prompt_length_truth([10, 20], [True, True], GAMMA)  # dropping it biases short
    assert prompt_length_truth([10, 256, 256], [True, False, False], GAMMA) is None
    assert prompt_length_truth([], [], GAMMA) is None


def _example(pid, length, finished):
    return Example(pid, list(range(3 + length)), 2, length, finished)


def test_length_metrics_skips_prompts_whose_samples_were_mostly_cut():
    examples = [
        _example("a", 5, True),
        _example("a", 7, True),
        _example("b", 30, False),
        _example("b", 30, False),
        _example("b", 9, True),
    ]
    # Exact values for finished completions: predicted remaining length equals the truth.
    values = [length_to_value(np.arange(e.length, 0, -1, dtype=float), GAMMA) for e in examples]
    m = length_metrics(examples, values, GAMMA, baseline_length=10.0)
    assert m["eval_prompts"] == 1 and m["eval_prompts_cut"] == 1
    assert m["token_mae"] == pytest.approx(0.0, abs=1e-9)
    assert m["eval_finished"] == 3


@settings(max_examples=80, deadline=None)
@given(st.lists(st.integers(-5, 5), min_size=2, max_size=30), st.integers(0, 10**6))
def test_spearman_is_rank_based_and_bounded(xs, seed):
    rng = np.random.default_rng(seed)
    ys = rng.normal(size=len(xs))
    rho = spearman(xs, ys)
    if len(set(xs)) == 1:
        assert np.isnan(rho)
        return
    assert -1 - 1e-12 <= rho <= 1 + 1e-12
    # Any increasing transform of either side leaves it unchanged; reversing one side flips it.
    assert spearman(np.exp(np.asarray(xs, float)), ys**3) == pytest.approx(rho)
    assert spearman(xs, -ys) == pytest.approx(-rho)
    assert spearman(xs, xs) == pytest.approx(1.0)


def test_ranks_share_ties():
    np.testing.assert_allclose(ranks([10, 20, 20, 5]), [2, 3.5, 3.5, 1])
    assert spearman([1, 2, 3, 4], [10, 20, 30, 45]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    with pytest.raises(ValueError):
        spearman([1, 2], [1])


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(1, 400), min_size=2, max_size=12, unique=True), st.integers(2, 8))
def test_a_truth_without_sampling_noise_is_perfectly_reliable(lengths, samples):
    # Every sample of a prompt has the same length: any two halves rank the prompts alike.
    assert truth_reliability([[n] * samples for n in lengths], GAMMA, splits=5) == pytest.approx(1.0)


def test_truth_reliability_of_noisy_samples_lies_between():
    rng = np.random.default_rng(0)
    means = np.linspace(50, 250, 40)
    noisy = [list(np.maximum(1, rng.normal(m, 60, size=8)).round().astype(int)) for m in means]
    pure_noise = [list(rng.integers(10, 250, size=8)) for _ in means]
    r_noisy, r_none = truth_reliability(noisy, GAMMA), truth_reliability(pure_noise, GAMMA)
    assert 0.5 < r_noisy < 0.98
    assert abs(r_none) < 0.3
    assert np.isnan(truth_reliability([[5, 6]], GAMMA)) and np.isnan(truth_reliability([[5], [6]], GAMMA))


def test_length_metrics_without_finished_completions_still_counts_the_prompts():
    examples = [_example("a", 30, False), _example("b", 30, False), _example("b", 30, False)]
    values = [np.zeros(e.length) for e in examples]
    m = length_metrics(examples, values, GAMMA, baseline_length=10.0)
    assert m == {"eval_prompts": 0, "eval_prompts_cut": 2, "eval_finished": 0}


def test_the_baseline_is_scored_on_finished_completions_and_prompts_with_a_truth():
    # Prompt a: two answers that ended and one cut (a minority: counted at its cut in the truth);
    # prompt b: cut only, so neither its states nor its prompt have a known truth.
    examples = [
        _example("a", 4, True),
        _example("a", 4, True),
        _example("a", 10, False),
        _example("b", 12, False),
    ]
    exact = [length_to_value(np.arange(e.length, 0, -1, dtype=float), GAMMA) for e in examples]
    values = [v if e.finished else np.zeros(e.length) for e, v in zip(examples, exact, strict=True)]
    m = length_metrics(examples, values, GAMMA, baseline_length=6.0)
    # Per token, finished answers only: the baseline's remaining [6, 5, 4, 3] against [4, 3, 2, 1].
    assert m["baseline_token_mae"] == pytest.approx(2.0)
    assert m["token_mae"] == pytest.approx(0.0, abs=1e-9) and m["value_mse"] == pytest.approx(0.0, abs=1e-12)
    assert m["eval_finished"] == 2 and (m["eval_prompts"], m["eval_prompts_cut"]) == (1, 1)
    truth = return_consistent_mean_length([4, 4, 10], GAMMA)
    assert m["baseline_prompt_mre"] == pytest.approx(abs(6.0 - truth) / truth)
