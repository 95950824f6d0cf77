"""Length control inside vLLM, rollouts through vLLM, and `vllm serve` with the processor, on a
tiny model (vLLM's CPU attention needs a head size of at least 32: hidden 128, 4 heads)."""

import json
import os
import urllib.request
from collections import Counter
from dataclasses import replace

import pytest
import torch

from lenvm import Control, Engine, LengthValueModel, Request, SamplingParams
from lenvm.io import InputError
from lenvm.prompts import as_prompt, encode_prompt

pytestmark = pytest.mark.vllm

PROMPTS = ["Tell me about the sea.", "Hi", "List three colors: red, green and blue, then explain why."]
CONTROLS = [
    Control("tilt", beta=20.0),
    Control("tilt", beta=-20.0),
    Control("equal_to", target=6, retries=0),
    Control("equal_to", target=6, rule="paper"),
    Control("at_most", target=5, retries=0),
    Control("at_least", target=9),
    Control("at_least", target=9, rule="paper"),
    None,
]


@pytest.fixture(scope="module", autouse=True)
def vllm_env():
    saved = dict(os.environ)
    os.environ.update(VLLM_CPU_KVCACHE_SPACE="1", VLLM_ENABLE_V1_MULTIPROCESSING="0")
    yield
    os.environ.clear()
    os.environ.update(saved)


def _engine(tiny128, lenvm_path=None, **kwargs):
    from lenvm.integrations.vllm import VLLMEngine

    settings = {"num_candidates": 4, "enforce_eager": True, "max_model_len": 512, "max_num_seqs": 8}
    return VLLMEngine(str(tiny128), lenvm=lenvm_path, **{**settings, **kwargs})


@pytest.mark.parametrize("kind", ["attached", "q", "standalone", "calibrated", "end head"])
def test_greedy_guided_decoding_matches_our_engine(tiny128, generator128, lenvms, kind):
    """Same LenVM, same controls, greedy: vLLM with the processor picks the tokens our engine
    picks (the generator's logits come from vLLM's kernels, equal to float32 rounding); a
    calibrated LenVM's map and an end head apply in vLLM's worker as in our engine."""
    lenvm, path = lenvms[kind]
    requests = [
        Request(PROMPTS[i % 3], SamplingParams(max_new_tokens=12, temperature=0.0), control=c)
        for i, c in enumerate(CONTROLS)
    ]
    ids = encode_prompt(generator128[1], as_prompt(PROMPTS[0]))  # token ids are taken as they are
    requests.append(Request(ids, SamplingParams(max_new_tokens=12, temperature=0.0), control=CONTROLS[0]))
    ours = Engine(*generator128, lenvm=lenvm, num_candidates=4).generate(requests)
    theirs = _engine(tiny128, path).generate(requests)
    assert [r.token_ids for r in theirs] == [r.token_ids for r in ours]
    assert len({tuple(r.token_ids) for r in ours}) > 3  # the controls change the answers
    for ours_r, theirs_r in zip(ours, theirs, strict=True):
        assert theirs_r.num_tokens == ours_r.num_tokens
        assert theirs_r.mean_logprob == pytest.approx(ours_r.mean_logprob, abs=1e-4)
    at_most, at_least = theirs[4], theirs[5]
    assert at_most.num_tokens <= 5 and at_least.num_tokens >= 9
    if kind in ("calibrated", "end head"):  # they change choices: matching is not by accident
        raw = Engine(*generator128, lenvm=lenvms["attached"][0], num_candidates=4).generate(requests)
        assert [r.token_ids for r in raw] != [r.token_ids for r in ours]


