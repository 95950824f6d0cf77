import json

import pytest

from lenvm import LengthValueModel, Prompt
from lenvm.batch_predict import predict_file
from lenvm.io import InputError


@pytest.fixture(scope="module")
def lenvm(tiny_path, tiny_generator):
    return LengthValueModel.from_base(tiny_path, gamma=0.9, generator=tiny_generator)


PROMPTS = [Prompt(f"p{i}", "word " * (1 + i)) for i in range(3)]


@pytest.mark.parametrize("dropped", ["lenvm", "prompt_sha"])
def test_predictions_without_fingerprints_are_refused_not_taken_as_this_runs(tmp_path, lenvm, dropped):
    """Lines written by an older lenvm carry no fingerprint of the LenVM or the prompt: they may
    be another LenVM's, so resuming into them is refused and the file is left as it was."""
    out = tmp_path / "predictions.jsonl"
    predict_file(lenvm, PROMPTS[:2], out, progress=False)
    older = [
        {k: v for k, v in json.loads(line).items() if k != dropped} for line in out.read_text().splitlines()
    ]
    out.write_text("".join(json.dumps(r) + "\n" for r in older))
    before = out.read_bytes()
    with pytest.raises(InputError, match="older lenvm.*cannot be checked"):
        predict_file(lenvm, PROMPTS, out, progress=False)
    assert out.read_bytes() == before


def test_predictions_of_another_lenvm_name_another_lenvm_version_too(tmp_path, lenvm):
    """The message cannot tell another LenVM from this one fingerprinted by another version."""
    out = tmp_path / "predictions.jsonl"
    predict_file(lenvm, PROMPTS[:2], out, progress=False)
    other = [dict(json.loads(line), lenvm="0123456789abcdef") for line in out.read_text().splitlines()]
    out.write_text("".join(json.dumps(r) + "\n" for r in other))
    with pytest.raises(InputError, match="another LenVM.*another lenvm version"):
        predict_file(lenvm, PROMPTS, out, progress=False)
    assert predict_file(lenvm, PROMPTS, tmp_path / "new.jsonl", progress=False).predicted == 3


def test_predictions_of_the_same_lenvm_by_an_earlier_lenvm_version_resume(tmp_path, lenvm):
    """A LenVM was fingerprinted by its config's fields before format_version and extra_fields
    were among them: neither changes a prediction, and such files resume."""
    from dataclasses import asdict

    from lenvm.hub import model_name
    from lenvm.io import fingerprint

    out = tmp_path / "predictions.jsonl"
    predict_file(lenvm, PROMPTS[:2], out, progress=False)
    config = {k: v for k, v in asdict(lenvm.config).items() if k not in ("format_version", "extra_fields")}
    dtype = str(next(lenvm.backbone.parameters()).dtype)
    earlier = fingerprint([config, model_name(lenvm.backbone.name_or_path), dtype])
    lines = [dict(json.loads(line), lenvm=earlier) for line in out.read_text().splitlines()]
    out.write_text("".join(json.dumps(r) + "\n" for r in lines))
    stats = predict_file(lenvm, PROMPTS, out, progress=False)
    assert (stats.skipped, stats.predicted) == (2, 1)


def test_a_prompt_predicted_under_another_id_is_refused(tmp_path, lenvm):
    """Resumed under a new id (an earlier lenvm numbered prompts with a 'prompt_id' field by
    position), a prompt would be predicted again beside its old line."""
    out = tmp_path / "predictions.jsonl"
    predict_file(lenvm, PROMPTS[:2], out, progress=False)
    before = out.read_bytes()
    renamed = [Prompt(f"q{i}", p.text) for i, p in enumerate(PROMPTS[:2])]
    with pytest.raises(InputError, match="holds prompt 'q0' under another id, 'p0'"):
        predict_file(lenvm, renamed, out, progress=False)
    assert out.read_bytes() == before
    assert predict_file(lenvm, [*PROMPTS[:2], PROMPTS[2]], out, progress=False).predicted == 1
