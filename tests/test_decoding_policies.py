"""Control policies on constructed candidates: pure functions, no model."""

import math
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lenvm.decoding import policies
from lenvm.decoding.params import MAX_TEMPERATURE, SamplingParams
from lenvm.decoding.policies import Candidates
from lenvm.decoding.step import Rows, sampling_distribution
from lenvm.returns import length_to_value

GAMMA = 0.99
EOS = 2


def cands(probs, lengths, eos_slot=None):
    """One row of candidates with exact remaining lengths (EOS: length 0)."""
    probs = torch.tensor([probs], dtype=torch.float64)
    lengths = torch.tensor([lengths], dtype=torch.float64)
    eos = torch.zeros_like(probs, dtype=torch.bool)
    if eos_slot is not None:
        eos[0, eos_slot] = True
        lengths[0, eos_slot] = 0
    ids = torch.arange(10, 10 + probs.shape[1])[None].masked_fill(eos, EOS)
    return Candidates(ids, probs, length_to_value(lengths, GAMMA).float(), eos)


def t(x):
    return torch.tensor([x])


def expected_length(dist, lengths):
    return float((dist[0] * torch.tensor(lengths, dtype=torch.float64)).sum())


def test_tilt_larger_beta_shifts_mass_to_shorter_candidates():
    lengths = [5, 20, 50, 100]
    c = cands([0.25, 0.25, 0.25, 0.25], lengths)
    means = [expected_length(policies.tilt(c, t(beta)), lengths) for beta in (-5.0, 0.0, 1.0, 5.0, 20.0)]
    assert means == sorted(means, reverse=True)
    assert means[1] == pytest.approx(sum(lengths) / 4)  # beta 0 is the generator itself
    assert means[-1] < 10


def test_tilt_keeps_the_generator_probabilities_among_equal_values():
    dist = policies.tilt(cands([0.6, 0.3, 0.1], [20, 20, 90]), t(3.0))[0]
    assert float(dist[0] / dist[1]) == pytest.approx(2.0)


def test_equal_to_paper_picks_the_closest_value_one_hot():
    c = cands([0.7, 0.1, 0.1, 0.1], [3, 20, 60, 0], eos_slot=3)
    dist = policies.equal_to(c, t(10), t(30), GAMMA, rule="paper")  # 20 tokens to go
    assert dist[0].tolist() == [0.0, 1.0, 0.0, 0.0]
    at_target = policies.equal_to(c, t(30), t(30), GAMMA, rule="paper")
    assert at_target[0].tolist() == [0.0, 0.0, 0.0, 1.0]


def test_equal_to_ours_prefers_the_candidate_that_lands_on_the_target():
    c = cands([0.4, 0.2, 0.3, 0.1], [3, 20, 80, 0], eos_slot=3)
    dist = policies.equal_to(c, t(10), t(30), GAMMA)[0]
    assert int(dist.argmax()) == 1
    assert float(dist[3]) < 1e-6  # ending 20 tokens early is ruled out


def test_equal_to_ours_keeps_generator_probabilities_between_equally_good_candidates():
    dist = policies.equal_to(cands([0.5, 0.1, 0.4], [20, 20, 0], eos_slot=2), t(10), t(30), GAMMA)[0]
    assert float(dist[0] / dist[1]) == pytest.approx(5.0)


def test_equal_to_ours_wraps_up_at_the_target_with_the_generators_own_eos():
    c = cands([0.6, 0.399, 0.001], [1, 30, 0], eos_slot=2)
    # One step before, the token predicted to end right after it wins.
    assert int(policies.equal_to(c, t(29), t(30), GAMMA)[0].argmax()) == 0
    # At the target an unlikely EOS is not forced: the sentence is finished first ...
    at_target = policies.equal_to(c, t(30), t(30), GAMMA)[0]
    assert int(at_target.argmax()) == 0 and float(at_target[2]) < 0.01
    assert float(at_target[1]) < 1e-4  # ... and a long continuation is ruled out
    # A plausible EOS is taken at once or a token later.
    plausible = cands([0.6, 0.1, 0.3], [4, 30, 0], eos_slot=2)
    assert float(policies.equal_to(plausible, t(30), t(30), GAMMA)[0, 2]) > 0.4
    assert float(policies.equal_to(plausible, t(31), t(30), GAMMA)[0, 2]) > 0.75
    # The pressure to end grows with every token past the target.
    eos_share = [float(policies.equal_to(c, t(30 + over), t(30), GAMMA)[0, 2]) for over in (0, 3, 6, 9)]
    assert eos_share == sorted(eos_share) and eos_share[-1] > 50 * eos_share[0]


