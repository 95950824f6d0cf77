"""The candidate block: one forward that scores k next tokens per row exactly."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lenvm.decoding import streams
from lenvm.decoding.streams import Stream, packed_sdpa
from lenvm.hub import default_device
from lenvm.model import LengthValueModel

DEVICE = default_device()  # where the tiny generator loads: an accelerator when there is one
PROMPTS = [[5, 17, 30, 41, 52, 60, 7], [9, 12], [100, 101, 102, 103]]  # different lengths: padding
CANDIDATES = torch.tensor([[3, 4, 5, 6], [70, 71, 72, 73], [200, 201, 202, 5]], device=DEVICE)


@pytest.fixture(scope="module")
def body(tiny_generator):
    return tiny_generator[0].base_model


def alone(body, ids):
    """Hidden state of the last token of ``ids`` from a fresh forward without any cache."""
    with torch.no_grad():
        return body(input_ids=torch.tensor([ids], device=DEVICE)).last_hidden_state[0, -1]


def batch(body, together, feature_layer=-1):
    """The prompts prefilled in one padded forward, or one by one and then merged."""
    if together:
        return Stream.prefill(body, PROMPTS, feature_layer)
    return Stream.cat([Stream.prefill(body, [p], feature_layer) for p in PROMPTS])


def test_prefill_gives_each_rows_last_hidden_state(body):
    hidden = Stream.prefill(body, PROMPTS).last
    assert hidden.features is hidden.last  # the final layer: no second tensor
    for row, prompt in enumerate(PROMPTS):
        torch.testing.assert_close(hidden.last[row], alone(body, prompt), atol=1e-4, rtol=0)


@pytest.mark.parametrize("together", [True, False])
def test_candidate_block_matches_appending_each_candidate_alone(body, together):
    hidden = batch(body, together).forward(CANDIDATES).last
    assert hidden.shape == (3, 4, body.config.hidden_size)
    for row, prompt in enumerate(PROMPTS):
        for j in range(CANDIDATES.shape[1]):
            expected = alone(body, prompt + [int(CANDIDATES[row, j])])
            torch.testing.assert_close(hidden[row, j], expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("feature_layer", [None, 0, -1])
def test_candidate_block_values_match_a_full_forward(tiny_path, tiny_generator, feature_layer):
    lenvm = LengthValueModel.from_base(
        tiny_path, kind="attached", generator=tiny_generator, feature_layer=feature_layer
    )
    with torch.no_grad():
        stream = batch(lenvm.body, True, lenvm.feature_layer)
        values = lenvm.values_from_hidden(stream.forward(CANDIDATES).features)
        for row, prompt in enumerate(PROMPTS):
            for j in range(CANDIDATES.shape[1]):
                full = lenvm(torch.tensor([prompt + [int(CANDIDATES[row, j])]], device=DEVICE))[0, -1]
                assert abs(float(values[row, j]) - float(full)) < 1e-4


class _GroupedAttention(torch.nn.Module):
    num_key_value_groups = 3


@given(length=st.integers(1, 6), cached=st.integers(1, 9), seed=st.integers(0, 2**16))
@settings(max_examples=25, deadline=None)
def test_packed_sdpa_is_transformers_sdpa_without_the_copies(length, cached, seed):
    """Several queries of a grouped-query layer under a per-query mask: the heads of a group
    attend together, with the result of transformers' SDPA path."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    g = torch.Generator().manual_seed(seed)
    query = torch.randn(2, 6, length, 8, generator=g)
    key, value = (torch.randn(2, 2, cached + length, 8, generator=g) for _ in range(2))
    allowed = torch.rand(2, 1, length, cached + length, generator=g) < 0.7
    allowed[..., -1] = True  # every query sees something
    mask = torch.zeros(allowed.shape).masked_fill_(~allowed, torch.finfo(torch.float32).min)
    module = _GroupedAttention().eval()
    got, _ = packed_sdpa(module, query, key, value, mask, scaling=0.3)
    want, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.3)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_a_long_block_is_left_to_transformers_sdpa(monkeypatch):
    """A padded prefill's many queries go to transformers' function: repeating its mask per head
    would cost more than the copies packing saves."""
    calls = []
    monkeypatch.setattr(streams, "sdpa_attention_forward", lambda *args, **kwargs: calls.append(1))
    module = _GroupedAttention().eval()
    for length, delegated in ((8, False), (2 * 6 * 8 // 3 + 1, True)):  # 2 * heads * dim / groups
        calls.clear()
        key = value = torch.randn(1, 2, length, 8)
        packed_sdpa(module, torch.randn(1, 6, length, 8), key, value, torch.zeros(1, 1, length, length))
        assert bool(calls) == delegated


def test_a_candidate_block_runs_packed_attention_and_restores_sdpa(body, monkeypatch):
    """The tiny body is grouped-query (4 heads, 2 key/value heads) under SDPA: a candidate
    block's layers run packed_sdpa, and the body's attention is SDPA again afterwards."""
    config = body.config
    assert config._attn_implementation == "sdpa" and config.num_key_value_heads < config.num_attention_heads
    calls = []
    original = streams.packed_sdpa

    def spy(module, query, *args, **kwargs):
        calls.append(query.shape[2])
        return original(module, query, *args, **kwargs)

    monkeypatch.setitem(streams.AttentionInterface._global_mapping, streams.PACKED_SDPA, spy)
    stream = batch(body, True)  # a padded prefill runs it too (its mask hides the padding)
    calls.clear()
    stream.forward(CANDIDATES)
    assert calls == [CANDIDATES.shape[1]] * body.config.num_hidden_layers
    assert body.config._attn_implementation == "sdpa"


def test_keep_leaves_only_the_chosen_candidate_in_the_cache(body):
    stream = batch(body, True)
    stream.forward(CANDIDATES)
    choice = torch.tensor([2, 0, 3], device=DEVICE)
    stream.keep(choice)
    assert stream.mask.shape[1] == max(map(len, PROMPTS)) + 1
    for row, prompt in enumerate(PROMPTS):  # the kept candidate's state is the stream's last
        expected = alone(body, prompt + [int(CANDIDATES[row, choice[row]])])
        torch.testing.assert_close(stream.last.last[row], expected, atol=1e-4, rtol=0)
    nxt = torch.tensor([[11], [12], [13]], device=DEVICE)
    hidden = stream.forward(nxt).last
    stream.keep()
    for row, prompt in enumerate(PROMPTS):
        ids = prompt + [int(CANDIDATES[row, choice[row]]), int(nxt[row, 0])]
        torch.testing.assert_close(hidden[row, 0], alone(body, ids), atol=1e-4, rtol=0)


def test_discard_drops_the_block(body):
    stream = batch(body, False)
    stream.forward(CANDIDATES)
    stream.discard()
    hidden = stream.forward(torch.tensor([[8], [8], [8]], device=DEVICE)).last
    for row, prompt in enumerate(PROMPTS):
        torch.testing.assert_close(hidden[row, 0], alone(body, prompt + [8]), atol=1e-4, rtol=0)


def test_select_and_cat_keep_rows_exact(body):
    stream = batch(body, True)
    stream.select(torch.tensor([2, 1], device=DEVICE))  # the longest prompt leaves: common padding is trimmed
    assert stream.mask.shape[1] == 4
    joined = Stream.cat([stream, Stream.prefill(body, [PROMPTS[0]])])
    hidden = joined.forward(torch.tensor([[40, 41], [42, 43], [44, 45]], device=DEVICE)).last
    for row, prompt in enumerate([PROMPTS[2], PROMPTS[1], PROMPTS[0]]):
        for j in range(2):
            expected = alone(body, prompt + [40 + 2 * row + j])
            torch.testing.assert_close(hidden[row, j], expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("scored", [True, False])
def test_advance_keeps_a_scored_candidate_or_feeds_the_token(body, scored):
    """advance() moves a stream one token on whether or not a candidate block was fed; feed()
    appends tokens that were never candidates, dropping a pending block."""
    stream = batch(body, True)
    choice = torch.tensor([1, 3, 0], device=DEVICE)
    token = CANDIDATES.gather(1, choice[:, None])[:, 0]
    if scored:
        stream.forward(CANDIDATES)
    stream.advance(choice, token)
    assert stream.pending is None
    stream.forward(CANDIDATES)
    stream.feed(torch.tensor([[7, 8], [7, 8], [7, 8]], device=DEVICE))
    for row, prompt in enumerate(PROMPTS):
        expected = alone(body, prompt + [int(token[row]), 7, 8])
        torch.testing.assert_close(stream.last.last[row], expected, atol=1e-4, rtol=0)


def test_a_shallow_stream_gives_the_full_streams_features_from_fewer_layers(tiny_path, tiny_generator):
    """A stream that stops at the head's middle feature layer caches that many layers and gives
    the features of a full stream through prefill, candidate blocks, keep, feed, select and cat."""
    lenvm = LengthValueModel.from_base(tiny_path, kind="attached", generator=tiny_generator, feature_layer=1)
    full = Stream.prefill(lenvm.body, PROMPTS, 1)
    shallow = Stream.prefill(lenvm.body, PROMPTS[:2], 1, shallow=True)
    shallow = Stream.cat([shallow, Stream.prefill(lenvm.body, PROMPTS[2:], 1, shallow=True)])
    assert shallow.shallow and len(shallow.cache.layers) == 1 < len(full.cache.layers)
    torch.testing.assert_close(shallow.last.features, full.last.features, atol=1e-5, rtol=0)
    for stream in (full, shallow):
        stream.forward(CANDIDATES)
    torch.testing.assert_close(shallow.pending.features, full.pending.features, atol=1e-5, rtol=0)
    for stream in (full, shallow):
        stream.keep(torch.tensor([2, 0, 3], device=DEVICE))
        stream.feed(torch.tensor([[7, 8], [9, 10], [11, 12]], device=DEVICE))
        stream.select(torch.tensor([2, 0], device=DEVICE))
    torch.testing.assert_close(shallow.last.features, full.last.features, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="shallow"):
        Stream.cat([shallow, Stream.prefill(lenvm.body, PROMPTS[:1], 1)])
    # A last layer that is the feature layer, or the final normed output: nothing to skip.
    assert not Stream.prefill(lenvm.body, PROMPTS, -1, shallow=True).shallow
    assert not Stream.prefill(lenvm.body, PROMPTS, 2, shallow=True).shallow


@pytest.mark.parametrize("shallow", [False, True])
def test_a_prefix_resumed_gives_what_a_fresh_prefill_gives(tiny_path, tiny_generator, shallow):
    """Rows cut back to a prefix of what they hold (a prompt's start, or into the tokens fed after
    it) and resumed with their next token, together and beside a fresh prefill, give the same
    last hidden states, features and next-token logits as a fresh prefill of the same ids; the
    prefixes hold copies, not views of the batch's cache."""
    lenvm = LengthValueModel.from_base(tiny_path, kind="attached", generator=tiny_generator, feature_layer=1)
    lm_head = tiny_generator[0].get_output_embeddings()
    stream = Stream.prefill(lenvm.body, PROMPTS, 1, shallow=shallow)  # left-padded: rows of other lengths
    fed = torch.tensor([[7, 8, 9], [10, 11, 12], [13, 14, 15]], device=DEVICE)
    stream.feed(fed)
    held = [p + fed[row].tolist() for row, p in enumerate(PROMPTS)]
    # Row 0 cut into its answer, row 1 to its one-token prompt's start, row 2 to its whole prompt.
    cuts = [(0, len(PROMPTS[0]) + 2), (1, 1), (2, len(PROMPTS[2]))]
    rows = [held[row][:n] for row, n in cuts]
    prefixes = [stream.prefix(row, n - 1) for row, n in cuts]
    buffers = {layer.keys.untyped_storage().data_ptr() for layer in stream.cache.layers}
    assert all(
        layer.keys.untyped_storage().data_ptr() not in buffers for p in prefixes for layer in p.cache.layers
    )
    resumed = Stream.resume(prefixes, [r[-1] for r in rows])
    assert resumed.shallow == shallow
    # The same rows again, resumed beside a row prefilled fresh.
    beside = Stream.cat(
        [
            Stream.prefill(lenvm.body, [[5, 6]], 1, shallow=shallow),
            Stream.resume([stream.prefix(row, n - 1) for row, n in cuts], [r[-1] for r in rows]),
        ]
    )
    beside.select(torch.tensor([1, 2, 3], device=DEVICE))
    fresh = Stream.prefill(lenvm.body, rows, 1, shallow=shallow)
    for got in (resumed, beside):
        torch.testing.assert_close(got.last.features, fresh.last.features, atol=1e-5, rtol=0)
        if not shallow:
            torch.testing.assert_close(lm_head(got.last.last), lm_head(fresh.last.last), atol=1e-5, rtol=0)
    # And the next steps: a candidate block, then one more token.
    for stream in (resumed, fresh):
        stream.forward(CANDIDATES)
    torch.testing.assert_close(resumed.pending.features, fresh.pending.features, atol=1e-5, rtol=0)
    for stream in (resumed, fresh):
        stream.keep(torch.tensor([1, 2, 0], device=DEVICE))
        stream.feed(torch.tensor([[20], [21], [22]], device=DEVICE))
    torch.testing.assert_close(resumed.last.features, fresh.last.features, atol=1e-5, rtol=0)
    torch.testing.assert_close(resumed.positions, fresh.positions, atol=0, rtol=0)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 5), st.integers(0, 3)), min_size=1, max_size=12))
