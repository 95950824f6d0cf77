"""LenVM guidance inside transformers' generate(): the logits processor and the length criterion."""

import pytest
import torch
from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

from lenvm.decoding import (
    Control,
    Engine,
    LengthStoppingCriteria,
    LenVMLogitsProcessor,
    Request,
    SamplingParams,
)
from lenvm.io import InputError
from lenvm.model import LengthValueModel
from lenvm.prompts import encode_prompt

PROMPTS = ["Tell me about the sea.", "List three colors: red, green and blue, then explain why."]


@pytest.fixture(scope="module")
def lenvms(tiny_path, tiny_generator):
    return {
        kind: LengthValueModel.from_base(tiny_path, kind=kind, generator=tiny_generator).eval()
        for kind in ("attached", "q", "standalone")
    }


def left_padded(tok, prompts):
    rows = [encode_prompt(tok, p) for p in prompts]
    width = max(map(len, rows))
    ids = torch.tensor([[tok.pad_token_id] * (width - len(r)) + r for r in rows])
    return ids, (ids != tok.pad_token_id).long()


def generate(model, tok, processors=(), criteria=(), max_new_tokens=12, sample=False):
    ids, mask = (t.to(model.device) for t in left_padded(tok, PROMPTS))
    config = GenerationConfig(
        do_sample=sample,
        max_new_tokens=max_new_tokens,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **({"temperature": 1.0, "top_k": 0, "top_p": 1.0} if sample else {}),
    )
    out = model.generate(
        ids,
        attention_mask=mask,
        generation_config=config,
        logits_processor=LogitsProcessorList(processors),
        stopping_criteria=StoppingCriteriaList(criteria),
    )
    return ids.shape[1], [row[ids.shape[1] :].tolist() for row in out]


def new_tokens(row, eos):
    """Generated tokens up to and including the first EOS."""
    return row[: row.index(eos) + 1] if eos in row else row


@pytest.mark.parametrize("kind", ["attached", "q", "standalone"])
def test_greedy_generate_with_the_processor_matches_the_engine(tiny_generator, lenvms, kind):
    model, tok = tiny_generator
    control = Control("tilt", beta=2.0)
    processor = LenVMLogitsProcessor(lenvms[kind], control, num_candidates=4)
    engine = Engine(model, tok, lenvm=lenvms[kind], num_candidates=4)
    requests = [
        Request(p, SamplingParams(max_new_tokens=12, temperature=0), control=control) for p in PROMPTS
    ]
    expected = [r.token_ids for r in engine.generate(requests)]
    for _ in range(2):  # the same processor serves a second generate() call
        _, rows = generate(model, tok, [processor])
        assert [new_tokens(row, tok.eos_token_id) for row in rows] == expected


def test_greedy_sampling_params_make_sampled_generate_greedy(tiny_generator, lenvms):
    """temperature 0 in the processor's SamplingParams is greedy even where generate samples:
    only the policy's choice is left in the logits (it sampled the whole policy, as at 1)."""
    model, tok = tiny_generator
    control = Control("tilt", beta=2.0)
    greedy = SamplingParams(temperature=0, max_new_tokens=12)
    processor = LenVMLogitsProcessor(lenvms["attached"], control, num_candidates=4, sampling=greedy)
    _, expected = generate(model, tok, [processor])
    for seed in (0, 1):
        torch.manual_seed(seed)
        assert generate(model, tok, [processor], sample=True)[1] == expected


