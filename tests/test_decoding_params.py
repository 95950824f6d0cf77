"""Request settings: SamplingParams checks and the flat length_* keys every backend accepts."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lenvm.decoding import Control, SamplingParams
from lenvm.decoding.params import (
    DEFAULT_MAX_NEW_TOKENS,
    LENGTH_KEYS,
    LengthKeyError,
    control_from_keys,
)
from lenvm.io import InputError


@pytest.mark.parametrize(
    "bad",
    [
        dict(temperature=-1),
        dict(temperature=float("nan")),
        dict(temperature=1e39),  # infinite in float32, where decoding divides logits by it
        dict(temperature=1e7),  # beyond MAX_TEMPERATURE
        dict(top_p=0),
        dict(top_k=-2),
        dict(top_k=2.5),
        dict(max_new_tokens=0),
        dict(max_new_tokens=2**63),  # beyond any context; overflowed a tensor in the processor
        dict(min_p=1.5),
        dict(temperature=10**400),  # too large for a float: refused, not an OverflowError
        dict(top_p=10**400),
        dict(seed=-(2**63) - 1),
        dict(seed=2**63),  # 2**63 and 2**64 + 1 drew as 0 and 1 did
        dict(seed=True),
        dict(ignore_eos="yes"),
    ],
)
def test_bad_sampling_params_name_the_problem(bad):
    with pytest.raises(InputError, match=next(iter(bad))):
        SamplingParams(**bad)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (dict(temperature="1.0"), r"temperature must be a number in \[0, 1e\+06\]"),
        (dict(top_p="0.9"), r"top_p must be a number in \(0, 1\]"),
        (dict(min_p="0.1"), r"min_p must be a number in \[0, 1\]"),
    ],
)
def test_a_setting_given_as_a_string_is_asked_for_as_a_number(bad, message):
    """A JSON or YAML config's "1.0" is not a temperature below 0, which is all the error said."""
    with pytest.raises(InputError, match=message):
        SamplingParams(**bad)


def test_policy_leaves_out_what_is_not_the_policy():
    params = SamplingParams(temperature=0.7, seed=3, ignore_eos=True, max_new_tokens=64)
    assert params.policy() == dict(temperature=0.7, top_p=1.0, top_k=0, min_p=0.0, max_new_tokens=64, seed=3)


def test_max_new_tokens_left_out_is_fitted_to_the_context():
    assert SamplingParams().max_new_tokens is None
    assert SamplingParams().fitted(5000).max_new_tokens == DEFAULT_MAX_NEW_TOKENS == 1024
    assert SamplingParams().fitted(300).max_new_tokens == 300
    assert SamplingParams().fitted(0).max_new_tokens == 1  # the context check names the prompt
    assert SamplingParams(max_new_tokens=2000).fitted(300).max_new_tokens == 2000  # given: as given


def test_sampling_from_a_lenvms_policy_takes_its_truncation_and_nothing_else(tiny_path, tiny_generator):
    from lenvm.model import LengthValueModel

    trained = SamplingParams(temperature=0.7, top_k=20, max_new_tokens=256, seed=0).policy()
    params = SamplingParams.from_policy(trained, max_new_tokens=64, top_k=5)
    assert (params.temperature, params.top_k, params.max_new_tokens, params.seed) == (0.7, 5, 64, None)
    assert SamplingParams.from_policy(None) == SamplingParams()
    lenvm = LengthValueModel.from_base(tiny_path, gamma=0.9, generator=tiny_generator)
    lenvm.config.sampling = trained
    assert lenvm.sampling_params(seed=3) == SamplingParams(temperature=0.7, top_k=20, seed=3)


def test_length_keys_make_the_control_they_name():
    assert control_from_keys({"length_equal_to": 64}) == Control("equal_to", target=64)
    assert control_from_keys({"length_at_most": 5, "length_rule": "paper"}) == Control(
        "at_most", target=5, rule="paper"
    )
    assert control_from_keys({"length_tilt": 2}) == Control("tilt", beta=2.0)
    with pytest.raises(LengthKeyError, match="length_tilt must be a finite number"):
        control_from_keys({"length_tilt": 10**400})  # too large for a float: no OverflowError
    assert control_from_keys({"length_equal_to": 8, "length_retries": 0, "length_best_of": 2}) == Control(
        "equal_to", target=8, retries=0, best_of=2
    )
    assert control_from_keys({"length_equal_to": 8, "length_hard_cap_slack": 2}) == Control(
        "equal_to", target=8, hard_cap_slack=2
    )
    # The rule joins first, whatever the keys' order: at_most takes a cap under the paper's rule.
    assert control_from_keys({"length_hard_cap_slack": 0, "length_rule": "paper", "length_at_most": 5}) == (
        Control("at_most", target=5, rule="paper", hard_cap_slack=0)
    )
    assert control_from_keys({"other": 1, "length_at_least": None}) is None  # other keys are not ours


