import math

import pytest

from lenvm.bench import lifebench_score
from lenvm.bench.lifebench_score import length_deviation, length_score


def test_equal_to_overshoot():
    assert length_deviation(48, 32) == pytest.approx(0.5)
    assert length_score(48, 32, "equal_to") == pytest.approx(100 * math.exp(-1))
    assert length_score(48, 32, "equal_to") == pytest.approx(36.79, abs=0.01)


def test_equal_to_undershoot_is_punished_harder():
    assert length_deviation(16, 32) == pytest.approx(-0.5)
    assert length_score(16, 32, "equal_to") == pytest.approx(100 * math.exp(-2.5))
    assert length_score(32, 32, "equal_to") == 100.0


@pytest.mark.parametrize("length", [0, 10, 31, 32])
def test_at_most_within_limit_scores_100(length):
    assert length_score(length, 32, "at_most") == 100.0


def test_at_most_over_limit_decays():
    assert length_score(64, 32, "at_most") == pytest.approx(100 * math.exp(-2))


@pytest.mark.parametrize("length", [32, 33, 500])
def test_at_least_above_limit_scores_100(length):
    assert length_score(length, 32, "at_least") == 100.0


def test_at_least_short_decays():
    assert length_score(24, 32, "at_least") == pytest.approx(100 * math.exp(-1.25))


def test_bad_inputs():
    with pytest.raises(ValueError):
        length_score(10, 0, "equal_to")
    with pytest.raises(ValueError):
        length_score(10, 32, "about")


def _item(method, constraint, target, n, category="qa", lang="en"):
    return {
        "method": method,
        "constraint": constraint,
        "target": target,
        "num_tokens": n,
        "category": category,
        "lang": lang,
        "finish_reason": "stop",
    }


def test_summary_averages_within_target_then_over_targets():
    items = [
        _item("prompt", "equal_to", 32, 48),  # LD 0.5
        _item("prompt", "equal_to", 32, 32),  # LD 0
        _item("prompt", "equal_to", 64, 32, category="create", lang="zh"),  # LD -0.5
        _item("prompt", "at_most", 32, 16),
        _item("lenvm-ours", "at_least", 32, 16),
    ]
    summary = lifebench_score.summarize(items)
    eq = summary["prompt"]["equal_to"]
    # target 32: mean |LD| 0.25; target 64: 0.5 -> 0.375 (not the item mean 1/3)
    assert eq["deviation"] == pytest.approx(0.375)
    assert eq["signed_deviation"] == pytest.approx((0.25 - 0.5) / 2)
    score_32 = (100 * math.exp(-1) + 100) / 2
    assert eq["score"] == pytest.approx((score_32 + 100 * math.exp(-2.5)) / 2)
    assert eq["by_target"]["32"]["n"] == 2
    assert list(eq["by_target"]) == ["32", "64"]
    mixed = [_item("prompt", "equal_to", t, t) for t in (128, 16, 32)]
    assert list(lifebench_score.summarize(mixed)["prompt"]["equal_to"]["by_target"]) == ["16", "32", "128"]
    assert set(eq["by_category"]) == {"qa", "create"}
    assert set(eq["by_lang"]) == {"en", "zh"}
    assert summary["prompt"]["at_most"]["score"] == 100.0
    assert "equal_to" not in summary["lenvm-ours"]
    assert summary["lenvm-ours"]["at_least"]["score"] == pytest.approx(100 * math.exp(-2.5))


def test_table2_layout():
    items = [_item("prompt", c, 32, 48) for c in lifebench_score.CONSTRAINTS]
    table = lifebench_score.table2(lifebench_score.summarize(items), {"prompt": "prompt only"})
    header, rule, row = table.strip().splitlines()
    assert header == "| method | Equal To deviation | Equal To LS | At Most LS | At Least LS |"
    assert row == "| prompt only | 50% | 36.8 (36.8-36.8) | 36.8 (36.8-36.8) | 100.0 (100.0-100.0) |"
    by_target = lifebench_score.breakdown_table(lifebench_score.summarize(items), "by_target")
    assert "36.8 (50%)" in by_target


