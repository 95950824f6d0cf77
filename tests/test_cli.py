"""The command line as a user drives it: tiny model, real files, exit codes and messages."""

import json
from pathlib import Path

import pytest

from lenvm.cli import main


@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    rows = [
        {"id": "a", "prompt": "List three colors."},
        {"messages": [{"role": "user", "content": "Explain why the sky is blue."}]},
        {"prompt": "What is 12 plus 30?"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_rollout_train_predict_end_to_end(tmp_path, tiny_path, prompts_file, capsys):
    rollouts = tmp_path / "r.jsonl"
    args = [
        "rollout",
        "--model",
        str(tiny_path),
        "--prompts",
        str(prompts_file),
        "--n",
        "2",
        "--max-new-tokens",
        "12",
        "--out",
        str(rollouts),
    ]
    assert main(args) == 0
    records = [json.loads(line) for line in rollouts.read_text().splitlines()]
    assert len(records) == 6 and {r["prompt_id"] for r in records} == {"a", "1", "2"}
    capsys.readouterr()
    assert main(args) == 0  # resumes: nothing left to do, nothing duplicated
    assert len(rollouts.read_text().splitlines()) == 6
    assert json.loads(capsys.readouterr().out)["seconds_this_run"] == 0.0  # this invocation's, not the run's

    out = tmp_path / "lenvm"
    capsys.readouterr()
    # Without --base, the LenVM is trained on the generator the rollouts name.
    assert (
        main(
            [
                "train",
                "--rollouts",
                str(rollouts),
                "--out",
                str(out),
                "--epochs",
                "2",
                "--eval-fraction",
                "0.34",
            ]
        )
        == 0
    )
    printed = capsys.readouterr()
    err = printed.err
    assert f"base: {tiny_path} (the generator the rollouts name" in err and "held-out" in err
    assert "seconds_this_run" in json.loads(printed.out)  # a resumed training's earlier time is unknown
    quiet = ["train", "--rollouts", str(rollouts), "--out", str(tmp_path / "quiet"), "--epochs", "2"]
    assert main([*quiet, "--eval-fraction", "0.34", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "held-out" not in err and "training head" not in err
    assert json.loads((out / "config.json").read_text())["base_model"] == str(tiny_path)
    assert (out / "config.json").exists() and (out / "head.safetensors").exists()
    # Training again into a LenVM, or into a folder of something else, replaces nothing unasked.
    again = ["train", "--rollouts", str(rollouts), "--base", str(tiny_path), "--epochs", "1", "--out"]
    before = (out / "head.safetensors").read_bytes()
    code, err = _error(capsys, [*again, str(out)])
    assert code == 2 and "--overwrite" in err and (out / "head.safetensors").read_bytes() == before
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("keep me")
    code, err = _error(capsys, [*again, str(other), "--overwrite"])
    assert code == 2 and "not a LenVM" in err and (other / "todo.txt").read_text() == "keep me"
    code, err = _error(capsys, [*again, str(tmp_path / "d"), "--accelerate-config", "ddp"])
    assert code == 2 and "--kind standalone" in err  # a frozen backbone: every process would repeat it
    code, err = _error(capsys, [*again, str(tmp_path / "d"), "--num-processes", "2"])
    assert code == 2 and "--num-processes goes with --accelerate-config" in err
    code, err = _error(capsys, [*again, str(tmp_path / "d"), "--features-cache", str(tmp_path / "d")])
    assert code == 2 and "folders of their own" in err
    assert main([*again, str(tmp_path / "replaced"), "--eval-fraction", "0.34"]) == 0
    assert main([*again, str(tmp_path / "replaced"), "--eval-fraction", "0.34", "--overwrite"]) == 0
    capsys.readouterr()
    assert main(["predict", "--lenvm", str(out), "--prompts", str(prompts_file), "--json"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["id"] for x in lines] == ["a", "1", "2"]
    from lenvm import LengthValueModel, read_prompts

    expected = LengthValueModel.from_pretrained(out).predict_length(read_prompts(prompts_file))
    assert [x["predicted_length"] for x in lines] == [round(x, 2) for x in expected]
    assert main(["predict", "--lenvm", str(out), "--prompt", "Hello"]) == 0
    hello = LengthValueModel.from_pretrained(out).predict_length("Hello")
    assert capsys.readouterr().out == f"0\t{hello:.1f}\n"
    # --prompt with the chat template's variables: the tiny template writes an empty think block.
    thinking_off = ["--prompt", "Hello", "--chat-template-kwargs", '{"enable_thinking": false}']
    assert main(["predict", "--lenvm", str(out), "--json", *thinking_off]) == 0
    from lenvm.prompts import Prompt

    off = LengthValueModel.from_pretrained(out).predict_length(
        Prompt("0", text="Hello", chat_template_kwargs={"enable_thinking": False})
    )
    assert json.loads(capsys.readouterr().out)["predicted_length"] == round(off, 2) != round(hello, 2)
    code, err = _error(
        capsys, ["predict", "--lenvm", str(out), "--prompts", str(prompts_file), *thinking_off[2:]]
    )
    assert code == 2 and "a prompts file gives each record's 'chat_template_kwargs'" in err
    code, err = _error(
        capsys, ["predict", "--lenvm", str(out), "--prompt", "Hi", "--chat-template-kwargs", "[1]"]
    )
    assert code == 2 and "expected a JSON object" in err
    # values prints one JSON line, whether or not it also writes the HTML view.
    values = ["values", "--lenvm", str(out), "--prompt", "Hello", "--completion", "Hi there"]
    for extra in ([], ["--html", str(tmp_path / "v.html")]):
        assert main([*values, *extra]) == 0
        printed = capsys.readouterr().out.splitlines()
        assert len(printed) == 1 and len(json.loads(printed[0])["tokens"]) >= 2
    # A rollout record, valued on the generator's own token ids; a completion read from a file.
    second = json.loads(rollouts.read_text().splitlines()[1])
    by_record = ["values", "--lenvm", str(out), "--rollouts", str(rollouts), "--record", "2"]
    assert main(by_record) == 0
    trace = json.loads(capsys.readouterr().out)
    ids = second["completion_token_ids"]
    assert [t["token_id"] for t in trace["tokens"]][: len(ids)] == ids
    assert trace["finished"] == (second["finish_reason"] == "stop")
    assert trace["prompt_tokens"] == len(second["prompt_token_ids"])
    # The record's prompt ids as they are (not the prompt encoded again), if they read back.
    tok = LengthValueModel.from_pretrained(out).tokenizer
    text = second["prompt"] if isinstance(second["prompt"], str) else second["prompt"][-1]["content"]
    raw = {**second, "prompt_token_ids": tok(text)["input_ids"]}  # no chat template
    foreign = {**second, "prompt_token_ids": [7] * 5}
    (tmp_path / "odd.jsonl").write_text(json.dumps(raw) + "\n" + json.dumps(foreign) + "\n")
    odd = ["values", "--lenvm", str(out), "--rollouts", str(tmp_path / "odd.jsonl")]
    assert main(odd) == 0
    assert json.loads(capsys.readouterr().out)["prompt_tokens"] == len(raw["prompt_token_ids"])
    code, err = _error(capsys, [*odd, "--record", "2"])
    assert code == 2 and "do not read back" in err and "show it with a LenVM of that generator" in err
    (tmp_path / "answer.txt").write_text("Hi there")
    assert main([*values[:-1], "@" + str(tmp_path / "answer.txt")]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == json.loads(printed[0])["tokens"]
    (tmp_path / "bom.txt").write_bytes("Hi there".encode("utf-8-sig"))  # as some editors save it
    assert main([*values[:-1], "@" + str(tmp_path / "bom.txt")]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == json.loads(printed[0])["tokens"]
    (tmp_path / "wide.txt").write_bytes("Hi there".encode("utf-16"))
    code, err = _error(capsys, [*values[:-1], "@" + str(tmp_path / "wide.txt")])
    assert code == 2 and "not UTF-8 text" in err
    code, err = _error(capsys, [*by_record[:-1], "99"])
    assert code == 2 and "fewer than 99 records" in err
    code, err = _error(capsys, [*by_record, "--prompt", "Hello"])
    assert code == 2 and "drop --prompt" in err
    code, err = _error(capsys, [*values, "--record", "2"])  # not silently ignored
    assert code == 2 and "--record picks a record of --rollouts" in err

    # Held-out prompts in a file of their own, and the layer the head reads.
    held = tmp_path / "held.jsonl"
    lines = rollouts.read_text().splitlines()
    held.write_text("\n".join(x for x in lines if json.loads(x)["prompt_id"] == "a") + "\n")
    rest = tmp_path / "rest.jsonl"
    rest.write_text("\n".join(x for x in lines if json.loads(x)["prompt_id"] != "a") + "\n")
    out2 = tmp_path / "lenvm2"
    argv = ["train", "--rollouts", str(rest), "--eval-rollouts", str(held), "--base", str(tiny_path)]
    argv += ["--out", str(out2), "--epochs", "2", "--feature-layer", "-1"]
    # The training options map onto TrainConfig's fields.
    argv += ["--lam", "0.7", "--loss", "huber", "--huber-delta", "0.1", "--relative-loss-weight", "0.05"]
    argv += ["--aggregation", "seq-mean-token-sum", "--prompt-weight", "4", "--stream", "--no-bf16"]
    capsys.readouterr()
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    config = json.loads((out2 / "config.json").read_text())
    assert config["feature_layer"] == -1 and config["training"]["eval_completions"] == 2
    training = config["training"]
    assert (training["lam"], training["loss"], training["huber_delta"]) == (0.7, "huber", 0.1)
    assert (training["aggregation"], training["relative_loss_weight"]) == ("seq-mean-token-sum", 0.05)
    assert training["prompt_weight"] == 4
    assert training["streamed"] and training["bf16"] is False
    assert training["metrics"] == printed["metrics"]  # (this random model's answers never end)
    assert json.loads((out / "config.json").read_text())["feature_layer"] == 1  # the default


def rows_text(rows):
    return "".join(json.dumps(r) + "\n" for r in rows)


def _error(capsys, argv):
    code = main(argv)
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--port", "99999", "must be from 0 to 65535"),
        ("--max-queue", "-1", "must be at least 0"),
        ("--shutdown-timeout", "soon", "expected a number"),
        ("--stream-stall-timeout", "0", "must be above 0"),
        ("--batch-size", "0", "must be at least 1"),
    ],
)
def test_serve_options_out_of_range_are_usage_errors(capsys, flag, value, message):
    assert main(["serve", flag, value]) == 2
    assert f"argument {flag}: {message}" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("[1]", "expected a JSON object of names and values"),
        ('"max_model_len"', "expected a JSON object of names and values"),
        ("{max_model_len: 1}", "not JSON (Expecting property name"),
    ],
)
def test_vllm_args_that_are_no_json_object_are_usage_errors(capsys, value, message):
    assert main(["rollout", "--prompts", "p.jsonl", "--out", "r.jsonl", "--vllm-args", value]) == 2
    assert f"argument --vllm-args: {message}" in capsys.readouterr().err


def test_clear_errors(tmp_path, tiny_path, prompts_file, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": "broken\n')
    code, err = _error(
        capsys,
        ["rollout", "--model", str(tiny_path), "--prompts", str(bad), "--out", str(tmp_path / "o.jsonl")],
    )
    assert code == 2 and f"{bad}:2" in err

    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"prompt": "ok"}\n\n{"prompt": "   "}\n')
    code, err = _error(
        capsys,
        ["rollout", "--model", str(tiny_path), "--prompts", str(empty), "--out", str(tmp_path / "o.jsonl")],
    )
    assert code == 2 and "empty" in err and f"{empty}:3" in err  # the line, blank lines counted

    for bad_id in ("null", '""', "true", "[1]"):
        ids = tmp_path / "ids.jsonl"
        ids.write_text('{"id": 7, "prompt": "ok"}\n{"id": ' + bad_id + ', "prompt": "ok"}\n')
        code, err = _error(capsys, ["predict", "--lenvm", str(tmp_path / "none"), "--prompts", str(ids)])
        assert code == 2 and f"{ids}:2: 'id' must be a non-empty string or an integer, got {bad_id}" in err

    code, err = _error(
        capsys,
        [
            "rollout",
            "--model",
            "no-such-model",
            "--prompts",
            str(prompts_file),
            "--out",
            str(tmp_path / "o.jsonl"),
        ],
    )
    assert code == 2 and "unknown model" in err

    code, err = _error(
        capsys,
        [
            "rollout",
            "--model",
            str(tiny_path),
            "--prompts",
            str(prompts_file),
            "--n",
            "0",
            "--out",
            str(tmp_path / "o.jsonl"),
        ],
    )
    assert code == 2 and "n" in err

    rollouts = tmp_path / "r.jsonl"
    record = {
        "prompt_id": "x",
        "sample_index": 0,
        "prompt": "hi",
        "prompt_token_ids": [1, 2],
        "completion": "a",
        "finish_reason": "stop",
        "num_tokens": 1,
        "generator": "g",
        "sampling": {},
    }
    rollouts.write_text(json.dumps(record) + "\n")
    code, err = _error(
        capsys,
        ["train", "--rollouts", str(rollouts), "--base", str(tiny_path), "--out", str(tmp_path / "lv")],
    )
    assert code == 2 and "completion_token_ids" in err and f"{rollouts}:1" in err

    code, err = _error(
        capsys,
        [
            "train",
            "--rollouts",
            str(rollouts),
            "--base",
            str(tiny_path),
            "--out",
            str(tmp_path / "lv"),
            "--gamma",
            "1.5",
        ],
    )
    assert code == 2 and "gamma" in err

    code, err = _error(capsys, ["predict", "--lenvm", str(tiny_path), "--prompt", "hi"])
    assert code == 2 and "not a LenVM" in err

    code, err = _error(
        capsys, ["generate", "--model", str(tiny_path), "--prompt", "hi", "--device", "banana"]
    )
    assert code == 2 and "unknown device 'banana'" in err


@pytest.mark.parametrize(
    "argv",
    [
        ["bench", "schedule", "--live", "-1"],
        ["bench", "length-tokens", "--batch-size", "0"],
        ["bench", "lifebench", "--targets", "0"],
        ["bench", "lifebench", "--max-prompt-tokens", "0"],
        ["bench", "lifebench", "--langs", "fr"],
        ["bench", "predict", "--limit", "-2"],
    ],
)
def test_bench_flags_out_of_range_are_refused_before_anything_runs(argv, capsys):
    assert main(argv) == 2 and "error: argument" in capsys.readouterr().err


def test_models_list(capsys):
    assert main(["models", "list"]) == 0
    assert "smollm2-135m-instruct" in capsys.readouterr().out
    code = main(["models", "prepare", "nope"])
    assert code == 2 and "unknown built-in model" in capsys.readouterr().err


def test_models_list_keeps_a_path_with_a_tab_in_its_field(tmp_path, monkeypatch, capsys):
    cache = tmp_path / "cache\tdir"
    monkeypatch.setenv("LENVM_CACHE", str(cache))
    assert main(["models", "list"]) == 0
    for line in capsys.readouterr().out.splitlines():
        name, state, description, path = line.split("\t")
        assert json.loads(path).startswith(str(cache))  # a JSON string, the tab escaped


@pytest.fixture(scope="module")
def tiny_lenvm(tmp_path_factory, tiny_path, tiny_generator):
    from lenvm.model import LengthValueModel

    path = tmp_path_factory.mktemp("lenvm") / "lenvm"
    LengthValueModel.from_base(tiny_path, gamma=0.9, generator=tiny_generator).save_pretrained(path)
    return path


HOSTILE_IDS = ["tab\tid", "new\nline", '"quoted"', "中文 ü", "next\x85line", "plain"]


@pytest.fixture
def hostile_prompts(tmp_path):
    path = tmp_path / "hostile.jsonl"  # prompts of falling lengths: --out runs them in another order
    path.write_text(rows_text({"id": pid, "prompt": "word " * (9 - i)} for i, pid in enumerate(HOSTILE_IDS)))
    return path


def test_predict_keeps_each_prompt_on_its_line_and_writes_text_as_it_is(
    tmp_path, tiny_lenvm, hostile_prompts, capsys
):
    """An id with a tab or a line break would break the plain tab-separated line: such an id is a
    JSON string there. Non-ASCII is raw UTF-8 in every output, as lenvm's files write it."""
    base = ["predict", "--lenvm", str(tiny_lenvm), "--prompts", str(hostile_prompts), "--no-progress"]
    assert main(base) == 0
    lines = capsys.readouterr().out.splitlines()
    fields = [line.split("\t") for line in lines]
    assert len(lines) == len(HOSTILE_IDS) and all(len(f) == 2 for f in fields)
    assert [json.loads(pid) if pid.startswith('"') else pid for pid, _ in fields] == HOSTILE_IDS
    assert lines[3].startswith("中文 ü\t") and lines[5].startswith("plain\t")  # as they are
    assert main([*base, "--json"]) == 0
    printed = capsys.readouterr().out
    assert '"中文 ü"' in printed and [json.loads(x)["id"] for x in printed.split("\n")[:-1]] == HOSTILE_IDS
    out = tmp_path / "predictions.jsonl"
    assert main([*base, "--out", str(out)]) == 0
    written = out.read_text(encoding="utf-8")  # appended, then put in the prompts' order
    assert '"中文 ü"' in written and [json.loads(x)["id"] for x in written.split("\n")[:-1]] == HOSTILE_IDS


def test_what_stdout_and_stderr_cannot_encode_is_escaped_then_they_are_as_they_were(
    tmp_path, tiny_lenvm, hostile_prompts, monkeypatch
):
    """An ASCII or cp1252 console took the work and then a UnicodeEncodeError's traceback; now
    what it cannot write is escaped as JSON escapes it (JSON lines stay JSON), while a command
    runs only: main() may run in a notebook's process."""
    import io
    import sys

    stdout, stderr = (io.TextIOWrapper(io.BytesIO(), encoding="ascii") for _ in range(2))
    monkeypatch.setattr(sys, "stdout", stdout)
    monkeypatch.setattr(sys, "stderr", stderr)
    base = ["predict", "--lenvm", str(tiny_lenvm), "--prompts", str(hostile_prompts), "--no-progress"]
    assert main(base) == 0
    assert main([*base, "--json"]) == 0
    twice = tmp_path / "twice.jsonl"
    twice.write_text(rows_text([{"id": "模", "prompt": "x"}, {"id": "模", "prompt": "y"}]))
    assert main([*base[:4], str(twice)]) == 2
    assert stdout.errors == stderr.errors == "strict"
    stdout.flush()
    stderr.flush()
    plain, json_lines = stdout.buffer.getvalue().decode("ascii").split("\nplain\t", 1)
    # A field the console cannot write is a JSON string: its escapes read as escapes, not as text.
    assert '\n"\\u4e2d\\u6587 \\u00fc"\t' in plain
    fields = [line.split("\t")[0] for line in (plain + "\nplain\t").splitlines()]
    assert [json.loads(f) if f.startswith('"') else f for f in fields] == HOSTILE_IDS
    assert [json.loads(line)["id"] for line in json_lines.splitlines()[1:]] == HOSTILE_IDS
    assert "duplicate prompt id '\\u6a21'" in stderr.buffer.getvalue().decode("ascii")


@pytest.mark.filterwarnings("ignore:no training completion ended with EOS:UserWarning")
def test_rollout_and_train_summaries_write_text_as_it_is(tmp_path, tiny_path, prompts_file, capsys):
    rollouts = tmp_path / "rollouts ü 模.jsonl"
    sample = ["rollout", "--model", str(tiny_path), "--prompts", str(prompts_file), "--n", "2"]
    assert main([*sample, "--max-new-tokens", "4", "--out", str(rollouts), "--no-progress"]) == 0
    assert json.dumps(str(rollouts), ensure_ascii=False) in capsys.readouterr().out
    out = tmp_path / "lenvm ü 模"
    train = ["train", "--rollouts", str(rollouts), "--out", str(out), "--epochs", "1"]
    assert main([*train, "--eval-fraction", "0.34", "--no-progress"]) == 0
    assert json.dumps(str(out), ensure_ascii=False) in capsys.readouterr().out


def test_generate_with_and_without_a_length_control(
    tmp_path, tiny_path, tiny_generator, prompts_file, capsys
):
    from lenvm.model import LengthValueModel

    lenvm = tmp_path / "lenvm"
    LengthValueModel.from_base(
        tiny_path, kind="attached", gamma=0.9, generator=tiny_generator
    ).save_pretrained(lenvm)
    base = ["generate", "--model", str(tiny_path), "--max-new-tokens", "6", "--seed", "0"]
    assert main([*base, "--lenvm", str(lenvm), "--prompt", "Hi", "--at-most", "3", "--json", "--values"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["num_tokens"] <= 3 and len(record["values"]) == record["num_tokens"] + 1
    assert record["finish_reason"] == "stop" and 0 < record["eos_prob"] <= 1
    assert len(record["token_ids"]) == record["num_tokens"] + 1  # its EOS too: for lenvm values
    # Without --model, the generator the LenVM reads: the same answer.
    alone = [x for x in base if x not in ("--model", str(tiny_path))]
    argv = [*alone, "--lenvm", str(lenvm), "--prompt", "Hi", "--at-most", "3", "--json", "--values"]
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out) == record

    # A batch from a file, mixing nothing but plain sampling: one JSON line per prompt, in order.
    assert main([*base, "--prompts", str(prompts_file)]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["id"] for r in lines] == ["a", "1", "2"]
    one = tmp_path / "one.jsonl"
    one.write_text(prompts_file.read_text().splitlines()[0] + "\n")
    assert main([*base, "--prompts", str(one)]) == 0  # a file of one prompt: still a JSON line
    assert json.loads(capsys.readouterr().out)["id"] == "a"
    # --seed: each prompt's own stream, as a rollout's sample 0 has (the same text twice: two draws).
    twice = tmp_path / "twice.jsonl"
    twice.write_text("".join(json.dumps({"id": i, "prompt": "Tell me a story."}) + "\n" for i in ("a", "b")))
    assert main([*base, "--prompts", str(twice), "--max-new-tokens", "12"]) == 0
    a, b = (json.loads(line) for line in capsys.readouterr().out.splitlines())
    assert a["token_ids"] != b["token_ids"]
    rolled = tmp_path / "rolled.jsonl"
    roll = ["rollout", "--model", str(tiny_path), "--prompts", str(twice), "--out", str(rolled), "--n", "1"]
    assert main([*roll, "--max-new-tokens", "12", "--seed", "0", "--temperature", "1"]) == 0
    capsys.readouterr()
    assert [r["completion_token_ids"] for r in map(json.loads, rolled.read_text().splitlines())] == [
        a["token_ids"],
        b["token_ids"],
    ]
    long = tmp_path / "long.jsonl"
    long.write_text(one.read_text() + json.dumps({"id": "big", "prompt": "word " * 1100}) + "\n")
    code, err = _error(capsys, [*base, "--prompts", str(long)])  # named as predict names it
    assert code == 2 and "prompt 2 (id 'big'):" in err and "context" in err
    # Left out, --max-new-tokens fits the context a long prompt leaves (the server's default too);
    # given, it is kept, and too many for the context is an error.
    near = ["generate", "--model", str(tiny_path), "--prompt", "word " * 200, "--json", "--temperature", "0"]
    assert main([*near, "--seed", "0"]) == 0
    assert json.loads(capsys.readouterr().out)["finish_reason"] in ("stop", "length")
    code, err = _error(capsys, [*near, "--max-new-tokens", "1024"])
    assert code == 2 and "context" in err
    code, err = _error(
        capsys, [*near, "--lenvm", str(lenvm), "--equal-to", "10"]
    )  # the limit it chose is named
    assert code == 2 and "max_new_tokens (left out: what the context leaves after the prompt" in err

    code, err = _error(capsys, [*base, "--prompt", "Hi", "--equal-to", "5"])
    assert code == 2 and "needs a LenVM" in err
    code, err = _error(capsys, [*base, "--lenvm", str(lenvm), "--prompt", "Hi", "--tilt", "nan"])
    assert code == 2 and "finite beta" in err
    argv = [*base, "--lenvm", str(lenvm), "--prompt", "Hi", "--at-least", "3", "--hard-cap-slack", "2"]
    code, err = _error(capsys, argv)  # not silently dropped
    assert code == 2 and "hard_cap_slack" in err
    code, err = _error(capsys, [*base, "--prompt", "Hi", "--rule", "paper", "--retries", "0"])
    assert code == 2 and "--rule, --retries shape a length control" in err

    # Equal To, best of three attempts: one answer comes back.
    argv = [*base, "--lenvm", str(lenvm), "--prompt", "Hi", "--equal-to", "3", "--best-of", "3", "--json"]
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["finish_reason"] in ("stop", "length")
    code, err = _error(
        capsys, [*base, "--lenvm", str(lenvm), "--prompt", "Hi", "--at-most", "3", "--best-of", "2"]
    )
    assert code == 2 and "equal_to" in err

    # Retries: the JSON line says how many ends were resampled and what was decoded in all.
    argv = [*base, "--lenvm", str(lenvm), "--prompt", "Hi", "--equal-to", "3", "--retries", "2", "--json"]
    assert main(argv) == 0
    record = json.loads(capsys.readouterr().out)
    assert 0 <= record["retries"] <= 2 and record["decoded_tokens"] >= record["num_tokens"]
    argv = [*base, "--lenvm", str(lenvm), "--prompt", "Hi", "--at-least", "3", "--retries", "1", "--json"]
    assert main(argv) == 0  # every target control resamples ends that are not natural
    assert 0 <= json.loads(capsys.readouterr().out)["retries"] <= 1
    code, err = _error(
        capsys, [*base, "--lenvm", str(lenvm), "--prompt", "Hi", "--tilt", "1", "--retries", "1"]
    )
    assert code == 2 and "retries" in err


def test_predict_a_file_in_batches_resumes_and_refuses_bad_input(tmp_path, tiny_path, tiny_generator, capsys):
    from lenvm.model import LengthValueModel
    from lenvm.testing import tiny_model, tiny_tokenizer

    lenvm = tmp_path / "lenvm"
    LengthValueModel.from_base(tiny_path, gamma=0.9, generator=tiny_generator).save_pretrained(lenvm)
    prompts = tmp_path / "many.jsonl"
    rows = [{"id": f"p{i}", "prompt": "word " * (1 + i % 7)} for i in range(20)]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "predictions.jsonl"
    base = ["predict", "--lenvm", str(lenvm), "--prompts", str(prompts), "--batch-size", "4", "--no-progress"]
    assert main([*base, "--out", str(out)]) == 0
    first = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in first] == [r["id"] for r in rows]  # run by length, written in order
    err = capsys.readouterr().err
    assert "20 prompts predicted" in err and "prompts/s at batch 4" in err
    # The same lengths as one prompt at a time (padding and batching change nothing).
    alone = LengthValueModel.from_pretrained(lenvm, generator=tiny_generator)
    by_id = {r["id"]: r["predicted_length"] for r in first}
    assert by_id["p3"] == pytest.approx(alone.predict_length("word " * 4), abs=0.01)
    # Interrupted after 5 lines: a rerun predicts only the rest.
    out.write_text("".join(json.dumps(r) + "\n" for r in first[:5]) + '{"id": "p')
    assert main([*base, "--out", str(out)]) == 0
    assert "15 prompts predicted" in capsys.readouterr().err
    again = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in again] == [r["id"] for r in rows]
    # --json without --out prints the same fields as a line of the file, in the same order.
    assert main([*base, "--json"]) == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert printed == [{k: r[k] for k in ("id", "predicted_length", "prompt_tokens")} for r in again]
    # The same generator named another way (a relative path, a trailing slash) resumes.
    import os

    here = os.getcwd()
    os.chdir(Path(tiny_path).parent)
    try:
        spelled = f"./{Path(tiny_path).name}/"
        assert main([*base, "--out", str(out), "--model", spelled]) == 0
    finally:
        os.chdir(here)
    capsys.readouterr()
    # Resuming with another LenVM, or another prompt under a predicted id, mixes nothing in.
    retrained = tmp_path / "lenvm-b"
    LengthValueModel.from_base(tiny_path, gamma=0.8, generator=tiny_generator).save_pretrained(retrained)
    code, err = _error(capsys, [*base, "--out", str(out), "--lenvm", str(retrained)])
    assert code == 2 and "another LenVM" in err
    code, err = _error(capsys, [*base, "--out", str(out), "--dtype", "bfloat16"])  # other values too
    assert code == 2 and "another generator or dtype" in err
    code, err = _error(capsys, [*base, "--out", str(out), "--json"])  # not silently one of them
    assert code == 2 and "give one of them" in err
    changed = tmp_path / "changed.jsonl"
    changed.write_text("".join(json.dumps({**r, "prompt": r["prompt"] + "more"}) + "\n" for r in rows))
    code, err = _error(capsys, [*base[:4], str(changed), *base[5:], "--out", str(out)])
    assert code == 2 and "'p0'" in err and "not the prompt" in err
    assert out.read_text().splitlines() == [json.dumps(r) for r in again]  # untouched
    # A second run into the file while one writes it: refused, not appending to a file the first
    # replaces when it puts its lines in order.
    from lenvm.io import RunLock

    with RunLock(out, "predicting into this file"):
        code, err = _error(capsys, [*base, "--out", str(out)])
    assert code == 2 and "another run is predicting into this file" in err
    # An --out that is not a predictions file (the prompts file itself, given by mistake; its last
    # line without a newline) is left exactly as it was.
    typo = tmp_path / "typo.jsonl"
    typo.write_text(prompts.read_text().rstrip("\n"))
    before = typo.read_bytes()
    code, err = _error(capsys, [*base[:4], str(typo), *base[5:], "--out", str(typo)])
    assert code == 2 and f"{typo}:1 is not a line of predictions (no predicted_length)" in err
    assert typo.read_bytes() == before
    # Prompts files: not UTF-8 is an error naming the line; a byte-order mark is fine.
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"id": "a", "prompt": "hi"}\n{"id": "b", "prompt": "caf\xe9"}\n')
    code, err = _error(capsys, [*base[:4], str(latin)])
    assert code == 2 and f"{latin}:2: not UTF-8 text" in err
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + rows_text(rows[:2]).encode())
    assert main([*base[:4], str(bom), "--json"]) == 0
    assert [json.loads(x)["id"] for x in capsys.readouterr().out.splitlines()] == ["p0", "p1"]
    joined = tmp_path / "joined.jsonl"  # two such files joined with cat: a mark inside
    joined.write_bytes(bom.read_bytes() + b"\xef\xbb\xbf" + rows_text(rows[2:3]).encode())
    code, err = _error(capsys, [*base[:4], str(joined)])
    assert code == 2 and f"{joined}:3: the line starts with a byte-order mark (U+FEFF)" in err

    def error(argv):
        code = main(argv)
        return code, capsys.readouterr().err

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    code, err = error(["predict", "--lenvm", str(lenvm), "--prompts", str(empty)])
    assert code == 2 and "no prompts" in err
    code, err = error(["predict", "--lenvm", str(lenvm), "--prompt", "word " * 1100])
    assert code == 2 and "context of 1024" in err
    other = tiny_model(tmp_path / "other", seed=1)
    tiny_tokenizer(vocab_size=300).save_pretrained(other)
    code, err = error(["predict", "--lenvm", str(lenvm), "--model", str(other), "--prompt", "hi"])
    assert code == 2 and "tokenizer differs" in err