def test_equal_to_ours_past_the_target_prefers_a_token_after_which_the_generator_ends():
    # 'a' and '.' equally likely and predicted equally long; after '.' the generator's EOS is
    # likely (lookahead), so '.' wins once past the target, and a mid-sentence EOS loses to it.
    c = cands([0.45, 0.45, 0.1 * 1e-3], [20, 20, 0], eos_slot=2)
    c.next_eos = torch.tensor([[0.0, 0.5, 0.0]])
    # Far before the target, ending right after '.' would end 20 tokens early: half of '.' is lost.
    before = policies.equal_to(c, t(10), t(30), GAMMA)[0]
    assert float(before[1] / before[0]) == pytest.approx(0.5, rel=1e-3)
    for over in (1, 3, 5):
        dist = policies.equal_to(c, t(30 + over), t(30), GAMMA)[0]
        assert float(dist[1]) > 0.75
    without = cands([0.45, 0.45, 0.1 * 1e-3], [20, 20, 0], eos_slot=2)
    assert float(policies.equal_to(without, t(35), t(30), GAMMA)[0, 2]) > 0.5  # no lookahead: EOS


def test_at_most_ours_follows_the_generator_inside_the_bound():
    c = cands([0.5, 0.3, 0.2], [10, 12, 200])
    dist = policies.at_most(c, t(5), t(100), GAMMA)[0]
    assert float(dist[0] / dist[1]) == pytest.approx(5 / 3, rel=1e-3)
    assert float(dist[2]) < 0.1 * 0.2  # predicted to end far beyond the bound: pushed down


def test_at_most_ours_weighs_each_candidate_by_its_chance_of_ending_within_the_bound():
    """Far before the bound (no wrap-up yet) a candidate's weight is the generator's probability
    times P(total <= N) under the Laplace model around its predicted total, with the half-token
    continuity correction."""
    c = cands([0.5, 0.5, 0.0], [101, 111, 200])  # totals of 100 and 110 tokens from step 0
    dist = policies.at_most(c, t(0), t(100), GAMMA)[0]
    total = policies.predicted_total(c, t(0), GAMMA)
    x = ((100.5 - total) / policies.spread(total, t(0))).reshape(-1)
    cdf = torch.where(x >= 0, 1 - 0.5 * torch.exp(-x), 0.5 * torch.exp(x))
    assert float(dist[1] / dist[0]) == pytest.approx(float(cdf[1] / cdf[0]), rel=1e-3)


@given(st.integers(0, 200), st.integers(1, 300), st.integers(-5, 120))
def test_a_state_fits_as_at_most_judged_the_token_that_led_to_it(step, left, beyond):
    """``fits`` reads the state after a token as ``at_most``'s Laplace model read that token: the
    same output length (EOS excluded) and scale, so the two agree on where an answer fits (the
    bound ``beyond`` tokens past the predicted length, near where the two could disagree)."""
    target = max(step + left + beyond, 1)
    value = length_to_value(torch.tensor([float(left)], dtype=torch.float64), GAMMA).float()
    fits = bool(policies.fits(value, t(step + 1), t(target), GAMMA)[0])
    c = Candidates(
        t([7]), torch.ones(1, 1, dtype=torch.float64), value[None], torch.zeros(1, 1, dtype=torch.bool)
    )
    total = policies.predicted_total(c, t(step), GAMMA)
    inside = policies._log_laplace_cdf((target + 0.5 - total) / policies.spread(total, t(step)))
    assert fits == bool(inside[0, 0] >= math.log(policies.FIT_CONFIDENCE))


def test_at_most_ours_wraps_up_before_its_bound():
    # A plausible EOS and a long continuation, 20 tokens from a bound of 100: far enough that the
    # Laplace tail alone leaves the generator's odds (the continuation fits); from a quarter of
    # the bound before it the rule wraps up, and the pressure to end grows every step.
    c = cands([0.7, 0.2, 0.1], [15, 15, 0], eos_slot=2)
    early = policies.at_most(c, t(60), t(100), GAMMA)[0]
    assert float(early[2]) == pytest.approx(0.1, rel=0.05)
    start = int(policies.lookahead_from(t(100)))
    eos_share = [float(policies.at_most(c, t(start + d), t(100), GAMMA)[0, 2]) for d in (0, 2, 4, 6)]
    assert eos_share == sorted(eos_share) and eos_share[-1] > 0.9
    # Inside the wrap-up the continuation predicted to end sooner gains on the likelier one.
    c = cands([0.7, 0.3], [15, 3])
    wrapped = policies.at_most(c, t(start + 4), t(100), GAMMA)[0]
    assert float(wrapped[1]) > 0.9


