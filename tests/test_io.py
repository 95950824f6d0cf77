"""Writes that fail half-way (a full disk) leave no half-written file behind."""

import errno
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from lenvm.io import (
    InputError,
    JsonlAppender,
    atomic_path,
    fingerprint,
    is_int,
    outside_vocabulary,
    plain_numbers,
    positive_count,
    read_jsonl,
    repair_jsonl_tail,
    write_json,
)


def _disk_full_after(monkeypatch, nbytes):
    """Make text writes store ``nbytes`` characters and then fail as a full disk would."""
    real = Path.write_text

    def write_text(self, data, *args, **kwargs):
        real(self, data[:nbytes], *args, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", write_text)


def test_a_folder_swap_cut_short_puts_the_old_folder_back(tmp_path, monkeypatch):
    """Folders are swapped through a backup name; an interrupt between the two renames must not
    take the old folder away with the temporary one."""
    import os

    target = tmp_path / "lenvm"
    target.mkdir()
    (target / "config.json").write_text("old")
    real, calls = os.replace, []

    def replace(src, dst):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt), atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "config.json").write_text("new")
    monkeypatch.undo()
    assert (target / "config.json").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["lenvm"]


def test_failed_atomic_write_keeps_the_old_file_and_no_temporaries(tmp_path, monkeypatch):
    target = tmp_path / "summary.json"
    write_json(target, {"old": True})
    _disk_full_after(monkeypatch, 5)
    with pytest.raises(OSError) as err:
        write_json(target, {"new": list(range(100))})
    assert err.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert json.loads(target.read_text()) == {"old": True}
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_failed_first_write_leaves_nothing(tmp_path, monkeypatch):
    _disk_full_after(monkeypatch, 3)
    with pytest.raises(OSError):
        write_json(tmp_path / "new.json", {"a": 1})
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []


def test_appender_cut_mid_line_keeps_earlier_lines(tmp_path):
    path = tmp_path / "rollouts.jsonl"
    with JsonlAppender(path) as log:
        log.write([{"i": 0}, {"i": 1}])
    with path.open("a") as fh:  # what a crash or a full disk leaves: part of a line
        fh.write('{"i": 2, "te')
    repair_jsonl_tail(path)
    assert read_jsonl(path) == [{"i": 0}, {"i": 1}]
    with JsonlAppender(path) as log:  # appending resumes on a clean line
        log.write([{"i": 2}])
    assert [r["i"] for r in read_jsonl(path)] == [0, 1, 2]


@pytest.mark.parametrize(
    ("text", "kept"),
    [
        ('{"i": 0}\n{"i": 1}', '{"i": 0}\n{"i": 1}\n'),  # whole: its newline is added back
        ('{"i": 0}\n{"i": 1} ', '{"i": 0}\n{"i": 1} \n'),
        ('{"i": 0}\n{"i": 1', '{"i": 0}\n'),  # part of a line: cut
        ('{"i": 0}\n  ', '{"i": 0}\n'),  # whitespace: cut
        ('{"i": 0}\n{"s": "\xe9"}'.encode()[:-3], '{"i": 0}\n'),  # a character cut short
    ],
)
def test_resuming_keeps_a_whole_last_line_and_cuts_a_partial_one(tmp_path, text, kept):
    from lenvm.io import read_jsonl_to_append

    path = tmp_path / "r.jsonl"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    records = read_jsonl_to_append(path, lambda record: None, "records")
    assert path.read_text() == kept
    assert records == read_jsonl(path)


def test_cli_reports_a_full_disk_and_keeps_finished_work(tmp_path, tiny_path, monkeypatch, capsys):
    from lenvm import io
    from lenvm.cli import main

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": str(i), "prompt": f"Say {i}."}) + "\n" for i in range(4)))
    out = tmp_path / "rollouts.jsonl"
    args = ["rollout", "--model", str(tiny_path), "--prompts", str(prompts), "--out", str(out)]
    args += ["--n", "1", "--max-new-tokens", "3", "--batch-size", "2"]
    real_write = io.JsonlAppender.write
    calls = []

    def write(self, records):
        calls.append(len(records))
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(self, records)

    monkeypatch.setattr(io.JsonlAppender, "write", write)
    assert main(args) == 28
    assert "no space left" in capsys.readouterr().err
    kept = read_jsonl(out)
    assert 0 < len(kept) < 4
    monkeypatch.undo()
    assert main(args) == 0  # the same command resumes and completes
    records = read_jsonl(out)
    assert sorted(r["prompt_id"] for r in records) == ["0", "1", "2", "3"]
    assert records[: len(kept)] == kept


