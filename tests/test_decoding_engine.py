"""The decoding engine end to end on the tiny model: every kind, every control, mixed batches."""

import math
from contextlib import contextmanager
from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lenvm.decoding import Control, Engine, Request, Result, SamplingParams, Scheduler
from lenvm.decoding.batch import Batch
from lenvm.decoding.engine import sentence_end_ids
from lenvm.decoding.params import MAX_TEMPERATURE, NATURAL_EOS
from lenvm.decoding.sequence import ATTEMPT_SEED_STEP, CLOSER_RETRIES, Sequence, best_of, retry_start
from lenvm.io import InputError
from lenvm.model import LengthValueModel, TokenizerMismatchError
from lenvm.prompts import encode_prompt
from lenvm.returns import length_to_value

PROMPTS = ["Tell me about the sea.", "Hi", "List three colors: red, green and blue, then explain why."]
CONTROLS = [
    Control("equal_to", target=6),
    Control("equal_to", target=6, rule="paper"),
    Control("at_most", target=5),
    Control("at_most", target=5, rule="paper", hard_cap_slack=0),
    Control("at_least", target=9),
    Control("at_least", target=9, rule="paper"),
    Control("tilt", beta=3.0),
    Control("tilt", beta=-3.0),
    Control(),
]


@pytest.fixture(scope="module")
def lenvms(tiny_path, tiny_generator):
    return {
        kind: LengthValueModel.from_base(tiny_path, kind=kind, generator=tiny_generator).eval()
        for kind in ("attached", "q", "standalone")
    }


@contextmanager
def ends_after_every_token(lenvm):
    """Make the LenVM predict, for every non-EOS candidate, that exactly one token (the EOS) is
    left after it: then equal_to N must end at exactly N tokens."""
    one_left = length_to_value(1.0, lenvm.gamma)
    saved = lenvm.values_from_hidden, lenvm.next_values_from_hidden
    lenvm.values_from_hidden = lambda h: torch.full(h.shape[:-1], one_left, device=h.device)
    lenvm.next_values_from_hidden = lambda h, ids: torch.full(ids.shape, one_left, device=ids.device)
    try:
        yield
    finally:
        lenvm.values_from_hidden, lenvm.next_values_from_hidden = saved


def full_forward_values(lenvm, result, eos_ids) -> torch.Tensor:
    """The LenVM's values of ``result``'s output tokens from one full forward over prompt and
    output (the q kind: its Q-head's predictions for them), 0 at EOS; float32, on the CPU."""
    ids = torch.tensor([result.prompt_token_ids + result.token_ids], device=lenvm.device)
    n = len(result.prompt_token_ids)
    with torch.no_grad():
        hidden = lenvm.features(ids)[0]
        if lenvm.config.kind == "q":
            steps = torch.arange(n - 1, ids.shape[1] - 1, device=ids.device)
            values = lenvm.next_values_from_hidden(hidden[steps], ids[0, n:, None])[:, 0]
        else:
            values = lenvm.values_from_hidden(hidden[n:])
    eos = torch.isin(ids[0, n:], torch.tensor(eos_ids, device=ids.device))
    return values.float().masked_fill(eos, 0.0).cpu()


def check(result, request, eos_ids):
    assert 1 <= len(result.token_ids) <= request.sampling.max_new_tokens
    ended = result.token_ids[-1] in eos_ids
    assert ended == (result.finish_reason in ("stop", "cap"))
    assert result.num_tokens == len(result.token_ids) - ended
    assert not any(t in eos_ids for t in result.token_ids[:-1])
    assert math.isfinite(result.mean_logprob) and result.mean_logprob < 0
    if request.return_values:
        assert len(result.values) == len(result.token_ids)
        assert all(-1 <= v <= 0 for v in result.values)


def test_plain_greedy_matches_transformers_generate(tiny_generator):
    from transformers import GenerationConfig

    model, tok = tiny_generator
    engine = Engine(model, tok)
    requests = [
        Request(p, SamplingParams(max_new_tokens=n, temperature=0))
        for p, n in zip(PROMPTS, [12, 3, 9], strict=True)
    ]
    results = engine.generate(requests, batch_size=2)  # the third request joins when the second ends
    for request, result in zip(requests, results, strict=True):
        ids = torch.tensor([encode_prompt(tok, request.prompt)], device=model.device)
        config = GenerationConfig(
            do_sample=False, max_new_tokens=request.sampling.max_new_tokens, eos_token_id=engine.eos_ids
        )
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), generation_config=config, pad_token_id=0
        )
        assert result.token_ids == out[0, ids.shape[1] :].tolist()
        check(result, request, engine.eos_ids)


def test_sampling_is_reproducible_per_request_whatever_the_batch(tiny_generator):
    model, tok = tiny_generator
    engine = Engine(model, tok)
    requests = [
        Request(p, SamplingParams(max_new_tokens=15, seed=i, top_p=0.9, top_k=50))
        for i, p in enumerate(PROMPTS)
    ]
    together = engine.generate(requests, batch_size=3)
    apart = [engine.generate([r])[0] for r in requests]
    assert [r.token_ids for r in together] == [r.token_ids for r in apart]
    assert len({tuple(r.token_ids) for r in together}) == 3


def test_negative_seeds_have_streams_of_their_own(tiny_generator):
    """vLLM takes any 64-bit seed: a negative one is reproducible and not a small seed's stream."""
    engine = Engine(*tiny_generator)

    def draw(seed):
        return engine.generate([Request("Hi", SamplingParams(max_new_tokens=15, seed=seed))])[0].token_ids

    draws = {seed: draw(seed) for seed in (-1, -2, -(2**63), 1, 2)}
    assert draws[-1] == draw(-1)
    assert len({tuple(d) for d in draws.values()}) == len(draws)


def test_mean_logprob_is_the_generators_own(tiny_generator):
    model, tok = tiny_generator
    engine = Engine(model, tok)
    request = Request(PROMPTS[0], SamplingParams(max_new_tokens=10, seed=3, temperature=0.7))
    result = engine.generate([request])[0]
    ids = torch.tensor([result.prompt_token_ids + result.token_ids], device=model.device)
    with torch.no_grad():
        logprobs = model(ids).logits[0, :-1].log_softmax(-1)
    n = len(result.prompt_token_ids)
    expected = logprobs[n - 1 :].gather(1, ids[0, n:, None]).mean()
    assert result.mean_logprob == pytest.approx(float(expected), abs=1e-4)


@pytest.mark.parametrize("kind", ["attached", "q", "standalone"])
def test_every_control_runs_for_every_kind_in_one_mixed_batch(tiny_generator, lenvms, kind):
    model, tok = tiny_generator
    engine = Engine(model, tok, lenvm=lenvms[kind], num_candidates=4)
    requests = [
        Request(
            PROMPTS[i % 3],
            SamplingParams(max_new_tokens=12, seed=i, temperature=i % 2),
            control=c,
            return_values=True,
        )
        for i, c in enumerate(CONTROLS)
    ]
    results = engine.generate(requests, batch_size=4)
    for request, result in zip(requests, results, strict=True):
        check(result, request, engine.eos_ids)
    # Mixed controls in one batch: each request gets what it would get alone.
    alone = [engine.generate([r])[0].token_ids for r in requests]
    assert [r.token_ids for r in results] == alone


