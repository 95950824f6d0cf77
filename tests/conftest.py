import os

import pytest

# Two cores: keep each test process from oversubscribing them.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a model hub


def pytest_collection_modifyitems(config, items):
    """vLLM tests run where vLLM is installed and skip elsewhere with the reason; with
    LENVM_REQUIRE_VLLM=1 (CI's vLLM stage) a missing vLLM is an error, not a skip."""
    from lenvm.rollouts import vllm_installed

    if vllm_installed():
        return
    if os.environ.get("LENVM_REQUIRE_VLLM") == "1":
        raise pytest.UsageError("LENVM_REQUIRE_VLLM=1 but vLLM is not installed")
    skip = pytest.mark.skip(reason="vLLM is not installed (pip install -e '.[vllm]', see the README)")
    for item in items:
        if "vllm" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def lazy_bars():
    """``(tqdm class, buffer)``: bars that draw into the buffer only when something forces them
    (their interval never passes), so that a test counts the redraws a loop forces."""
    import io

    from tqdm.auto import tqdm

    buffer = io.StringIO()

    class Bar(tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "file": buffer, "mininterval": 3600})

    return Bar, buffer


@pytest.fixture(scope="session")
def tiny_path(tmp_path_factory):
    from lenvm.testing import tiny_model

    return tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny_generator(tiny_path):
    from lenvm.hub import load_generator

    return load_generator(tiny_path)


@pytest.fixture(scope="session")
def ending_path(tmp_path_factory):
    """The tiny model with EOS made likely, so that some completions stop and some are cut."""
    from lenvm.testing import tiny_model

    return tiny_model(tmp_path_factory.mktemp("ending") / "model", eos_logit=4.0)


@pytest.fixture(scope="session")
def eos_generator(ending_path):
    from lenvm.hub import load_generator

    return load_generator(ending_path)


def synthetic_records(tokenizer, n_per_prompt=3, truncate_long=False):
    """Rollout records whose length depends on the prompt: 'short' prompts answer in 3 tokens,
    'long' ones in 24, so a working trainer must tell them apart. Each completion token counts
    down the tokens left (as a token id), so remaining length is learnable from hidden states
    even of a random model."""
    from lenvm.prompts import encode_prompt

    eos = tokenizer.eos_token_id
    records = []
    for p in range(8):
        kind = "short" if p % 2 == 0 else "long"
        text = f"Prompt {p}: give a {kind} answer about the sea."
        prompt_ids = encode_prompt(tokenizer, text)
        length = 3 if kind == "short" else 24
        for s in range(n_per_prompt):
            body = [10 + length - k + (100 if kind == "short" else 0) for k in range(length - 1)]
            finished = not (truncate_long and kind == "long" and s == 0)
            ids = body + [eos] if finished else body[:12]
            records.append(
                {
                    "prompt_id": str(p),
                    "sample_index": s,
                    "prompt": text,
                    "prompt_token_ids": prompt_ids,
                    "completion": tokenizer.decode(ids, skip_special_tokens=True),
                    "completion_token_ids": ids,
                    "finish_reason": "stop" if finished else "length",
                    "num_tokens": len(ids),
                    "generator": "tiny",
                    "sampling": {"temperature": 1.0, "max_new_tokens": 12 if not finished else 64},
                }
            )
    return records