def test_the_top_level_api_imports_lazily_and_completely():
    """Everything in ``lenvm.__all__`` is importable from ``lenvm``, and importing ``lenvm`` alone
    loads neither torch-heavy modules nor optional dependencies."""
    import subprocess
    import sys

    code = (
        "import sys, lenvm;"
        "heavy = [m for m in ('torch', 'transformers', 'fastapi', 'vllm') if m in sys.modules];"
        "assert not heavy, heavy;"
        # the request types come without the engine (the command line starts without torch)
        "from lenvm.decoding import SamplingParams, Control;"
        "assert 'torch' not in sys.modules and 'lenvm.decoding.engine' not in sys.modules;"
        "missing = [n for n in lenvm.__all__ if getattr(lenvm, n, None) is None];"
        "assert not missing, missing;"
        "import lenvm.decoding as d;"
        "assert all(getattr(d, n, None) is not None for n in d.__all__);"
        # what a user calls after training, and the errors to catch
        "assert {'calibrate', 'train_end_head', 'InputError', 'TokenizerMismatchError'} <= set(lenvm.__all__)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_writes_follow_a_link_and_never_replace_a_device_or_pipe(tmp_path):
    import os

    from lenvm.io import InputError, check_writable, write_text

    real = tmp_path / "real.txt"
    real.write_text("old")
    link = tmp_path / "link.txt"
    link.symlink_to(real)
    write_text(link, "new")
    assert link.is_symlink() and real.read_text() == "new"  # the link stays, its file is written
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)  # as /dev/stdout is, under a pipeline; /dev/null is a device
    for write in (lambda: write_text(pipe, "x"), lambda: check_writable(pipe)):
        with pytest.raises(InputError, match="not a regular file"):
            write()
    assert pipe.is_fifo()


def test_a_run_lock_refuses_a_second_writer_and_goes_with_its_holder(tmp_path):
    from lenvm.io import InputError, RunLock

    out = tmp_path / "pred.jsonl"
    with (
        RunLock(out, "predicting into this file"),
        pytest.raises(InputError, match="another run is predicting into this file"),
    ):
        RunLock(out, "predicting into this file")
    assert not out.exists()  # created for the lock and never written: not left behind
    out.write_text("kept\n")
    with RunLock(out, "writing"):
        pass
    assert out.read_text() == "kept\n"
    with RunLock(out, "writing"):  # released: a later run may take it
        pass
    folder = tmp_path / "results"
    folder.mkdir()
    held = RunLock(folder, "writing")  # a folder too
    with pytest.raises(InputError, match="another run is writing"):
        RunLock(folder, "writing")
    held.release()
    RunLock(folder, "writing").release()
    assert folder.is_dir()


def test_atomic_writes_leave_files_readable_as_new_files_are(tmp_path):
    import torch
    from safetensors.torch import save_file

    folder = tmp_path / "lenvm"
    with atomic_path(folder) as tmp:
        tmp.mkdir()
        save_file({"w": torch.zeros(2)}, str(tmp / "head.safetensors"))  # created owner-only
        (tmp / "config.json").write_text("{}")
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    modes = {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir()}
    assert modes == {
        "head.safetensors": plain.stat().st_mode & 0o777,
        "config.json": plain.stat().st_mode & 0o777,
    }


@pytest.mark.parametrize("size", [0, 1, 65535, 65536, 65537, 200_000])
@pytest.mark.parametrize("newline_at", [None, 0, 10, 65540, 150_000])
def test_the_last_line_is_found_from_the_end_of_the_file(tmp_path, size, newline_at):
    from lenvm.io import _partial_tail

    content = bytearray(b"x" * size)
    if newline_at is not None and newline_at < size:
        content[newline_at] = ord("\n")
    path = tmp_path / "f.jsonl"
    path.write_bytes(bytes(content))
    assert _partial_tail(path) == bytes(content[content.rfind(b"\n") + 1 :])
    repair_jsonl_tail(path)
    assert path.read_bytes() == bytes(content[: content.rfind(b"\n") + 1])


def test_unwritable_outputs_fail_before_the_work(tmp_path, monkeypatch, capsys):
    """A read-only place for the output is named at once, not after the rollouts, training or
    calibration that would fill it."""
    import tempfile

    from lenvm.cli import main
    from lenvm.io import check_writable
    from lenvm.rollouts import rollout

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "TemporaryFile", read_only)
    with pytest.raises(OSError) as err:
        check_writable(tmp_path / "out" / "lenvm")
    assert err.value.errno == errno.EROFS and err.value.filename == str(tmp_path / "out" / "lenvm")
    with pytest.raises(OSError) as err:  # before the (missing) generator would load
        rollout("no/such-model", ["Hi"], tmp_path / "r.jsonl", n=1, backend="hf", progress=False)
    assert err.value.filename == str(tmp_path / "r.jsonl")
    assert main(["calibrate", "--lenvm", str(tmp_path / "none"), "--rollouts", "r.jsonl"]) == 2
    assert f"Read-only file system: {tmp_path / 'none'}" in capsys.readouterr().err