def test_appending_in_place_equals_concatenating(steps):
    """The cache grows in a buffer with room behind it: appending blocks and dropping trailing
    columns (as keep and discard do, through views) gives what concatenating copies gives."""
    from lenvm.decoding.streams import _appended

    generator = torch.Generator().manual_seed(len(steps))
    cached = expected = torch.randn(2, 3, 4, 8, generator=generator)
    for width, dropped in steps:
        new = torch.randn(2, 3, width, 8, generator=generator)
        cached, expected = _appended(cached, new), torch.cat([expected, new], dim=2)
        torch.testing.assert_close(cached, expected, atol=0, rtol=0)
        keep = max(cached.shape[2] - dropped, 1)
        cached, expected = cached[:, :, :keep], expected[:, :, :keep]
    torch.testing.assert_close(cached, expected, atol=0, rtol=0)


def test_a_step_writes_into_the_room_of_the_cache_it_extends(body):
    """After the first steps, a step reuses the cache's buffer instead of copying it."""
    stream = batch(body, True)
    for _ in range(2):
        stream.forward(CANDIDATES)
        stream.keep(torch.tensor([0, 1, 2], device=DEVICE))
    keys = stream.cache.layers[0].keys
    stream.forward(CANDIDATES)
    assert stream.cache.layers[0].keys.data_ptr() == keys.data_ptr()