@pytest.mark.parametrize("kind", ["attached", "q", "standalone"])
def test_returned_values_are_the_lenvm_values_of_the_output(tiny_generator, lenvms, kind):
    model, tok = tiny_generator
    lenvm = lenvms[kind]
    engine = Engine(model, tok, lenvm=lenvm, num_candidates=4)
    request = Request(
        PROMPTS[2],
        SamplingParams(max_new_tokens=8, seed=1),
        control=Control("tilt", beta=1.0),
        return_values=True,
    )
    result = engine.generate([request])[0]
    expected = full_forward_values(lenvm, result, engine.eos_ids)
    torch.testing.assert_close(torch.tensor(result.values), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", ["attached", "q", "standalone"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_equal_to_hits_the_target_with_an_exact_lenvm(tiny_generator, lenvms, kind, temperature):
    model, tok = tiny_generator
    engine = Engine(model, tok, lenvm=lenvms[kind], num_candidates=4)
    targets = [1, 4, 9]
    requests = [
        Request(
            PROMPTS[i],
            SamplingParams(max_new_tokens=20, seed=i, temperature=temperature),
            control=Control("equal_to", target=n),
        )
        for i, n in enumerate(targets)
    ]
    with ends_after_every_token(lenvms[kind]):
        results = engine.generate(requests)
    # The random generator's EOS is never likely: the policy wraps up within a few tokens
    for result, n in zip(results, targets, strict=True):
        assert n <= result.num_tokens <= n + 4
    assert [r.finish_reason for r in results] == ["stop"] * 3  # the policy ended, nothing forced


def test_greedy_requests_are_guided(tiny_generator, lenvms):
    model, tok = tiny_generator
    lenvm = lenvms["q"]
    engine = Engine(model, tok, lenvm=lenvm, num_candidates=4)
    plain = engine.generate([Request(PROMPTS[0], SamplingParams(max_new_tokens=6, temperature=0))])[0]
    # Values that make the generator's 2nd..4th choices look far shorter than its first.
    chosen = set(plain.token_ids)
    lenvm.next_values_from_hidden = lambda h, ids: torch.where(
        torch.isin(ids, torch.tensor(sorted(chosen), device=ids.device)), -0.99, -0.01
    )
    try:
        guided = engine.generate(
            [
                Request(
                    PROMPTS[0],
                    SamplingParams(max_new_tokens=6, temperature=0),
                    control=Control("tilt", beta=50.0),
                )
            ]
        )[0]
    finally:
        del lenvm.next_values_from_hidden
    assert not set(guided.token_ids) & chosen


def test_at_least_and_at_most_hold_with_an_exact_lenvm(tiny_generator, lenvms):
    model, tok = tiny_generator
    lenvm = lenvms["attached"]
    engine = Engine(model, tok, lenvm=lenvm, num_candidates=4)
    requests = [
        Request(p, SamplingParams(max_new_tokens=25, seed=i), control=Control("at_least", target=12))
        for i, p in enumerate(PROMPTS)
    ]
    requests += [
        Request(p, SamplingParams(max_new_tokens=25, seed=i), control=Control("at_most", target=7))
        for i, p in enumerate(PROMPTS)
    ]
    with ends_after_every_token(lenvm):
        results = engine.generate(requests)
    assert all(r.num_tokens >= 12 for r in results[:3])
    assert all(r.num_tokens <= 7 and r.finish_reason in ("stop", "cap") for r in results[3:])


def test_hard_cap_reports_cap(tiny_generator, lenvms):
    model, tok = tiny_generator
    lenvm = lenvms["standalone"]
    engine = Engine(model, tok, lenvm=lenvm, num_candidates=3)
    control = Control("equal_to", target=4, rule="paper", hard_cap_slack=2)
    # Every candidate looks very long: the paper's rule never picks EOS, so the cap has to fire.
    lenvm.values_from_hidden = lambda h: torch.full(h.shape[:-1], -0.999, device=h.device)
    try:
        result = engine.generate(
            [Request(PROMPTS[0], SamplingParams(max_new_tokens=30, seed=0), control=control)]
        )[0]
    finally:
        del lenvm.values_from_hidden
    assert result.finish_reason == "cap"
    assert result.num_tokens == 6
    assert result.token_ids[-1] in engine.eos_ids


def test_ignore_eos_runs_the_full_length(tiny_generator, lenvms):
    model, tok = tiny_generator
    engine = Engine(model, tok, lenvm=lenvms["q"], num_candidates=4)
    requests = [
        Request(p, SamplingParams(max_new_tokens=10, seed=0, ignore_eos=True), control=c)
        for p, c in zip(PROMPTS, CONTROLS, strict=False)
    ]
    assert all(r.num_tokens == 10 and r.finish_reason == "length" for r in engine.generate(requests))


def test_max_new_tokens_left_out_fits_what_the_context_leaves(tiny_generator):
    """The default (1024) within the tiny model's context of 1024 after the prompt, as the server
    and the CLI have it; given, it is kept, and too many is an error."""
    model, tok = tiny_generator
    engine = Engine(model, tok)
    prompt = "word " * 200
    room = engine.context - len(encode_prompt(tok, prompt))
    [result] = engine.generate([Request(prompt, SamplingParams(seed=0, ignore_eos=True))])
    assert result.num_tokens == room and result.finish_reason == "length"
    with pytest.raises(InputError, match=r"plus max_new_tokens \(1024\) exceeds the model's context"):
        engine.generate([Request(prompt, SamplingParams(max_new_tokens=1024))])


def test_an_engine_takes_loaded_models_not_their_names(tiny_generator):
    model, tok = tiny_generator
    with pytest.raises(
        InputError, match=r"Engine takes a loaded LengthValueModel .*from_pretrained\('my-lenvm'\)"
    ):
        Engine(model, tok, lenvm="my-lenvm")
    with pytest.raises(InputError, match=r"load_generator\('/path/gen'\) loads one\), got \(str, NoneType\)"):
        Engine("/path/gen", None)
    with pytest.raises(InputError, match=r"loaded \(model, tokenizer\) pair"):
        Engine(model, None)


def test_numpy_counts_are_taken(tiny_generator, lenvms):
    model, tok = tiny_generator
    request = Request("hi", SamplingParams(max_new_tokens=4, seed=0), control=Control("tilt", beta=2.0))
    answers = [
        Engine(model, tok, lenvm=lenvms["q"], num_candidates=k).generate([request], batch_size=b)[0].token_ids
        for k, b in ((np.int64(4), np.int64(2)), (4, 2))
    ]
    assert answers[0] == answers[1]  # the candidates NumPy counts choose among are the same
    assert len(lenvms["q"].predict_length(["a", "b"], batch_size=np.int64(1))) == 2


def test_a_prompt_may_hold_the_ids_every_model_embeds(tiny_path, lenvms):
    """Ids past the tokenizer's, in the rows a generator pads its embedding with, are a prompt; not
    where a standalone LenVM, whose own embedding has no such rows, reads the prompt too."""
    from lenvm.hub import load_generator

    model, tok = load_generator(tiny_path)  # a copy of its own, padded
    model.resize_token_embeddings(len(tok) + 8, mean_resizing=False)
    padding = Request([5, len(tok) + 7], SamplingParams(max_new_tokens=2))
    assert Engine(model, tok).generate([padding])[0].num_tokens >= 1
    standalone = Engine(model, tok, lenvm=lenvms["standalone"])
    with pytest.raises(
        InputError, match=rf"token id {len(tok) + 7}, outside the vocabulary \(0-{len(tok) - 1}\)$"
    ):
        standalone.generate([padding])


def test_no_answer_holds_an_id_a_standalone_lenvm_cannot_read(tiny_path, lenvms):
    """A generator that pads its embedding, and whose head favours the padding rows, beside a
    standalone LenVM of the unpadded model: no row generates an id past the LenVM's embedding, a
    plain row in the batch included (the LenVM reads every row once one is scored)."""
    from lenvm.hub import load_generator

    model, tok = load_generator(tiny_path)  # a copy of its own, padded
    model.resize_token_embeddings(len(tok) + 8, mean_resizing=False)
    with torch.no_grad():  # tied: the padding rows' logits beat EOS's
        embeddings = model.get_input_embeddings().weight
        embeddings[len(tok) :] = 3 * embeddings[tok.eos_token_id]
    sampling = SamplingParams(max_new_tokens=4, seed=0)
    plain = Engine(model, tok).generate([Request("hi", sampling)])[0]
    assert max(plain.token_ids) >= len(tok)  # without the LenVM, the padding rows are generated
    requests = [
        Request("hi", sampling, control=Control("tilt", beta=2.0)),
        Request("hi", sampling, return_values=True),
        Request("hi", sampling),
    ]
    results = Engine(model, tok, lenvm=lenvms["standalone"], num_candidates=4).generate(requests)
    assert all(max(r.token_ids) < len(tok) for r in results)


def test_bad_inputs_raise_input_errors(tiny_path, tiny_generator, lenvms):
    model, tok = tiny_generator
    engine = Engine(model, tok, lenvm=lenvms["q"])
    with pytest.raises(InputError, match="at least 2"):  # one candidate: a control has no choice
        Engine(model, tok, lenvm=lenvms["q"], num_candidates=1)
    bad_controls = [
        dict(kind="equal_to", target=0),
        dict(kind="at_most"),
        dict(kind="tilt", beta=float("inf")),
        dict(kind="tilt", beta=float("nan")),
        dict(kind="tilt"),
        dict(kind="shortest"),
        dict(kind="equal_to", target=5, rule="magic"),
        dict(kind="at_least", target=5, hard_cap_slack=1),
        dict(kind="at_most", target=5, hard_cap_slack=1),  # our at_most never passes its target
        dict(kind="equal_to", target=5, hard_cap_slack=-1),
        dict(kind="equal_to", target=5, best_of=17),  # each attempt a whole answer: at most 16
        dict(kind="equal_to", target=5, retries=10**9),
    ]
    for kwargs in bad_controls:
        with pytest.raises(InputError):
            Control(**kwargs)
    with pytest.raises(
        InputError,
        match=rf"the prompt holds token id {len(tok)}, outside the vocabulary \(0-{len(tok) - 1}\)$",
    ):
        engine.generate([Request([5, len(tok)])])  # one past the vocabulary
    with pytest.raises(InputError, match="a list of requests"):
        engine.generate(Request("hi"))
    with pytest.raises(InputError, match="list of token ids .Python ints., got Tensor"):
        engine.generate([Request(torch.tensor([1, 2]))])
    with pytest.raises(InputError, match="context"):
        engine.generate([Request("hi", control=Control("equal_to", target=10**6))])
    for kind in ("at_least", "equal_to"):  # the target's tokens and the EOS take 11
        with pytest.raises(InputError, match="never be met within max_new_tokens"):
            engine.generate(
                [Request("hi", SamplingParams(max_new_tokens=10), control=Control(kind, target=10))]
            )
    with pytest.raises(InputError, match="empty"):
        engine.generate([Request("")])
    short_sighted = LengthValueModel.from_base(tiny_path, kind="q", gamma=0.5, generator=tiny_generator)
    with pytest.raises(InputError, match="horizon"):  # 0.5**64: every value rounds to -1
        Engine(model, tok, lenvm=short_sighted).generate(
            [Request("hi", SamplingParams(max_new_tokens=100), control=Control("at_least", target=64))]
        )
    with pytest.raises(InputError, match="empty"):
        engine.generate([Request([{"role": "user", "content": "  "}])])
    for kwargs in [
        dict(temperature=-1),
        dict(top_p=0),
        dict(top_k=-2),
        dict(max_new_tokens=0),
        dict(min_p=1.5),
    ]:
        with pytest.raises(InputError):
            SamplingParams(**kwargs)
    for k in (0, -3, 1.5):
        with pytest.raises(InputError, match="num_candidates"):
            Engine(model, tok, lenvm=lenvms["q"], num_candidates=k)
    with pytest.raises(InputError, match="needs an engine with a LenVM"):
        Engine(model, tok).generate(
            [Request("hi", SamplingParams(max_new_tokens=8), control=Control("tilt", beta=1.0))]
        )

    other = LengthValueModel.from_base(tiny_path, kind="standalone")
    other.config.tokenizer_fingerprint = "0" * 16
    with pytest.raises(TokenizerMismatchError):
        Engine(model, tok, lenvm=other)
    from lenvm.hub import load_generator

    second = load_generator(tiny_path)
    with pytest.raises(InputError, match="generator=\\(model, tokenizer\\)"):
        Engine(second[0], second[1], lenvm=lenvms["attached"])


@pytest.mark.parametrize("kind", ["attached", "standalone"])
def test_naive_candidate_scoring_matches_the_block(tiny_generator, lenvms, kind):
    model, tok = tiny_generator
    requests = [
        Request(p, SamplingParams(max_new_tokens=10, seed=i), control=c, return_values=True)
        for i, (p, c) in enumerate(
            zip(PROMPTS, [Control("tilt", beta=3.0), Control(), CONTROLS[0]], strict=True)
        )
    ]
    block, naive = (
        Engine(model, tok, lenvm=lenvms[kind], num_candidates=4, candidate_scoring=scoring).generate(
            requests, batch_size=2
        )
        for scoring in ("block", "naive")
    )
    assert [r.token_ids for r in naive] == [r.token_ids for r in block]
    for a, b in zip(naive, block, strict=True):
        torch.testing.assert_close(torch.tensor(a.values), torch.tensor(b.values), atol=1e-4, rtol=0)
    with pytest.raises(InputError, match="naive"):
        Engine(model, tok, lenvm=lenvms["q"], candidate_scoring="naive")
    with pytest.raises(InputError, match="candidate_scoring"):
        Engine(model, tok, lenvm=lenvms[kind], candidate_scoring="fast")


@pytest.mark.parametrize("kind", ["attached", "q"])
def test_half_precision_generator_with_a_float32_head(tiny_path, kind):
    """A bfloat16 generator keeps its dtype, the head stays in float32, and the values the engine
    returns are the LenVM's values of the output, as a full forward in the same precision gives
    them."""
    from lenvm.hub import load_generator

    model, tokenizer = load_generator(tiny_path, dtype=torch.bfloat16)
    lenvm = LengthValueModel.from_base(tiny_path, kind=kind, generator=(model, tokenizer)).eval()
    assert next(lenvm.head.parameters()).dtype == torch.float32
    assert next(model.parameters()).dtype == torch.bfloat16
    request = Request(
        "Hi", SamplingParams(max_new_tokens=6, seed=0), control=Control("tilt", beta=1.0), return_values=True
    )
    [result] = Engine(model, tokenizer, lenvm=lenvm, num_candidates=3).generate([request])
    expected = full_forward_values(lenvm, result, lenvm.config.eos_token_ids)
    # bfloat16 keeps about 3 significant digits: the cached and the full forward differ that much
    torch.testing.assert_close(torch.tensor(result.values), expected, atol=2e-2, rtol=0)


def test_best_of_returns_the_best_of_its_attempts(tiny_generator, lenvms):
    """best_of=3 runs three attempts with their own random streams (the request's seed stepped
    by ATTEMPT_SEED_STEP) and keeps the best; run alone, each attempt gives the same answer."""
    model, tok = tiny_generator
    engine = Engine(model, tok, lenvm=lenvms["attached"], num_candidates=4)
    control = Control("equal_to", target=6)
    chosen = engine.generate(
        [
            Request(
                PROMPTS[0],
                SamplingParams(max_new_tokens=20, seed=7),
                control=Control("equal_to", target=6, best_of=3),
            )
        ]
    )[0]
    alone = engine.generate(
        [
            Request(
                PROMPTS[0],
                SamplingParams(max_new_tokens=20, seed=(7 + a * ATTEMPT_SEED_STEP) % 2**63),
                control=control,
            )
            for a in range(3)
        ]
    )
    assert len({tuple(r.token_ids) for r in alone}) > 1  # the attempts differ
    assert chosen.token_ids == best_of(alone, 6, NATURAL_EOS).token_ids


def _result(num_tokens, eos_prob, finish_reason="stop"):
    ids = list(range(num_tokens)) + ([2] if finish_reason == "stop" else [])
    return Result([1], ids, "", num_tokens, finish_reason, None, -1.0, eos_prob)


def test_best_of_prefers_a_natural_ending_then_the_closest():
    natural_far, unnatural_exact, natural_near = _result(40, 0.3), _result(32, 0.001), _result(35, 0.06)
    assert best_of([natural_far, unnatural_exact, natural_near], 32, NATURAL_EOS) is natural_near
    assert best_of([unnatural_exact, _result(31, 0.01)], 32, NATURAL_EOS) is unnatural_exact  # none natural
    assert best_of([_result(32, None, "length"), natural_far], 32, NATURAL_EOS) is natural_far
    short, long = _result(30, 0.3), _result(36, 0.3)  # 2 short weighs 5, more than 4 past
    assert best_of([short, long], 32, NATURAL_EOS) is long


def test_best_of_for_a_bound_prefers_one_that_meets_it_then_the_likeliest_end():
    """Attempts of a bound that never ended naturally: one that meets the bound (At Most: the
    bound itself meets it), then the one whose final EOS the generator found likeliest."""
    at_bound, shorter, over = _result(20, 0.04), _result(15, 0.001), _result(21, 0.045)
    assert best_of([shorter, at_bound, over], 20, NATURAL_EOS, "at_most") is at_bound
    under, at_target, longer = _result(19, 0.045), _result(20, 0.001), _result(25, 0.04)
    assert best_of([under, at_target, longer], 20, NATURAL_EOS, "at_least") is longer


def test_best_of_is_checked():
    with pytest.raises(InputError, match="best_of"):
        Control("equal_to", target=5, best_of=0)
    with pytest.raises(InputError, match="equal_to"):
        Control("at_most", target=5, best_of=2)


def _equal_to(seed, retries, target=8, natural_eos=NATURAL_EOS):
    control = Control("equal_to", target=target, retries=retries, natural_eos=natural_eos)
    return Request(
        PROMPTS[seed % 3], SamplingParams(max_new_tokens=30, seed=seed), control=control, return_values=True
    )


def test_an_end_that_is_not_natural_is_resampled(tiny_generator, lenvms):
    """The random generator never gives EOS a fair chance, so no end is natural: one retry
    samples the answer anew (the last retry starts from the beginning); the result is the
    attempt closest to the target, and its cost counts both."""
    model, tok = tiny_generator
    engine = Engine(model, tok, lenvm=lenvms["attached"], num_candidates=4)
    first = engine.generate([_equal_to(seed, 0) for seed in range(4)])
    again = engine.generate([_equal_to(seed, 1) for seed in range(4)])
    for a, b in zip(first, again, strict=True):
        assert not a.natural and a.retries == 0 and a.decoded_tokens == len(a.token_ids)
        assert b.retries == 1 and b.decoded_tokens > len(a.token_ids)
        assert abs(b.num_tokens - 8) <= abs(a.num_tokens - 8)  # the closer of the two ends


def test_a_retry_goes_back_to_the_start_of_a_sentence(tiny_generator):
    """Retry a of R keeps the answer up to a / R of the target before the target, cut back to
    just after the last sentence end before that point."""
    _, tok = tiny_generator
    ends = sentence_end_ids(tok)
    dot = tok.convert_tokens_to_ids(".")
    word = tok.encode("sea", add_special_tokens=False)[0]
    assert dot in ends and word not in ends
    answer = [word] * 10 + [dot] + [word] * 11 + [tok.eos_token_id]
    kept = [retry_start(answer, 22, 20, a, 4, ends) for a in range(1, 5)]
    # back 5, 10, 15, 20 tokens from the target (20): the first cut moves back to the "."
    assert kept == [11, 10, 5, 0]
    assert retry_start(answer[:8], 7, 20, 1, 4, ends) == 2  # a short answer: from its end


def test_an_engine_with_a_lenvm_finds_sentence_ends_before_it_decodes(tiny_generator, lenvms, monkeypatch):
    """Decoding the whole vocabulary takes a while on a real tokenizer: an engine that can retry
    (one with a LenVM) does it when built, not at its first retry while other requests wait."""
    model, tok = tiny_generator
    whole_vocabulary = []
    original = type(tok).batch_decode

    def batch_decode(self, sequences, *args, **kwargs):
        if len(sequences) == len(tok):
            whole_vocabulary.append(len(sequences))
        return original(self, sequences, *args, **kwargs)

    monkeypatch.setattr(type(tok), "batch_decode", batch_decode)
    engine = Engine(model, tok, lenvm=lenvms["attached"], num_candidates=4)
    assert len(whole_vocabulary) == 1
    request = Request(
        PROMPTS[0], SamplingParams(max_new_tokens=12, seed=0), control=Control("at_most", target=5)
    )
    assert engine.generate([request])[0].retries > 0
    assert len(whole_vocabulary) == 1 and engine.sentence_ends == sentence_end_ids(tok)


def test_at_most_writes_its_first_attempt_unguided_then_starts_over_under_guidance(tiny_generator):
    """An At Most answer's first attempt is the generator's alone; one that reached the bound
    starts over (nothing of it kept), guided; later retries go back from the target as usual.
    Without retries, or for another control, no attempt is left to the generator."""
    _, tok = tiny_generator
    word = tok.encode("sea", add_special_tokens=False)[0]

    def sequence(control):
        seq = Sequence.start(
            0, Request("Hi", SamplingParams(max_new_tokens=40, seed=0), control=control), [1], 0, "cpu"
        )
        seq.tokens = [word] * 20
        return seq

    seq = sequence(Control("at_most", target=20))
    assert seq.free
    seq.retry(seq.result(tok), sentence_end_ids(tok))
    assert not seq.free and seq.tokens == [] and len(seq.missed) == 1
    seq.tokens = [word] * 20
    seq.retry(seq.result(tok), sentence_end_ids(tok))
    assert len(seq.tokens) == 20 - 10  # retry 2 of 4: back 2/4 of the target
    assert not sequence(Control("at_most", target=20, retries=0)).free
    assert not sequence(Control("at_most", target=20, rule="paper")).free
    assert not sequence(Control("equal_to", target=20)).free


def _written(control, length, natural_at, max_new_tokens=40, ended=True):
    """An attempt of ``length`` tokens (then, if ``ended``, an EOS: chosen where ``length`` is in
    ``natural_at``, else forced at the cap) whose generator gave EOS 20% at the positions
    ``natural_at`` and 1% elsewhere."""
    request = Request("Hi", SamplingParams(max_new_tokens=max_new_tokens, seed=0), control=control)
    seq = Sequence.start(0, request, [1], 0, "cpu")
    for i in range(length + ended):
        end = (2, math.log(0.2 if i in natural_at else 0.01))
        eos = ended and i == length
        seq.append(2 if eos else 7 + i, eos and i not in natural_at, end[1] if eos else -1.0, 0.5, {2}, end)
    return seq


@pytest.mark.parametrize(
    ("control", "length", "ended", "cut"),
    [
        (Control("at_most", target=20), 20, True, 12),  # the last natural position within the bound
        (Control("at_least", target=8), 40, False, 10),  # the first at or past the target
        (Control("at_least", target=30), 40, False, None),  # none past the target
        (Control("at_least", target=10), 40, False, 10),  # one exactly at the target
    ],
)
def test_an_answer_that_did_not_end_naturally_ends_where_its_own_text_could_have(
    tiny_generator, control, length, ended, cut
):
    """An At Most answer stopped at its bound, or an At Least answer cut at max_new_tokens, ends
    instead at a position of its own text where the generator gave EOS at least 5% and the bound
    holds: the text before it is kept as written, an EOS added; nowhere such, it stays as it was."""
    _, tok = tiny_generator
    seq = _written(control, length, natural_at={3, 10, 12, 25}, ended=ended)
    before = seq.result(tok)
    assert not before.natural
    assert seq.end_earlier(before) == (cut is not None)
    after = seq.result(tok)
    if cut is None:
        assert after == before
        return
    assert after.natural and after.finish_reason == "stop" and after.num_tokens == cut
    assert after.token_ids == before.token_ids[:cut] + [2]
    assert after.eos_prob == pytest.approx(0.2) and after.decoded_tokens == before.decoded_tokens


def test_an_answer_is_never_ended_before_its_first_token_nor_under_ignore_eos(tiny_generator):
    """A natural EOS chance at position 0 would make the answer empty; under ignore_eos an answer
    runs to max_new_tokens whatever chances its text gave."""
    _, tok = tiny_generator
    seq = _written(Control("at_most", target=20), 20, natural_at={0})
    assert not seq.end_earlier(seq.result(tok)) and seq.result(tok).num_tokens == 20
    control = Control("at_most", target=20)
    request = Request("Hi", SamplingParams(max_new_tokens=20, seed=0, ignore_eos=True), control=control)
    seq = Sequence.start(0, request, [1], 0, "cpu")
    for i in range(20):
        seq.append(7 + i, False, -1.0, 0.5, {2}, (2, math.log(0.2 if i == 12 else 0.01)))
    assert not seq.end_earlier(seq.result(tok)) and seq.result(tok).num_tokens == 20


def test_an_at_most_answer_with_no_natural_end_in_any_attempt_ends_where_its_text_came_closest(
    tiny_generator,
):
    """With no natural position within the bound and no retry left, an At Most answer stopped at
    its bound ends instead where its own text gave EOS the highest probability (4% after token 9
    here), if higher than at the bound; while retries remain it is left for them. At Least keeps
    its answer (tried: it changed nothing measurable)."""
    _, tok = tiny_generator
    at_most, cut = Control("at_most", target=20, retries=2), 9
    chances = {5: 0.03, 9: 0.04, 15: 0.035}  # 15: past At Least's target below

    def ended_unnaturally(own_eos: float, control: Control = at_most) -> Sequence:
        request = Request("Hi", SamplingParams(max_new_tokens=40, seed=0), control=control)
        seq = Sequence.start(0, request, [1], 0, "cpu")
        for i in range(21):
            p = chances.get(i, 0.001) if i < 20 else own_eos
            seq.append(
                2 if i == 20 else 7 + i, False, math.log(p) if i == 20 else -1.0, 0.5, {2}, (2, math.log(p))
            )
        return seq

    seq = ended_unnaturally(1e-6)
    before = seq.result(tok)
    assert not seq.end_earlier(before)  # two retries left
    seq.missed = [before, before]
    assert seq.end_earlier(before)
    after = seq.result(tok)
    assert after.num_tokens == cut and after.token_ids == before.token_ids[:cut] + [2]
    assert after.eos_prob == pytest.approx(chances[cut]) and not after.natural
    likelier_own_end = ended_unnaturally(0.045)
    likelier_own_end.missed = [before, before]
    assert not likelier_own_end.end_earlier(likelier_own_end.result(tok))
    seq = ended_unnaturally(1e-6, Control("at_least", target=12, retries=2))
    seq.missed = [before, before]
    assert not seq.end_earlier(seq.result(tok))


def test_an_equal_to_answer_with_no_natural_end_in_any_attempt_ends_near_its_target(tiny_generator):
    """With no natural position anywhere and no retry left, an Equal To answer that ran past its
    target ends instead within CLOSE_ENOUGH of it (by miss), where its own text gave EOS the
    highest probability there (2% after token 41 of a target of 40), though a natural position
    far before the target is in its text; not while retries remain, nor where an attempt ended
    naturally, nor where its own end is that near already, nor where its own EOS or that of an
    earlier attempt was likelier."""
    _, tok = tiny_generator
    control = Control("equal_to", target=40, retries=2)
    # 3: a natural position, but much further from the target than the answer's own end; 30:
    # likelier than 41, but far from the target
    chances = {3: 0.2, 30: 0.04, 41: 0.02, 42: 0.01}

    def ended_unnaturally(length: int, own_eos: float = 1e-6) -> Sequence:
        request = Request("Hi", SamplingParams(max_new_tokens=60, seed=0), control=control)
        seq = Sequence.start(0, request, [1], 0, "cpu")
        for i in range(length + 1):
            p = chances.get(i, 0.001) if i < length else own_eos
            end = (2, math.log(p))
            seq.append(2 if i == length else 7 + i, False, end[1] if i == length else -1.0, 0.5, {2}, end)
        return seq

    seq = ended_unnaturally(45)
    before = seq.result(tok)
    assert not before.natural and not seq.end_earlier(before)  # two retries left
    seq.missed = [before, before]
    assert seq.end_earlier(before)
    after = seq.result(tok)
    assert after.num_tokens == 41 and after.token_ids == before.token_ids[:41] + [2]
    assert after.eos_prob == pytest.approx(0.02) and not after.natural
    near_already = ended_unnaturally(42)
    near_already.missed = [before, before]
    assert not near_already.end_earlier(near_already.result(tok))
    likelier_own_end = ended_unnaturally(45, own_eos=0.03)
    likelier_own_end.missed = [before, before]
    assert not likelier_own_end.end_earlier(likelier_own_end.result(tok))
    seq = ended_unnaturally(45)
    seq.missed = [before, likelier_own_end.result(tok)]  # an earlier attempt ended likelier (3%)
    assert not seq.end_earlier(seq.result(tok))
    natural_before = _written(control, 44, natural_at={44})
    seq = ended_unnaturally(45)
    seq.missed = [before, natural_before.result(tok)]
    assert not seq.end_earlier(seq.result(tok))


@pytest.mark.parametrize(
    ("target", "length", "cut"),
    [
        (11, 20, 12),  # an end that is not natural: the natural position nearest the target
        (11, 25, 12),  # a natural end too far past the target
        (14, 20, 12),  # two tokens short (5: a shortfall weighs 2.5 times) is nearer than six past
        (14, 16, None),  # two past is nearer than two short
        (12, 25, 12),  # exactly on target
        (30, 25, None),  # a natural end nearer than any earlier position
        (25, 25, None),  # and on target
    ],
)
def test_an_equal_to_answer_ends_where_its_own_text_ends_nearer_its_target(
    tiny_generator, target, length, cut
):
    """An Equal To answer ends at the position of its own text where the generator gave EOS at
    least 5% nearest its target, where that is nearer than its own end (natural or not)."""
    _, tok = tiny_generator
    seq = _written(Control("equal_to", target=target), length, natural_at={3, 10, 12, 25})
    before = seq.result(tok)
    assert seq.end_earlier(before) == (cut is not None)
    after = seq.result(tok)
    assert (
        after.num_tokens == (cut or length) and after.token_ids[:-1] == before.token_ids[: after.num_tokens]
    )
    assert after.natural or cut is None


def test_an_equal_to_tie_goes_to_a_natural_end(tiny_generator):
    """A natural position as near as an end that is not natural replaces it; one as near as a
    natural end does not."""
    _, tok = tiny_generator
    unnatural = _written(Control("equal_to", target=11), 13, natural_at={10})  # 2.5 against 2 past
    assert not unnatural.end_earlier(unnatural.result(tok))
    unnatural = _written(Control("equal_to", target=8), 13, natural_at={6})  # 2 short (5), 5 past
    assert unnatural.end_earlier(unnatural.result(tok)) and unnatural.result(tok).num_tokens == 6
    natural = _written(Control("equal_to", target=8), 13, natural_at={6, 13})
    assert not natural.end_earlier(natural.result(tok))


@pytest.mark.parametrize(
    ("control", "length", "retry"),
    [
        (Control("equal_to", target=20), 21, False),  # within 5% of the target: kept
        (Control("equal_to", target=20), 22, True),  # two past: resampled
        (Control("equal_to", target=20), 19, True),  # one short weighs 2.5
        (Control("equal_to", target=20, retries=0), 22, False),
        (Control("equal_to", target=20, rule="paper", retries=4), 22, False),
        (Control("at_most", target=20), 12, False),  # a bound met: nothing to get closer to
        (Control("at_least", target=8), 22, False),
    ],
)
def test_a_natural_equal_to_end_far_from_its_target_is_resampled(tiny_generator, control, length, retry):
    """Our Equal To rule resamples a natural end more than CLOSE_ENOUGH of the target away (by
    miss), at most CLOSER_RETRIES times; any other natural end is final."""
    _, tok = tiny_generator
    seq = _written(control, length, natural_at={length})
    result = seq.result(tok)
    assert result.natural and seq.may_retry(result) == retry
    if retry:
        for _ in range(CLOSER_RETRIES):
            seq.retry(result, frozenset())
        assert not seq.may_retry(result) and control.max_retries > CLOSER_RETRIES


def test_once_an_end_was_natural_the_closest_natural_end_is_returned(tiny_generator):
    """After a natural end was resampled, an attempt that ends otherwise is not retried, and the
    result is the natural end closest to the target (by miss), with the cost of every attempt."""
    _, tok = tiny_generator
    control = Control("equal_to", target=20)
    seq = _written(control, 25, natural_at={25})
    far = seq.result(tok)
    seq.retry(far, frozenset())
    kept = len(seq.tokens)
    for i in range(kept, 22):  # the second attempt ends at 21 tokens, where the generator gave EOS 20%
        end = (2, math.log(0.2 if i == 21 else 0.01))
        seq.append(2 if i == 21 else 7 + i, False, end[1] if i == 21 else -1.0, 0.5, {2}, end)
    nearer = seq.result(tok)
    assert nearer.natural and nearer.num_tokens == 21 and not seq.may_retry(nearer)
    final = seq.final(nearer)
    assert final.token_ids == nearer.token_ids and final.decoded_tokens == 26 + 22 - kept
    seq = _written(control, 25, natural_at={25})
    seq.retry(seq.result(tok), frozenset())
    cut = _written(control, 30, natural_at=set(), ended=False)
    seq.tokens, seq.ends, seq.finish_reason = cut.tokens, cut.ends, "length"
    assert not seq.may_retry(seq.result(tok))  # not natural, but a natural end is in hand
    assert seq.final(seq.result(tok)).num_tokens == 25


@pytest.mark.parametrize(
    "control",
    [
        Control("at_most", target=20, retries=0),  # one pass: a stream may have sent the tokens already
        Control("at_most", target=20, rule="paper"),
        Control("equal_to", target=12, retries=0),
        Control("equal_to", target=12, rule="paper"),
    ],
)
def test_only_our_rules_with_retries_end_an_answer_earlier(tiny_generator, control):
    _, tok = tiny_generator
    seq = _written(control, 20, natural_at={12})
    assert not seq.end_earlier(seq.result(tok)) and len(seq.tokens) == 21


def test_the_engine_takes_an_earlier_natural_end_before_it_spends_a_retry(
    tiny_generator, lenvms, monkeypatch
):
    """The engine asks an answer that did not end naturally for an earlier end of its own text
    first, and returns that end, with no retry, where there is one."""
    model, tok = tiny_generator
    engine = Engine(model, tok, lenvm=lenvms["attached"], num_candidates=4)
    asked = []

    def end_after_two(seq, result):  # as if the generator had given EOS 100% after two tokens
        asked.append(result.num_tokens)
        seq.tokens[2:], seq.logprobs[2:], seq.values[2:] = [engine.eos_ids[0]], [0.0], [0.0]
        seq.finish_reason, seq.eos_logprob = "stop", 0.0
        return True

    monkeypatch.setattr(Sequence, "end_earlier", end_after_two)
    control = Control("at_most", target=6, natural_eos=1.0)  # no EOS the generator gives is natural
    result = engine.generate([Request("Hi", SamplingParams(max_new_tokens=20, seed=0), control=control)])[0]
    assert asked == [6]  # the unguided first attempt, stopped at the bound
    assert result.num_tokens == 2 and result.retries == 0 and result.eos_prob == 1.0


def test_each_row_carries_its_resampled_ends_to_the_policy(tiny_generator):
    """At Least widens its window with every end already resampled, so the batch's rows carry
    each answer's retries (a retried answer rejoins the batch)."""
    model, tok = tiny_generator
    engine = Engine(model, tok)
    word = tok.encode("sea", add_special_tokens=False)[0]
    request = Request("Hi", SamplingParams(max_new_tokens=40, seed=0), control=Control("at_least", target=10))
    seqs = [Sequence.start(i, request, [1], 0, "cpu") for i in range(2)]
    for _ in range(2):
        seqs[0].tokens = [word] * 14
        seqs[0].retry(seqs[0].result(tok), sentence_end_ids(tok))
    assert Batch.join(engine, None, seqs).rows.retries.tolist() == [2, 0]


@given(
    tokens=st.lists(st.integers(0, 3), min_size=1, max_size=40),
    target=st.integers(1, 50),
    retries=st.integers(1, 6),
    data=st.data(),
)
def test_retry_start_moves_back_with_each_attempt(tokens, target, retries, data):
    """Each retry keeps no more than the one before, never more than the answer or the target,
    and the last keeps nothing; a cut lands on the start of a sentence or where the ratio said."""
    ends = frozenset({0})
    num_tokens = data.draw(st.integers(0, len(tokens)))
    kept = [retry_start(tokens, num_tokens, target, a, retries, ends) for a in range(1, retries + 1)]
    assert kept == sorted(kept, reverse=True) and kept[-1] == 0
    assert all(0 <= k <= min(num_tokens, target) for k in kept)
    assert all(
        k == 0 or tokens[k - 1] in ends or k == min(num_tokens, target) - -(-a * target // retries)
        for a, k in zip(range(1, retries + 1), kept, strict=True)
    )


def test_a_higher_bar_for_natural_ends_is_met_by_waiting_or_retrying(ending_path, eos_generator):
    """With EOS made likely and the bar for a natural end set at the median of the first ends'
    EOS probabilities, half of them miss it. With the bar, the policy chooses EOS only where the
    generator clears it (or past its give-up point) and retries the rest: every answer clears
    it or has used every retry, and more clear it than before."""
    import statistics

    model, tok = eos_generator
    lenvm = LengthValueModel.from_base(ending_path, kind="attached", generator=eos_generator).eval()
    engine = Engine(model, tok, lenvm=lenvm, num_candidates=4)
    first = engine.generate([_equal_to(seed, 0) for seed in range(8)])
    bar = statistics.median(r.eos_prob or 0.0 for r in first)
    again = engine.generate([_equal_to(seed, 3, natural_eos=bar) for seed in range(8)])
    assert all(b.ended_above(bar) or b.retries == 3 for b in again)
    assert sum(b.ended_above(bar) for b in again) > sum(a.ended_above(bar) for a in first)


def test_natural_ends_are_kept_as_they_are(tiny_generator, lenvms):
    model, tok = tiny_generator
    lenvm = lenvms["attached"]
    with ends_after_every_token(lenvm):  # every EOS counts as natural at a bar of 0
        results = Engine(model, tok, lenvm=lenvm, num_candidates=4).generate(
            [_equal_to(s, 3, natural_eos=0.0) for s in range(3)]
        )
    assert all(r.retries == 0 and r.finish_reason == "stop" for r in results)
    # Every position is natural: an answer that ran past its target ends at it instead (its own
    # text up to there, with the cost of the tokens it decoded); any other is kept as it is.
    assert all(
        r.num_tokens == 8 or (r.num_tokens < 8 and r.decoded_tokens == len(r.token_ids)) for r in results
    )


def test_retries_do_not_depend_on_the_batch(tiny_generator, lenvms):
    """A retried request rejoins whatever batch is running; its answer is the one it gets alone."""
    model, tok = tiny_generator
    engine = Engine(model, tok, lenvm=lenvms["q"], num_candidates=4)
    requests = [_equal_to(seed, 3, target=5 + seed) for seed in range(5)]
    together = engine.generate(requests, batch_size=2)
    for request, result in zip(requests, together, strict=True):
        alone = engine.generate([request])[0]
        assert alone.token_ids == result.token_ids and alone.retries == result.retries == 3
        assert alone.decoded_tokens == result.decoded_tokens


def test_best_of_counts_the_cost_of_every_attempt(tiny_generator, lenvms):
    """The tokens decoded for a best_of request are those of its attempts, each of which decodes
    what it decodes alone."""
    model, tok = tiny_generator
    engine = Engine(model, tok, lenvm=lenvms["q"], num_candidates=4)
    control = Control("equal_to", target=6, best_of=3, retries=0)
    result = engine.generate(
        [Request(PROMPTS[0], SamplingParams(max_new_tokens=20, seed=7), control=control)]
    )[0]
    single = Control("equal_to", target=6, retries=0)
    attempts = engine.generate(
        [
            Request(
                PROMPTS[0],
                SamplingParams(max_new_tokens=20, seed=(7 + a * ATTEMPT_SEED_STEP) % 2**63),
                control=single,
            )
            for a in range(3)
        ]
    )
    assert result.decoded_tokens == sum(len(r.token_ids) for r in attempts)
    assert result.token_ids in [r.token_ids for r in attempts]


def test_retries_are_checked():
    for kind in ("equal_to", "at_most", "at_least"):
        assert Control(kind, target=5).max_retries == 4
        assert Control(kind, target=5, rule="paper").max_retries == 0
        assert Control(kind, target=5, rule="paper", retries=2).max_retries == 2
    assert Control("tilt", beta=1.0).max_retries == 0
    with pytest.raises(InputError, match="retries"):
        Control("equal_to", target=5, retries=-1)
    with pytest.raises(InputError, match="retries"):
        Control("equal_to", target=5, retries=1.5)
    with pytest.raises(InputError, match="target controls"):
        Control("tilt", beta=1.0, retries=2)


def _apply(updates, streamed: dict, results: dict) -> None:
    """What a client of the scheduler does with a step's updates: each answer's tokens so far,
    and its result once final."""
    for update in updates:
        tokens = streamed.setdefault(update.key, [])
        del tokens[update.start :]
        tokens.extend(update.tokens)
        if update.result is not None:
            results[update.key] = update.result


def test_requests_join_a_running_scheduler_and_leave_when_aborted(tiny_generator, lenvms):
    """A request added while others decode joins the batch at the next step and gets the answer
    it gets alone; an aborted request frees its row and never reports a result."""
    from lenvm.decoding import Scheduler

    model, tok = tiny_generator
    engine = Engine(model, tok, lenvm=lenvms["attached"], num_candidates=4)
    requests = [
        Request(p, SamplingParams(max_new_tokens=12, seed=i), control=c)
        for i, (p, c) in enumerate(zip(PROMPTS, [Control("tilt", beta=2.0), None, CONTROLS[0]], strict=True))
    ]
    scheduler = Scheduler(engine, batch_size=3)
    assert scheduler.step() == []  # idle: nothing to report
    scheduler.add(requests[0], "a")
    scheduler.add(requests[2], "gone")
    with pytest.raises(InputError, match="'a' is already queued or running"):
        scheduler.add(requests[1], "a")
    streamed: dict[str, list[int]] = {}
    results = {}
    for step in range(40):
        if step == 3:
            scheduler.add(requests[1], "b")  # joins at the next step
            scheduler.abort("gone")
            assert scheduler.running == 1
        _apply(scheduler.step(), streamed, results)
        if not scheduler.busy:
            break
    assert set(results) == {"a", "b"} and not scheduler.busy
    for key, request in (("a", requests[0]), ("b", requests[1])):
        alone = engine.generate([request])[0]
        assert results[key].token_ids == alone.token_ids == streamed[key]
    # A best_of request aborted after some of its attempts finished leaves nothing behind: its
    # key may be used again.
    best = Request(
        "Hi", SamplingParams(max_new_tokens=12, seed=0), control=Control("equal_to", target=4, best_of=3)
    )
    scheduler = Scheduler(engine, batch_size=1)
    scheduler.add(best, "k")
    while "k" not in scheduler.tried:
        scheduler.step()
    with pytest.raises(InputError, match="'k' is already queued or running"):
        scheduler.add(best, "k")
    scheduler.abort("k")
    assert not scheduler.tried and not scheduler.busy
    scheduler.add(best, "k")


def test_updates_show_where_a_retry_resampled_the_end(tiny_generator, lenvms):
    from lenvm.decoding import Scheduler

    model, tok = tiny_generator
    scheduler = Scheduler(Engine(model, tok, lenvm=lenvms["q"], num_candidates=4))
    scheduler.add(_equal_to(0, 2), 0)
    seen, rewinds, result = [], 0, None
    while scheduler.busy:
        for update in scheduler.step():
            rewinds += update.start < len(seen)
            del seen[update.start :]
            seen.extend(update.tokens)
            result = update.result or result
    assert result.retries == 2 and rewinds == 2  # the random generator never ends naturally
    assert result.decoded_tokens > len(seen)  # every attempt's tokens count, not only the last one's


def test_updates_add_up_to_the_result_when_an_answer_ends_earlier(tmp_path, monkeypatch):
    """An answer cut back to an earlier natural end (Sequence.end_earlier) says so in its update:
    a client applying every update holds the answer's tokens."""
    from lenvm.decoding import Scheduler
    from lenvm.decoding.sequence import Sequence
    from lenvm.hub import load_generator
    from lenvm.testing import tiny_model

    cuts = []
    original = Sequence.end_earlier
    monkeypatch.setattr(Sequence, "end_earlier", lambda self, r: cuts.append(original(self, r)) or cuts[-1])
    model, tok = load_generator(tiny_model(tmp_path / "m", eos_logit=3.0))  # natural ends are common
    lenvm = LengthValueModel.from_base(tmp_path / "m", generator=(model, tok), gamma=0.95)
    scheduler = Scheduler(Engine(model, tok, lenvm=lenvm, num_candidates=8), batch_size=4)
    for seed in range(16):
        scheduler.add(
            Request("Hi", SamplingParams(max_new_tokens=30, seed=seed), control=Control("at_most", target=6)),
            seed,
        )
    streamed: dict[int, list[int]] = {}
    results = {}
    while scheduler.busy:
        _apply(scheduler.step(), streamed, results)
    assert any(cuts) and len(results) == 16
    # (After a retry the result may be an earlier attempt's answer, as Update says.)
    kept = [key for key, result in results.items() if result.retries == 0]
    assert kept and all(streamed[key] == results[key].token_ids for key in kept)


def test_token_id_prompts_are_taken_as_they_are(tiny_generator):
    model, tok = tiny_generator
    engine = Engine(model, tok)
    sampling = SamplingParams(max_new_tokens=6, seed=3)
    templated = engine.generate([Request("Hi", sampling)])[0]
    as_ids = engine.generate([Request(encode_prompt(tok, "Hi"), sampling)])[0]
    assert as_ids.prompt_token_ids == templated.prompt_token_ids
    assert as_ids.token_ids == templated.token_ids
    raw = tok("Hi")["input_ids"]  # no template: another prompt
    assert engine.generate([Request(raw, sampling)])[0].prompt_token_ids == raw
    with pytest.raises(InputError, match="outside the vocabulary"):
        engine.generate([Request([1, len(tok) + 5], sampling)])


def test_logprobs_and_top_alternatives(tiny_generator, lenvms):
    from lenvm.decoding import Scheduler

    model, tok = tiny_generator
    engine = Engine(model, tok, lenvm=lenvms["attached"], num_candidates=4)
    plain = Request("Hi", SamplingParams(max_new_tokens=8, seed=1, top_logprobs=3))
    guided = Request("Hi", SamplingParams(max_new_tokens=8, seed=1), control=Control("tilt", beta=2.0))
    results = engine.generate([plain, guided])
    for result in results:
        assert len(result.logprobs) == len(result.token_ids)
        assert result.mean_logprob == pytest.approx(sum(result.logprobs) / len(result.logprobs))
    assert results[1].top_logprobs is None
    # The alternatives are the generator's own most likely tokens, best first; the chosen token's
    # log-probability is among them whenever it is one of them.
    prompt_ids = results[0].prompt_token_ids
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + results[0].token_ids], device=model.device)).logits[
            0, len(prompt_ids) - 1 :
        ]
    expected = logits.log_softmax(-1)
    for t, (token, top) in enumerate(zip(results[0].token_ids, results[0].top_logprobs, strict=True)):
        assert [i for i, _ in top] == expected[t].topk(3).indices.tolist()
        assert [lp for _, lp in top] == pytest.approx(expected[t].topk(3).values.tolist(), abs=1e-4)
        assert results[0].logprobs[t] == pytest.approx(expected[t, token].item(), abs=1e-4)
    # Updates carry each token's log-probability and alternatives as it is chosen.
    scheduler = Scheduler(engine)
    scheduler.add(plain, "p")
    seen = []
    while scheduler.busy:
        for update in scheduler.step():
            seen.append((update.tokens, update.logprobs, update.top_logprobs))
    assert [t[0] for t, _, _ in seen] == results[0].token_ids
    assert [lp[0] for _, lp, _ in seen] == pytest.approx(results[0].logprobs)
    for (_, _, top), alone in zip(seen, results[0].top_logprobs, strict=True):
        assert [i for i, _ in top[0]] == [i for i, _ in alone]
        assert [lp for _, lp in top[0]] == pytest.approx([lp for _, lp in alone], abs=1e-5)


