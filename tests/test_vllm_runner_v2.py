"""Length control under vLLM's Model Runner V2, its default on GPUs. The runner itself needs
Triton's GPU kernels, so on a CPU these tests drive V2's own pieces as its model runner does, step
by step: its request state (token buffer, slots taken and freed), its sampler with the built-in
processors, its processor loader and admission check, and its batch order; requests join, finish,
are preempted and resume, and long prompts are prefilled in chunks. Stand-ins: the generator's
logits come from transformers, the scheduler is a loop of this file, and the two Triton kernels on
this path (staged writes into the token buffer, the temperature) are done in torch."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lenvm import Control, Engine, Request, SamplingParams
from lenvm.prompts import encode_prompt

pytestmark = pytest.mark.vllm

PROMPTS = ["Tell me about the sea.", "Hi", "List three colors: red, green and blue, then explain why."]
CONTROLS = [
    Control("tilt", beta=20.0),
    Control("equal_to", target=6, retries=0),
    Control("at_most", target=5, retries=0),
    Control("at_least", target=9, retries=0),  # one pass, as in vLLM
    Control("equal_to", target=6, rule="paper"),
    None,
]
PROCESSOR = "lenvm.integrations.vllm:LenVMLogitsProcessor"


@pytest.fixture
def runner_v2(monkeypatch):
    """V2's modules on a CPU, with torch in place of the Triton kernels this path launches."""
    import vllm.v1.worker.cpu.shm  # noqa: F401  (what vLLM's CPU worker imports first: host tensors)
    from vllm.v1.worker.gpu import buffer_utils
    from vllm.v1.worker.gpu.sample.states import SamplingStates

    def apply_write(self):
        flat, start_of_contents = self.gpu.view(-1), 0
        for row, start, end in zip(
            self._staged_write_indices, self._staged_write_starts, self._staged_write_cu_lens, strict=True
        ):
            contents = self._staged_write_contents[start_of_contents:end]
            at = row * self.gpu.stride(0) + start
            flat[at : at + len(contents)] = torch.tensor(contents, dtype=self.dtype)
            start_of_contents = end
        self.clear_staged_writes()

    def apply_temperature(self, logits, expanded_idx_mapping, idx_mapping_np):
        temperature = self.temperature.gpu[expanded_idx_mapping]
        logits /= torch.where(temperature == 0, 1.0, temperature)[:, None]  # 0: greedy, left as is

    monkeypatch.setattr(buffer_utils.StagedWriteTensor, "apply_write", apply_write)
    monkeypatch.setattr(SamplingStates, "apply_temperature", apply_temperature)
    return Runner