@pytest.mark.parametrize(
    ("keys", "message", "key"),
    [
        ({"length_equal_to": 5, "length_at_most": 9}, "one length control", "length_at_most"),
        ({"length_equal_to": -3}, "at least 1", "length_equal_to"),
        ({"length_equal_to": 2.5}, "integer", "length_equal_to"),
        ({"length_equal_to": "64"}, "integer", "length_equal_to"),
        ({"length_tilt": "fast"}, "finite number", "length_tilt"),
        ({"length_tilt": float("inf")}, "finite number", "length_tilt"),
        ({"length_equal_too": 5}, "unknown length control key", "length_equal_too"),
        ({"length_rule": "paper"}, "needs a length control", "length_rule"),
        ({"length_tilt": 1.0, "length_retries": 2}, "target controls", "length_retries"),
        ({"length_equal_to": 5, "length_rule": "magic"}, "rule", "length_rule"),
        ({"length_equal_to": 5, "length_retries": "2"}, "integer", "length_retries"),
        ({"length_equal_to": 5, "length_retries": 99}, "retries", "length_retries"),
        ({"length_at_most": 5, "length_best_of": 2}, "equal_to", "length_best_of"),
        ({"length_at_most": 5, "length_hard_cap_slack": 1}, "rule 'paper'", "length_hard_cap_slack"),
        ({"length_equal_to": 5, "length_hard_cap_slack": -1}, "non-negative", "length_hard_cap_slack"),
        ({"length_equal_to": 5, "length_hard_cap_slack": True}, "integer", "length_hard_cap_slack"),
        # past 2**63 target + slack overflowed the engines' cap tensor and failed the whole batch
        (
            {"length_equal_to": 5, "length_hard_cap_slack": 2**63},
            "at most 2147483647",
            "length_hard_cap_slack",
        ),
        (
            {"length_equal_to": 5, "length_hard_cap_slack": 2**31},
            "at most 2147483647",
            "length_hard_cap_slack",
        ),
        ({"length_hard_cap_slack": 2}, "needs a length control", "length_hard_cap_slack"),
        ({"length_equal_to": 5, "length_rule": "paper", "length_best_of": 0}, "best_of", "length_best_of"),
    ],
)
def test_bad_length_keys_are_refused_by_name(keys, message, key):
    with pytest.raises(LengthKeyError, match=message) as caught:
        control_from_keys(keys)
    assert caught.value.key == key


def test_a_backend_can_refuse_what_it_cannot_do():
    allowed = tuple(k for k in LENGTH_KEYS if k not in ("length_retries", "length_best_of"))
    with pytest.raises(InputError, match="not supported"):
        control_from_keys({"length_equal_to": 5, "length_best_of": 2}, allowed)


@given(
    st.dictionaries(
        st.text(max_size=20), st.one_of(st.integers(), st.floats(), st.text(max_size=5), st.none())
    )
)
def test_any_flat_keys_give_a_control_or_a_clear_error(keys):
    try:
        control = control_from_keys(keys)
    except InputError:
        return
    assert control is None or isinstance(control, Control)


@given(
    st.one_of(
        st.builds(
            Control,
            kind=st.sampled_from(["equal_to", "at_most", "at_least"]),
            target=st.integers(1, 10_000),
            rule=st.sampled_from(["ours", "paper"]),
        ),
        st.builds(Control, kind=st.just("tilt"), beta=st.floats(-50, 50)),
        st.builds(Control, kind=st.just("equal_to"), target=st.integers(1, 99), retries=st.integers(0, 5)),
        st.builds(
            Control,
            kind=st.just("at_most"),
            target=st.integers(1, 99),
            rule=st.just("paper"),
            hard_cap_slack=st.integers(0, 9),
        ),
    )
)
def test_keys_of_a_control_give_it_back(control):
    from lenvm.decoding.params import keys_of

    assert control_from_keys(keys_of(control)) == control


def test_numpy_numbers_are_taken_as_python_ones():
    import dataclasses
    import json

    import numpy as np

    sampling = SamplingParams(seed=np.int64(3), temperature=np.float32(0.5), max_new_tokens=np.int32(9))
    assert type(sampling.seed) is int and type(sampling.max_new_tokens) is int
    json.dumps(dataclasses.asdict(sampling))  # as rollout records hold it
    assert Control("equal_to", target=np.int64(5)).target == 5
    with pytest.raises(InputError):
        Control("equal_to", target=np.bool_(True))  # a bool is not a count, NumPy's neither


def test_a_policy_recorded_by_other_tools_reads_their_off_as_ours():
    """vLLM turns top-k off with -1 where ours takes 0, and a tool may record a setting it left
    alone as null: rollouts of theirs sampled with both filters off."""
    recorded = {"temperature": 0.7, "top_p": 1.0, "top_k": -1, "min_p": None, "max_new_tokens": 48}
    assert SamplingParams.from_policy(recorded) == SamplingParams(temperature=0.7)
    assert SamplingParams.from_policy(recorded, top_k=5).top_k == 5
    with pytest.raises(InputError, match="top_k must be an integer >= 0"):
        SamplingParams.from_policy({"top_k": -2})  # off nowhere


LONG = "模" + "x" * 50_000  # a client's value may be as long as its request


@pytest.mark.parametrize(
    "make",
    [
        lambda: control_from_keys({"length_equal_to": LONG}),
        lambda: control_from_keys({"length_tilt": LONG}),
        lambda: control_from_keys({"length_equal_to": 5, "length_retries": LONG}),
        lambda: control_from_keys({"length_equal_to": 5, "length_rule": LONG}),
        lambda: control_from_keys({"length_" + LONG: 5}),
        lambda: control_from_keys({"length_equal_to": [LONG]}),
        lambda: Control("equal_to", target=LONG),
        lambda: Control(LONG),
        lambda: SamplingParams(temperature=LONG, seed=LONG),
    ],
)
def test_a_long_value_is_quoted_short(make):
    with pytest.raises(InputError) as refused:
        make()
    message = str(refused.value)
    assert len(message) < 500 and "模xxx" in message and "x…" in message, message[:300]
