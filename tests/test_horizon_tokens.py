import json

import pytest
import torch
from conftest import sentencepiece_tokenizer, synthetic_records

from lenvm import LengthValueModel
from lenvm.horizon_tokens import LengthTokenStats, length_token_stats
from lenvm.io import InputError
from lenvm.values_view import token_label, token_values


@pytest.fixture(scope="module")
def lenvm(tiny_path, tiny_generator):
    torch.manual_seed(0)
    return LengthValueModel.from_base(tiny_path, kind="attached", gamma=0.9, generator=tiny_generator)


def constructed() -> LengthTokenStats:
    stats = LengthTokenStats(gamma=0.99, threshold=0.01, min_count=3)
    stats.add(["wait", "a", "therefore", "\n\n"], [-0.05, 0.0, 0.02, 0.3])
    stats.add(["wait", "a", "therefore", "\n\n"], [-0.02, 0.005, 0.05, 0.1])
    stats.add(["wait", "a", "therefore", "wait"], [0.03, -0.005, -0.02, -0.011])
    stats.add(["rare"], [-1.0])
    return stats


def test_counts_on_constructed_residuals():
    stats = constructed()
    wait = stats.tokens["wait"]
    assert (wait.count, wait.longer, wait.shorter) == (4, 3, 1)
    assert wait.mean_residual == pytest.approx((-0.05 - 0.02 + 0.03 - 0.011) / 4)
    a = stats.tokens["a"]
    assert (a.count, a.longer, a.shorter) == (3, 0, 0)  # within +-threshold both ways
    therefore = stats.tokens["therefore"]
    assert (therefore.longer_fraction, therefore.shorter_fraction) == (pytest.approx(1 / 3), 2 / 3)
    assert stats.tokens["\n\n"].count == 2
    assert stats.completions == 4 and stats.total_tokens == 13


def test_top_respects_min_count_and_direction():
    stats = constructed()
    assert [s.token for s in stats.top(5, "longer")] == ["wait", "therefore"]  # "rare" has 1
    assert [s.token for s in stats.top(5, "shorter")] == ["therefore", "wait"]  # "\n\n" has 2
    stats.min_count = 2
    assert [s.token for s in stats.top(1, "shorter")] == ["\n\n"]
    stats.min_count = 1
    assert stats.top(1, "longer")[0].token == "rare"  # 1/1 beats 3/4
    with pytest.raises(InputError):
        stats.top(3, "sideways")


@pytest.mark.parametrize("threshold", [-0.1, float("nan")])
def test_a_threshold_must_be_a_non_negative_number(lenvm, tiny_generator, threshold):
    records = synthetic_records(tiny_generator[1], n_per_prompt=1)
    with pytest.raises(InputError, match="threshold must be a non-negative number"):
        length_token_stats(lenvm, records, threshold=threshold, progress=False)


def test_the_default_threshold_leaves_the_strongest_tenth_of_residuals_pushing(lenvm, tiny_generator):
    records = synthetic_records(tiny_generator[1], truncate_long=True)
    stats = length_token_stats(lenvm, records, min_count=1, progress=False)
    pushing = sum(s.longer + s.shorter for s in stats.tokens.values())
    assert stats.threshold > 0 and pushing == pytest.approx(0.1 * stats.total_tokens, abs=2)


def test_threshold_is_strict():
    stats = LengthTokenStats(gamma=0.99, threshold=0.01, min_count=1)
    stats.add(["x", "x", "x"], [-0.01, 0.01, -0.0100001])
    x = stats.tokens["x"]
    assert (x.longer, x.shorter) == (1, 0)
    with pytest.raises(ValueError):
        stats.add(["x"], [0.1, 0.2])


def test_to_dict_is_json():
    data = json.loads(json.dumps(constructed().to_dict(n=1)))
    assert data["tokens"] == 13 and data["completions"] == 4 and data["distinct_tokens"] == 5
    assert [d["token"] for d in data["longer"]] == ["wait"]
    assert data["longer"][0]["longer_fraction"] == 0.75