def test_top_logprobs_is_checked():
    with pytest.raises(InputError, match="top_logprobs"):
        SamplingParams(top_logprobs=21)
    assert "top_logprobs" not in SamplingParams(top_logprobs=2).policy()


def test_a_top_k_beyond_the_vocabulary_keeps_every_token(tiny_generator):
    model, tok = tiny_generator
    engine = Engine(model, tok)
    results = engine.generate(
        [Request("Hi", SamplingParams(max_new_tokens=5, seed=2, top_k=k)) for k in (0, len(tok), 10**12)]
    )
    assert results[0].token_ids == results[1].token_ids == results[2].token_ids


@contextmanager
def predicted_lengths(lenvm, lengths_by_prompt_size):
    """Make the LenVM predict a chosen length per prompt (by its token count), counting calls."""
    calls = []
    saved = lenvm.values_of_prompts

    def fake(encoded, batch_size=16, progress=False):
        calls.append(len(encoded))
        return [float(length_to_value(lengths_by_prompt_size[len(e.ids)], lenvm.gamma)) for e in encoded]

    lenvm.values_of_prompts = fake
    try:
        yield calls
    finally:
        lenvm.values_of_prompts = saved


def admission_order(scheduler, arrivals):
    """Run ``scheduler``, adding ``arrivals[step]`` (key -> request) before each step; returns the
    keys in the order their first token came out."""
    order, step = [], 0
    while scheduler.busy or step in arrivals:
        for key, request in arrivals.get(step, {}).items():
            scheduler.add(request, key)
        order += [u.key for u in scheduler.step() if u.start == 0 and u.key not in order]
        step += 1
    return order