def test_every_option_has_help_and_bench_defaults_match_the_python_api():
    import argparse
    import inspect

    from lenvm.bench.lifebench import run_lifebench
    from lenvm.bench.tradeoff import run_tradeoff
    from lenvm.cli.commands import build_parser

    parser = build_parser()

    def undocumented(p, name):
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub_name, sub in action.choices.items():
                    yield from undocumented(sub, f"{name} {sub_name}")
            elif not action.help:
                yield f"{name} {'/'.join(action.option_strings) or action.dest}"

    assert list(undocumented(parser, "lenvm")) == []
    for command, run in (("lifebench", run_lifebench), ("tradeoff", run_tradeoff)):
        args = parser.parse_args(["bench", command])
        assert args.max_new_tokens == inspect.signature(run).parameters["max_new_tokens"].default


@pytest.mark.parametrize("beta", ["-1e-3", "-.5", "-2", "1e-3"])
def test_a_negative_number_in_any_notation_is_a_value(beta):
    """``--tilt -1e-3`` is the number, as ``--tilt=-1e-3`` is, not an unknown option."""
    from lenvm.cli.commands import build_parser

    args = build_parser().parse_args(["generate", "--prompt", "Hi", "--tilt", beta])
    assert args.tilt == float(beta)


def test_every_option_with_a_default_says_it_in_its_help():
    import argparse

    from lenvm.cli.commands import build_parser

    def options(p, name):
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub_name, sub in action.choices.items():
                    yield from options(sub, f"{name} {sub_name}")
            elif action.option_strings:
                yield f"{name} {action.option_strings[0]}", action, p._get_formatter()._expand_help(action)

    walked = list(options(build_parser(), "lenvm"))
    with_default = [
        (option, shown)
        for option, action, shown in walked
        if action.nargs != 0 and action.default not in (None, argparse.SUPPRESS, [])
    ]
    assert len(with_default) > 100
    assert [option for option, shown in with_default if "default" not in shown] == []
    assert [option for option, _, shown in walked if shown.count("(default: ") > 1] == []
    shown = dict((option, text) for option, _, text in walked)
    assert shown["lenvm rollout --model"].endswith("(default: smollm2-135m-instruct)")
    assert shown["lenvm bench tradeoff --levels"].endswith("(default: 1 2 3)")  # as it is typed