class Runner:
    """V2's request state, sampler and custom processors, and the runner's order of calls: finished
    and preempted requests leave, new and resumed ones join (``add_request``), staged writes are
    applied, then the step's rows, decodes first, are sampled."""

    def __init__(self, model, lenvm_path, max_num_reqs=4, num_candidates=4, chunk=None):
        from vllm.v1.worker.gpu.sample.logits_processor import (
            build_custom_logits_processors,
            build_custom_logits_processors_params_validator,
        )
        from vllm.v1.worker.gpu.sample.sampler import Sampler
        from vllm.v1.worker.gpu.states import RequestState

        self.model = model
        vocab = model.config.vocab_size
        self.state = RequestState(
            max_num_reqs=max_num_reqs,
            max_model_len=512,
            max_num_batched_tokens=512,
            num_speculative_steps=0,
            vocab_size=vocab,
            device=torch.device("cpu"),
        )
        self.config = SimpleNamespace(
            reasoning_config=None,
            speculative_config=None,
            additional_config={"lenvm_path": str(lenvm_path), "lenvm_num_candidates": num_candidates},
            model_config=SimpleNamespace(
                max_model_len=512, tokenizer=model.name_or_path, enable_prompt_embeds=False
            ),
        )
        self.processors = build_custom_logits_processors(self.config, self.state, False, [PROCESSOR])
        self.admit = build_custom_logits_processors_params_validator([PROCESSOR])  # the frontend's check
        self.sampler = Sampler(
            self.config,
            max_num_reqs=max_num_reqs,
            vocab_size=vocab,
            device=torch.device("cpu"),
            req_states=self.state,
            custom_logits_processors=self.processors,
        )
        self.chunk = chunk  # prefill at most this many tokens a step (chunked prefill)
        self.requests: dict[str, dict] = {}
        self.processed: dict[str, list[torch.Tensor]] = {}  # each request's logits as vLLM samples them
        self.raw: dict[str, list[torch.Tensor]] = {}  # and as the generator gave them

    def add(self, name, prompt, params):
        self.admit(params)
        self.requests[name] = {"prompt": list(prompt), "output": [], "params": params}
        self.processed[name], self.raw[name] = [], []
        self._join(name)

    def _join(self, name):
        request = self.requests[name]
        ids = request["prompt"] + request["output"]  # a resumed request is prefilled with its output
        self.state.add_request(name, len(request["prompt"]), ids, 0, request["params"].max_tokens)
        self.sampler.add_request(self.state.req_id_to_index[name], request["params"])
        request.update(computed=0, prefill=len(ids), joined=True)

    def preempt(self, name):
        self.state.remove_request(name)
        self.requests[name]["joined"] = False

    def resume(self, name):
        self._join(name)

    def step(self, rng=None):
        """One step for every joined request still running; finished requests leave after it."""
        from vllm.v1.worker.gpu.model_runner import sort_batch_req_ids

        self.state.apply_staged_writes()
        self.sampler.apply_staged_writes()
        running = {n: r for n, r in self.requests.items() if r.get("joined") and not r.get("done")}
        scheduled = {}
        for name, r in running.items():
            left = r["prefill"] - r["computed"]
            scheduled[name] = min(left, self.chunk or left) if left > 0 else 1
        names = sort_batch_req_ids(scheduled, {}, 1)
        slots = np.array([self.state.req_id_to_index[n] for n in names], dtype=np.intp)
        lengths = np.array([running[n]["computed"] + scheduled[n] for n in names], dtype=np.int32)
        tokens = [running[n]["prompt"] + running[n]["output"] for n in names]
        with torch.no_grad():
            logits = torch.cat(
                [
                    self.model(torch.tensor([t[:length]])).logits[:, -1].float()
                    for t, length in zip(tokens, lengths, strict=True)
                ]
            )
        index = torch.tensor(slots, dtype=torch.long)
        processed = self.sampler.apply_sampling_params(
            logits,
            index,
            index,
            slots,
            torch.tensor(lengths - 1, dtype=torch.long),
            torch.tensor([t[length - 1] for t, length in zip(tokens, lengths, strict=True)]),
            torch.zeros(len(names), dtype=torch.int32),
            lengths,
        )
        for b, name in enumerate(names):
            r = running[name]
            r["computed"] += scheduled[name]
            if lengths[b] < r["prefill"]:  # a prefill chunk: its sample is dropped
                continue
            self.processed[name].append(processed[b].clone())
            self.raw[name].append(logits[b].clone())
            if r["params"].temperature == 0:
                token = int(processed[b].argmax())
            else:
                token = int(torch.multinomial(torch.softmax(processed[b], -1), 1, generator=rng))
            s = slots[b]  # as the runner's post_update: the token joins the buffer
            total = int(self.state.total_len.gpu[s])
            self.state.all_token_ids.gpu[s, total] = token
            self.state.total_len.gpu[s] = total + 1
            r["output"].append(token)
            eos = self.model.generation_config.eos_token_id
            if (
                token in (eos if isinstance(eos, list) else [eos])
                or len(r["output"]) == r["params"].max_tokens
            ):
                r["done"] = True
                self.state.remove_request(name)
        return names

    def run(self, rng=None):
        """Steps until every request is done."""
        while not all(r.get("done") for r in self.requests.values()):
            self.step(rng)


def _vllm_params(control, **sampling):
    from vllm import SamplingParams as VllmParams

    from lenvm.integrations.vllm import length_args

    return VllmParams(extra_args=length_args(control), **sampling)


def test_the_loaders_of_both_runners_take_the_processor_and_v2_admission_refuses_bad_keys(runner_v2):
    from vllm import SamplingParams as VllmParams
    from vllm.v1.sample.logits_processor import _load_custom_logitsprocs
    from vllm.v1.worker.gpu.sample.logits_processor import build_custom_logits_processors_params_validator

    from lenvm.integrations.vllm import LenVMLogitsProcessor

    assert _load_custom_logitsprocs([PROCESSOR]) == [LenVMLogitsProcessor]  # V1's loader
    admit = build_custom_logits_processors_params_validator([PROCESSOR])
    with pytest.raises(Exception, match="length_equal_to") as refused:
        admit(VllmParams(max_tokens=8, extra_args={"length_equal_to": -3}))
    assert type(refused.value).__name__ == "VLLMValidationError"  # the server's 400


