import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import lenvm_folder_with_rollouts, synthetic_records
from hypothesis import given, settings
from hypothesis import strategies as st

from lenvm.calibration import Calibration, calibrate, fit_calibration, isotonic, length_map
from lenvm.cli import main
from lenvm.io import InputError
from lenvm.model import LengthValueModel, read_config
from lenvm.returns import length_to_value

floats = st.floats(-1, 0, allow_nan=False)
pairs = st.lists(st.tuples(floats, floats), min_size=1, max_size=40)


@given(pairs)
def test_isotonic_fit_is_non_decreasing_and_keeps_the_mean(data):
    x, y = zip(*data, strict=True)
    xs, fit = isotonic(x, y)
    assert np.all(np.diff(xs) > 0) and np.all(np.diff(fit) >= -1e-12)
    # Pooling replaces values by weighted block means: the total is unchanged.
    weight = np.array([sum(1 for v in x if v == u) for u in xs])
    assert float((fit * weight).sum()) == pytest.approx(sum(y), abs=1e-9)
    assert isotonic(xs, fit)[1] == pytest.approx(fit)  # a monotone fit is its own fit


@settings(max_examples=50)
@given(pairs, st.lists(floats, min_size=1, max_size=40))
def test_isotonic_fit_beats_any_other_monotone_fit(data, other):
    x, y = zip(*data, strict=True)
    xs, fit = isotonic(x, y)
    at = {u: i for i, u in enumerate(xs)}
    # Any non-decreasing assignment to the distinct x: here, sorted draws.
    rival = np.sort(np.resize(np.asarray(other), len(xs)))

    def error(f):
        return sum((f[at[a]] - b) ** 2 for a, b in zip(x, y, strict=True))

    assert error(fit) <= error(rival) + 1e-9


def test_isotonic_fit_of_a_falling_sequence_is_its_mean():
    assert isotonic([1, 2, 3, 4], [4, 3, 2, 1])[1] == pytest.approx([2.5] * 4)


@given(st.lists(floats, min_size=1, max_size=30))
def test_calibration_is_monotone_and_stays_in_range(values):
    c = Calibration((-1.0, -0.6, -0.2, 0.0), (-1.0, -0.7, -0.5, 0.0))
    v = torch.tensor(sorted(values), dtype=torch.float64)
    out = c(v)
    assert torch.all(out[1:] >= out[:-1] - 1e-12) and out.min() >= -1 and out.max() <= 0
    assert out.shape == v.shape and out.dtype == v.dtype


def test_calibration_passes_through_its_knots_and_round_trips():
    c = Calibration((-1.0, -0.5, 0.0), (-1.0, -0.6, 0.0))
    assert c(torch.tensor([-1.0, -0.5, -0.25, 0.0])).tolist() == pytest.approx([-1.0, -0.6, -0.3, 0.0])
    assert Calibration.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    assert c(torch.zeros(2, 3, dtype=torch.float32)).dtype == torch.float32
    # Outside its knots a map holds its end returns, never leaving [-1, 0].
    inner = Calibration((-0.8, -0.2), (-0.9, -0.1))
    assert inner(torch.tensor([-1.0, -0.5, 0.0])).tolist() == pytest.approx([-0.9, -0.5, -0.1])


def test_knots_are_kept_as_tuples_of_python_floats():
    given = Calibration([-1.0, np.float32(-0.5), 0], np.array([-1.0, -0.6, 0.0]))
    assert given == Calibration((-1.0, -0.5, 0.0), (-1.0, -0.6, 0.0)) and hash(given)
    fitted = fit_calibration([-0.9, -0.5, -0.1], [-0.8, -0.5, -0.2], knots=3)
    for c in (given, fitted):
        assert all(type(x) is float for x in (*c.values, *c.returns))
    assert "np." not in repr(fitted)


@pytest.mark.parametrize(
    "values, returns",
    [
        ((-0.5,), (-0.5,)),
        ((-0.5, -0.6), (-0.5, -0.6)),
        ((-0.6, -0.5), (-0.5, -0.6)),
        ((-2.0, 0.0), (-1.0, 0.0)),
        ((-1.0, 0.0), (-1.5, 0.0)),
        ((-1.0, 0.0), (-1.0, 0.5)),
        ((-1.0, float("nan")), (-1.0, 0.0)),
        (("a", 0.0), (-1.0, 0.0)),
        (None, (-1.0, 0.0)),
    ],
)
def test_bad_calibrations_are_refused(values, returns):
    with pytest.raises(InputError):
        Calibration(values, returns)


