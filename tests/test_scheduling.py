import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lenvm.decoding.queue import check_queue, priority
from lenvm.io import InputError
from lenvm.scheduling import poisson_arrivals, rate_for_load, simulate

workloads = st.integers(1, 60).flatmap(
    lambda n: st.tuples(
        st.lists(st.floats(0, 50, allow_nan=False), min_size=n, max_size=n).map(sorted),
        st.lists(st.integers(1, 40), min_size=n, max_size=n),
        st.lists(st.floats(0, 100, allow_nan=False), min_size=n, max_size=n),
        st.integers(1, 6),
    )
)


def running_at(t, timeline):
    return int(np.sum((timeline.admitted <= t) & (timeline.finished > t)))


@settings(max_examples=60, deadline=None)
@given(workloads)
def test_every_request_runs_once_for_its_length_within_the_batch(workload):
    arrival, length, predicted, batch = workload
    timeline = simulate(arrival, length, predicted, batch)
    assert np.all(timeline.admitted >= timeline.arrival)
    np.testing.assert_allclose(timeline.finished - timeline.admitted, length)
    np.testing.assert_allclose(timeline.first_token, timeline.admitted + 1)
    for t in np.unique(timeline.admitted):
        assert running_at(t, timeline) <= batch
    # A request waits only while every row is busy.
    for i in np.flatnonzero(timeline.admitted > timeline.arrival):
        starts = np.unique(np.concatenate([timeline.admitted, timeline.finished]))
        for s in starts[(starts >= timeline.arrival[i]) & (starts < timeline.admitted[i])]:
            assert running_at(s, timeline) == batch
    assert timeline.busy_row_steps == pytest.approx(sum(length))


@settings(max_examples=60, deadline=None)
@given(workloads, st.floats(0.01, 2.0))
def test_ageing_lets_no_request_be_overtaken_by_much_later_arrivals(workload, aging):
    arrival, length, predicted, batch = workload
    keys = [priority(p, a, aging) for p, a in zip(predicted, arrival, strict=True)]
    timeline = simulate(arrival, length, keys, batch)
    for r in range(len(arrival)):
        later = timeline.arrival > timeline.arrival[r] + predicted[r] / aging
        assert np.all(timeline.admitted[r] <= timeline.admitted[later])


@settings(max_examples=40, deadline=None)
@given(workloads)
def test_fcfs_on_one_row_is_a_single_server_queue(workload):
    arrival, length, _, _ = workload
    timeline = simulate(arrival, length, arrival, batch_size=1)
    free = -np.inf
    for i, (a, n) in enumerate(zip(arrival, length, strict=True)):
        start = max(a, free)
        assert timeline.admitted[i] == pytest.approx(start)
        free = start + n
        assert timeline.finished[i] == pytest.approx(free)


def test_prefill_lengthens_the_steps_where_requests_join():
    timeline = simulate([0.0, 0.0], [3, 2], [0.0, 1.0], 2, prompt_tokens=[10, 30], prefill_per_token=0.1)
    # The first step carries the prefill of 40 prompt tokens: 1 + 4 steps long.
    assert timeline.first_token.tolist() == [5.0, 5.0]
    assert timeline.finished.tolist() == [7.0, 6.0]
    # Both rows are busy through the long first step (5 each), then 2 and 1 more steps.
    assert timeline.busy_row_steps == pytest.approx(5 * 2 + 2 + 1)


def test_shortest_first_beats_fcfs_when_the_queue_builds():
    rng = np.random.default_rng(0)
    length = np.maximum(1, rng.lognormal(4.0, 1.0, 3000).astype(int))
    for seed in range(3):
        arrival = poisson_arrivals(len(length), rate_for_load(0.95, length.mean(), 8), seed=seed)
        fcfs = simulate(arrival, length, arrival, 8)
        oracle = simulate(arrival, length, length, 8)  # shortest first, no ageing
        assert oracle.latency.mean() < 0.8 * fcfs.latency.mean()
        assert 0.85 < fcfs.utilization < 1.0


def test_poisson_arrivals_have_the_asked_rate():
    arrival = poisson_arrivals(20000, 0.5, seed=1)
    assert arrival[0] == 0.0 and np.all(np.diff(arrival) >= 0)
    assert len(arrival) / arrival[-1] == pytest.approx(0.5, rel=0.03)
    assert np.array_equal(arrival, poisson_arrivals(20000, 0.5, seed=1))


def test_bad_input_is_refused():
    with pytest.raises(InputError, match="no requests"):
        simulate([], [], [], 4)
    with pytest.raises(InputError, match="sorted"):
        simulate([1.0, 0.0], [1, 1], [0, 0], 4)
    with pytest.raises(InputError, match="at least one token"):
        simulate([0.0], [0], [0], 4)
    for bad in (0, 1.5, True):
        with pytest.raises(InputError, match="batch_size must be a positive integer"):
            simulate([0.0], [1], [0], bad)
    with pytest.raises(InputError, match="queue must be"):
        check_queue("lifo", 0.1)
    with pytest.raises(InputError, match="ageing"):
        check_queue("shortest", -1)
    with pytest.raises(InputError, match="predicted length"):
        priority(float("nan"), 0.0, 0.1)


def test_a_numpy_batch_size_is_kept_as_a_plain_int():
    timeline = simulate([0.0, 0.0], [2, 1], [0, 1], np.int64(1))
    assert type(timeline.batch_size) is int and timeline.makespan == 3.0
