"""The Q-head agreement benchmark on the tiny random model with tiny trained LenVMs."""

import json
import math

import numpy as np
import pytest
import torch
from conftest import synthetic_records

from lenvm.bench.q_agreement import (
    average_ranks,
    run_q_agreement,
    sample_positions,
    score_completion,
    spearman,
)
from lenvm.dataset import held_out_prompts
from lenvm.io import InputError, read_jsonl
from lenvm.model import LengthValueModel
from lenvm.training import TrainConfig, train


@pytest.fixture(scope="module")
def rollouts(tiny_generator, tmp_path_factory):
    # Some completions cut at max_new_tokens: their last state (after the cut) is scored too.
    records = synthetic_records(tiny_generator[1], n_per_prompt=2, truncate_long=True)
    path = tmp_path_factory.mktemp("rollouts") / "rollouts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _trained(kind, rollouts, tiny_path, tiny_generator, root):
    config = TrainConfig(kind=kind, epochs=5, lr=3e-3, batch_tokens=64, eval_fraction=0.25, seed=0)
    train(rollouts, str(tiny_path), root / kind, config, generator=tiny_generator, progress=False)
    return root / kind


@pytest.fixture(scope="module")
def lenvms(rollouts, tiny_path, tiny_generator, tmp_path_factory):
    root = tmp_path_factory.mktemp("lenvms")
    standalone = root / "standalone"
    torch.manual_seed(1)
    LengthValueModel.from_base(tiny_path, kind="standalone", gamma=0.9).save_pretrained(standalone)
    return {
        "attached": _trained("attached", rollouts, tiny_path, tiny_generator, root),
        "q": _trained("q", rollouts, tiny_path, tiny_generator, root),
        "standalone": standalone,
    }


def test_average_ranks_and_spearman_by_hand():
    np.testing.assert_allclose(average_ranks([3.0, 1.0, 2.0]), [3, 1, 2])
    np.testing.assert_allclose(average_ranks([1.0, 2.0, 2.0, 3.0]), [1, 2.5, 2.5, 4])
    np.testing.assert_allclose(average_ranks([5.0, 5.0, 5.0]), [2, 2, 2])
    assert spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    # Monotone but non-linear: Spearman 1 where Pearson would not be.
    assert spearman([1, 2, 3, 4], [1, 10, 100, 1000]) == pytest.approx(1.0)
    # Ties: ranks a = [1, 2.5, 2.5, 4], b = [1, 3, 2, 4]: cov 4.5, var 4.5 and 5, rho = sqrt(0.9).
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(math.sqrt(0.9))
    # a = [1, 2, 3], b ranks = [1.5, 1.5, 3]: cov 1.5, var 2 and 1.5, rho = 1.5 / sqrt(3).
    assert spearman([1, 2, 3], [0, 0, 7]) == pytest.approx(1.5 / math.sqrt(3))
    assert np.isnan(spearman([1, 2, 3], [4, 4, 4]))
    rows = spearman([[1, 2, 3], [1, 2, 3], [1, 1, 1]], [[1, 2, 3], [3, 2, 1], [1, 2, 3]])
    np.testing.assert_allclose(rows[:2], [1.0, -1.0])
    assert np.isnan(rows[2])