def test_a_chat_that_goes_on_from_finished_answers_is_a_new_call(tiny_generator, lenvms):
    """A processor reused for the next turn of a chat, whose input_ids are the last turn's output
    and a new user message: a new answer, counted from its own start, as with a fresh processor
    (it took it for the old answer going on, and ended it at once)."""
    model, tok = tiny_generator
    lenvm = lenvms["attached"]
    control, sampling = Control("equal_to", target=6), SamplingParams(max_new_tokens=30)
    reused = LenVMLogitsProcessor(lenvm, control, num_candidates=4, sampling=sampling)
    ids = torch.tensor([encode_prompt(tok, PROMPTS[0])])
    config = dict(do_sample=False, max_new_tokens=30, pad_token_id=tok.pad_token_id)
    first = model.generate(ids, logits_processor=LogitsProcessorList([reused]), **config)
    assert first[0, -1] == tok.eos_token_id
    more = torch.tensor(
        [tok("\n<|im_start|>user\nAnd the wind?<|im_end|>\n<|im_start|>assistant\n")["input_ids"]]
    )
    follow_up = torch.cat([first, more], 1)
    again = model.generate(follow_up, logits_processor=LogitsProcessorList([reused]), **config)
    fresh = LenVMLogitsProcessor(lenvm, control, num_candidates=4, sampling=sampling)
    expected = model.generate(follow_up, logits_processor=LogitsProcessorList([fresh]), **config)
    assert again.tolist() == expected.tolist() and again.shape[1] - follow_up.shape[1] > 1


def test_assisted_generation_is_refused_not_silently_restarted(tiny_generator, lenvms):
    """Assisted generation goes back within the answers between its rounds, which the processor
    would take for new generate() calls: refused."""
    model, tok = tiny_generator
    processor = LenVMLogitsProcessor(lenvms["attached"], Control("equal_to", target=15), num_candidates=4)
    ids = torch.tensor([encode_prompt(tok, "red green blue red green blue red green blue red green blue")])
    with pytest.raises(InputError, match="assisted generation"):
        model.generate(
            ids,
            do_sample=False,
            max_new_tokens=40,
            prompt_lookup_num_tokens=3,
            pad_token_id=tok.pad_token_id,
            logits_processor=LogitsProcessorList([processor]),
        )


def test_the_pad_token_is_the_tokenizers_when_generate_calls(tiny_generator, lenvms, monkeypatch):
    """A pad token set after the processor was made (the usual tokenizer.pad_token = eos before
    batching) is the one stripped from the left of the rows: the LenVM reads the prompts alone."""
    import lenvm.decoding.hf as hf

    model, tok = tiny_generator
    prefilled = []
    real = hf.scorer_for

    def spying(lenvm):
        scorer = real(lenvm)

        class Spy(scorer):  # the scorer classes themselves stay as they are
            @classmethod
            def prefill(cls, lenvm, rows, **kw):
                prefilled.append(rows)
                return scorer.prefill(lenvm, rows, **kw)

        return Spy

    monkeypatch.setattr(hf, "scorer_for", spying)
    pad = tok.pad_token
    tok.pad_token = None
    try:
        late = LenVMLogitsProcessor(lenvms["attached"], Control("tilt", beta=1.0), num_candidates=4)
    finally:
        tok.pad_token = pad
    generate(model, tok, [late], max_new_tokens=2)
    assert prefilled[0] == [encode_prompt(tok, p) for p in PROMPTS]


def test_beam_search_is_refused_not_silently_restarted(tiny_generator, lenvms):
    """Beam search hands the processor its rows in another order each step, which it would take
    for new generate() calls (a control that never sees its target): refused."""
    model, tok = tiny_generator
    processor = LenVMLogitsProcessor(lenvms["attached"], Control("equal_to", target=5), num_candidates=4)
    ids, mask = left_padded(tok, PROMPTS)
    with pytest.raises(InputError, match="beam search"):
        model.generate(
            ids,
            attention_mask=mask,
            num_beams=3,
            do_sample=False,
            max_new_tokens=12,
            pad_token_id=tok.pad_token_id,
            logits_processor=LogitsProcessorList([processor]),
        )