def test_help_and_usage_errors_come_without_torch():
    """``lenvm --help``, ``lenvm bench --help`` and a mistyped command answer at once: only the
    chosen command's options are built (train's, demo's and the benchmarks' import torch)."""
    import subprocess
    import sys

    code = (
        "import sys, contextlib, io\n"
        "from lenvm.cli import main\n"
        "usage = (['--help'], ['bench', '--help'], ['trian'], ['bench', 'lifebenc'], ['rollout', '--help'])\n"
        "for argv in usage:\n"
        "    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):\n"
        "        main(argv)\n"
        "assert 'torch' not in sys.modules, argv\n"
        "import lenvm.bench as b\n"
        "assert 'torch' not in sys.modules\n"
        "assert all(getattr(b, n, None) is not None for n in b.__all__)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_help_version_and_usage_errors_return_their_status(capsys):
    """main(argv) returns what the command line exits with, argparse's statuses included."""
    import subprocess
    import sys

    assert main(["--help"]) == 0 and "usage: lenvm" in capsys.readouterr().out
    assert main(["--version"]) == 0 and capsys.readouterr().out.startswith("lenvm ")
    assert main(["predict", "--lenvm", "x"]) == 2
    assert "one of the arguments --prompt --prompts is required" in capsys.readouterr().err
    usage_error = [sys.executable, "-m", "lenvm.cli", "predict", "--lenvm", "x"]
    assert subprocess.run(usage_error, capture_output=True).returncode == 2


def _process_settings() -> tuple:
    import warnings

    from huggingface_hub.utils import are_progress_bars_disabled
    from transformers.utils import logging as hf_logging

    return (
        hf_logging.get_verbosity(),
        hf_logging.is_progress_bar_enabled(),
        are_progress_bars_disabled(),
        warnings.formatwarning,
    )


def test_main_leaves_the_process_settings_as_it_found_them(tmp_path, capsys):
    """In a notebook, transformers' warnings and progress bars, and how warnings print, are the
    kernel's again after a command, whether it succeeded, failed or was mistyped."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_info()  # not what a command sets, nor the default
    hf_logging.enable_progress_bar()
    try:
        before = _process_settings()
        assert main(["models", "list"]) == 0 and _process_settings() == before
        assert main(["predict", "--lenvm", str(tmp_path / "none"), "--prompt", "hi"]) == 2
        assert _process_settings() == before
        assert main(["predict"]) == 2 and _process_settings() == before
    finally:
        hf_logging.set_verbosity_warning()
    capsys.readouterr()


def test_the_chosen_command_gets_its_options(tmp_path):
    from lenvm.cli.commands import build_parser

    for argv, key, value in [
        (["train", "--rollouts", "r", "--out", "o", "--loss", "bce"], "loss", "bce"),
        (["demo", "--n", "2"], "n", 2),
        (["demo", "--no-progress"], "progress", False),  # as every long command takes it
        (["rollout", "--prompts", "p", "--out", "o", "--no-progress"], "progress", False),
        (["bench", "lifebench", "--targets", "8"], "targets", [8]),
        (["bench", "train-memory"], "out", "results/train_memory"),
    ]:
        assert getattr(build_parser(argv).parse_args(argv), key) == value


def test_generate_prints_each_answer_once_it_is_done_and_a_closed_pipe_ends_quietly(tmp_path, tiny_path):
    import signal
    import subprocess
    import sys

    prompts = tmp_path / "many.jsonl"
    prompts.write_text(
        "".join(json.dumps({"id": f"p{i}", "prompt": f"Tell me {i}."}) + "\n" for i in range(6))
    )
    command = [sys.executable, "-m", "lenvm.cli", "generate", "--model", str(tiny_path),
               "--prompts", str(prompts), "--max-new-tokens", "4", "--batch-size", "2",
               "--no-progress"]  # fmt: skip
    # The reader takes one line and closes the pipe while answers are still coming.
    run = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = run.stdout.readline()
    run.stdout.close()
    err = run.stderr.read().decode()
    assert json.loads(first)["id"] == "p0"
    assert run.wait() == -signal.SIGPIPE and "Traceback" not in err  # as a C tool ends


@pytest.mark.parametrize("terminal", [False, True])
@pytest.mark.parametrize("redraw_every", [0.0, 1000.0])  # seconds: before every answer, or never again
def test_generate_answers_start_lines_of_their_own_beside_the_progress_bar(
    tmp_path, tiny_path, monkeypatch, terminal, redraw_every
):
    """stdout and stderr in one log (or one terminal): no answer may go on the bar's line, and
    answers that come faster than the bar redraws follow each other without blank lines."""
    import io
    import sys

    import tqdm.auto

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    class Bar(tqdm.auto.tqdm):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, mininterval=redraw_every, **kwargs)

    both = Terminal() if terminal else io.StringIO()
    monkeypatch.setattr(sys, "stdout", both)
    monkeypatch.setattr(sys, "stderr", both)
    monkeypatch.setattr(tqdm.auto, "tqdm", Bar)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Tell me {i}."}) + "\n" for i in range(4)))
    argv = ["generate", "--model", str(tiny_path), "--prompts", str(prompts), "--max-new-tokens", "3"]
    assert main(argv) == 0
    log = both.getvalue()
    assert "generate:" in log  # the bar was drawn
    # In a terminal a carriage return starts a line over; in a file only a newline starts one.
    shown = [line.split("\r")[-1] if terminal else line for line in log.split("\n")]
    answers = [i for i, line in enumerate(shown) if '"id"' in line]
    assert len(answers) == 4 and all(shown[i].startswith("{") for i in answers), log
    assert "" not in shown[answers[0] : answers[-1]], log


def test_serve_on_a_port_in_use_is_a_clear_error_before_the_model_loads(capsys, monkeypatch):
    import socket

    import lenvm.hub

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded for a server that cannot listen")

    monkeypatch.setattr(lenvm.hub, "load_generator", never)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, err = _error(capsys, ["serve", "--model", "anything", "--port", str(port)])
    assert code == 2 and f"127.0.0.1:{port} is in use" in err


def test_serve_takes_server_wide_chat_template_arguments(capsys, monkeypatch, tiny_path):
    import lenvm.hub
    import lenvm.serve

    served = []
    monkeypatch.setattr(lenvm.serve, "serve", lambda engine, settings, **where: served.append(settings))
    serve = ["serve", "--model", str(tiny_path), "--port", "0"]
    assert main([*serve, "--default-chat-template-kwargs", '{"enable_thinking": false}']) == 0
    assert main(serve) == 0
    assert [s.default_chat_template_kwargs for s in served] == [{"enable_thinking": False}, {}]

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded for a server that cannot start")

    monkeypatch.setattr(lenvm.hub, "load_generator", never)
    code, err = _error(capsys, [*serve, "--default-chat-template-kwargs", '{"tokenize": true}'])
    assert code == 2 and "default_chat_template_kwargs: 'chat_template_kwargs' cannot set 'tokenize'" in err
    code, err = _error(capsys, [*serve, "--default-chat-template-kwargs", "[1]"])
    assert code == 2 and "argument --default-chat-template-kwargs: expected a JSON object" in err


def test_a_lenvm_whose_generator_moved_reads_it_where_model_says(tmp_path, capsys):
    from lenvm.hub import load_generator
    from lenvm.model import LengthValueModel
    from lenvm.testing import tiny_model

    gen = tiny_model(tmp_path / "gen")
    LengthValueModel.from_base(gen, gamma=0.9, generator=load_generator(gen)).save_pretrained(tmp_path / "lv")
    Path(gen).rename(tmp_path / "moved")
    values = ["values", "--lenvm", str(tmp_path / "lv"), "--prompt", "Hi", "--completion", "there"]
    code, err = _error(capsys, values)
    assert code == 2 and "gen" in err
    for command in (values, ["predict", "--lenvm", str(tmp_path / "lv"), "--prompt", "Hi"]):
        assert main([*command, "--model", str(tmp_path / "moved")]) == 0
    capsys.readouterr()


def test_prompts_from_a_pipe(tmp_path, tiny_path, tiny_generator):
    import subprocess
    import sys

    from lenvm.model import LengthValueModel

    lenvm = tmp_path / "lv"
    LengthValueModel.from_base(tiny_path, gamma=0.9, generator=tiny_generator).save_pretrained(lenvm)
    lines = '{"id": "a", "prompt": "Hi"}\n{"id": "b", "prompt": "Hello there"}\n'
    command = [
        sys.executable,
        "-m",
        "lenvm.cli",
        "predict",
        "--lenvm",
        str(lenvm),
        "--prompts",
        "-",
        "--json",
    ]
    run = subprocess.run(command, input=lines.encode(), capture_output=True, check=True)
    assert [json.loads(line)["id"] for line in run.stdout.decode().splitlines()] == ["a", "b"]
    bad = subprocess.run(command, input=b'{"id": "a", "prompt": "Hi"}\n{"id": "a", "prompt": "Yo"}\n',
                         capture_output=True)  # fmt: skip
    assert bad.returncode == 2 and "<stdin>:2: duplicate prompt id 'a'" in bad.stderr.decode()


def test_a_completion_file_is_its_text_without_the_final_line_ending(
    tmp_path, tiny_path, tiny_generator, capsys, monkeypatch
):
    """Every editor ends a file with a newline, which is no part of the answer valued."""
    import io
    import sys

    from lenvm.model import LengthValueModel

    lenvm = tmp_path / "lv"
    LengthValueModel.from_base(tiny_path, gamma=0.9, generator=tiny_generator).save_pretrained(lenvm)
    values = ["values", "--lenvm", str(lenvm), "--prompt", "Hello", "--completion"]

    def tokens(completion):
        assert main([*values, completion]) == 0
        return [t["token_id"] for t in json.loads(capsys.readouterr().out)["tokens"]]

    for kept in ("Hi there\n", "Hi there\r\n"):  # the last line ending goes, an earlier one stays
        (tmp_path / "answer.txt").write_bytes((kept + kept[8:]).encode())
        assert tokens("@" + str(tmp_path / "answer.txt")) == tokens(kept)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"Hi there\n\n")))
    assert tokens("@-") == tokens("Hi there\n")
    code, err = _error(capsys, [*values, "@" + str(tmp_path)])
    assert code == 2 and f"--completion @{tmp_path}: a folder, not a file" in err


def test_model_left_out_is_the_lenvms_generator(tmp_path, tiny_path, tiny_generator):
    from lenvm.cli import options
    from lenvm.cli.commands import build_parser
    from lenvm.hub import DEFAULT_MODEL
    from lenvm.model import LengthValueModel

    lenvm = LengthValueModel.from_base(tiny_path, gamma=0.9, generator=tiny_generator)
    lenvm.save_pretrained(tmp_path / "lv")
    for argv, model in [
        (["serve", "--lenvm", str(tmp_path / "lv")], str(Path(tiny_path).resolve())),
        (["serve"], DEFAULT_MODEL),
        (["serve", "--lenvm", str(tmp_path / "lv"), "--model", "other"], "other"),
        (["bench", "speed", "--lenvm", str(tmp_path / "lv")], str(Path(tiny_path).resolve())),
    ]:
        args = build_parser().parse_args(argv)
        options.resolve_model(args)
        assert args.model == model


def test_paths_that_cannot_be_read_or_written_as_asked_are_clear_errors(
    tmp_path, tiny_path, tiny_generator, prompts_file, capsys
):
    from lenvm.model import LengthValueModel

    lenvm = tmp_path / "lv"
    LengthValueModel.from_base(tiny_path, gamma=0.9, generator=tiny_generator).save_pretrained(lenvm)
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep me")
    predict = ["predict", "--lenvm", str(lenvm), "--prompts", str(prompts_file), "--out"]
    code, err = _error(capsys, [*predict, str(a_file / "p.jsonl")])  # under a file, not a folder
    assert code == 2 and str(a_file) in err and a_file.read_text() == "keep me"
    rollout = [
        "rollout",
        "--model",
        str(tiny_path),
        "--prompts",
        str(tmp_path),
        "--out",
        str(tmp_path / "r.jsonl"),
    ]
    code, err = _error(capsys, rollout)
    assert code == 2 and "a folder, not a JSONL file" in err
    values = ["values", "--lenvm", str(lenvm), "--prompt", "Hi", "--completion", "Yes", "--html"]
    code, err = _error(capsys, [*values, str(tmp_path)])
    assert code == 2 and "a folder, not a file" in err
    code, err = _error(capsys, [*values, str(a_file)])  # not a page of ours: left as it is
    assert code == 2 and "not an HTML page" in err and a_file.read_text() == "keep me"
    assert main([*values, str(tmp_path / "v.html")]) == 0
    assert main([*values, str(tmp_path / "v.html")]) == 0  # its own page is replaced
    code, err = _error(capsys, [*values, ""])  # an unset variable in a script: not silently nothing
    assert code == 2 and "--html needs a file name" in err
    code, err = _error(capsys, ["predict", "--lenvm", str(lenvm), "--prompt", "Hi", "--model", str(lenvm)])
    assert code == 2 and "is a LenVM folder, not a generator" in err


def test_sigterm_while_the_model_loads_leaves_no_output_file(tmp_path, prompts_file, monkeypatch, capsys):
    """SIGTERM ends a run as Ctrl-C does: its cleanup runs, so the output file its lock created is
    removed again rather than left empty, as if the run had produced it."""
    import os
    import signal
    import time

    from lenvm import hub

    def terminated_while_loading(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(10)  # the signal interrupts this
        raise AssertionError("SIGTERM did not interrupt the run")

    def not_handled(signum, frame):  # stands for the default, which would end the test process itself
        raise AssertionError("the command left SIGTERM to kill it without cleanup")

    monkeypatch.setattr(hub, "load_generator", terminated_while_loading)
    out = tmp_path / "r.jsonl"
    previous = signal.signal(signal.SIGTERM, not_handled)
    try:
        code = main(["rollout", "--model", "tiny", "--prompts", str(prompts_file), "--out", str(out)])
        assert signal.getsignal(signal.SIGTERM) is not_handled  # put back as it was
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert code == 128 + signal.SIGTERM
    assert "interrupted; run the same command again to resume" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.skipif(not Path("/dev/fd").is_dir(), reason="pipes by path: /dev/fd")
def test_prompts_and_rollouts_from_a_pipe(tmp_path, tiny_path, prompts_file, capsys):
    """A shell's ``<(...)`` or ``/dev/stdin``: a pipe by path, which can be read once."""
    import os

    def pipe(content: bytes) -> str:
        read, write = os.pipe()
        os.write(write, content)  # small enough for the pipe's buffer
        os.close(write)
        return f"/dev/fd/{read}"

    rollouts = tmp_path / "r.jsonl"
    rollout = ["rollout", "--model", str(tiny_path), "--n", "2", "--max-new-tokens", "8", "--no-progress"]
    assert main([*rollout, "--prompts", pipe(prompts_file.read_bytes()), "--out", str(rollouts)]) == 0
    assert len(rollouts.read_text().splitlines()) == 6
    capsys.readouterr()
    train = ["train", "--epochs", "1", "--eval-fraction", "0.34", "--no-progress"]
    # Read once: the generator's name and the training both come from that one read.
    assert main([*train, "--rollouts", pipe(rollouts.read_bytes()), "--out", str(tmp_path / "lv")]) == 0
    assert json.loads((tmp_path / "lv" / "config.json").read_text())["base_model"] == str(tiny_path)
    code, err = _error(capsys, [*train, "--stream", "--rollouts", pipe(b""), "--out", str(tmp_path / "x")])
    assert code == 2 and "--stream reads the rollouts afresh on every pass" in err


def test_path_options_expand_the_home_folder(tmp_path, monkeypatch):
    """``--out=~/x``: no shell expands ``~`` after ``=``, so every option naming a file or folder
    does, rather than create a folder named ``~`` in the working directory."""
    import argparse
    import re

    from lenvm.cli.commands import build_parser

    monkeypatch.setenv("HOME", str(tmp_path))
    parser = build_parser()
    args = parser.parse_args(["rollout", "--prompts=~/p.jsonl", "--out=~/r.jsonl", "--model=~/m"])
    assert (args.prompts, args.out, args.model) == tuple(
        str(tmp_path / n) for n in ("p.jsonl", "r.jsonl", "m")
    )
    args = parser.parse_args(["bench", "schedule", "--lenvm=~/lv", "--rollouts", "~/a", "-", "--out=~/b"])
    assert (args.lenvm, args.rollouts, args.out) == (
        str(tmp_path / "lv"),
        [str(tmp_path / "a"), "-"],
        str(tmp_path / "b"),
    )
    assert parser.parse_args(["generate", "--prompt", "~/not a path"]).prompt == "~/not a path"

    def string_options_about_paths(p, name):
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub_name, sub in action.choices.items():
                    yield from string_options_about_paths(sub, f"{name} {sub_name}")
            elif (
                action.option_strings
                and action.nargs != 0
                and action.type in (None, str)
                and not action.choices
            ):
                about = f"{action.help} {action.metavar or ''}"
                if re.search(r"folder|file|JSONL|\bPATH\b|\bDIR\b|\bhere\b", about):
                    yield f"{name} {action.option_strings[0]}"

    assert list(string_options_about_paths(build_parser(), "lenvm")) == []


def test_the_commands_are_importable_from_the_cli_package_which_loads_them_when_asked():
    import subprocess
    import sys

    code = (
        "import sys, lenvm.cli\n"
        "assert 'lenvm.cli.commands' not in sys.modules\n"
        "from lenvm.cli import build_parser, cmd_train, commands\n"
        "assert build_parser is commands.build_parser and cmd_train is commands.cmd_train\n"
        "for name in ('argparse', 'InputError', '_run', 'nothing'):\n"
        "    assert not hasattr(lenvm.cli, name), name\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_train_without_base_on_rollouts_that_name_no_generator(tmp_path, tiny_generator, capsys):
    from conftest import synthetic_records

    rollouts = tmp_path / "r.jsonl"
    rollouts.write_text(
        "".join(json.dumps({**r, "generator": ""}) + "\n" for r in synthetic_records(tiny_generator[1]))
    )
    assert main(["train", "--rollouts", str(rollouts), "--out", str(tmp_path / "l"), "--no-progress"]) == 2
    assert (
        "the rollouts name no generator; give the model they were sampled from as --base"
        in capsys.readouterr().err
    )
    assert not (tmp_path / "l").exists()


def test_serve_refuses_an_empty_api_key_rather_than_serving_without_one(monkeypatch, capsys):
    """A script's ``--api-key "$KEY"`` with KEY unset passes an empty key: refused before the
    model loads, not a server open to anyone."""
    monkeypatch.delenv("LENVM_API_KEY", raising=False)
    assert main(["serve", "--model", "no-such-model", "--api-key", "", "--port", "0"]) == 2
    assert "the API key of --api-key must be a non-empty string" in capsys.readouterr().err
    # A key from the environment is named as such: an invisible carriage return, say.
    monkeypatch.setenv("LENVM_API_KEY", "s3cret\r")
    assert main(["serve", "--model", "no-such-model", "--port", "0"]) == 2
    assert "the API key of LENVM_API_KEY must be printable ASCII" in capsys.readouterr().err