def test_json_writes_figures_that_are_not_numbers_as_null(tmp_path):
    """A metric with nothing to measure is NaN: JSON has no NaN, so other readers refused the file."""
    import json

    data = {
        "prompt_mre": float("nan"),
        "evaluations": [{"x": float("inf")}, {"x": 1.5}],
        "n": (2, -float("inf")),
    }
    write_json(tmp_path / "m.json", data)
    text = (tmp_path / "m.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"prompt_mre": None, "evaluations": [{"x": None}, {"x": 1.5}], "n": [2, None]}


def test_jsonl_lines_write_figures_that_are_not_numbers_as_null(tmp_path):
    """A prompts file's NaN (Python's json reads it) reaches a rollout record's meta as null."""
    with JsonlAppender(tmp_path / "r.jsonl") as out:
        out.write([{"meta": {"score": float("nan"), "far": [float("-inf")]}}])
    assert (tmp_path / "r.jsonl").read_text() == '{"meta": {"score": null, "far": [null]}}\n'


def test_numpy_numbers_are_written_as_plain_json_numbers(tmp_path):
    """A count or a metric computed with NumPy reaches the file as the number it is."""
    record = {"n": np.int64(3), "rate": np.float32(0.5), "ok": np.bool_(True), "xs": [np.uint8(7), 1.5]}
    plain = {"n": 3, "rate": 0.5, "ok": True, "xs": [7, 1.5]}
    write_json(tmp_path / "m.json", {**record, "none": np.float32("nan"), "far": np.float64("inf")})
    assert json.loads((tmp_path / "m.json").read_text()) == {**plain, "none": None, "far": None}
    with JsonlAppender(tmp_path / "r.jsonl") as out:
        out.write([record])
        with pytest.raises(TypeError, match="not JSON serializable"):  # anything else, as json says
            out.write([{"x": object()}])
    assert read_jsonl(tmp_path / "r.jsonl") == [plain]
    assert fingerprint(record) == fingerprint(plain)


def test_the_demo_summary_says_n_a_for_an_error_it_could_not_measure():
    from lenvm.demo import _share

    assert [_share(x) for x in (float("nan"), None, 0.2353)] == ["n/a", "n/a", "23.5%"]


def test_numpy_integers_are_integers_and_stored_as_python_ones():
    assert is_int(np.int64(2)) and is_int(np.uint8(2)) and is_int(7)
    assert not is_int(True) and not is_int(np.bool_(True)) and not is_int(2.0)

    @dataclass
    class Settings:
        count: int
        rate: float
        flag: object

    settings = Settings(np.int64(3), np.float32(0.5), np.bool_(True))
    plain_numbers(settings)
    assert type(settings.count) is int and type(settings.rate) is float
    assert isinstance(settings.flag, np.bool_)  # refused as a number where one is checked


def test_a_positive_count_is_a_plain_int_and_anything_else_is_named():
    assert positive_count(3, "n") == 3
    taken = positive_count(np.int64(4), "batch_size")
    assert taken == 4 and type(taken) is int
    for bad in (0, -2, 2.0, 2.5, True, np.bool_(True), np.int8(0), "3", None):
        with pytest.raises(InputError, match=r"^repeats must be a positive integer, got "):
            positive_count(bad, "repeats")


def test_token_ids_outside_the_vocabulary_are_named():
    assert outside_vocabulary([0, 5, 9], 10) is None
    assert outside_vocabulary([0, 10, 11], 10) == "the prompt holds token id 10, outside the vocabulary (0-9)"
    assert (
        outside_vocabulary([3, -1], 10, "record 2")
        == "record 2 holds token id -1, outside the vocabulary (0-9)"
    )


def test_a_byte_order_mark_inside_a_jsonl_file_is_named_with_its_line(tmp_path):
    """Files joined with cat: the second one's byte-order mark starts a line of the whole; the
    first line's is allowed."""
    path = tmp_path / "joined.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"a": 1}\n' + b'\xef\xbb\xbf{"a": 2}\n')
    with pytest.raises(
        InputError, match=rf"^{path}:2: the line starts with a byte-order mark \(U\+FEFF\)"
    ) as err:
        read_jsonl(path)
    assert "files were joined" in str(err.value)
    path.write_bytes(b'\xef\xbb\xbf{"a": 1}\n{"a": 2}\n')
    assert read_jsonl(path) == [{"a": 1}, {"a": 2}]