def test_an_at_most_row_that_fits_samples_from_the_generators_whole_distribution(tiny_generator, lenvms):
    """Where the LenVM is confident the answer fits, At Most leaves it to the generator: the
    processor hands over the generator's own distribution, not its renormalized share of the
    candidates (where the EOS that At Most always adds would weigh far more)."""
    model, tok = tiny_generator
    ids, _ = left_padded(tok, PROMPTS)
    scores = torch.randn(2, len(tok))
    lenvm = lenvms["standalone"]
    lenvm.values_from_hidden = lambda h: torch.full(h.shape[:-1], -(1 - lenvm.gamma**3), device=h.device)
    try:
        control, sampling = Control("at_most", target=200), SamplingParams(max_new_tokens=300)
        processor = LenVMLogitsProcessor(lenvm, control, sampling=sampling, num_candidates=4)
        out = processor(ids, scores)
    finally:
        del lenvm.values_from_hidden
    torch.testing.assert_close(out, scores.log_softmax(-1))


def test_processor_leaves_only_candidates_and_one_hot_rules_leave_one(tiny_generator, lenvms):
    model, tok = tiny_generator
    ids, _ = left_padded(tok, PROMPTS)
    scores = torch.randn(2, len(tok))
    soft = LenVMLogitsProcessor(lenvms["standalone"], Control("at_least", target=5), num_candidates=3)
    out = soft(ids, scores)
    assert ((out > -float("inf")).sum(-1) <= 3).all()
    torch.testing.assert_close(out.exp().sum(-1), torch.ones(2))
    paper = LenVMLogitsProcessor(lenvms["standalone"], Control("at_least", target=5, rule="paper"))
    assert ((paper(ids, scores) > -float("inf")).sum(-1) == 1).all()


def test_no_id_a_standalone_lenvm_cannot_read_is_a_candidate_or_sampled(tiny_path, lenvms):
    """A generator that pads its embedding, its padding rows favoured, beside a standalone LenVM of
    the unpadded model: as in the engine, the processor leaves no id past the LenVM's embedding,
    among the candidates or in the whole distribution of an At Most row left to the generator, so
    that generate never hands the LenVM one to read."""
    from lenvm.hub import load_generator

    model, tok = load_generator(tiny_path)  # a copy of its own, padded
    model.resize_token_embeddings(len(tok) + 8, mean_resizing=False)

    def favour_padding(input_ids, scores):
        return scores + torch.arange(scores.shape[-1]).ge(len(tok)) * 100.0

    assert min(min(row) for row in generate(model, tok, [favour_padding], max_new_tokens=4)[1]) >= len(tok)
    lenvm = lenvms["standalone"]
    processor = LenVMLogitsProcessor(lenvm, Control("tilt", beta=2.0), num_candidates=4)
    for sample in (False, True):
        _, rows = generate(model, tok, [favour_padding, processor], max_new_tokens=4, sample=sample)
        assert max(max(row) for row in rows) < len(tok)
    ids, _ = left_padded(tok, PROMPTS)
    scores = torch.randn(2, len(tok) + 8)
    lenvm.values_from_hidden = lambda h: torch.full(h.shape[:-1], -(1 - lenvm.gamma**3), device=h.device)
    try:  # the LenVM is confident that the answer fits: At Most leaves it to the generator
        control, sampling = Control("at_most", target=200), SamplingParams(max_new_tokens=300)
        out = LenVMLogitsProcessor(lenvm, control, sampling=sampling, num_candidates=4)(ids, scores)
    finally:
        del lenvm.values_from_hidden
    assert (out[:, len(tok) :] == -float("inf")).all()
    torch.testing.assert_close(out[:, : len(tok)], scores[:, : len(tok)].log_softmax(-1))


def test_a_prompt_id_a_standalone_lenvm_cannot_read_is_refused(tiny_generator, lenvms):
    """An id past a standalone LenVM's own embedding (a row the generator pads its embedding with)
    in a prompt is refused by name, as the engine refuses it."""
    _, tok = tiny_generator
    processor = LenVMLogitsProcessor(lenvms["standalone"], Control("tilt", beta=2.0))
    with pytest.raises(
        InputError,
        match=rf"own: the prompt holds token id {len(tok) + 3}, outside the vocabulary \(0-{len(tok) - 1}\)$",
    ):
        processor(torch.tensor([[5, len(tok) + 3]]), torch.randn(1, len(tok) + 8))


