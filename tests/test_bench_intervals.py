import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lenvm.bench import lifebench_score
from lenvm.bench.intervals import bootstrap_interval, wilson_interval


@given(st.integers(1, 500).flatmap(lambda n: st.tuples(st.integers(0, n), st.just(n))))
def test_wilson_interval_holds_the_share_inside_zero_one(case):
    k, n = case
    lo, hi = wilson_interval(k, n)
    assert 0.0 <= lo <= k / n <= hi <= 1.0
    assert lo < hi  # never degenerate, not even at 0 or n successes


@given(st.integers(1, 200).flatmap(lambda n: st.tuples(st.integers(0, n), st.just(n))))
def test_wilson_interval_is_symmetric_in_successes_and_failures(case):
    k, n = case
    lo, hi = wilson_interval(k, n)
    lo2, hi2 = wilson_interval(n - k, n)
    assert lo == pytest.approx(1 - hi2, abs=1e-12) and hi == pytest.approx(1 - lo2, abs=1e-12)


@given(st.integers(1, 50).flatmap(lambda n: st.tuples(st.integers(0, n), st.just(n))))
def test_wilson_interval_narrows_with_more_answers_at_the_same_share(case):
    k, n = case
    lo, hi = wilson_interval(k, n)
    lo4, hi4 = wilson_interval(4 * k, 4 * n)
    assert hi4 - lo4 < hi - lo


def test_wilson_interval_known_value():
    # 34 of 36 (94%): the interval reaches well below and above the share.
    lo, hi = wilson_interval(34, 36)
    assert lo == pytest.approx(0.8186, abs=1e-3) and hi == pytest.approx(0.9846, abs=1e-3)


def test_wilson_interval_rejects_impossible_counts():
    for k, n in [(-1, 5), (6, 5), (0, 0)]:
        with pytest.raises(ValueError):
            wilson_interval(k, n)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.lists(st.floats(0, 100), min_size=1, max_size=12), min_size=1, max_size=4))
def test_bootstrap_interval_lies_between_the_extreme_group_means(groups):
    lo, hi = bootstrap_interval(groups, resamples=200)
    # Every resampled group mean lies within that group's range.
    assert np.mean([min(g) for g in groups]) - 1e-9 <= lo <= hi <= np.mean([max(g) for g in groups]) + 1e-9
    assert bootstrap_interval(groups, resamples=200) == (lo, hi)  # seeded: the same every time


def test_bootstrap_interval_of_constant_values_is_that_value():
    assert bootstrap_interval([[70.0, 70.0], [90.0]]) == pytest.approx((80.0, 80.0))


def test_bootstrap_interval_narrows_with_more_answers_and_covers_the_mean():
    rng = np.random.default_rng(1)
    few = [rng.normal(80, 10, 9).tolist() for _ in range(4)]
    lo, hi = bootstrap_interval(few)
    assert lo < np.mean([np.mean(g) for g in few]) < hi
    lo4, hi4 = bootstrap_interval([g * 4 for g in few])
    assert hi4 - lo4 < (hi - lo) * 0.7  # about half as wide with four times the answers


def test_bootstrap_interval_rejects_empty_groups():
    for groups in ([], [[1.0], []]):
        with pytest.raises(ValueError):
            bootstrap_interval(groups)


def test_summary_and_tables_carry_the_intervals():
    items = [
        {
            "method": "m",
            "constraint": "equal_to",
            "target": t,
            "num_tokens": n,
            "finish_reason": "stop",
            "eos_prob": p,
        }
        for t, n, p in [(32, 32, 0.5), (32, 36, 0.5), (64, 64, 0.01), (64, 60, 0.3)]
    ]
    m = lifebench_score.summarize(items)["m"]["equal_to"]
    assert m["natural_end_interval"] == pytest.approx(wilson_interval(3, 4))
    lo, hi = m["score_interval"]
    assert lo < m["score"] < hi <= 100.0
    assert m["by_target"]["32"]["natural_end_interval"] == pytest.approx(wilson_interval(2, 2))
    summary = {"m": {"equal_to": m}}
    assert f"({lo:.1f}-{hi:.1f})" in lifebench_score.table2(summary)
    low, high = wilson_interval(3, 4)
    assert f"75% ({100 * low:.0f}-{100 * high:.0f}%)" in lifebench_score.quality_table(summary)