def test_shortest_queue_admits_the_shortest_prediction_first_and_ages(tiny_generator, lenvms):
    model, tok = tiny_generator
    lenvm = lenvms["attached"]
    prompts = {name: "word " * size for name, size in [("x", 1), ("a", 2), ("c", 3), ("d", 4)]}
    sizes = {name: len(encode_prompt(tok, text)) for name, text in prompts.items()}
    predicted = dict(zip(sizes.values(), [1.0, 50.0, 10.0, 30.0], strict=True))
    plain = SamplingParams(max_new_tokens=3, temperature=0, ignore_eos=True)  # 3 steps each

    def request(name):
        return Request(prompts[name], plain)

    # x and a wait at step 0, c comes at step 1; when x is done (step 3), c has the shorter prediction.
    arrivals = {0: {"x": request("x"), "a": request("a"), "d": request("d")}, 1: {"c": request("c")}}
    with predicted_lengths(lenvm, predicted) as calls:
        engine = Engine(model, tok, lenvm=lenvm, queue="shortest", queue_aging=0.0)
        assert admission_order(Scheduler(engine, batch_size=1), arrivals) == ["x", "c", "d", "a"]
        assert calls == [3, 1]  # one forward for the requests of step 0, one for c
        # With fast ageing, a and d's head start outweighs their longer predictions.
        engine = Engine(model, tok, lenvm=lenvm, queue="shortest", queue_aging=100.0)
        assert admission_order(Scheduler(engine, batch_size=1), arrivals) == ["x", "d", "a", "c"]
    # First come, first served (the default) ignores predictions.
    engine = Engine(model, tok, lenvm=lenvm)
    assert admission_order(Scheduler(engine, batch_size=1), arrivals) == ["x", "a", "d", "c"]