@pytest.mark.parametrize("kind", ["attached", "standalone", "q"])
def test_greedy_guided_decoding_under_runner_v2_matches_our_engine(
    runner_v2, tiny128, generator128, lenvms, kind
):
    """Requests join at different steps, one long prompt is prefilled in chunks, one request is
    preempted mid-answer and resumes in another slot, slots are reused: the tokens are our
    engine's, and a request without a control is left as the generator samples it."""
    model, tok = generator128
    lenvm, path = lenvms[kind]
    prompts = [encode_prompt(tok, PROMPTS[i % 3]) for i in range(len(CONTROLS))]
    requests = [
        Request(p, SamplingParams(max_new_tokens=12, temperature=0.0), control=c)
        for p, c in zip(prompts, CONTROLS, strict=True)
    ]
    ours = Engine(model, tok, lenvm=lenvm, num_candidates=4).generate(requests)

    # Three slots for six requests: the rest wait for a slot. Request 1 is preempted at step 3 (a
    # waiting request takes its slot) and resumes from step 5 when a slot is free; request 2's
    # prompt is prefilled 8 tokens a step.
    runner = runner_v2(model, path, max_num_reqs=3, chunk=8)
    waiting, preempted = list(range(len(CONTROLS))), []
    for step in range(200):
        if step == 3:
            assert not runner.requests["1"].get("done")
            slot = runner.state.req_id_to_index["1"]
            runner.preempt("1")
            preempted.append("1")
        while runner.state.free_indices:
            if preempted and step >= 5:
                runner.resume(preempted.pop())
            elif waiting:
                i = waiting.pop(0)
                runner.add(str(i), prompts[i], _vllm_params(CONTROLS[i], max_tokens=12, temperature=0.0))
            else:
                break
        if not waiting and not preempted and all(r.get("done") for r in runner.requests.values()):
            break
        if step == 3:
            assert runner.state.req_id_to_index["3"] == slot  # the preempted request's slot, reused
        runner.step()
    theirs = {int(n): r["output"] for n, r in runner.requests.items()}
    assert [theirs[i] for i in range(len(CONTROLS))] == [r.token_ids for r in ours]
    assert len({tuple(r.token_ids) for r in ours}) > 3  # the controls change the answers
    processor = runner.processors[0]
    assert processor.state is not None and not processor.admitted  # under V2; every controlled row was read


def test_runner_v2_samples_the_policys_distribution(runner_v2, generator128, lenvms, one_step_policy):
    """At temperature 0.7 and top-p 0.9, what V2's sampler samples from after the processor (its
    temperature and truncation applied after it) is the distribution of the shared decoding step;
    a request without a control in the same batch keeps the generator's own."""
    model, tok = generator128
    control = Control("tilt", beta=8.0)
    prompt = encode_prompt(tok, PROMPTS[0])
    logits, policy = one_step_policy(
        prompt, SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=1), control
    )

    runner = runner_v2(model, lenvms["attached"][1])
    runner.add("guided", prompt, _vllm_params(control, max_tokens=1, temperature=0.7, top_p=0.9))
    runner.add("plain", prompt, _vllm_params(None, max_tokens=1, temperature=1.0))
    runner.run(rng=torch.Generator().manual_seed(0))
    guided = torch.softmax(runner.processed["guided"][0].double(), -1)
    assert torch.allclose(guided, policy, atol=1e-5)
    assert (policy - torch.softmax(logits.double() / 0.7, -1)).abs().sum() / 2 > 0.1  # not the generator's
    assert torch.allclose(runner.processed["plain"][0], logits)  # untouched


def test_runner_v2_setups_the_processor_cannot_follow_stop_vllm_at_start(runner_v2, generator128, lenvms):
    from lenvm.integrations.vllm import LenVMLogitsProcessor

    model, _ = generator128
    runner = runner_v2(model, lenvms["attached"][1])
    from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcRequestState

    state = LogitsProcRequestState.from_request_state(runner.state)
    speculative = SimpleNamespace(**{**vars(runner.config), "speculative_config": object()})
    with pytest.raises(ValueError, match="without speculative decoding"):
        LenVMLogitsProcessor(speculative, state)
    embeds = SimpleNamespace(
        **{
            **vars(runner.config),
            "model_config": SimpleNamespace(
                **{**vars(runner.config.model_config), "enable_prompt_embeds": True}
            ),
        }
    )
    with pytest.raises(ValueError, match="--enable-prompt-embeds"):
        LenVMLogitsProcessor(embeds, state)