def test_sampled_generate_respects_the_hard_cap(tiny_generator, lenvms):
    model, tok = tiny_generator
    control = Control("equal_to", target=3, rule="paper", hard_cap_slack=2)
    lenvm = lenvms["standalone"]
    # Every candidate looks very long: the policy never ends by itself.
    lenvm.values_from_hidden = lambda h: torch.full(h.shape[:-1], -0.999, device=h.device)
    try:
        processor = LenVMLogitsProcessor(lenvm, control, num_candidates=4)
        _, rows = generate(model, tok, [processor], max_new_tokens=20, sample=True)
    finally:
        del lenvm.values_from_hidden
    for row in rows:
        assert row.index(tok.eos_token_id) == 5  # 3 + 2 tokens, then the forced EOS


def test_length_stopping_criteria_cuts_generation(tiny_generator):
    model, tok = tiny_generator
    ids, _ = left_padded(tok, PROMPTS)
    criterion = LengthStoppingCriteria(prompt_length=ids.shape[1], max_new_tokens=4)
    _, rows = generate(model, tok, criteria=[criterion], max_new_tokens=20)
    assert all(len(row) <= 4 for row in rows)
    with pytest.raises(InputError):
        LengthStoppingCriteria(prompt_length=3, max_new_tokens=0)


def test_processor_rejects_bad_settings(lenvms):
    with pytest.raises(InputError):
        LenVMLogitsProcessor(lenvms["q"], Control())
    with pytest.raises(InputError):
        LenVMLogitsProcessor(lenvms["q"], Control("tilt", beta=1.0), num_candidates=0)
    with pytest.raises(InputError, match="at least 2"):  # one candidate: nothing to choose from
        LenVMLogitsProcessor(lenvms["q"], Control("tilt", beta=1.0), num_candidates=1)
    with pytest.raises(InputError):
        LenVMLogitsProcessor(lenvms["q"], Control("tilt", beta=1.0), sampling=SamplingParams(top_p=0.0))
    with pytest.raises(InputError, match="SamplingParams"):
        LenVMLogitsProcessor(lenvms["q"], Control("tilt", beta=1.0), sampling={"top_p": 0.5})
    for control in (Control("equal_to", target=5, best_of=2), Control("equal_to", target=5, retries=1)):
        with pytest.raises(InputError, match="engine"):
            LenVMLogitsProcessor(lenvms["q"], control)
    LenVMLogitsProcessor(lenvms["q"], Control("equal_to", target=5, retries=0))
    with pytest.raises(InputError, match="takes a loaded LengthValueModel"):
        LenVMLogitsProcessor("my-lenvm", Control("tilt", beta=1.0))
    with pytest.raises(InputError, match="takes a Control, got dict"):
        LenVMLogitsProcessor(lenvms["q"], {"kind": "equal_to", "target": 5})


@pytest.mark.parametrize("control_kind", ["equal_to", "at_most", "at_least"])
def test_sampled_generate_runs_our_target_rules_with_the_lookahead(tiny_generator, lenvms, control_kind):
    """Near its target a rule looks one step ahead (the attached LenVM's candidate block gives the
    generator's EOS probability after each candidate): generate() still gets a distribution
    over the candidates at every step, and an At Most answer stays within its bound."""
    model, tok = tiny_generator
    processor = LenVMLogitsProcessor(lenvms["attached"], Control(control_kind, target=3), num_candidates=4)
    torch.manual_seed(0)
    _, rows = generate(model, tok, [processor], max_new_tokens=10, sample=True)
    for row in rows:
        answer = new_tokens(row, tok.eos_token_id)
        if control_kind == "at_most":
            assert len(answer) <= 4 and answer[-1] == tok.eos_token_id
        if control_kind == "at_least":
            assert tok.eos_token_id not in answer[:3]