def test_shortest_queue_with_retries_while_others_wait(tiny_generator, lenvms):
    """Retries go back to the queue (first in line) while other requests wait: each request gets
    the answer it gets alone."""
    model, tok = tiny_generator
    engine = Engine(model, tok, lenvm=lenvms["attached"], num_candidates=4, queue="shortest")
    never_natural = Control("at_most", target=4, natural_eos=1.0)  # every end is retried
    requests = [
        Request(p, SamplingParams(max_new_tokens=12, seed=i), control=never_natural)
        for i, p in enumerate(PROMPTS)
    ]
    results = engine.generate(requests, batch_size=1)
    assert all(r.retries == never_natural.max_retries for r in results)
    assert [r.token_ids for r in results] == [engine.generate([q])[0].token_ids for q in requests]


@pytest.mark.parametrize("queue", ["fcfs", "shortest"])
def test_a_retry_keeps_its_place_at_the_head_of_the_queue(tiny_generator, lenvms, queue):
    """With one row, a request whose end is resampled runs again at once, ahead of the requests
    still waiting: each request's steps are one unbroken run."""
    model, tok = tiny_generator
    scheduler = Scheduler(
        Engine(model, tok, lenvm=lenvms["attached"], num_candidates=4, queue=queue), batch_size=1
    )
    never_natural = Control("at_most", target=3, natural_eos=1.0)  # every end is retried
    for i, prompt in enumerate(PROMPTS):
        scheduler.add(Request(prompt, SamplingParams(max_new_tokens=8, seed=i), control=never_natural), i)
    order, results = [], {}
    while scheduler.busy:
        for update in scheduler.step():
            if not order or order[-1] != update.key:
                order.append(update.key)
            if update.result is not None:
                results[update.key] = update.result
    assert all(r.retries == never_natural.max_retries > 0 for r in results.values())
    assert sorted(order) == list(range(len(PROMPTS)))  # no request came back after another ran