def sentencepiece_tokenizer(decoder: str):
    """SentencePiece's scheme: a byte token <0xNN> for each byte (id 2 + NN), the words "▁a" (258),
    "▁b" (259), "▁" (260) and "a" (261), and a decoder that reads a run of byte tokens whole, every
    byte of an invalid run shown as U+FFFD. It writes "▁" as a space ("byte fallback": Gemma), and
    drops the text's first space ("strip first space": Llama, Mistral) or the first token's "▁"
    ("metaspace")."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    pieces = {"▁a": 258, "▁b": 259, "▁": 260, "a": 261}
    vocab = {"<unk>": 0, "</s>": 1, **{f"<0x{b:02X}>": 2 + b for b in range(256)}, **pieces}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    spaces = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(
        {
            "byte fallback": spaces,
            "strip first space": [*spaces, decoders.Strip(" ", 1, 0)],
            "metaspace": [decoders.ByteFallback(), decoders.Metaspace("▁", prepend_scheme="first")],
        }[decoder]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>")


def lenvm_folder_with_rollouts(tmp_path, tiny_path, tiny_generator):
    """A fresh attached LenVM saved at ``tmp_path / "l"`` (with a stray ``notes.txt`` that a
    command writing into the folder or a copy must keep) and a rollouts file of
    :func:`synthetic_records` beside it; returns both paths."""
    import json

    import torch

    from lenvm.model import LengthValueModel

    torch.manual_seed(0)
    LengthValueModel.from_base(tiny_path, generator=tiny_generator, gamma=0.9).save_pretrained(tmp_path / "l")
    (tmp_path / "l" / "notes.txt").write_text("kept")
    rollouts = tmp_path / "r.jsonl"
    rollouts.write_text("".join(json.dumps(r) + "\n" for r in synthetic_records(tiny_generator[1])))
    return tmp_path / "l", rollouts


@pytest.fixture(scope="session")
def tiny128(tmp_path_factory):
    """A tiny model that vLLM's CPU attention runs (it needs a head size of at least 32)."""
    from lenvm.testing import tiny_model

    return tiny_model(tmp_path_factory.mktemp("tiny128") / "model", hidden_size=128, eos_logit=3.0)


@pytest.fixture(scope="session")
def generator128(tiny128):
    """The generator of ``tiny128``, loaded by lenvm."""
    from lenvm import load_generator

    return load_generator(tiny128)


def _lenvm(tiny128, generator, kind, folder):
    """A LenVM whose head tells candidates apart (a fresh head's values barely differ)."""
    import torch

    from lenvm import LengthValueModel

    torch.manual_seed(0)
    lenvm = LengthValueModel.from_base(tiny128, kind=kind, generator=generator, gamma=0.9)
    with torch.no_grad():
        torch.nn.init.normal_(lenvm.head.state.fc2.weight if kind == "q" else lenvm.head.fc2.weight, std=3.0)
        if kind == "q":
            torch.nn.init.normal_(lenvm.head.proj.weight, std=0.3)
    lenvm.save_pretrained(folder)
    return LengthValueModel.from_pretrained(folder, generator=generator)


def _calibrated(tiny128, generator, folder):
    """The attached LenVM with a map that reads every state as further from its end (its values
    lie within 0.01 of 0, so the map spreads that stretch)."""
    from lenvm import LengthValueModel
    from lenvm.calibration import Calibration
    from lenvm.model import save_config

    lenvm = _lenvm(tiny128, generator, "attached", folder)
    lenvm.config.calibration = Calibration((-1.0, -0.005, 0.0), (-1.0, -0.6, 0.0)).to_dict()
    save_config(folder, lenvm.config)
    return LengthValueModel.from_pretrained(folder, generator=generator)


def _with_end_head(tiny128, generator, folder):
    """The attached LenVM with an end head whose predictions spread widely, so that the wrap-ups,
    which rank candidates by it, choose otherwise than by the value head."""
    import torch

    from lenvm import LengthValueModel
    from lenvm.model import END_HEAD_NAME, ValueHead, save_config

    lenvm = _lenvm(tiny128, generator, "attached", folder)
    torch.manual_seed(1)
    head = ValueHead(lenvm.config.hidden_size, lenvm.config.head_hidden_size)
    with torch.no_grad():
        torch.nn.init.normal_(head.fc2.weight, std=3.0)
    lenvm.config.end_head = {"gamma": 0.9, "natural_eos": 0.05}
    save_config(folder, lenvm.config, weights={END_HEAD_NAME: head.state_dict()})
    return LengthValueModel.from_pretrained(folder, generator=generator)


@pytest.fixture(scope="session")
def lenvms(tiny128, generator128, tmp_path_factory):
    """LenVMs of every kind for ``tiny128`` (and a calibrated one, one with an end head): name ->
    (LenVM, folder)."""
    root = tmp_path_factory.mktemp("lenvms")
    kinds = ("attached", "q", "standalone")
    found = {kind: (_lenvm(tiny128, generator128, kind, root / kind), root / kind) for kind in kinds}
    found["calibrated"] = (_calibrated(tiny128, generator128, root / "calibrated"), root / "calibrated")
    found["end head"] = (_with_end_head(tiny128, generator128, root / "end"), root / "end")
    return found