def test_plot_writes_png(tmp_path):
    stats = constructed()
    stats.add(["cost $5", "$x$"] * 3, [-0.5, 0.5] * 3)  # '$' must not break mathtext
    path = tmp_path / "plots" / "tokens.png"
    stats.plot(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    LengthTokenStats(gamma=0.9).plot(tmp_path / "empty.png")
    assert (tmp_path / "empty.png").stat().st_size > 0


def test_stats_over_rollouts_match_token_values(lenvm, tiny_generator):
    records = synthetic_records(tiny_generator[1], n_per_prompt=1, truncate_long=True)
    stats = length_token_stats(lenvm, records, threshold=0.0, min_count=1, batch_size=3, progress=False)
    assert stats.completions == len(records)
    assert stats.total_tokens == sum(len(r["completion_token_ids"]) for r in records)
    # Same residuals as one completion at a time (batching and padding change nothing).
    expected = LengthTokenStats(gamma=lenvm.gamma, threshold=0.0, min_count=1)
    for r in records:
        trace = token_values(
            lenvm, r["prompt"], r["completion_token_ids"], finished=r["finish_reason"] == "stop"
        )
        # Counted per token (its text alone), where the view shows a split character whole.
        texts = [token_label(lenvm.tokenizer, t.token_id) for t in trace.tokens]
        expected.add(texts, [t.residual for t in trace.tokens])
    assert set(stats.tokens) == set(expected.tokens)
    for text, s in stats.tokens.items():
        e = expected.tokens[text]
        assert (s.count, s.longer, s.shorter) == (e.count, e.longer, e.shorter)
        assert s.residual_sum == pytest.approx(e.residual_sum, abs=1e-5)


def test_exact_values_push_nowhere(lenvm, tiny_generator, monkeypatch):
    records = synthetic_records(tiny_generator[1], n_per_prompt=1)
    # Each finished row's inputs: prompt + completion without EOS -> (prompt length, L).
    rows = {
        tuple(r["prompt_token_ids"] + r["completion_token_ids"][:-1]): (
            len(r["prompt_token_ids"]),
            len(r["completion_token_ids"]),
        )
        for r in records
    }

    def forward(input_ids, attention_mask=None):
        out = torch.zeros(input_ids.shape, dtype=torch.float64)
        for row, n_real in enumerate(attention_mask.sum(1).tolist()):
            prompt_len, total = rows[tuple(input_ids[row, :n_real].tolist())]
            remaining = total - (torch.arange(input_ids.shape[1]) - (prompt_len - 1))
            out[row] = -(1 - lenvm.gamma ** remaining.clamp(0, total).double())
        return out.float()

    monkeypatch.setattr(lenvm, "forward", forward)
    stats = length_token_stats(lenvm, records, threshold=1e-5, min_count=1, progress=False)
    assert stats.total_tokens == sum(total for _, total in rows.values())
    assert all(s.longer == 0 and s.shorter == 0 for s in stats.tokens.values())
    assert max(abs(s.mean_residual) for s in stats.tokens.values()) < 1e-5


def test_no_usable_records_is_an_input_error(lenvm):
    with pytest.raises(InputError):
        length_token_stats(lenvm, [], progress=False)


def test_rollouts_the_lenvm_cannot_read_are_refused(lenvm, tiny_generator):
    """As calibration refuses them: an id past the vocabulary, or another tokenizer's prompt."""
    records = synthetic_records(tiny_generator[1], n_per_prompt=1)
    vocab = lenvm.backbone.get_input_embeddings().weight.shape[0]
    past = [dict(records[0], completion_token_ids=[vocab], num_tokens=1), *records[1:]]
    with pytest.raises(InputError, match=f"holds token id {vocab}, outside the vocabulary"):
        length_token_stats(lenvm, past, progress=False)
    shifted = [dict(r, prompt_token_ids=[t + 1 for t in r["prompt_token_ids"]]) for r in records]
    with pytest.raises(InputError, match="do not read back as its prompt"):
        length_token_stats(lenvm, shifted, progress=False)


def test_pieces_of_a_character_are_labelled_by_their_bytes(tiny_generator):
    """Byte-level BPE splits most Chinese characters and emoji; each piece alone decodes to U+FFFD.
    Labelled by its bytes, pieces are not pooled into one replacement character."""
    tok = tiny_generator[1]
    text = "用中文 🎉 hi"
    labels = [token_label(tok, i) for i in tok(text, add_special_tokens=False)["input_ids"]]
    assert not any("\ufffd" in label for label in labels)
    pieces = [label for label in labels if label.startswith("<0x")]
    assert len(set(pieces)) == len(pieces) == 13  # 3 characters of 3 bytes, an emoji of 4
    assert bytes(int(b, 16) for p in pieces for b in p[3:-1].split("><0x")).decode() == "用中文🎉"
    assert labels[-2:] == ["h", "i"]


@pytest.mark.parametrize("decoder", ["strip first space", "metaspace", "byte fallback"])
def test_a_word_start_and_a_piece_of_a_word_are_labelled_apart(decoder):
    """A decoder that drops the space at the start of a text (Llama, Mistral) reads "▁a" alone as
    "a"; its label keeps the space, so that word starts and pieces of words are not pooled."""
    tok = sentencepiece_tokenizer(decoder)
    labels = [token_label(tok, i) for i in (258, 261, 260, 2 + 0x20, 2 + 0xE4, 1)]
    assert labels == [" a", "a", " ", " ", "<0xE4>", "</s>"]  # "▁a", "a", "▁", <0x20>, <0xE4>, EOS