def test_queue_options_are_checked(tiny_generator, lenvms):
    model, tok = tiny_generator
    with pytest.raises(InputError, match="give lenvm"):
        Engine(model, tok, queue="shortest")
    with pytest.raises(InputError, match="queue must be"):
        Engine(model, tok, lenvm=lenvms["attached"], queue="random")
    with pytest.raises(InputError, match="ageing"):
        Engine(model, tok, lenvm=lenvms["attached"], queue="shortest", queue_aging=-1.0)


# -- natural endings for every target control ---------------------------------------------------


@pytest.mark.parametrize("kind", ["attached", "q", "standalone"])
def test_at_most_leaves_an_answer_that_fits_as_the_generator_gives_it(ending_path, eos_generator, kind):
    """At Most's first attempt is the generator's own (the same random stream): an answer that
    fits is the unguided one, whatever the LenVM expects. In one pass (no retries) the row is
    left to the generator while the LenVM is confident that the answer fits; a LenVM that expects
    a long answer steers, and then the answer changes."""
    model, tok = eos_generator
    lenvm = LengthValueModel.from_base(ending_path, kind=kind, generator=eos_generator).eval()
    engine = Engine(model, tok, lenvm=lenvm, num_candidates=4)
    sampling = [SamplingParams(max_new_tokens=40, seed=s, temperature=0.8) for s in range(6)]
    plain = engine.generate([Request(PROMPTS[s % 3], sp) for s, sp in enumerate(sampling)])
    assert all(r.finish_reason == "stop" and r.num_tokens <= 30 for r in plain)
    guided = [
        Request(PROMPTS[s % 3], sp, control=Control("at_most", target=30)) for s, sp in enumerate(sampling)
    ]
    with ends_after_every_token(lenvm):
        assert [r.token_ids for r in engine.generate(guided)] == [r.token_ids for r in plain]
    one_pass = [replace(r, control=Control("at_most", target=30, retries=0)) for r in guided]
    with ends_after_every_token(lenvm):
        assert [r.token_ids for r in engine.generate(one_pass)] == [r.token_ids for r in plain]
    long_answer = length_to_value(200.0, lenvm.gamma)
    saved = lenvm.values_from_hidden, lenvm.next_values_from_hidden
    lenvm.values_from_hidden = lambda h: torch.full(h.shape[:-1], long_answer, device=h.device)
    lenvm.next_values_from_hidden = lambda h, ids: torch.full(ids.shape, long_answer, device=ids.device)
    try:
        first_free, steered = engine.generate(guided), engine.generate(one_pass)
    finally:
        lenvm.values_from_hidden, lenvm.next_values_from_hidden = saved
    assert [r.token_ids for r in first_free] == [r.token_ids for r in plain]
    assert [r.token_ids for r in steered] != [r.token_ids for r in plain]