@pytest.fixture(scope="session")
def one_step_policy(generator128, lenvms):
    """``(prompt ids, sampling, control) -> (the generator's logits [V], the shared decoding step's
    distribution over the vocabulary [V], float64)`` for ``tiny128``'s first answer token under the
    attached LenVM, 4 candidates."""
    import torch

    from lenvm.decoding.scorers import scorer_for
    from lenvm.decoding.step import Rows, decide

    model, _ = generator128
    lenvm, _ = lenvms["attached"]

    def policy(prompt, sampling, control):
        with torch.no_grad():
            logits = model(torch.tensor([prompt])).logits[:, -1].float()
            scorer = scorer_for(lenvm).prefill(lenvm, [prompt])
            eos = torch.tensor(lenvm.config.eos_token_ids)
            d = decide(logits, Rows.build([sampling], [control], [0], "cpu"), scorer, 4, eos, lenvm.gamma)
        dense = torch.zeros(logits.shape[-1], dtype=torch.float64)
        dense[d.ids[0]] = d.dist[0].double()
        return logits[0], dense

    return policy


@pytest.fixture(scope="session")
def padded128(tiny128, tmp_path_factory):
    """``(model, tokenizer, folder)``: ``tiny128`` with 8 rows of padding past the tokenizer's ids
    in its embedding (as generators pad theirs), which a standalone LenVM's own embedding lacks;
    tied, so their logits beat EOS's, which the tiny model favours. Saved for vLLM."""
    import torch

    from lenvm import load_generator

    model, tok = load_generator(tiny128)  # a copy of its own
    model.resize_token_embeddings(len(tok) + 8, mean_resizing=False)
    with torch.no_grad():
        embeddings = model.get_input_embeddings().weight
        embeddings[len(tok) :] = 3 * embeddings[tok.eos_token_id]
    folder = tmp_path_factory.mktemp("padded128")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    model.name_or_path = str(folder)
    return model, tok, folder


@pytest.fixture(scope="session")
def vllm_server(tiny128, tmp_path_factory):
    """`vllm serve` (vLLM's OpenAI server module) of ``tiny128`` as model "tiny" on 127.0.0.1, with
    lenvm's logits processor and an attached LenVM; yields the base URL (without /v1)."""
    import subprocess
    import sys
    import time
    import urllib.request

    import torch

    from lenvm import LengthValueModel

    root = tmp_path_factory.mktemp("vllm-server")
    torch.manual_seed(0)
    lenvm = LengthValueModel.from_base(tiny128, kind="attached", gamma=0.9)
    with torch.no_grad():
        torch.nn.init.normal_(lenvm.head.fc2.weight, std=3.0)  # candidates get values apart
    lenvm.save_pretrained(root / "lenvm")
    port = _free_port()
    env = {**os.environ, "LENVM_PATH": str(root / "lenvm"), "LENVM_NUM_CANDIDATES": "4"}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(tiny128)]
    command += ["--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--enforce-eager"]
    command += ["--max-model-len", "512", "--max-num-seqs", "8", "--served-model-name", "tiny"]
    command += ["--logits-processors", "lenvm.integrations.vllm:LenVMLogitsProcessor"]
    log = root / "server.log"
    with log.open("w") as fh:
        server = subprocess.Popen(command, env=env, stdout=fh, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            if server.poll() is not None:
                pytest.fail(f"vLLM's server exited: {log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(base + "/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"vLLM's server did not start: {log.read_text()[-3000:]}")
            time.sleep(1)
        yield base
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def vlm_path(tmp_path_factory):
    """A tiny Qwen2.5-VL whose answers end (EOS made likely), with a small image processor."""
    from lenvm.testing import tiny_vlm

    return tiny_vlm(tmp_path_factory.mktemp("vlm") / "model", eos_logit=3.0)


@pytest.fixture(scope="session")
def vlm_generator(vlm_path):
    from lenvm.hub import load_generator

    return load_generator(vlm_path)


@pytest.fixture(scope="session")
def shapes(tmp_path_factory):
    """The prompts file of six generated shape images with questions."""
    from lenvm.testing import shape_images

    return shape_images(tmp_path_factory.mktemp("shapes"), n=6)