def test_sample_positions_spread_and_seeded():
    rng = np.random.default_rng(0)
    positions = sample_positions(100, 10, rng)
    assert len(positions) == 10
    assert [p // 10 for p in positions] == list(range(10))  # one in each tenth of the completion
    assert sample_positions(100, 10, np.random.default_rng(3)) == sample_positions(
        100, 10, np.random.default_rng(3)
    )
    assert sample_positions(4, 16, rng) == [0, 1, 2, 3]
    assert sample_positions(1, 16, rng) == [0]


def test_run_writes_results_with_consistent_counts(tmp_path, tiny_path, lenvms, rollouts):
    out = tmp_path / "qa"
    kwargs = dict(
        model=tiny_path,
        exact=lenvms["attached"],
        q=lenvms["q"],
        rollouts=rollouts,
        num_candidates=4,
        positions_per_completion=5,
        progress=False,
    )
    results = run_q_agreement(out, **kwargs)
    for name in ("results.json", "table.md", "settings.json", "items.jsonl"):
        assert (out / name).is_file()
    assert (out / "q_vs_exact.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out / "results.json").read_text())["metrics"] == results["metrics"]
    table = (out / "table.md").read_text()
    assert "Q-head" in table and "generator log-probability" in table

    records = read_jsonl(rollouts)
    items = read_jsonl(out / "items.jsonl")
    assert results["completions"] == len(records) == len(items)
    assert results["candidates"] == 4
    states = [len(r["completion_token_ids"]) + (r["finish_reason"] == "length") for r in records]
    assert results["positions"] == sum(min(5, n) for n in states) == sum(len(i["positions"]) for i in items)
    for item, n in zip(items, states, strict=True):
        assert item["num_states"] == n
        assert len(set(item["positions"])) == len(item["positions"]) and max(item["positions"]) < n
    for name in ("q_head", "probabilities"):
        m = results["metrics"][name]
        assert m["positions"] == results["positions"]
        assert m["ranked_positions"] + m["tied_positions"] == m["positions"]
        assert m["ranked_positions"] > 0
        assert -1 <= m["spearman_median"] <= 1 and -1 <= m["spearman_mean"] <= 1
        assert 0 <= m["same_argmax"] <= 1 and 0 <= m["same_argmin"] <= 1
    q = results["metrics"]["q_head"]
    assert -1 <= q["pearson"] <= 1
    assert q["value_mae"] > 0 and q["length_mae"] > 0
    assert 0 < results["candidate_mass_mean"] <= 1

    # Same settings: a rerun reuses the items and gives the same numbers; other settings refuse.
    again = run_q_agreement(out, **kwargs)
    assert again["metrics"] == results["metrics"]
    assert len(read_jsonl(out / "items.jsonl")) == len(items)
    with pytest.raises(InputError, match="other settings"):
        run_q_agreement(out, **{**kwargs, "num_candidates": 3})
    subset = run_q_agreement(tmp_path / "subset", **{**kwargs, "max_completions": 3})
    assert subset["completions"] == 3

    # held_out: only the prompts the training split held out (2 of 8 at eval_fraction 0.25)
    held = run_q_agreement(tmp_path / "held", **{**kwargs, "held_out": True})
    held_ids = held_out_prompts([r["prompt_id"] for r in records], 0.25, 0)
    assert len(held_ids) == 2
    assert held["completions"] == sum(r["prompt_id"] in held_ids for r in records) == 4


@pytest.mark.parametrize("exact_kind", ["attached", "standalone"])
def test_exact_values_match_appending_the_candidate(
    tmp_path, tiny_path, tiny_generator, lenvms, rollouts, exact_kind
):
    run_q_agreement(
        tmp_path / "qa",
        model=tiny_path,
        exact=lenvms[exact_kind],
        q=lenvms["q"],
        rollouts=rollouts,
        num_candidates=5,
        positions_per_completion=4,
        max_completions=4,
        progress=False,
    )
    model, tokenizer = tiny_generator
    exact = LengthValueModel.from_pretrained(lenvms[exact_kind], generator=tiny_generator)
    q = LengthValueModel.from_pretrained(lenvms["q"], generator=tiny_generator)
    records = read_jsonl(rollouts)
    items = read_jsonl(tmp_path / "qa" / "items.jsonl")
    assert len(items) == 4
    checked = 0
    with torch.no_grad():
        for item in items:
            record = records[int(item["key"])]
            for i, t in enumerate(item["positions"]):
                state = record["prompt_token_ids"] + record["completion_token_ids"][:t]
                ids = torch.tensor([state], device=model.device)
                logits = model(ids).logits[0, -1]
                logits[tokenizer.eos_token_id] = -float("inf")
                assert item["candidates"][i] == logits.topk(5).indices.tolist()
                hidden = q.features(ids)[0, -1]
                expected_q = q.next_values_from_hidden(
                    hidden, torch.tensor(item["candidates"][i], device=ids.device)
                )
                np.testing.assert_allclose(item["q"][i], expected_q.cpu().numpy(), atol=1e-5)
                for j, x in enumerate(item["candidates"][i]):
                    value = exact(torch.tensor([state + [x]], device=ids.device))[0, -1].item()
                    assert item["exact"][i][j] == pytest.approx(value, abs=1e-4)
                    checked += 1
    assert checked == 5 * sum(len(item["positions"]) for item in items)


def test_eos_is_never_a_candidate(eos_generator, lenvms, rollouts):
    """The engine values EOS at 0 without asking either head, so it is left out of the comparison,
    even where it is the generator's most probable token."""
    model, tokenizer = eos_generator
    exact = LengthValueModel.from_pretrained(lenvms["attached"], generator=eos_generator)
    q = LengthValueModel.from_pretrained(lenvms["q"], generator=eos_generator)
    record = read_jsonl(rollouts)[3]  # a long completion (24 tokens)
    positions = [0, 3, 7]
    with torch.no_grad():
        state = torch.tensor(
            [record["prompt_token_ids"] + record["completion_token_ids"][:3]], device=model.device
        )
        assert model(state).logits[0, -1].argmax().item() == tokenizer.eos_token_id
    scores = score_completion(
        model,
        exact,
        q,
        record["prompt_token_ids"],
        record["completion_token_ids"],
        positions,
        num_candidates=6,
        temperature=1.0,
        eos_ids=[tokenizer.eos_token_id],
    )
    assert [len(c) for c in scores["candidates"]] == [6, 6, 6]
    assert all(tokenizer.eos_token_id not in c for c in scores["candidates"])
    assert all(0 < m < 1 for m in scores["mass"])


def test_bad_inputs(tmp_path, tiny_path, lenvms, rollouts):
    kwargs = dict(model=tiny_path, exact=lenvms["attached"], q=lenvms["q"], rollouts=rollouts, progress=False)
    with pytest.raises(InputError, match="exact scorer"):
        run_q_agreement(tmp_path / "a", **{**kwargs, "exact": lenvms["q"]})
    with pytest.raises(InputError, match="kind 'q'"):
        run_q_agreement(tmp_path / "b", **{**kwargs, "q": lenvms["attached"]})
    with pytest.raises(InputError, match="num_candidates"):
        run_q_agreement(tmp_path / "c", **{**kwargs, "num_candidates": 0})
    with pytest.raises(InputError, match="num_candidates"):
        run_q_agreement(tmp_path / "c", **{**kwargs, "num_candidates": 10**6})
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(InputError, match="no rollouts"):
        run_q_agreement(tmp_path / "d", **{**kwargs, "rollouts": empty})
    with pytest.raises(InputError):
        run_q_agreement(tmp_path / "e", **{**kwargs, "q": tmp_path / "missing"})


@pytest.mark.parametrize("bad_id", [-5, 10**6])
def test_rollouts_with_ids_outside_the_vocabulary_are_refused(tmp_path, tiny_path, lenvms, rollouts, bad_id):
    records = read_jsonl(rollouts)
    for record in records:
        record["completion_token_ids"][0] = bad_id
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(InputError, match=f"token id {bad_id}, outside the vocabulary"):
        run_q_agreement(
            tmp_path / "out",
            model=tiny_path,
            exact=lenvms["attached"],
            q=lenvms["q"],
            rollouts=bad,
            progress=False,
        )