def test_the_processors_own_cache_runs_the_final_layer_only_for_rules_that_look_ahead(lenvms):
    """A tilt needs the head's features only (a shallow cache); our target rules look one step
    ahead, which needs the generator's final states after each candidate."""
    from lenvm.decoding.scorers import scorer_for

    lenvm = lenvms["attached"]
    for control, lookahead in [(Control("tilt", beta=1.0), False), (Control("equal_to", target=5), True)]:
        processor = LenVMLogitsProcessor(lenvm, control, num_candidates=4)
        processor(torch.tensor([[5, 6, 7]]), torch.zeros(1, lenvm.backbone.config.vocab_size))
        assert processor._answers.scorer.stream.shallow is not lookahead
        scorer = scorer_for(lenvm).prefill(lenvm, [[5, 6, 7]], lookahead=lookahead)
        scorer.score(
            torch.tensor([[8, 9]], device=lenvm.device),
            torch.zeros(1, 2, dtype=torch.bool, device=lenvm.device),
        )
        assert (scorer.next_eos() is not None) is lookahead


def test_processor_refuses_targets_it_cannot_meet(lenvms):
    """As the engine: a target that max_new_tokens cannot hold, or beyond the LenVM's horizon."""
    with pytest.raises(InputError, match="can never be met within max_new_tokens"):
        LenVMLogitsProcessor(
            lenvms["q"], Control("equal_to", target=500), sampling=SamplingParams(max_new_tokens=10)
        )
    with pytest.raises(InputError, match="beyond the LenVM's horizon"):
        LenVMLogitsProcessor(lenvms["q"], Control("at_most", target=100_000))


