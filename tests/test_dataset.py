import numpy as np
import pytest
from conftest import synthetic_records

from lenvm.dataset import collate, examples_from_records, held_out_prompts, position_targets
from lenvm.io import InputError
from lenvm.returns import bootstrap_targets, mc_targets


def test_finished_completion_supervises_last_prompt_token_to_last_non_eos(tiny_generator):
    _, tok = tiny_generator
    records = synthetic_records(tok, n_per_prompt=1)
    examples, report = examples_from_records(records, [tok.eos_token_id])
    e, r = examples[0], records[0]
    assert e.start == len(r["prompt_token_ids"]) - 1
    assert e.num_states == r["num_tokens"]  # L states for L tokens (EOS included)
    assert len(e.input_ids) == len(r["prompt_token_ids"]) + r["num_tokens"] - 1  # EOS never an input
    assert e.start + e.num_states - 1 == len(e.input_ids) - 1  # last state is the last non-EOS token
    assert report.finished == len(records) and report.truncated == 0


def test_truncated_bootstrap_or_drop(tiny_generator):
    _, tok = tiny_generator
    records = synthetic_records(tok, truncate_long=True)
    kept, report = examples_from_records(records, [tok.eos_token_id], "bootstrap")
    cut = [e for e in kept if not e.finished]
    assert report.truncated == 4 and report.dropped == 0 and len(cut) == 4
    e = cut[0]
    assert e.bootstrap_index == len(e.input_ids) - 1
    mc, disc = position_targets(e, 0.9)
    np.testing.assert_allclose(mc + disc * -0.3, bootstrap_targets(e.num_states, 0.9, -0.3))
    dropped, report = examples_from_records(records, [tok.eos_token_id], "drop")
    assert report.dropped == 4 and all(e.finished for e in dropped)
    with pytest.raises(InputError, match=r"dropped \(prompt and completion longer than max_length 2\)"):
        examples_from_records(records, [tok.eos_token_id], max_length=2)  # nothing left: say why


def test_collate_targets_match_returns(tiny_generator):
    _, tok = tiny_generator
    examples, _ = examples_from_records(synthetic_records(tok, n_per_prompt=1), [tok.eos_token_id])
    batch = collate(examples[:2], 0.95)
    for row, e in enumerate(examples[:2]):
        got = batch.mc[row][batch.supervised[row]].double().numpy()
        np.testing.assert_allclose(got, mc_targets(e.num_states, 0.95), rtol=1e-6)
    assert batch.supervised.sum() == sum(e.num_states for e in examples[:2])


def test_held_out_prompts_are_whole_prompts():
    ids = [str(i // 3) for i in range(24)]  # 8 prompts, 3 completions each
    held = held_out_prompts(ids, 0.25, seed=1)
    assert len(held) == 2 and held <= set(ids)
    assert held_out_prompts(ids, 0.25, seed=1) == held  # deterministic
    assert held_out_prompts(list(reversed(ids)), 0.25, seed=1) == held  # whatever the order
    assert len(held_out_prompts(ids, 0.01)) == 1  # at least one
    assert len(held_out_prompts(["a", "b"], 0.9)) == 1  # never every prompt


def test_bad_records_rejected(tiny_generator):
    _, tok = tiny_generator
    record = synthetic_records(tok, n_per_prompt=1)[0]
    del record["completion_token_ids"]
    with pytest.raises(InputError, match="completion_token_ids"):
        examples_from_records([record], [tok.eos_token_id])
    with pytest.raises(InputError):
        examples_from_records(synthetic_records(tok), [tok.eos_token_id], truncated="ignore")