def test_fit_calibration_undoes_a_monotone_bias():
    gamma = 0.95
    rng = np.random.default_rng(0)
    said = rng.uniform(1, 60, 4000)  # the head's remaining lengths
    went = said + 8  # answers ran 8 tokens longer
    c = fit_calibration(length_to_value(said, gamma), length_to_value(went, gamma))
    assert c.values[0] == -1.0 and c.values[-1] == 0.0  # the ends map to themselves
    for a, b in length_map(c, gamma, [4, 16, 32]):
        assert b == pytest.approx(a + 8, abs=0.5)


def test_fit_calibration_takes_returns_outside_the_range_as_its_ends():
    """Bootstrapped returns may stray past [-1, 0] by a rounding: they count as the ends."""
    c = fit_calibration([-0.9, -0.5, -0.1], [-1.2, -0.5, 0.3])
    assert min(c.returns) == -1.0 and max(c.returns) == 0.0


def test_fit_calibration_needs_data():
    with pytest.raises(InputError):
        fit_calibration([-0.5], [-0.4])
    with pytest.raises(InputError):
        fit_calibration([-0.5, -0.5], [-0.4, -0.6])


def test_a_calibrated_lenvm_maps_every_value_and_keeps_the_map(tmp_path, tiny_path, tiny_generator):
    torch.manual_seed(0)
    lenvm = LengthValueModel.from_base(tiny_path, generator=tiny_generator, gamma=0.9)
    ids = torch.tensor([[5, 6, 7, 8]])
    raw = lenvm(ids)
    calibration = calibrate(lenvm, synthetic_records(tiny_generator[1]))
    assert lenvm.calibration == calibration
    assert torch.allclose(lenvm(ids), calibration(raw)) and not torch.allclose(lenvm(ids), raw)
    assert torch.equal(lenvm(ids, calibrated=False), raw)  # what training fits
    lenvm.save_pretrained(tmp_path / "cal")
    again = LengthValueModel.from_pretrained(tmp_path / "cal", generator=tiny_generator)
    assert again.calibration == calibration and torch.allclose(again(ids), lenvm(ids))


def test_calibrating_moves_the_heads_predictions_toward_what_happened(tiny_path, tiny_generator):
    """An untrained head says about the same for every state; the synthetic answers run 3 or 24
    tokens: calibrated on them, its values come nearer their realized returns."""
    from lenvm.calibration import realized_returns

    torch.manual_seed(0)
    lenvm = LengthValueModel.from_base(tiny_path, generator=tiny_generator, gamma=0.9)
    records = synthetic_records(tiny_generator[1], truncate_long=True)
    values, returns = realized_returns(lenvm, records)
    calibration = calibrate(lenvm, records)
    after = calibration(torch.from_numpy(values)).numpy()
    assert np.mean((after - returns) ** 2) < np.mean((values - returns) ** 2)
    # The fit's own report says the same.
    from lenvm.calibration import fit_on_rollouts
    from lenvm.returns import value_to_length

    fit = fit_on_rollouts(lenvm, records)
    assert fit.calibration == calibration and fit.states == len(values)
    assert fit.mse_before == pytest.approx(np.mean((values - returns) ** 2))
    assert fit.mse_after == pytest.approx(np.mean((after - returns) ** 2))
    assert fit.seen == pytest.approx(tuple(value_to_length(np.array([values.max(), values.min()]), 0.9)))


def test_realized_returns_are_monte_carlo_and_bootstrapped_at_a_cut(tiny_path, tiny_generator):
    """What calibration fits to, against the formula: an answer that ended realizes
    -(1 - gamma**steps) from each state; one cut at max_new_tokens adds gamma**steps times the
    LenVM's own value at the cut."""
    from lenvm.calibration import realized_returns

    torch.manual_seed(0)
    lenvm = LengthValueModel.from_base(tiny_path, generator=tiny_generator, gamma=0.9)
    records = synthetic_records(tiny_generator[1], truncate_long=True)
    ended, cut = records[0], next(r for r in records if r["finish_reason"] == "length")
    for record in (ended, cut):
        prompt, completion = record["prompt_token_ids"], record["completion_token_ids"]
        start, n = len(prompt) - 1, len(completion)
        own = lenvm(torch.tensor([prompt + completion]), calibrated=False)[0].double().detach()
        steps = torch.arange(n, 0, -1, dtype=torch.float64)
        at_cut = own[start + n] if record is cut else 0.0
        values, returns = realized_returns(lenvm, [record])
        np.testing.assert_allclose(values, own[start : start + n].numpy(), atol=1e-6)
        np.testing.assert_allclose(returns, (-(1 - 0.9**steps) + 0.9**steps * at_cut).numpy(), atol=1e-6)