def _unguided_batch() -> list[Request]:
    """At Most requests on their first attempt (the generator's alone) and a plain request beside
    them: every row draws its own token until an At Most answer goes back from its bound."""
    at_most = [
        Request(
            PROMPTS[s % 3],
            SamplingParams(max_new_tokens=14, seed=s, temperature=0.9),
            control=Control("at_most", target=6),
            return_values=True,
        )
        for s in range(3)
    ]
    return [*at_most, Request(PROMPTS[1], SamplingParams(max_new_tokens=14, seed=7), return_values=True)]


@pytest.mark.parametrize("kind", ["attached", "q", "standalone"])
def test_a_step_where_every_row_draws_its_own_token_scores_one_candidate(
    tiny_generator, lenvms, kind, monkeypatch
):
    """A row that draws its own token has that token as its only candidate: when every row of a
    step does, the LenVM scores one column, not num_candidates copies of it. A row guided by its
    candidates brings them back."""
    model, tok = tiny_generator
    engine = Engine(model, tok, lenvm=lenvms[kind], num_candidates=4)
    widths = []
    score = engine.scorer_type.score
    monkeypatch.setattr(
        engine.scorer_type,
        "score",
        lambda self, ids, eos: widths.append(ids.shape[1]) or score(self, ids, eos),
    )
    scheduler = Scheduler(engine, batch_size=5)
    for key, request in enumerate(_unguided_batch()):
        scheduler.add(request, key)
    for _ in range(3):
        scheduler.step()
    guided = Request(
        PROMPTS[0], SamplingParams(max_new_tokens=30, seed=9), control=Control("equal_to", target=20)
    )
    scheduler.add(guided, "guided")
    scheduler.step()
    assert widths == [1, 1, 1, 4]


@pytest.mark.parametrize("kind", ["attached", "q", "standalone"])
def test_rows_that_draw_their_own_token_get_the_same_answers_alone_as_beside_guided_rows(
    tiny_generator, lenvms, kind
):
    """The same requests decode alike whether every row of a step draws its own token (one
    candidate each) or a guided row beside them keeps the candidate block num_candidates wide:
    the same tokens, retries and cost, and the same values and log-probabilities up to float
    rounding (other block widths and batch sizes round differently)."""
    model, tok = tiny_generator
    engine = Engine(model, tok, lenvm=lenvms[kind], num_candidates=4)
    requests = _unguided_batch()
    guided = Request(
        PROMPTS[0], SamplingParams(max_new_tokens=30, seed=9), control=Control("equal_to", target=20)
    )
    alone = engine.generate(requests, batch_size=5)
    beside = engine.generate([*requests, guided], batch_size=5)[:-1]
    assert all(r.retries > 0 for r in alone[:3])  # each At Most answer went on under guidance
    for a, b in zip(alone, beside, strict=True):
        assert (a.token_ids, a.finish_reason, a.retries, a.decoded_tokens) == (
            b.token_ids,
            b.finish_reason,
            b.retries,
            b.decoded_tokens,
        )
        assert a.values == pytest.approx(b.values, abs=1e-5)
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)
        assert (a.eos_prob or 0.0, a.mean_logprob) == pytest.approx(
            (b.eos_prob or 0.0, b.mean_logprob), abs=1e-5
        )


def test_bounds_resample_ends_that_are_not_natural_and_still_meet_the_bound(tiny_generator, lenvms):
    """The random generator never gives EOS a fair chance: At Most answers reach their bound and
    At Least answers their give-up point; each is resampled, and what comes back meets its bound,
    ended with EOS (never cut at max_new_tokens), with the cost of every attempt counted."""
    model, tok = tiny_generator
    engine = Engine(model, tok, lenvm=lenvms["attached"], num_candidates=4)
    requests = [
        Request(
            PROMPTS[s % 3],
            SamplingParams(max_new_tokens=12, seed=s),
            control=Control(kind, target=n, retries=2),
        )
        for s in range(3)
        for kind, n in (("at_most", 5), ("at_least", 6))
    ]
    for request, result in zip(requests, engine.generate(requests), strict=True):
        control = request.control
        assert not result.natural and result.retries == 2
        assert result.decoded_tokens > len(result.token_ids)
        assert result.finish_reason in ("stop", "cap")
        if control.kind == "at_most":
            assert result.num_tokens <= 5
        else:
            assert 6 <= result.num_tokens <= 11


def test_greedy_decoding_makes_no_retry_or_attempt_that_would_repeat_itself(tiny_generator, lenvms):
    """Greedy decoding from a state it decoded before, under the same policy, writes the same
    tokens: Equal To's retries and best_of's other attempts are not made; At Most's first retry
    (from its unguided attempt to guidance) and At Least's (a wider window) still are."""
    model, tok = tiny_generator
    engine = Engine(model, tok, lenvm=lenvms["attached"], num_candidates=4)

    def run(control: Control, temperature: float) -> Result:
        sampling = SamplingParams(max_new_tokens=14, seed=0, temperature=temperature)
        return engine.generate([Request(PROMPTS[0], sampling, control=control)])[0]

    sampled = run(Control("equal_to", target=5, retries=2), 1.0)
    assert not sampled.natural and sampled.retries == 2  # the random generator never ends naturally
    greedy = run(Control("equal_to", target=5, retries=2), 0.0)
    # One pass's tokens (its end may then move nearer the target: no retry is left).
    one_pass = run(Control("equal_to", target=5, retries=0), 0.0)
    assert greedy.retries == 0 and greedy.decoded_tokens == one_pass.decoded_tokens == len(one_pass.token_ids)
    best = run(Control("equal_to", target=5, retries=0, best_of=3), 0.0)
    assert best.token_ids == run(Control("equal_to", target=5, retries=0), 0.0).token_ids
    assert best.decoded_tokens == len(best.token_ids)
    at_most = run(Control("at_most", target=5, retries=3), 0.0)
    assert at_most.retries == 1
    # No retry is left once the rest would replay: the answer ends as with exactly that many.
    assert at_most.token_ids == run(Control("at_most", target=5, retries=1), 0.0).token_ids
    assert run(Control("at_least", target=6, retries=2), 0.0).retries == 2


@pytest.mark.parametrize("kind", ["attached", "q"])
def test_retries_of_every_control_do_not_depend_on_the_batch(tiny_generator, lenvms, kind):
    model, tok = tiny_generator
    engine = Engine(model, tok, lenvm=lenvms[kind], num_candidates=4)
    controls = [
        Control("equal_to", target=5, retries=2),
        Control("at_most", target=4, retries=3),
        Control("at_least", target=6, retries=1),
        Control("tilt", beta=1.0),
        None,
    ]
    requests = [
        Request(PROMPTS[i % 3], SamplingParams(max_new_tokens=14, seed=i), control=c)
        for i, c in enumerate(controls * 2)
    ]
    together = engine.generate(requests, batch_size=3)
    for request, result in zip(requests, together, strict=True):
        alone = engine.generate([request])[0]
        assert alone.token_ids == result.token_ids and alone.retries == result.retries
        assert alone.decoded_tokens == result.decoded_tokens


def _retry_requests():
    """Requests that retry (every Equal To and At Most end is not natural for the random
    generator; At Most's unguided first attempt starts over with nothing kept, one of them from a
    one-token prompt), beside plain and tilted ones."""
    never_natural = Control("at_most", target=4, natural_eos=1.0, retries=2)
    return [
        _equal_to(0, 3, target=6),
        Request(PROMPTS[1], SamplingParams(max_new_tokens=10, seed=1)),
        _equal_to(2, 2, target=9),
        Request([5], SamplingParams(max_new_tokens=8, seed=3), control=never_natural),
        Request(PROMPTS[2], SamplingParams(max_new_tokens=10, seed=4), control=Control("tilt", beta=1.0)),
        _equal_to(5, 1, target=4),
        Request(PROMPTS[0], SamplingParams(max_new_tokens=8, seed=6), control=never_natural),
    ]


def _run_with_joins(engine, requests) -> dict:
    """The requests' results through a scheduler of three rows, half of them added after the
    first steps (they join a running batch); checks at every step that only a waiting retry
    holds kept caches."""
    scheduler = Scheduler(engine, batch_size=3)
    results = {}
    for i, request in enumerate(requests[:3]):
        scheduler.add(request, i)
    steps = 0
    while scheduler.busy:
        if steps == 4:
            for i, request in enumerate(requests[3:], start=3):
                scheduler.add(request, i)
        for update in scheduler.step():
            if update.result is not None:
                results[update.key] = update.result
        steps += 1
        running = scheduler.batch.seqs if scheduler.batch is not None else []
        assert all(s.kept is None for s in running)
        assert all(s.missed for s in scheduler.waiting if s.kept is not None)
    return results


@pytest.mark.parametrize("kind", ["attached", "q", "standalone"])
def test_a_retry_rejoining_from_its_kept_caches_decodes_what_a_prefill_would(
    tiny_generator, lenvms, kind, monkeypatch
):
    """Retries rejoin the batch from the caches they kept when they left; their answers (tokens,
    values, retries, cost) are those of retries prefilled again."""
    model, tok = tiny_generator
    engine = Engine(model, tok, lenvm=lenvms[kind], num_candidates=4)
    requests = _retry_requests()
    reused = _run_with_joins(engine, requests)
    assert sum(r.retries for r in reused.values()) >= 6
    leave = Batch.leave
    monkeypatch.setattr(
        Batch, "leave", lambda self, engine, finished, retrying=(): leave(self, engine, finished)
    )
    prefilled = _run_with_joins(engine, requests)
    assert set(reused) == set(prefilled) == set(range(len(requests)))
    for key, result in reused.items():
        again = prefilled[key]
        assert result.token_ids == again.token_ids
        assert (result.retries, result.decoded_tokens) == (again.retries, again.decoded_tokens)
        if result.values is not None:
            assert result.values == pytest.approx(again.values, abs=1e-5)


def test_a_retry_is_not_prefilled_again(tiny_generator, lenvms, monkeypatch):
    """Only the prompts are prefilled: a retry, whatever it keeps of its answer (the whole
    prompt's cache where it keeps none of it), rejoins from the caches it kept."""
    from lenvm.decoding.streams import Stream

    model, tok = tiny_generator
    engine = Engine(model, tok, lenvm=lenvms["standalone"], num_candidates=4)
    prefilled = []
    prefill = Stream.prefill.__func__

    def counted(cls, body, rows, *args, **kwargs):
        prefilled.extend(rows)
        return prefill(cls, body, rows, *args, **kwargs)

    monkeypatch.setattr(Stream, "prefill", classmethod(counted))
    # Every row needs values from the start: no batch's LenVM stream is prefilled late.
    requests = [replace(r, return_values=True) for r in _retry_requests()]
    results = engine.generate(requests, batch_size=2)
    assert sum(r.retries for r in results) >= 6
    # Each prompt twice: the generator's stream and the standalone LenVM's own.
    assert len(prefilled) == 2 * len(requests)