def test_at_most_ours_takes_eos_once_nothing_else_fits():
    c = cands([0.9, 0.09, 0.01], [3, 5, 0], eos_slot=2)
    assert float(policies.at_most(c, t(50), t(50), GAMMA)[0, 2]) == pytest.approx(1.0)


def test_at_most_paper_picks_the_shortest():
    c = cands([0.9, 0.05, 0.05], [30, 4, 12])
    assert policies.at_most(c, t(0), t(100), GAMMA, rule="paper")[0].tolist() == [0.0, 1.0, 0.0]


def test_at_least_never_ends_early_unless_nothing_else_is_possible():
    c = cands([0.05, 0.05, 0.9], [40, 2, 0], eos_slot=2)
    for rule in ("ours", "paper"):
        assert float(policies.at_least(c, t(10), t(30), GAMMA, rule)[0, 2]) == 0.0
    only_eos = cands([0.0, 0.0, 1.0], [40, 2, 0], eos_slot=2)
    assert float(policies.at_least(only_eos, t(10), t(30), GAMMA)[0, 2]) == 1.0


def test_at_least_ours_pushes_up_candidates_that_fall_short_then_aims_at_ending_soon_after():
    c = cands([0.45, 0.45, 0.1], [40, 2, 0], eos_slot=2)
    before = policies.at_least(c, t(10), t(30), GAMMA)[0]
    assert float(before[0]) > 0.99
    # From the target on, ending within [30, 30 + 9] is what it aims at: EOS and the candidate
    # predicted to end 2 tokens later keep their generator odds; running on 40 more is pushed down.
    after = policies.at_least(c, t(30), t(30), GAMMA)[0]
    assert float(after[1] / after[2]) == pytest.approx(4.5, rel=0.05)
    assert float(after[0]) < 0.1 * float(after[1])
    # Past the window it wraps up: EOS wins.
    assert float(policies.at_least(c, t(45), t(30), GAMMA)[0, 2]) > 0.9
    # After two resampled ends the window reaches 30 + 27: at 45 the odds are the generator's again.
    widened = policies.at_least(c, t(45), t(30), GAMMA, retries=t(2))[0]
    assert float(widened[1] / widened[2]) == pytest.approx(4.5, rel=0.05)


def test_at_least_paper_picks_the_longest():
    c = cands([0.9, 0.05, 0.05], [30, 4, 120])
    assert policies.at_least(c, t(0), t(10), GAMMA, rule="paper")[0].tolist() == [0.0, 0.0, 1.0]


def test_choose_inverse_cdf_never_draws_zero_probability_and_greedy_takes_argmax():
    dist = torch.tensor([[0.0, 0.3, 0.0, 0.7]] * 1000)
    u = torch.linspace(0, 1 - 1e-9, 1000, dtype=torch.float64)
    drawn = policies.choose(dist, u)
    assert set(drawn.tolist()) == {1, 3}
    assert abs(float((drawn == 1).double().mean()) - 0.3) < 0.01
    greedy = policies.choose(dist[:2], u[:2], torch.tensor([True, False]))
    assert greedy.tolist() == [3, 1]


def test_truncate_applies_top_k_top_p_and_min_p_per_row():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.1]] * 4))
    probs = policies.truncate(
        logits,
        torch.ones(4),
        top_k=torch.tensor([2, 0, 0, 0]),
        top_p=torch.tensor([1.0, 0.7, 1.0, 1.0]),
        min_p=torch.tensor([0.0, 0.0, 0.4, 0.0]),
    )
    assert (probs > 0).sum(-1).tolist() == [2, 2, 2, 4]
    torch.testing.assert_close(probs[3], torch.tensor([0.5, 0.25, 0.15, 0.1]))
    torch.testing.assert_close(probs.sum(-1), torch.ones(4))
    hot = policies.truncate(logits[:1], torch.tensor([0.5]))
    assert float(hot[0, 0]) == pytest.approx(0.25 / (0.25 + 0.0625 + 0.0225 + 0.01))