def test_cli_calibrates_in_place_or_into_a_copy(tmp_path, tiny_path, tiny_generator, capsys):
    _, rollouts = lenvm_folder_with_rollouts(tmp_path, tiny_path, tiny_generator)
    args = ["calibrate", "--lenvm", str(tmp_path / "l"), "--rollouts", str(rollouts), "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "copy")]) == 0
    assert read_config(tmp_path / "l").calibration is None  # the original is left alone
    assert read_config(tmp_path / "copy").calibration is not None
    assert (tmp_path / "copy" / "notes.txt").read_text() == "kept"
    printed = capsys.readouterr().out
    assert "tokens left, as the head says" in printed
    # Before/after errors, and only rows within the lengths the head gave (not the map's fixed ends).
    from lenvm.calibration import fit_on_rollouts

    fit = fit_on_rollouts(LengthValueModel.from_pretrained(tmp_path / "l", generator=tiny_generator),
                          rollouts)  # fmt: skip  # a file, as calibrate takes
    assert f"{fit.mse_before:.4f} before, {fit.mse_after:.4f} after" in printed
    assert fit.rollouts == len(Path(rollouts).read_text().splitlines())
    rows = [
        float(line.split("->")[0]) for line in printed.splitlines() if "->" in line and "said" not in line
    ]
    assert rows and all(fit.seen[0] - 0.05 <= r <= fit.seen[1] + 0.05 for r in rows)  # printed to 0.1
    assert main(args) == 0
    assert read_config(tmp_path / "l").calibration == read_config(tmp_path / "copy").calibration
    assert (tmp_path / "l" / "notes.txt").read_text() == "kept"  # in place: only the config changes
    # Another folder at --out is never replaced, a LenVM there only with --overwrite.
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("mine")
    assert main([*args, "--out", str(tmp_path / "precious")]) == 2
    assert "not a LenVM folder" in capsys.readouterr().err
    assert (tmp_path / "precious" / "notes.txt").read_text() == "mine"
    assert main([*args, "--out", str(tmp_path / "copy")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "copy"), "--overwrite"]) == 0
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert main(["calibrate", "--lenvm", str(tmp_path / "l"), "--rollouts", str(empty)]) != 0
    assert "no rollouts" in capsys.readouterr().err


def test_decoding_scores_candidates_with_the_calibrated_values(tiny_path, tiny_generator):
    from lenvm.decoding.scorers import scorer_for

    torch.manual_seed(0)
    lenvm = LengthValueModel.from_base(tiny_path, generator=tiny_generator, gamma=0.9)
    rows = [[5, 6, 7, 8], [9, 10, 11]]
    ids, eos = torch.tensor([[20, 21, 22], [23, 24, 25]]), torch.zeros(2, 3, dtype=torch.bool)
    raw = scorer_for(lenvm).prefill(lenvm, rows, lookahead=False).score(ids, eos)
    lenvm.config.calibration = Calibration((-1.0, -0.5, 0.0), (-1.0, -0.9, 0.0)).to_dict()
    calibrated = scorer_for(lenvm).prefill(lenvm, rows, lookahead=False).score(ids, eos)
    assert torch.allclose(calibrated, lenvm.calibration(raw), atol=1e-6)
    assert not torch.allclose(calibrated, raw)


def test_calibration_refuses_rollouts_the_lenvm_cannot_read(tiny_path, tiny_generator, tmp_path):
    """Rollouts of another decoding policy or another tokenizer would fit a map to nothing the
    LenVM models: refused with a reason, not a wrong map or an index error."""
    lenvm = LengthValueModel.from_base(tiny_path, generator=tiny_generator, gamma=0.9)
    lenvm.config.sampling = {"temperature": 1.0}  # what its training rollouts were sampled with
    records = synthetic_records(tiny_generator[1])
    with pytest.raises(InputError, match=r"sampled with \{'temperature': 0.2.*the LenVM's training rollouts"):
        calibrate(lenvm, [dict(r, sampling={"temperature": 0.2}) for r in records])
    with pytest.raises(InputError, match="holds token id 1000000, outside the vocabulary"):
        calibrate(lenvm, [dict(records[0], completion_token_ids=[10**6], num_tokens=1), *records[1:]])
    with pytest.raises(InputError, match="do not read back as its prompt"):
        calibrate(lenvm, [dict(r, prompt_token_ids=[t + 1 for t in r["prompt_token_ids"]]) for r in records])
    assert lenvm.config.calibration is None
    with pytest.raises(InputError, match="batch_size must be an integer of at least 1"):
        calibrate(lenvm, records, batch_size=0)
    path = tmp_path / "r.jsonl"  # a rollouts file is read as its records
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert calibrate(lenvm, path) == calibrate(lenvm, records)