def test_an_aborted_retry_lets_go_of_its_kept_caches(tiny_generator, lenvms):
    import gc
    import weakref

    model, tok = tiny_generator
    scheduler = Scheduler(Engine(model, tok, lenvm=lenvms["standalone"], num_candidates=4))
    scheduler.add(_equal_to(0, 2), "r")
    scheduler.step()
    while not scheduler.waiting:  # until the answer leaves to retry
        scheduler.step()
    kept = scheduler.waiting[0].kept
    assert kept is not None and kept[1] is not None  # the standalone LenVM's stream too
    refs = [weakref.ref(s) for s in kept]
    del kept
    scheduler.abort("r")
    gc.collect()
    assert not scheduler.busy and all(r() is None for r in refs)


def test_truncation_that_leaves_only_eos_does_not_end_a_target_short(tmp_path):
    """A short answer's EOS can hold more than top-p: truncation then keeps EOS alone (and a low
    temperature leaves it alone with a probability). Equal To and At Least must still go on to
    their target (from the distribution before truncation); an unguided answer under the same
    truncation ends at once."""
    from lenvm.hub import load_generator
    from lenvm.testing import tiny_model

    model, tok = load_generator(tiny_model(tmp_path / "m", eos_logit=12.0))
    lenvm = LengthValueModel.from_base(tmp_path / "m", generator=(model, tok), gamma=0.9)
    engine = Engine(model, tok, lenvm=lenvm, num_candidates=4)
    sampling = SamplingParams(max_new_tokens=40, top_p=0.9, seed=0)
    plain, at_least, equal_to, paper = engine.generate(
        [
            Request("Hi", sampling),
            Request("Hi", sampling, control=Control("at_least", target=20)),
            Request("Hi", sampling, control=Control("equal_to", target=20)),
            Request("Hi", sampling, control=Control("at_least", target=20, rule="paper")),
        ]
    )
    assert plain.num_tokens == 0
    assert at_least.num_tokens >= 20 and paper.num_tokens >= 20
    assert equal_to.num_tokens >= 10
    # A low temperature rounds every probability but EOS's to 0, with no truncation at all.
    cold = SamplingParams(max_new_tokens=40, temperature=0.01, seed=0)
    controls = [Control("at_least", target=20), Control("at_least", target=20, rule="paper")]
    for result in engine.generate([Request("Hi", cold, control=c) for c in controls]):
        assert result.num_tokens >= 20
    equal_to = engine.generate([Request("Hi", cold, control=Control("equal_to", target=20))])[0]
    assert equal_to.num_tokens >= 10


def test_a_low_temperature_that_rounds_eos_away_still_ends_a_target(tmp_path):
    """The mirror case: EOS below the top token rounds to probability 0 at temperature 0.01. Equal
    To and At Least must still be able to end (by max_new_tokens at the latest), not be cut."""
    from lenvm.hub import load_generator
    from lenvm.testing import tiny_model

    model, tok = load_generator(tiny_model(tmp_path / "m", eos_logit=-2.0))
    lenvm = LengthValueModel.from_base(tmp_path / "m", generator=(model, tok), gamma=0.95)
    engine = Engine(model, tok, lenvm=lenvm, num_candidates=8)
    cold = [SamplingParams(max_new_tokens=40, temperature=0.01, seed=s) for s in range(2)]
    controls = [Control("equal_to", target=10), Control("at_least", target=10)]
    for result in engine.generate([Request("Hi", s, control=c) for s in cold for c in controls]):
        assert result.finish_reason == "stop" and 10 <= result.num_tokens < 40


def test_equal_to_just_under_max_new_tokens_ends_rather_than_being_cut(tmp_path):
    """A target that fits (N tokens and the EOS) must end by max_new_tokens, like At Least, even
    where the generator rarely gives EOS: its give-up point is never past the last step."""
    from lenvm.hub import load_generator
    from lenvm.testing import tiny_model

    model, tok = load_generator(tiny_model(tmp_path / "m", eos_logit=-4.0))
    lenvm = LengthValueModel.from_base(tmp_path / "m", generator=(model, tok), gamma=0.9)
    engine = Engine(model, tok, lenvm=lenvm, num_candidates=4)
    results = engine.generate(
        [Request("Hi", SamplingParams(max_new_tokens=30, seed=s), control=Control("equal_to", target=29))
         for s in range(3)]
    )  # fmt: skip
    assert all(r.finish_reason == "stop" and r.num_tokens <= 29 for r in results)


def test_a_temperature_below_the_greedy_threshold_decodes_greedily(tiny_generator, lenvms):
    """As in vLLM, a temperature under 1e-5 is greedy: 1e-40 would overflow logits / temperature."""
    model, tok = tiny_generator
    engine = Engine(model, tok, lenvm=lenvms["q"], num_candidates=4)
    assert SamplingParams(temperature=1e-40).greedy and not SamplingParams(temperature=1e-5).greedy
    for control in (None, Control("equal_to", target=5, retries=0)):
        tiny, zero = (
            engine.generate(
                [Request("Hi", SamplingParams(max_new_tokens=8, temperature=t), control=control)]
            )[0]
            for t in (1e-40, 0.0)
        )
        assert tiny.token_ids == zero.token_ids


@pytest.mark.parametrize("ignore_eos", [False, True])
def test_extreme_sampling_settings_decode(tiny_generator, lenvms, ignore_eos):
    """A top_p that float32 rounds to 0 keeps the likeliest token (the smallest set whose mass
    reaches it), and the largest temperature stays finite, so that no distribution turns NaN:
    such requests decode, plain and under a length control, alone and in one batch."""
    model, tok = tiny_generator
    engine = Engine(model, tok, lenvm=lenvms["attached"], num_candidates=4)
    settings = [
        dict(top_p=1e-46),
        dict(temperature=MAX_TEMPERATURE),
        dict(temperature=MAX_TEMPERATURE, top_p=1e-46, top_k=3, min_p=1 - 1e-9),
    ]
    controls = [None, Control("equal_to", target=4), Control("at_most", target=4, retries=0)]
    requests = [
        Request("Hi", SamplingParams(max_new_tokens=6, seed=1, ignore_eos=ignore_eos, **s), control=c)
        for s in settings
        for c in controls
    ]
    for request, result in zip(requests, engine.generate(requests, batch_size=4), strict=True):
        check(result, request, engine.eos_ids)
    # top_p that small keeps the likeliest token alone: the answer is the greedy one
    greedy = SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=ignore_eos)
    [nucleus, argmax] = engine.generate([Request("Hi", requests[0].sampling), Request("Hi", greedy)])
    assert nucleus.token_ids == argmax.token_ids


@pytest.mark.parametrize("bad", [[], [1.0, 2.0], [True, False], [[5, 6, 7]]])
def test_a_list_prompt_that_is_neither_messages_nor_token_ids_is_named_so(tiny_generator, bad):
    engine = Engine(*tiny_generator)
    with pytest.raises(InputError, match="empty list|messages .* or token ids"):
        engine.generate([Request(bad, SamplingParams(max_new_tokens=2))])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_logits_that_are_not_numbers_stop_the_step(bad):
    """NaN (a broken model, a float16 overflow) would draw an arbitrary token, a masked one
    included: the step refuses, for guided and plain rows alike."""
    from lenvm.decoding.step import Rows, decide

    logits = torch.zeros(2, 10)
    logits[1, 3] = bad
    rows = Rows.build([SamplingParams(max_new_tokens=8)] * 2, [Control(), Control()], [0, 0], "cpu")
    with pytest.raises(ValueError, match="NaN"):
        decide(logits, rows, None, 4, torch.tensor([2]), None, uniform=torch.rand(2))


def test_a_request_near_its_target_does_not_change_the_policy_of_the_others(tiny_path):
    """The one-step lookahead is computed for the batch once some row is near the end of its
    window; the rows still short of theirs weigh none of it: a request decodes as it does alone."""
    from lenvm.hub import load_generator
    from lenvm.testing import tiny_model

    generator = load_generator(tiny_model(tiny_path.parent / "ending", eos_logit=3.0))
    lenvm = LengthValueModel.from_base(
        tiny_path.parent / "ending", kind="attached", gamma=0.95, generator=generator
    )
    engine = Engine(*generator, lenvm=lenvm, num_candidates=8)
    far = [
        Request(p, SamplingParams(temperature=0, max_new_tokens=6, ignore_eos=True),
                control=Control("equal_to", target=1, natural_eos=0.0))
        for p in PROMPTS
    ]  # fmt: skip
    near = Request(
        "Hi", SamplingParams(temperature=0, max_new_tokens=8), control=Control("equal_to", target=3)
    )
    alone = [engine.generate([r])[0].token_ids for r in far]
    together = [engine.generate([r, near], batch_size=2)[0].token_ids for r in far]
    assert together == alone


def test_the_progress_bar_shows_the_tokens_decoded(tiny_generator, monkeypatch):
    """A long controlled answer (retries, a slow model) shows it is moving before it finishes."""
    import io

    from tqdm import tqdm

    import lenvm.decoding.engine as engine_module

    written = io.StringIO()
    monkeypatch.setattr(
        engine_module, "_progress", lambda total, on: tqdm(total=total, file=written, mininterval=0)
    )
    request = Request("Hi", SamplingParams(max_new_tokens=30, seed=0, ignore_eos=True))
    Engine(*tiny_generator).generate([request], progress=True)
    shown = written.getvalue().split("\r")
    assert any("0/1" in line and "tokens decoded" in line for line in shown)
    assert "30 tokens decoded" in shown[-1]


def test_the_reprs_say_what_the_lenvm_and_the_engine_are(lenvms, tiny_generator):
    for kind, lenvm in lenvms.items():
        first, second = repr(lenvm).splitlines()[:2]
        assert first.startswith(f"LengthValueModel(kind={kind!r}, base=") and "gamma=0.99," in first
        assert f"feature_layer={lenvm.feature_layer}, end_head=False, calibrated=False" in first
        assert second.startswith("  (backbone): ")  # PyTorch's module tree follows
    guided, plain = Engine(*tiny_generator, lenvm=lenvms["attached"]), Engine(*tiny_generator)
    assert repr(guided) == (
        f"Engine(generator={tiny_generator[0].name_or_path!r}, lenvm=LengthValueModel(kind='attached', "
        "gamma=0.99), num_candidates=8, device=cpu, dtype=torch.float32)"
    )
    assert "\n" not in repr(plain) and ", lenvm=None, " in repr(plain)