def test_rows_that_look_ahead_joining_a_shallow_cache_rebuild_it(tiny128, generator128, lenvms, monkeypatch):
    """Two rows at a time: the tilt rows start a cache that runs below the final layer only; an
    Equal To row (its rule looks one step ahead) joins while a tilt row still runs, and the cache
    is rebuilt at full depth. The tokens stay those of our engine."""
    from lenvm.integrations import vllm as integration

    built = []
    scorer_for = integration.scorer_for

    def recording(lenvm):
        kind = scorer_for(lenvm)

        class Recorded(kind):
            @classmethod
            def prefill(cls, lenvm, rows, *args, lookahead=True, **kwargs):
                built.append((len(rows), lookahead))
                return kind.prefill(lenvm, rows, *args, lookahead=lookahead, **kwargs)

        return Recorded

    monkeypatch.setattr(integration, "scorer_for", recording)
    lenvm, path = lenvms["attached"]
    tilt = Control("tilt", beta=20.0)
    requests = [  # the first runs 16 tokens, the second 2: the third joins beside the first
        Request(
            PROMPTS[0], SamplingParams(max_new_tokens=16, temperature=0.0, ignore_eos=True), control=tilt
        ),
        Request(PROMPTS[1], SamplingParams(max_new_tokens=2, temperature=0.0), control=tilt),
        Request(
            PROMPTS[2],
            SamplingParams(max_new_tokens=12, temperature=0.0),
            control=Control("equal_to", target=6),
        ),
    ]
    ours = Engine(*generator128, lenvm=lenvm, num_candidates=4).generate(requests)
    theirs = _engine(tiny128, path, max_num_seqs=2).generate(requests)
    assert [r.token_ids for r in theirs] == [r.token_ids for r in ours]
    assert built[0] == (2, False) and (2, True) in built, built  # shallow first, then rebuilt with both rows


def test_the_lenvm_runs_on_vllms_cpu_kernels_with_the_same_values(lenvms):
    """In vLLM's worker the LenVM body's linear layers take vLLM's packed CPU GEMM kernels: the
    weights move into the kernels and a candidate block scores as before."""
    from lenvm.decoding.scorers import scorer_for
    from lenvm.integrations.vllm import _use_vllm_cpu_gemm

    _, path = lenvms["standalone"]
    rows = [[5, 6, 7, 8, 9], [10, 11]]
    ids = torch.tensor([[3, 4, 5], [6, 7, 8]])
    eos = torch.zeros(ids.shape, dtype=torch.bool)

    def values(lenvm):
        scorer = scorer_for(lenvm).prefill(lenvm, rows)
        first = scorer.score(ids, eos)
        scorer.advance(torch.tensor([1, 2]), ids[:, 0])
        return torch.stack([first, scorer.score(ids, eos)])

    lenvm = LengthValueModel.from_pretrained(path).eval()
    before = values(lenvm)
    _use_vllm_cpu_gemm(lenvm.body)
    linears = [m for m in lenvm.body.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(m.weight.numel() == 0 for m in linears)
    torch.testing.assert_close(values(lenvm), before, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(("variable", "expected"), [(None, "float32"), ("bfloat16", "bfloat16")])
def test_the_lenvm_dtype_is_the_generators_unless_lenvm_dtype_names_one(
    tiny128, lenvms, monkeypatch, variable, expected
):
    import vllm

    seen = {}

    class Built(Exception):  # the engine's arguments are all this test needs: stop there
        pass

    def record(**kwargs):
        seen.update(kwargs)
        raise Built

    monkeypatch.setattr(vllm, "LLM", record)
    if variable is None:
        monkeypatch.delenv("LENVM_DTYPE", raising=False)
    else:
        monkeypatch.setenv("LENVM_DTYPE", variable)
    with pytest.raises(Built):
        _engine(tiny128, lenvms["attached"][1], dtype="float32")
    assert seen["dtype"] == "float32"
    assert seen["additional_config"]["lenvm_dtype"] == expected


def test_vllm_samples_the_policys_distribution(tiny128, generator128, lenvms, one_step_policy):
    """Many one-token samples of a controlled request at temperature 0.7 and top-p 0.9: vLLM's
    draws follow the distribution the shared decoding step gives, not the generator's own."""
    control = Control("tilt", beta=8.0)
    prompt = encode_prompt(generator128[1], PROMPTS[0])
    logits, dense = one_step_policy(
        prompt, SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=1), control
    )
    policy = {t: float(p) for t, p in enumerate(dense) if p > 0}
    assert (dense - torch.softmax(logits.double() / 0.7, -1)).abs().sum() / 2 > 0.1
    path = lenvms["attached"][1]

    n = 3000
    requests = [
        Request(
            PROMPTS[0], SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=1, seed=i), control=control
        )
        for i in range(n)
    ]
    drawn = Counter(r.token_ids[0] for r in _engine(tiny128, path, logprobs=False).generate(requests))
    assert set(drawn) <= set(policy)
    distance = sum(abs(drawn[t] / n - p) for t, p in policy.items()) / 2
    assert distance < 0.04  # sampling noise over a handful of candidates is about 0.01-0.02


