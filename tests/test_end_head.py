"""The end head: its targets (pure), its training, saving and loading, and its use in decoding."""

import math

import numpy as np
import pytest
import torch
from conftest import lenvm_folder_with_rollouts, synthetic_records
from hypothesis import given
from hypothesis import strategies as st

from lenvm.cli import main
from lenvm.decoding import policies
from lenvm.decoding.policies import Candidates
from lenvm.end_head import natural_end_distances, train_end_head
from lenvm.io import InputError
from lenvm.model import END_HEAD_NAME, LengthValueConfig, LengthValueModel, read_config
from lenvm.returns import length_to_value


def test_distances_count_down_to_each_natural_end_and_the_own_end():
    p = [0.0, 0.2, 0.0, 0.0, 0.01, 0.0]
    assert natural_end_distances(p, ended=True, bar=0.05).tolist() == [2, 1, 4, 3, 2, 1]
    cut = natural_end_distances(p, ended=False, bar=0.05)
    assert cut[:2].tolist() == [2, 1] and np.isnan(cut[2:]).all()  # no end known after state 1
    assert natural_end_distances([], ended=True, bar=0.05).tolist() == []


@given(st.lists(st.floats(0.0, 1.0), max_size=40), st.booleans(), st.floats(0.01, 0.99))
def test_distances_are_one_at_every_natural_end_and_fall_by_one_in_between(p, ended, bar):
    d = natural_end_distances(p, ended, bar)
    for t, prob in enumerate(p):
        if prob >= bar or (ended and t == len(p) - 1):
            assert d[t] == 1
        if t + 1 < len(p) and not np.isnan(d[t + 1]):
            assert d[t] == 1 or d[t] == d[t + 1] + 1
        if np.isnan(d[t]):  # unknown only where nothing later could end it
            assert not ended and all(q < bar for q in p[t:])


@pytest.fixture
def trained(tiny_path, tiny_generator):
    torch.manual_seed(0)
    lenvm = LengthValueModel.from_base(tiny_path, generator=tiny_generator, gamma=0.9)
    records = synthetic_records(tiny_generator[1], truncate_long=True)
    figures = train_end_head(lenvm, records, records, bar=0.05, epochs=3)
    return lenvm, figures


def test_training_sets_the_head_and_its_settings(trained):
    lenvm, figures = trained
    assert lenvm.end_head is not None
    assert lenvm.config.end_head["natural_eos"] == 0.05
    assert 0 < lenvm.config.end_head["gamma"] < 1
    assert figures["states"] > 0 and math.isfinite(figures["eval_mae"])
    lengths = lenvm.end_lengths_from_hidden(torch.randn(3, lenvm.config.hidden_size))
    assert lengths.shape == (3,) and bool((lengths >= 1).all())


def test_the_end_head_round_trips_and_a_lenvm_without_one_has_none(tmp_path, trained, tiny_generator):
    lenvm, _ = trained
    lenvm.save_pretrained(tmp_path / "l")
    assert (tmp_path / "l" / END_HEAD_NAME).is_file()
    again = LengthValueModel.from_pretrained(tmp_path / "l", generator=tiny_generator)
    h = torch.randn(4, lenvm.config.hidden_size)
    assert torch.allclose(again.end_lengths_from_hidden(h), lenvm.end_lengths_from_hidden(h))
    (tmp_path / "l" / END_HEAD_NAME).unlink()
    with pytest.raises(InputError, match="end head"):
        LengthValueModel.from_pretrained(tmp_path / "l", generator=tiny_generator)
    plain = LengthValueModel.from_base(lenvm.config.base_model, generator=tiny_generator, gamma=0.9)
    assert plain.end_head is None and plain.end_lengths_from_hidden(h) is None
    # Saved over a LenVM folder, as Hugging Face's save_pretrained does: the other files stay,
    # the end head of the LenVM it replaces does not.
    lenvm.save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "training_log.json").write_text("{}")
    (tmp_path / "m" / "notes").mkdir()
    (tmp_path / "m" / "notes" / "README.md").write_text("mine")
    plain.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "training_log.json").read_text() == "{}"
    assert (tmp_path / "m" / "notes" / "README.md").read_text() == "mine"
    assert not (tmp_path / "m" / END_HEAD_NAME).exists()
    assert LengthValueModel.from_pretrained(tmp_path / "m", generator=tiny_generator).end_head is None


def test_only_an_attached_lenvm_takes_an_end_head(trained):
    lenvm, _ = trained
    data = lenvm.config.to_dict()
    with pytest.raises(InputError, match="attached"):
        LengthValueConfig.from_dict({**data, "kind": "q", "vocab_size": 256})
    with pytest.raises(InputError, match="gamma"):
        LengthValueConfig.from_dict({**data, "end_head": {"natural_eos": 0.05}})