def _windowed(path, **window):
    """A tiny generator whose attention has a sliding window (``window``: its config's settings)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from lenvm.testing import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    config = AutoConfig.for_model(
        window.pop("model_type", "mistral"), vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        initializer_range=0.3, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        **window,
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model, tokenizer


def test_a_sliding_window_bounds_every_decoder(tmp_path):
    """Our streams attend to the whole prefix, as a windowed model does within its window only:
    requests longer than the window are refused, and those within it decode as the model does."""
    from lenvm.decoding.params import RequestError

    model, tokenizer = _windowed(tmp_path / "mistral", sliding_window=16)
    engine = Engine(model, tokenizer)
    assert engine.context == 16
    prompt = list(range(100, 110))
    greedy = SamplingParams(temperature=0, max_new_tokens=6, ignore_eos=True)
    [result] = engine.generate([Request(prompt, greedy)])
    expected = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=6, min_new_tokens=6)
    assert result.token_ids == expected[0, len(prompt) :].tolist()
    with pytest.raises(RequestError, match="context of 16 tokens .its sliding window"):
        engine.generate([Request(prompt, SamplingParams(temperature=0, max_new_tokens=7))])
    # The server says so too.
    from lenvm.serve.protocol import ApiError, CompletionRequest, Context, plan_completion

    ctx = Context(tokenizer, engine.vocab_size, engine.context, False, 8, context_note=engine.context_note)
    for body in ({"prompt": prompt, "max_tokens": 7}, {"prompt": list(range(100, 117))}):
        with pytest.raises(
            ApiError, match="context is 16 tokens .its sliding window|of 16 tokens .its sliding"
        ):
            plan_completion(CompletionRequest(**body), ctx)
    # The transformers processor: a clear error where its stream would go beyond the window.
    lenvm = LengthValueModel.from_base(
        tmp_path / "mistral", kind="attached", gamma=0.9, generator=(model, tokenizer)
    )
    processor = LenVMLogitsProcessor(
        lenvm, Control("tilt", beta=1.0), sampling=SamplingParams(max_new_tokens=10)
    )
    with pytest.raises(InputError, match="reached 16 tokens"):
        model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=10, min_new_tokens=10,
                       logits_processor=[processor])  # fmt: skip
    # Only live rows count: a long prompt whose answer ended early stops no one (generate pads it).
    processor.reset()
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    ids = torch.tensor([list(range(100, 112)), [pad] * 10 + [100, 101]])
    for step in range(10):  # the short row reaches 12 tokens, the long one would have 22
        processor(ids, torch.randn(2, len(tokenizer)))
        ids = torch.cat([ids, torch.tensor([[eos if step == 0 else pad], [120 + step]])], 1)
    # A window on some layers (layer_types) is refused by both.
    model, tokenizer = _windowed(tmp_path / "qwen2", model_type="qwen2", use_sliding_window=True,
                                 sliding_window=16, max_window_layers=0)  # fmt: skip
    with pytest.raises(InputError, match="sliding_attention"):
        Engine(model, tokenizer)
    lenvm = LengthValueModel.from_base(
        tmp_path / "qwen2", kind="attached", gamma=0.9, generator=(model, tokenizer)
    )
    with pytest.raises(InputError, match="sliding_attention"):
        LenVMLogitsProcessor(lenvm, Control("tilt", beta=1.0))


def test_generate_stopping_on_fewer_eos_ids_than_the_lenvm_is_named(ending_path, eos_generator):
    """The processor ends answers with any of the LenVM's EOS ids; generate told to stop on others
    went on after them (and was taken for beam search): a clear error says which ids to pass."""
    model, tok = eos_generator
    lenvm = LengthValueModel.from_base(ending_path, kind="attached", gamma=0.9, generator=eos_generator)
    ids = torch.tensor([encode_prompt(tok, PROMPTS[0])])
    config = dict(do_sample=False, max_new_tokens=20, pad_token_id=tok.pad_token_id)

    def run(eos_token_id):
        processor = LenVMLogitsProcessor(
            lenvm, Control("equal_to", target=4), sampling=SamplingParams(max_new_tokens=20)
        )
        return model.generate(ids, logits_processor=[processor], eos_token_id=eos_token_id, **config)

    assert run(tok.eos_token_id)[0, -1] == tok.eos_token_id
    other = tok.convert_tokens_to_ids("a")  # a stop token generate is given, not the LenVM's EOS
    with pytest.raises(InputError, match=rf"pass eos_token_id=\[{tok.eos_token_id}\] to generate"):
        run(other)


def test_a_call_on_the_same_prompts_after_one_token_answers_asks_for_reset(tiny_generator, lenvms):
    """After answers of one token the processor has seen only the prompts; the same prompts again
    read as assisted generation going back to them: refused, naming reset(), which starts over."""
    model, tok = tiny_generator
    processor = LenVMLogitsProcessor(lenvms["attached"], Control("tilt", beta=1.0))
    ids = torch.tensor([encode_prompt(tok, "Tell me about the sea.")])
    kwargs = dict(
        max_new_tokens=1, do_sample=False, pad_token_id=tok.pad_token_id, logits_processor=[processor]
    )
    first = model.generate(ids, **kwargs)
    with pytest.raises(InputError, match="single token long, call reset"):
        model.generate(ids, **kwargs)
    processor.reset()
    assert torch.equal(model.generate(ids, **kwargs), first)


def test_a_top_k_beyond_the_vocabulary_keeps_every_token(tiny_generator, lenvms):
    """top_k at or past the vocabulary's size is no filter at all, as in our engine, rather than a
    topk call beyond the row."""
    model, tok = tiny_generator
    control = Control("equal_to", target=5)
    wide = SamplingParams(temperature=0, top_k=10**18, max_new_tokens=12)
    exact = SamplingParams(temperature=0, max_new_tokens=12)
    rows = [
        generate(
            model, tok, [LenVMLogitsProcessor(lenvms["attached"], control, num_candidates=4, sampling=s)]
        )[1]
        for s in (wide, exact)
    ]
    assert rows[0] == rows[1]