def test_bad_length_keys_are_refused_when_vllm_admits_the_request(tiny128, lenvms):
    from vllm import SamplingParams as VllmParams
    from vllm.exceptions import VLLMValidationError
    from vllm.inputs import TokensPrompt

    engine = _engine(tiny128, lenvms["attached"][1])
    for bad in (
        {"length_equal_to": -3},
        {"length_at_most": 5, "length_at_least": 6},
        {"length_tilt": "x"},
        {"length_equal_to": 5, "length_retries": 2},
        {"length_at_least": 50},
        {"length_equal_to": 8},  # 8 tokens and the EOS do not fit in max_tokens 8
    ):
        with pytest.raises(VLLMValidationError, match="length_"):
            engine.llm.generate(
                [TokensPrompt(prompt_token_ids=[5, 6, 7])], VllmParams(max_tokens=8, extra_args=bad)
            )
    [ok] = engine.generate(
        [Request("Hi", SamplingParams(max_new_tokens=4), control=Control("at_most", target=3))]
    )
    assert ok.num_tokens <= 3  # the engine is still serving
    # A hard cap goes to vLLM with the other keys: Equal To ends at its target plus the slack.
    capped = Control("equal_to", target=4, retries=0, hard_cap_slack=0)
    [cut] = engine.generate([Request([5, 6, 7], SamplingParams(max_new_tokens=20, seed=0), control=capped)])
    assert cut.finish_reason == "stop" and cut.num_tokens == 4
    uncapped = replace(capped, hard_cap_slack=None)
    [ran_on] = engine.generate(
        [Request([5, 6, 7], SamplingParams(max_new_tokens=20, seed=0), control=uncapped)]
    )
    assert ran_on.num_tokens > 4  # the random model does not end at its target by itself
    with pytest.raises(InputError, match="lenvm's own engine"):
        engine.generate([Request("Hi", control=Control("equal_to", target=5, best_of=2))])
    with pytest.raises(InputError, match="exceeds the model's context of 512"):
        engine.generate([Request("Hi", SamplingParams(max_new_tokens=600))])
    # A request refused after others in its call leaves nothing in vLLM for the next call; bad
    # ids, targets beyond what the context leaves and what is not a Request are refused as our
    # engine refuses them.
    fine = Request("Hello there", SamplingParams(seed=1, max_new_tokens=30, ignore_eos=True))
    for bad, message in (
        (Request("Hi " * 600), "left out: what the context leaves"),
        (Request([5, 10**6]), r"holds token id 1000000, outside the vocabulary"),
        (
            Request("Hi", control=Control("equal_to", target=600)),
            "equal_to 600 can never be met within max_new_tokens",
        ),
        ("Describe the sea.", "expected a Request, got str"),
    ):
        with pytest.raises(InputError, match=message):
            engine.generate([fine, bad])
    [answer] = engine.generate([Request("What", SamplingParams(seed=2, max_new_tokens=3, ignore_eos=True))])
    assert answer.num_tokens == 3
    # A caller that stops reading a stream leaves nothing behind either.
    next(engine.stream([fine, Request("What", SamplingParams(seed=2, max_new_tokens=3, ignore_eos=True))]))
    [answer] = engine.generate([Request("What", SamplingParams(seed=2, max_new_tokens=3, ignore_eos=True))])
    assert answer.num_tokens == 3


def test_ids_a_standalone_lenvms_embedding_lacks(padded128, lenvms):
    """A generator that pads its embedding takes ids past the tokenizer's, which a standalone
    LenVM's own embedding lacks. In a prompt: VLLMEngine refuses them as our engine does, and a
    request that reaches the processor with them anyway (vLLM's server shows admission no prompt)
    is decoded without control, the other rows keeping theirs. In an answer, where the generator
    favours them: a controlled request never takes one (the processor would have to read it),
    while a plain request beside it is left alone."""
    from vllm import SamplingParams as VllmParams
    from vllm.inputs import TokensPrompt

    _, tok, folder = padded128
    engine = _engine(folder, lenvms["standalone"][1])
    padding = [5, len(tok) + 7]
    with pytest.raises(
        InputError, match=rf"token id {len(tok) + 7}, outside the vocabulary \(0-{len(tok) - 1}\)$"
    ):
        engine.generate([Request(padding, control=Control("at_most", target=3))])
    params = VllmParams(max_tokens=12, temperature=0.0, extra_args={"length_equal_to": 6})
    greedy = VllmParams(max_tokens=12, temperature=0.0)
    unread, prompt = TokensPrompt(prompt_token_ids=padding), TokensPrompt(prompt_token_ids=[5, 6, 7])
    [alone] = engine.llm.generate([prompt], params)
    [plain] = engine.llm.generate([prompt], greedy)
    assert min(plain.outputs[0].token_ids) >= len(tok)  # unguided, the padding rows win
    assert max(alone.outputs[0].token_ids) < len(tok)  # guided, never one of them
    unread, beside = engine.llm.generate([unread, prompt], params)
    assert unread.outputs[0].finish_reason in ("stop", "length")
    assert beside.outputs[0].token_ids == alone.outputs[0].token_ids
    sampled = VllmParams(max_tokens=12, seed=0, extra_args={"length_tilt": 2.0})
    guided, unguided = engine.llm.generate([prompt, prompt], [sampled, greedy])
    assert max(guided.outputs[0].token_ids) < len(tok)
    assert unguided.outputs[0].token_ids == plain.outputs[0].token_ids  # a plain row beside is untouched