def test_breakdown_headers_from_data_keep_the_columns():
    """A data file's category is a header cell: a "|" in it must not shift the columns."""
    items = [_item("prompt", "equal_to", 32, 48, category=c) for c in ("qa", "q|a", "multi\nline")]
    lines = lifebench_score.breakdown_table(lifebench_score.summarize(items), "by_category").splitlines()
    assert len(lines) == 3
    assert lines[0] == r"| method | constraint | multi<br>line | qa | q\|a |"
    assert lines[2] == "| prompt | Equal To | 36.8 (50%) | 36.8 (50%) | 36.8 (50%) |"


def test_endings_count_chosen_eos_and_natural_ones():
    items = [
        {
            "method": "m",
            "constraint": "equal_to",
            "target": 10,
            "num_tokens": 10,
            "finish_reason": r,
            "eos_prob": p,
        }
        for r, p in [("stop", 0.5), ("stop", 0.001), ("cap", 0.2), ("length", None)]
    ]
    metrics = lifebench_score.summarize(items)["m"]["equal_to"]
    assert metrics["ended"] == 0.5  # a hard cap is not an ending the model or policy chose
    assert metrics["natural_end"] == 0.25  # of those, only p(EOS) 0.5 passes 0.05


def _ended(method, constraint, target, n, finish="stop", eos_prob=0.3, text="", row="r", logprob=-1.0):
    return {
        "mean_logprob": logprob,
        "method": method,
        "constraint": constraint,
        "target": target,
        "num_tokens": n,
        "finish_reason": finish,
        "eos_prob": eos_prob,
        "text": text,
        "row": row,
        "decoded_tokens": n + 1,
    }


def test_summary_says_how_answers_ended():
    items = [
        _ended("lenvm-ours", "at_most", 32, 32, eos_prob=0.01),  # stopped at the bound by the policy
        _ended("lenvm-ours", "at_most", 32, 32, eos_prob=0.2),  # natural, on the bound: not stopped
        _ended("lenvm-ours", "at_most", 32, 20, finish="cap", eos_prob=None),  # forced
        _ended("lenvm-ours", "at_most", 32, 12),
    ]
    m = lifebench_score.summarize(items)["lenvm-ours"]["at_most"]
    assert m["bound_stop"] == pytest.approx(0.5)
    assert m["natural_end"] == pytest.approx(0.5)
    assert m["cut"] == 0.0
    assert m["median_ratio"] == pytest.approx((20 / 32 + 1) / 2)
    assert m["decoding_cost"] == 1.0  # each answer decoded once, its EOS counted on both sides
    resampled = [*items[:3], {**items[3], "decoded_tokens": 113}]  # 100 more tokens than kept
    assert lifebench_score.summarize(resampled)["lenvm-ours"]["at_most"]["decoding_cost"] == 2.0
    table = lifebench_score.quality_table(lifebench_score.summarize(items))
    natural = lifebench_score.summarize(items)["lenvm-ours"]["at_most"]["natural_end_interval"]
    assert f"50% ({100 * natural[0]:.0f}-{100 * natural[1]:.0f}%)" in table and natural[0] > 0.01
    least = [
        _ended("p", "at_least", 10, 512, finish="length", eos_prob=None),
        _ended("p", "at_least", 10, 12),
    ]
    m = lifebench_score.summarize(least)["p"]["at_least"]
    assert m["cut"] == pytest.approx(0.5) and m["bound_stop"] == 0.0


