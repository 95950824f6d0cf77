"""What a training run reads of its rollout records and checks in its one scanning pass."""

import json
import os
import threading

import pytest

from lenvm.io import InputError
from lenvm.training_data import RolloutSource, check_length, scan

EOS = 2


def record(prompt_ids: list[int], completion_ids: list[int], finish_reason: str = "stop") -> dict:
    return {
        "prompt_id": "p",
        "sample_index": 0,
        "prompt": "Hi",
        "prompt_token_ids": prompt_ids,
        "completion": "",
        "completion_token_ids": completion_ids,
        "finish_reason": finish_reason,
        "num_tokens": len(completion_ids),
        "generator": "g",
        "sampling": {"temperature": 1.0, "max_new_tokens": 8, "seed": 0},
    }


def scanned(records: list[dict], context: int | None = None):
    return scan(records, [EOS], "bootstrap", None, vocab_size=16, vocab_name="g", context=context)


def test_a_record_exactly_as_long_as_the_context_fits_and_one_token_more_does_not():
    fits = record([5, 6, 7], [8, 9, EOS])  # 6 tokens, prompt and answer together
    check_length(fits, 0, 6, "g", "advice")
    with pytest.raises(
        InputError, match="rollout record 1 is 6 tokens long .* context of 'g' \\(5 tokens\\)"
    ):
        check_length(fits, 0, 5, "g", "advice")
    assert scanned([fits], context=6).records == 1
    with pytest.raises(InputError, match="beyond the context"):
        scanned([fits], context=5)


@pytest.mark.parametrize("bad", [-5, 16])
def test_a_token_id_outside_the_vocabulary_is_refused_at_either_end(bad):
    """A negative id would index the embeddings from their end, or fail there with an IndexError."""
    with pytest.raises(
        InputError, match=rf"^rollout record 2 holds token id {bad}, outside the vocabulary \(0-15\) of 'g'"
    ):
        scanned([record([5, 6], [8, EOS]), record([5, bad], [8, EOS])])


def test_the_runs_fingerprint_tells_a_finished_answer_from_the_same_tokens_cut():
    """A resumed run reuses a checkpoint or cached features only for the same data; a record that
    ended and one cut at max_new_tokens train differently (a return, or a bootstrapped one)."""
    stopped = record([5, 6], [8, EOS], "stop")
    cut = record([5, 6], [8, EOS], "length")
    assert scanned([stopped]).digest != scanned([cut]).digest
    assert scanned([stopped]).digest == scanned([dict(stopped)]).digest


def test_a_stream_reads_no_further_than_its_scan_read(tmp_path):
    """Records a rollout run appends during training were never checked, nor split or counted."""
    path = tmp_path / "r.jsonl"
    records = [record([5, 6], [8, EOS]), record([5, 7], [9, 10, EOS])]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    source = RolloutSource(path, stream=True)
    assert scanned(source).records == 2
    with path.open("a") as fh:  # an id past the vocabulary of 16, which the scan refuses
        fh.write(json.dumps(record([5, 99], [8, EOS])) + "\n")
    assert list(source) == records and list(source) == records


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes")
def test_a_pipe_is_read_once_and_held_never_streamed(tmp_path):
    """Streaming reads the file afresh on every pass: a pipe would give nothing after the first."""
    fifo = tmp_path / "rollouts"
    os.mkfifo(fifo)
    with pytest.raises(InputError, match="a pipe can be read only once"):
        RolloutSource(fifo, stream=True)
    records = [record([5, 6], [8, EOS]), record([5, 7], [9, 9, EOS])]

    def write() -> None:
        with open(fifo, "w") as f:
            f.write("".join(json.dumps(r) + "\n" for r in records))

    writer = threading.Thread(target=write)
    writer.start()
    source = RolloutSource(fifo)  # held, as streaming is left to decide
    writer.join()
    assert not source.streamed and list(source) == records and list(source) == records