def test_admission_refuses_what_a_control_cannot_honour_and_gives_reused_params_back(lenvms, monkeypatch):
    from types import SimpleNamespace

    from vllm import SamplingParams as VllmParams
    from vllm.sampling_params import StructuredOutputsParams

    from lenvm.integrations.vllm import TRUNCATION, LenVMLogitsProcessor

    validate = LenVMLogitsProcessor.validate_params
    with pytest.raises(InputError, match="structured output"):
        validate(VllmParams(max_tokens=16, extra_args={"length_at_most": 8},
                            structured_outputs=StructuredOutputsParams(regex="[a-z]+")))  # fmt: skip
    with pytest.raises(InputError, match="min_tokens 12 contradicts length_at_most 8"):
        validate(VllmParams(max_tokens=16, min_tokens=12, extra_args={"length_at_most": 8}))
    validate(VllmParams(max_tokens=16, min_tokens=12, extra_args={"length_at_least": 8}))  # no contradiction
    # Params used for a second request: their own truncation is kept, set anew, or given back.
    params = VllmParams(max_tokens=16, top_k=5, top_p=0.9, extra_args={"length_at_most": 8})
    validate(params)
    assert (params.top_k, params.top_p) == (0, 1.0) and params.extra_args[TRUNCATION] == [5, 0.9, 0.0]
    validate(params)
    assert params.extra_args[TRUNCATION] == [5, 0.9, 0.0]
    params.top_k = 3
    validate(params)
    assert params.extra_args[TRUNCATION] == [3, 1.0, 0.0]
    params.extra_args = {k: v for k, v in params.extra_args.items() if k != "length_at_most"}
    validate(params)
    assert (params.top_k, params.top_p, params.extra_args) == (3, 1.0, None)
    # Settings that cannot work fail when vLLM starts, not on every step.
    path = str(lenvms["attached"][1])
    for extra, env, match in [
        ({"lenvm_path": path, "lenvm_num_candidates": 1}, {}, "lenvm_num_candidates .* at least 2"),
        ({"lenvm_path": path}, {"LENVM_NUM_CANDIDATES": "abc"}, "LENVM_NUM_CANDIDATES.* got 'abc'"),
        ({"lenvm_path": path}, {"LENVM_PATH": str(lenvms["q"][1])}, "name the LenVM once"),
    ]:
        with monkeypatch.context() as m:
            for name, value in env.items():
                m.setenv(name, value)
            with pytest.raises(ValueError, match=match):
                LenVMLogitsProcessor(SimpleNamespace(additional_config=extra), torch.device("cpu"), False)


def test_an_at_most_answer_that_fits_is_sampled_as_the_generator_would(
    tiny128, generator128, lenvms, monkeypatch
):
    """Where the LenVM is confident the answer fits, At Most in one pass leaves it to the generator:
    vLLM draws from the generator's own distribution (temperature, top-p), not from its share of
    the candidates, which would favour the EOS that At Most always has among them."""
    from lenvm.decoding import policies
    from lenvm.prompts import encode_prompt

    monkeypatch.setattr(  # in this process, as vLLM's worker is: every answer "has 3 tokens left"
        LengthValueModel, "values_from_hidden", lambda self, h: torch.full(h.shape[:-1], -(1 - self.gamma**3))
    )
    model, tok = generator128
    with torch.no_grad():
        logits = model(torch.tensor([encode_prompt(tok, PROMPTS[0])])).logits[:, -1].float()
    generator = policies.truncate(logits, torch.tensor([0.7]), None, torch.tensor([0.9]), None)[0]
    n = 2000
    control = Control("at_most", target=100)
    requests = [
        Request(
            PROMPTS[0], SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=1, seed=i), control=control
        )
        for i in range(n)
    ]
    drawn = Counter(
        r.token_ids[0] for r in _engine(tiny128, lenvms["attached"][1], logprobs=False).generate(requests)
    )
    assert all(generator[t] > 0 for t in drawn)  # within the generator's top-p
    eos = lenvms["attached"][0].config.eos_token_ids[0]
    assert abs(drawn[eos] / n - float(generator[eos])) < 0.03  # 4 standard deviations of the share