@st.composite
def truncations(draw):
    """Two rows of logits (a masked token's -inf among them, never all) and any sampling settings
    SamplingParams takes for each."""
    size = draw(st.integers(1, 12))
    logit = st.floats(-1e4, 1e4, width=32) | st.just(-math.inf)
    row = st.lists(logit, min_size=size, max_size=size).filter(lambda x: max(x) > -math.inf)
    sampling = st.builds(
        SamplingParams,
        temperature=st.floats(0.0, MAX_TEMPERATURE) | st.sampled_from([1.0, MAX_TEMPERATURE]),
        top_k=st.integers(0, size) | st.sampled_from([size + 1, 10**18]),  # beyond the vocabulary too
        top_p=st.floats(0.0, 1.0, exclude_min=True) | st.sampled_from([1e-46, 1e-300, 1.0]),
        min_p=st.floats(0.0, 1.0) | st.sampled_from([1 - 1e-9, 1.0]),
        max_new_tokens=st.just(8),
    )
    return [draw(row) for _ in range(2)], [draw(sampling) for _ in range(2)]


@settings(max_examples=300, deadline=None)
@given(truncations())
def test_truncation_always_keeps_a_token_and_sums_to_one(case):
    """No settings SamplingParams takes may empty a row of the step's sampling distribution:
    top-p keeps the smallest set whose mass reaches p, never none (a p that float32 rounds to 0
    included), and the largest temperature stays finite (a masked token's -inf / inf is NaN)."""
    logits, samplings = case
    rows = Rows.build(samplings, [None, None], [0, 0], "cpu")
    probs = sampling_distribution(torch.tensor(logits), rows)
    assert not probs.isnan().any()
    assert ((probs > 0).sum(-1) >= 1).all()
    torch.testing.assert_close(probs.sum(-1), torch.ones(2), atol=1e-5, rtol=0)
    assert float(probs[torch.tensor(logits) == -math.inf].sum()) == 0.0


def test_top_candidates_adds_eos_when_a_target_needs_a_way_to_end():
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1 - 1e-3, 1e-3]] * 2))
    probs = policies.truncate(logits, torch.ones(2), top_p=torch.tensor([0.8, 0.8]))
    eos_ids = torch.tensor([4])
    ids, p = policies.top_candidates(logits, probs, 3, eos_ids, torch.tensor([True, False]), torch.ones(2))
    assert ids.tolist() == [[0, 1, 4], [0, 1, 2]]
    assert float(p[0, 2]) == pytest.approx(1e-3)  # its probability before top-p cut it


def simulate(policy, target, seed, start=15):
    """A small world with an exact LenVM: the generator plans to end in ``r`` tokens; token 'a'
    follows the plan, token 'b' starts one more sentence (10 tokens), EOS ends. Returns the
    output length under ``policy``."""
    rng = random.Random(seed)
    r, step = start, 0
    while step < 500:
        p = [0.05, 0.05, 0.9] if r <= 1 else [0.8, 0.15, 0.05]
        lengths = [max(r - 1, 1), r - 1 + 10, 0]
        c = cands(p, lengths, eos_slot=2)
        choice = int(policies.choose(policy(c, t(step), t(target)), torch.tensor([rng.random()])))
        if choice == 2:
            return step
        r = lengths[choice]
        step += 1
    return step


@pytest.mark.parametrize("target", [8, 15, 40])
def test_equal_to_ours_hits_targets_in_a_world_with_an_exact_lenvm(target):
    def ours(c, step, n):
        return policies.equal_to(c, step, n, GAMMA)

    def plain(c, step, n):
        return policies.follow(c)

    errors = [abs(simulate(ours, target, seed) - target) for seed in range(40)]
    plain_errors = [abs(simulate(plain, target, seed) - target) for seed in range(40)]
    # Within a few tokens: past the target the policy lets a sentence finish before it ends.
    assert sum(errors) / len(errors) <= 2.0
    assert max(errors) <= 3
    if target != 15:  # the generator's own length
        assert sum(plain_errors) / len(plain_errors) > 5


@pytest.mark.parametrize("rule", ["ours", "paper"])
def test_bounds_hold_in_a_world_with_an_exact_lenvm(rule):
    lengths_most = [
        simulate(lambda c, s, n: policies.at_most(c, s, n, GAMMA, rule), 10, seed) for seed in range(20)
    ]
    lengths_least = [
        simulate(lambda c, s, n: policies.at_least(c, s, n, GAMMA, rule), 40, seed) for seed in range(20)
    ]
    assert max(lengths_most) <= 10
    assert min(lengths_least) >= 40