def test_requests_that_lose_their_control_keep_their_own_sampling_and_the_rest_stay_guided(
    runner_v2, padded128, lenvms, monkeypatch, caplog
):
    """A generator that pads its embedding, beside a standalone LenVM whose own embedding lacks the
    padding ids, which the generator favours. A prompt holding one is decoded without its control,
    with its own top-k (admission took it over for the processor); a step whose LenVM forward
    fails goes unguided, each controlled row with its own sampling, and a greedy row then takes a
    padding id: from there it is decoded without its control too, rather than failing every
    later step for the whole batch; a request that joins later is guided as our engine guides it."""
    from vllm import SamplingParams as VllmParams

    from lenvm.decoding import policies

    model, tok, _ = padded128
    lenvm, path = lenvms["standalone"]
    runner = runner_v2(model, path)
    equal = {"length_equal_to": 6}
    runner.add(
        "unread", [5, len(tok) + 7], VllmParams(max_tokens=8, temperature=0.7, top_k=3, extra_args=equal)
    )
    runner.add("poisoned", [5, 6, 7], VllmParams(max_tokens=8, temperature=0.0, extra_args=equal))
    rng = torch.Generator().manual_seed(0)
    runner.step(rng)
    processor = runner.processors[0]
    sync, failed = processor._sync, []

    def failing_once(live):
        if not failed:
            failed.append(True)
            raise RuntimeError("a LenVM failure")
        return sync(live)

    monkeypatch.setattr(processor, "_sync", failing_once)
    runner.step(rng)
    assert runner.requests["poisoned"]["output"][-1] >= len(tok)  # unguided, a padding id won
    runner.add("fresh", [5, 6, 7], VllmParams(max_tokens=12, temperature=0.0, extra_args=equal))
    runner.run(rng)

    messages = [r.getMessage() for r in caplog.records if r.name == "lenvm.integrations.vllm"]
    assert sum("length control failed" in m for m in messages) == 1  # that step only
    refused = [m for m in messages if "without length control" in m]
    assert len(refused) == 2 and "the prompt holds" in refused[0] and "the answer holds" in refused[1], (
        refused
    )
    own = policies.truncate(torch.stack(runner.raw["unread"]), torch.full((8,), 0.7), torch.full((8,), 3))
    assert torch.allclose(torch.softmax(torch.stack(runner.processed["unread"]), -1), own, atol=1e-6)
    assert int((own[0] > 0).sum()) < 10  # its own top-k (3, and the padding ids' ties)
    assert int(torch.isfinite(runner.processed["poisoned"][1]).sum()) == model.config.vocab_size
    alone = Engine(model, tok, lenvm=lenvm, num_candidates=4).generate(
        [Request([5, 6, 7], SamplingParams(max_new_tokens=12, temperature=0.0), control=CONTROLS[1])]
    )
    assert runner.requests["fresh"]["output"] == alone[0].token_ids


def test_the_lenvms_cache_goes_once_new_requests_take_the_slots_of_finished_controlled_ones(
    runner_v2, generator128, lenvms
):
    """V2 never says that a request finished, and calls the processor only for batches with a
    controlled request: once plain requests have taken the slots of finished controlled ones, the
    LenVM's cache of those is freed, where no later step would free it."""
    model, _tok = generator128
    _lenvm, path = lenvms["attached"]
    runner = runner_v2(model, path, max_num_reqs=2)
    for name in ("a", "b"):
        runner.add(name, [5, 6, 7], _vllm_params(CONTROLS[1], max_tokens=8, temperature=0.0))
    runner.run()
    processor = runner.processors[0]
    assert processor.scorer is not None  # the finished requests' rows, kept
    runner.add("plain", [5, 6], _vllm_params(None, max_tokens=4, temperature=0.0))
    assert processor.scorer is not None  # one slot still names a finished controlled request
    runner.add("plain too", [5, 6], _vllm_params(None, max_tokens=4, temperature=0.0))
    assert processor.scorer is None and not processor.order
    runner.run()
    runner.add("controlled again", [5, 6, 7], _vllm_params(CONTROLS[1], max_tokens=8, temperature=0.0))
    runner.run()
    assert len(runner.requests["controlled again"]["output"]) > 0


def test_a_step_whose_unguided_fallback_fails_too_leaves_vllms_logits_as_they_are(
    runner_v2, generator128, lenvms, monkeypatch
):
    """Where guidance fails and so does sampling the controlled rows as vLLM would, the processor
    hands vLLM its logits back rather than raising into vLLM's engine (which would fail every
    request of the batch); the next step is guided again."""
    model, _tok = generator128
    _lenvm, path = lenvms["attached"]
    runner = runner_v2(model, path)
    runner.add("a", [5, 6, 7], _vllm_params(CONTROLS[1], max_tokens=8, temperature=0.0))
    runner.step()
    processor = runner.processors[0]
    guide, unguided, failed = processor._guide, processor._unguided, []

    def failing_once(method):
        def call(*args):
            if len(failed) < 2:
                failed.append(method.__name__)
                raise RuntimeError("a failure")
            return method(*args)

        return call

    monkeypatch.setattr(processor, "_guide", failing_once(guide))
    monkeypatch.setattr(processor, "_unguided", failing_once(unguided))
    runner.step()  # no exception reaches the runner
    assert failed == ["_guide", "_unguided"]
    torch.testing.assert_close(runner.processed["a"][-1], runner.raw["a"][-1])  # vLLM's own, untouched
    runner.run()
    assert runner.requests["a"]["done"]