def test_requests_without_a_control_are_left_alone(tiny128, lenvms):
    requests = [Request(p, SamplingParams(max_new_tokens=10, seed=i)) for i, p in enumerate(PROMPTS)]
    plain = _engine(tiny128).generate(requests)
    beside = _engine(tiny128, lenvms["q"][1]).generate(
        requests
        + [Request(PROMPTS[0], SamplingParams(max_new_tokens=10, seed=9), control=Control("tilt", beta=5.0))]
    )
    assert [r.token_ids for r in beside[:3]] == [r.token_ids for r in plain]


def test_rollout_vllm_args_that_vllm_does_not_take_are_refused_by_name(tiny128, tmp_path):
    from lenvm import rollout

    out = tmp_path / "r.jsonl"
    for vllm_args, message in [
        (
            {"max_model_len": 64, "nonsense_arg": 1, "other": 2},
            "'nonsense_arg', 'other' are not among vllm.LLM's",
        ),
        ({"model": "another"}, "cannot set 'model'"),
    ]:
        with pytest.raises(InputError, match=message):
            rollout(str(tiny128), PROMPTS[:1], out, n=1, backend="vllm", vllm_args=vllm_args, progress=False)
    assert not out.exists()


def test_a_vllm_rollout_prints_only_its_summary_on_stdout(tiny128, tmp_path):
    """vLLM logs to stdout unless told otherwise: `lenvm rollout --backend vllm | jq .` must work."""
    import subprocess
    import sys

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "Hi"}) + "\n")
    command = [
        sys.executable,
        "-m",
        "lenvm.cli",
        "rollout",
        "--model",
        str(tiny128),
        "--prompts",
        str(prompts),
    ]
    command += ["--out", str(tmp_path / "r.jsonl"), "--backend", "vllm", "--n", "1", "--max-new-tokens", "4"]
    env = {k: v for k, v in os.environ.items() if k != "VLLM_LOGGING_STREAM"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["completions_written"] == 1  # the summary and nothing else
    assert "INFO" in done.stderr  # vLLM's log, where it belongs


def test_rollouts_through_vllm_resume_and_train(tiny128, generator128, tmp_path):
    from lenvm import TrainConfig, read_rollouts, rollout, train
    from lenvm.prompts import as_prompt

    prompts = [as_prompt(p, default_id=str(i)) for i, p in enumerate(PROMPTS)]
    out = tmp_path / "rollouts.jsonl"
    sampling = SamplingParams(max_new_tokens=24, seed=3)
    # "auto" (the demo's and the benchmarks' choice) takes vLLM where it is installed.
    summary = rollout(str(tiny128), prompts[:2], out, n=3, sampling=sampling, backend="auto", progress=False)
    assert summary.completions_written == 6 and summary.backend == "vllm"
    summary = rollout(str(tiny128), prompts, out, n=3, sampling=sampling, backend="vllm", progress=False)
    assert summary.completions_written == 3 and summary.prompts_skipped == 2  # resumed
    records = read_rollouts(out)
    assert len(records) == 9 and {r["sampling"]["backend"] for r in records} == {"vllm"}
    eos = set(generator128[1].convert_tokens_to_ids(["<|im_end|>"]))
    for r in records:
        ended = r["finish_reason"] == "stop"
        assert ended == (r["completion_token_ids"][-1] in eos) and (ended or r["num_tokens"] == 24)
    again = tmp_path / "again.jsonl"
    rollout(str(tiny128), prompts, again, n=3, sampling=sampling, backend="vllm", progress=False)

    def samples(rows):
        return {(r["prompt_id"], r["sample_index"]): r["completion_token_ids"] for r in rows}

    assert samples(read_rollouts(again)) == samples(records)  # seeded per completion, whatever the batch
    result = train(
        records,
        str(tiny128),
        tmp_path / "lenvm",
        TrainConfig(epochs=2),
        generator=generator128,
        progress=False,
    )
    assert (result.path / "head.safetensors").is_file()


def test_vllm_serve_takes_length_control_from_an_openai_client(vllm_server):
    import openai

    client = openai.OpenAI(base_url=vllm_server + "/v1", api_key="none", max_retries=0)
    bound = {"vllm_xargs": {"length_at_most": 4}}
    text = client.completions.create(model="tiny", prompt="Tell me", max_tokens=30, seed=1, extra_body=bound)
    assert text.usage.completion_tokens <= 5  # 4 tokens and the EOS
    chat = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=30, extra_body=bound
    )
    assert chat.usage.completion_tokens <= 5
    at_least = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=30,
        extra_body={"vllm_xargs": {"length_at_least": 12}},
    )
    assert at_least.usage.completion_tokens >= 12
    plain = client.completions.create(model="tiny", prompt="Tell me", max_tokens=8, seed=1)
    assert plain.usage.completion_tokens <= 8
    pieces = list(
        client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "Hi"}],
            max_tokens=30,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"vllm_xargs": {"length_equal_to": 6, "length_rule": "paper"}},
        )
    )
    assert pieces[-1].usage.completion_tokens >= 1 and any(
        p.choices and p.choices[0].finish_reason for p in pieces
    )

    with pytest.raises(openai.BadRequestError, match="length_equal_to"):
        client.completions.create(
            model="tiny", prompt="Hi", max_tokens=8, extra_body={"vllm_xargs": {"length_equal_to": -1}}
        )
    with pytest.raises(openai.APIError, match="one length control"):  # streaming: an error event
        list(
            client.completions.create(
                model="tiny",
                prompt="Hi",
                max_tokens=8,
                stream=True,
                extra_body={"vllm_xargs": {"length_equal_to": 5, "length_at_most": 4}},
            )
        )
    with urllib.request.urlopen(vllm_server + "/health", timeout=5) as response:
        assert response.status == 200  # still serving
    assert (
        json.loads(urllib.request.urlopen(vllm_server + "/v1/models", timeout=5).read())["data"][0]["id"]
        == "tiny"
    )