# -- natural endings --------------------------------------------------------------------------

BAR = torch.tensor([0.05], dtype=torch.float64)
OURS = {"equal_to": policies.equal_to, "at_most": policies.at_most, "at_least": policies.at_least}


def with_eos_now(c, p):
    c.eos_now = torch.tensor([p], dtype=torch.float64)
    return c


def test_window_give_up_and_lookahead_points():
    n = torch.tensor([30, 8, 256])
    assert policies.window_end("equal_to", n).tolist() == [30, 8, 256]
    assert policies.window_end("at_least", n).tolist() == [39, 11, 333]
    assert policies.give_up("equal_to", n).tolist() == [33, 10, 277]  # 8%, at least 2 tokens
    assert policies.give_up("at_most", n).tolist() == [30, 8, 256]  # the bound itself
    assert policies.give_up("at_least", n).tolist() == [43, 13, 360]
    # at_least and equal_to end before max_new_tokens rather than being cut there
    assert policies.give_up("at_least", n, horizon=torch.tensor([40, 512, 300])).tolist() == [39, 13, 299]
    assert policies.give_up("equal_to", n, horizon=torch.tensor([31, 512, 300])).tolist() == [30, 10, 277]
    assert policies.lookahead_from(n).tolist() == [22, 4, 192]
    # each resampled end widens at_least's window by another AT_LEAST_AIM of the target
    retries = torch.tensor([1, 2, 4])
    assert policies.window_end("at_least", n, retries).tolist() == [48, 16, 640]
    assert policies.window_end("equal_to", n, retries).tolist() == [30, 8, 256]
    assert policies.give_up("at_least", n, retries=retries).tolist() == [52, 18, 692]


@pytest.mark.parametrize("kind", ["equal_to", "at_most", "at_least"])
def test_an_eos_the_generator_finds_unlikely_waits_for_the_give_up_point(kind):
    """Our rules choose EOS only where the generator itself gives it at least the row's bar; from
    the give-up step on, any EOS may end the answer."""
    target = t(30)
    limit = int(policies.give_up(kind, target))
    for step in (30, limit - 1, limit):
        if kind == "at_most" and step > 30:
            continue
        c = with_eos_now(cands([0.5, 0.3, 0.2], [3, 40, 0], eos_slot=2), 0.01)
        dist = OURS[kind](c, t(step), target, GAMMA, natural_eos=BAR)[0]
        assert (float(dist[2]) > 0) == (step >= limit), step
        natural = with_eos_now(cands([0.5, 0.3, 0.2], [3, 40, 0], eos_slot=2), 0.2)
        assert float(OURS[kind](natural, t(step), target, GAMMA, natural_eos=BAR)[0, 2]) > 0


def test_lookahead_counts_only_natural_endings_and_prefers_ending_on_time():
    # Three tokens before the target: '.' (after which the generator ends with q = 0.3) and 'a'
    # are equally likely and predicted equally long.
    c = cands([0.45, 0.45, 1e-3], [4, 4, 0], eos_slot=2)
    c.next_eos = torch.tensor([[0.0, 0.3, 0.0]])
    one_before = policies.equal_to(c, t(29), t(30), GAMMA, natural_eos=BAR)[0]
    assert float(one_before[1]) > 0.85  # ending right after '.' lands on 30
    c.next_eos = torch.tensor([[0.0, 0.03, 0.0]])  # under the bar: that ending would not count
    ignored = policies.equal_to(c, t(29), t(30), GAMMA, natural_eos=BAR)[0]
    assert float(ignored[1]) == pytest.approx(float(ignored[0]), rel=1e-6)
    # at_most: near the bound the candidate after which the answer can end is preferred
    c.next_eos = torch.tensor([[0.0, 0.3, 0.0]])
    assert float(policies.at_most(c, t(28), t(30), GAMMA, natural_eos=BAR)[0, 1]) > 0.6


def test_fits_is_confident_only_well_inside_the_bound():
    values = length_to_value(torch.tensor([10.0, 10.0, 25.0, 40.0], dtype=torch.float64), GAMMA)
    step, target = torch.tensor([0, 15, 0, 0]), torch.tensor([30, 30, 30, 30])
    assert policies.fits(values, step, target, GAMMA).tolist() == [True, True, False, False]