def test_the_scorer_gives_each_candidates_next_natural_end(trained):
    from lenvm.decoding.scorers import scorer_for

    lenvm, _ = trained
    rows = [[5, 6, 7, 8], [9, 10, 11]]
    ids, eos = torch.tensor([[20, 21, 22], [23, 24, 25]]), torch.zeros(2, 3, dtype=torch.bool)
    scorer = scorer_for(lenvm).prefill(lenvm, rows, lookahead=False)
    scorer.score(ids, eos)
    ends = scorer.next_end()
    # Each candidate's state, fed alone: the end head on it.
    alone = [
        lenvm.end_lengths_from_hidden(lenvm.features(torch.tensor([row + [int(x)]]))[0, -1])
        for row, cand in zip(rows, ids, strict=True)
        for x in cand
    ]
    assert torch.allclose(ends.flatten(), torch.stack(alone), atol=1e-3)


def test_a_wrap_up_heads_for_the_soonest_natural_end_the_end_head_sees():
    """Past the target, two candidates: the value head says the first ends sooner, the end head
    that the second can end sooner. With the end head the second wins, without it the first."""
    gamma, step, target = 0.99, torch.tensor([40]), torch.tensor([32])
    probs = torch.tensor([[0.5, 0.5]], dtype=torch.float64)
    values = length_to_value(torch.tensor([[5.0, 40.0]]), gamma).float()
    eos = torch.zeros(1, 2, dtype=torch.bool)
    ids = torch.tensor([[10, 11]])
    plain = policies.equal_to(Candidates(ids, probs, values, eos), step, target, gamma)
    ends = torch.tensor([[30.0, 2.0]])
    guided = policies.equal_to(Candidates(ids, probs, values, eos, next_end=ends), step, target, gamma)
    assert plain[0, 0] > 0.9 and guided[0, 1] > 0.9
    for kind in ("at_most", "at_least"):  # their wrap-ups rank the same way
        rule = policies.TARGET_RULES[kind]
        end = torch.tensor([20]) if kind == "at_least" else torch.tensor([41])
        dist = rule(Candidates(ids, probs, values, eos, next_end=ends), step, end, gamma)
        assert dist[0, 1] > dist[0, 0]


def test_cli_trains_the_end_head_into_a_copy(tmp_path, tiny_path, tiny_generator, capsys):
    _, rollouts = lenvm_folder_with_rollouts(tmp_path, tiny_path, tiny_generator)
    args = ["train-end-head", "--lenvm", str(tmp_path / "l"), "--rollouts", str(rollouts), "--no-progress"]
    assert main([*args, "--eval-rollouts", str(rollouts), "--epochs", "2", "--out", str(tmp_path / "e")]) == 0
    assert read_config(tmp_path / "l").end_head is None  # the original is left alone
    assert read_config(tmp_path / "e").end_head is not None
    assert (tmp_path / "e" / END_HEAD_NAME).is_file() and (tmp_path / "e" / "notes.txt").read_text() == "kept"
    assert "held-out tokens to the next natural end" in capsys.readouterr().out
    loaded = LengthValueModel.from_pretrained(tmp_path / "e", generator=tiny_generator)
    assert loaded.end_head is not None
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("mine")
    assert main([*args, "--out", str(tmp_path / "precious")]) == 2
    assert (tmp_path / "precious" / "notes.txt").read_text() == "mine"
    assert main([*args, "--out", str(tmp_path / "e"), "--epochs", "1"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    for bad in (["--lr", "inf"], ["--lr", "0"], ["--epochs", "0"]):
        assert main([*args, *bad]) == 2
        assert "must be" in capsys.readouterr().err
    assert main([*args, "--natural-eos", "1.5"]) != 0
    assert "natural-end bar" in capsys.readouterr().err


def test_the_engine_decodes_every_target_control_with_an_end_head(trained, tiny_generator, monkeypatch):
    from lenvm.decoding import Control, Engine, Request, SamplingParams

    lenvm, _ = trained
    model, tok = tiny_generator
    calls = []
    head = lenvm.end_lengths_from_hidden
    monkeypatch.setattr(lenvm, "end_lengths_from_hidden", lambda h: calls.append(h.shape) or head(h))
    engine = Engine(model, tok, lenvm=lenvm, num_candidates=4)
    controls = [Control("equal_to", target=6), Control("at_most", target=8), Control("at_least", target=5)]
    requests = [
        Request("Tell me about the sea.", SamplingParams(max_new_tokens=16, seed=i), control=c)
        for i, c in enumerate(controls)
    ]
    results = engine.generate(requests, batch_size=3)
    assert results[1].num_tokens <= 8 and results[2].num_tokens >= 5
    assert calls  # the wrap-ups read the end head
    assert [r.token_ids for r in results] == [engine.generate([r])[0].token_ids for r in requests]