def test_summary_compares_log_probabilities_where_unguided_sampling_ended():
    """Only items whose unguided answer ended with EOS are compared, each method's own answers
    to them against the unguided ones; an unguided answer cut at max_new_tokens is left out."""
    items = [
        _ended("prompt", "equal_to", 32, 20, row="a", logprob=-1.0),
        _ended("prompt", "equal_to", 32, 40, row="b", logprob=-2.0),
        _ended("prompt", "equal_to", 32, 512, finish="length", row="c", logprob=-0.2),  # a loop
        _ended("lenvm-ours", "equal_to", 32, 31, row="a", logprob=-1.2),
        _ended("lenvm-ours", "equal_to", 32, 33, row="b", logprob=-1.4),
        _ended("lenvm-ours", "equal_to", 32, 32, row="c", logprob=-3.0),
    ]
    summary = lifebench_score.summarize(items)
    m = summary["lenvm-ours"]["equal_to"]
    assert m["unguided_ended"] == 2
    assert m["logprob_where_unguided_ended"] == pytest.approx(-1.3)
    assert m["unguided_logprob_where_ended"] == pytest.approx(-1.5)
    assert m["mean_logprob"] == pytest.approx(-5.6 / 3)  # all items, the loop's included
    assert "unguided_ended" not in summary["prompt"]["equal_to"]
    assert "-1.30 against -1.50 (2 items)" in lifebench_score.quality_table(summary)
    cut = lifebench_score.summarize([items[2], items[5]])["lenvm-ours"]["equal_to"]
    assert cut["unguided_ended"] == 0 and cut["logprob_where_unguided_ended"] is None


def test_summary_counts_guided_changes_to_answers_that_fit_unguided():
    items = [
        _ended("prompt", "at_most", 32, 20, text="fits", row="a"),
        _ended("prompt", "at_most", 32, 40, text="too long", row="b"),
        _ended("prompt", "at_most", 64, 30, text="fits too", row="a"),
        _ended("prompt", "at_most", 16, 10, finish="length", text="cut", row="c"),
        _ended("lenvm-ours", "at_most", 32, 20, text="fits", row="a"),  # left alone
        _ended("lenvm-ours", "at_most", 32, 30, text="shorter", row="b"),  # needed changing
        _ended("lenvm-ours", "at_most", 64, 25, text="changed", row="a"),  # changed a fitting answer
        _ended("lenvm-ours", "at_most", 16, 10, text="other", row="c"),
    ]
    summary = lifebench_score.summarize(items)
    m = summary["lenvm-ours"]["at_most"]
    assert m["unguided_fit"] == 2 and m["changed_fit"] == pytest.approx(0.5)
    assert "changed_fit" not in summary["prompt"]["at_most"]
    assert "1 of 2" in lifebench_score.quality_table(summary)


def test_summary_sets_log_probabilities_beside_unguided_answers_of_the_same_length(monkeypatch):
    """Each guided answer is compared with the unguided answers of its language that ended
    naturally and are nearest in length, whatever their item: shorter answers score lower per
    token, so this separates length from fluency."""
    monkeypatch.setattr(lifebench_score, "LENGTH_NEIGHBOURS", 2)
    items = [
        _ended("prompt", "at_most", 32, 10, row="a", logprob=-2.0),
        _ended("prompt", "at_most", 32, 12, row="b", logprob=-1.8),
        _ended("prompt", "equal_to", 64, 100, row="a", logprob=-1.0),
        _ended("prompt", "equal_to", 64, 120, row="b", logprob=-0.8),
        _ended("prompt", "at_most", 64, 11, row="c", eos_prob=0.01, logprob=-9.0),  # not natural
        _ended("prompt", "at_most", 16, 512, finish="length", row="d", logprob=-0.1),  # a loop, cut
        _ended("lenvm-ours", "at_most", 32, 11, row="a", logprob=-1.9),
        _ended("lenvm-ours", "at_most", 64, 110, row="c", logprob=-0.7),
    ]
    m = lifebench_score.summarize(items)["lenvm-ours"]["at_most"]
    assert m["same_length_pool"] == 4
    assert m["logprob_same_length"] == pytest.approx((-1.9 + -0.9) / 2)
    assert "-1.40" in lifebench_score.quality_table(lifebench_score.summarize(items))
    zh = [{**i, "lang": "zh"} if i["method"] == "lenvm-ours" else {**i, "lang": "en"} for i in items]
    m = lifebench_score.summarize(zh)["lenvm-ours"]["at_most"]
    assert m["logprob_same_length"] is None and m["same_length_pool"] == 0