@given(
    lo=st.floats(-30, 30, allow_nan=False),
    width=st.floats(1e-3, 40, allow_nan=False),
)
def test_log_laplace_interval_is_the_cdf_difference(lo, width):
    lo_t, hi_t = torch.tensor([lo], dtype=torch.float64), torch.tensor([lo + width], dtype=torch.float64)

    def cdf(z):
        return 0.5 * math.exp(z) if z < 0 else 1 - 0.5 * math.exp(-z)

    got = float(policies.log_laplace_interval(lo_t, hi_t))
    expected = cdf(lo + width) - cdf(lo)
    assert got <= 1e-12
    if expected > 1e-9:  # where the plain difference is itself accurate
        assert math.exp(got) == pytest.approx(expected, rel=1e-6)
    assert math.isfinite(got)


@settings(max_examples=200, deadline=None)
@given(
    kind=st.sampled_from(["equal_to", "at_most", "at_least"]),
    probs=st.lists(st.one_of(st.just(0.0), st.floats(1e-6, 1)), min_size=2, max_size=6),
    lengths=st.lists(st.floats(1, 300), min_size=6, max_size=6),
    eos_slot=st.integers(0, 5),
    eos_now=st.floats(0, 1),
    next_eos=st.lists(st.floats(0, 1), min_size=6, max_size=6),
    step=st.integers(0, 80),
    target=st.integers(1, 60),
)
def test_our_rules_give_a_distribution_and_no_unnatural_eos_before_giving_up(
    kind, probs, lengths, eos_slot, eos_now, next_eos, step, target
):
    k = len(probs)
    if sum(probs) == 0:
        probs[0] = 1.0
    eos_slot %= k
    c = cands(probs, lengths[:k], eos_slot=eos_slot)
    c.eos_now = torch.tensor([eos_now], dtype=torch.float64)
    c.next_eos = torch.tensor([next_eos[:k]])
    dist = OURS[kind](c, t(step), t(target), GAMMA, natural_eos=BAR, horizon=t(100))[0]
    assert torch.isfinite(dist).all() and (dist >= 0).all()
    assert float(dist.sum()) == pytest.approx(1.0)
    assert float(dist[torch.tensor(probs, dtype=torch.float64) == 0].sum()) == 0.0
    others = [j for j in range(k) if j != eos_slot and probs[j] > 0]
    can_go_on = others and (kind != "at_most" or step < target)
    limit = int(policies.give_up(kind, t(target), t(100)))
    if can_go_on and eos_now < 0.05 and step < limit:
        assert float(dist[eos_slot]) == 0.0
    if kind == "at_least" and can_go_on and step < target:
        assert float(dist[eos_slot]) == 0.0


def simulate_natural(policy, target, seed, start=15):
    """A world with an exact LenVM and a generator that ends only where it planned to: it plans
    to end in ``r`` tokens; 'a' follows the plan, 'b' starts one more sentence (10 tokens), 'c'
    concludes (the end comes right after it). The generator gives EOS 0.9 once its plan is
    done and 0.01 anywhere else (an ending that is not natural). Returns (length, natural)."""
    rng = random.Random(seed)
    r, step = start, 0
    while step < 500:
        done = r <= 1
        p = [0.05, 0.03, 0.02, 0.9] if done else [0.75, 0.15, 0.09, 0.01]
        lengths = [max(r - 1, 1), r - 1 + 10, 1, 0]
        c = cands(p, lengths, eos_slot=3)
        c.eos_now = torch.tensor([p[3]], dtype=torch.float64)
        c.next_eos = torch.tensor([[0.9 if r - 1 <= 1 else 0.01, 0.01, 0.9, 0.0]])
        choice = int(policies.choose(policy(c, t(step), t(target)), torch.tensor([rng.random()])))
        if choice == 3:
            return step, p[3] >= 0.05
        r = lengths[choice]
        step += 1
    return step, False


@pytest.mark.parametrize("target", [8, 40])
def test_targets_end_naturally_in_a_world_with_an_exact_lenvm(target):
    def run(kind):
        return [
            simulate_natural(lambda c, s, n: OURS[kind](c, s, n, GAMMA, natural_eos=BAR), target, seed)
            for seed in range(30)
        ]

    equal, most, least = run("equal_to"), run("at_most"), run("at_least")
    end = int(policies.window_end("at_least", t(target)))
    assert all(natural for _, natural in equal + most + least)
    assert sum(abs(n - target) for n, _ in equal) / 30 <= 1.0
    assert all(n <= target for n, _ in most)
    assert all(target <= n <= end for n, _ in least)