def test_speed_benchmark_measures_vllm_plain_and_guided(tiny128, tmp_path):
    from lenvm.bench.speed import run_speed

    results = run_speed(
        tmp_path / "speed",
        model=tiny128,
        batch_sizes=(1, 2),
        candidates=(2,),
        new_tokens=4,
        generate_batch_sizes=(),
        methods=["vllm-guided"],
        progress=False,
    )
    rows = {r["key"]: r for r in results["rows"]}
    assert set(rows) == {
        "plain-b1",
        "plain-b2",
        "vllm-b1",
        "vllm-b2",
        "vllm-guided-k2-b1",
        "vllm-guided-k2-b2",
    }
    for key, r in rows.items():
        assert r["tokens"] == 4 * r["batch"], key
    guided = rows["vllm-guided-k2-b2"]
    assert guided["x_own_plain"] == pytest.approx(guided["tokens_per_s"] / rows["vllm-b2"]["tokens_per_s"])


def test_lifebench_runs_on_the_vllm_backend(tiny128, lenvms, tmp_path):
    """The benchmarks can generate with vLLM and the processor; an At Most answer keeps its bound."""
    from lenvm.bench.lifebench import run_lifebench

    rows = tmp_path / "life.jsonl"
    task = (
        "[Instruction] Answer: \n What is the sea? \n\n"
        "[Requirement] Your answer must be {word_count_type} {word_count} words long."
    )
    rows.write_text(json.dumps({"id": 1, "category": "qa", "lang": "en", "task": task}) + "\n")
    results = run_lifebench(
        tmp_path / "out",
        model=tiny128,
        lenvm=lenvms["attached"][1],
        data=rows,
        targets=(4, 8),
        methods=["prompt", "lenvm-ours"],
        max_new_tokens=16,
        backend="vllm",
        progress=False,
    )
    assert results["settings"]["backend"] == "vllm"
    items = [json.loads(line) for line in (tmp_path / "out" / "items.jsonl").read_text().splitlines()]
    assert len(items) == 2 * 3 * 2
    assert all(
        i["num_tokens"] <= i["target"]
        for i in items
        if i["method"] == "lenvm-ours" and i["constraint"] == "at_most"
    )
    assert all(i["retries"] == 0 and i["decoded_tokens"] >= i["num_tokens"] for i in items)
    assert all(i["eos_prob"] is None or 0 < i["eos_prob"] <= 1 for i in items)
