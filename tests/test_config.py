"""A LenVM's config.json as a user may edit it: every field checked when it is read, fields it
does not know named and kept, a newer folder format refused."""

import dataclasses
import json
import re
import shutil
import warnings

import pytest
from conftest import synthetic_records

from lenvm.cli import main
from lenvm.io import InputError
from lenvm.model import (
    CONFIG_NAME,
    FORMAT_VERSION,
    LengthValueConfig,
    LengthValueModel,
    NotALenVMError,
    read_config,
    refuse_to_replace,
    save_config,
)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_path, tiny_generator):
    """An attached LenVM folder on the tiny generator, trained on its own rollouts."""
    folder = tmp_path_factory.mktemp("config") / "lv"
    lenvm = LengthValueModel.from_base(tiny_path, generator=tiny_generator, gamma=0.9)
    lenvm.config.generator = lenvm.config.base_model
    lenvm.save_pretrained(folder)
    return folder


def edited(saved, tmp_path, change):
    """A copy of the LenVM folder ``saved`` whose config (a dict) ``change`` edits, or replaces
    with what it returns."""
    folder = tmp_path / "edited"
    shutil.copytree(saved, folder)
    config = json.loads((folder / CONFIG_NAME).read_text())
    replaced = change(config)
    config = config if replaced is None else replaced
    (folder / CONFIG_NAME).write_text(json.dumps(config))
    return folder


def setting(**fields):
    return lambda config: config.update(fields)


def without(*names):
    def change(config):
        for name in names:
            del config[name]

    return change


BAD_EDITS = {
    "gamma as a string": (
        setting(gamma="0.8254"),
        "gamma must be a number in (0, 1), got '0.8254' (a string)",
    ),
    "gamma null": (setting(gamma=None), "gamma must be a number in (0, 1), got null"),
    "no eos_token_ids": (without("eos_token_ids"), "not a valid LenVM config (no eos_token_ids)"),
    "no eos ids": (setting(eos_token_ids=[]), "eos_token_ids must be a non-empty list of token ids, got []"),
    "one eos id, not a list": (
        setting(eos_token_ids=2),
        "eos_token_ids must be a non-empty list of token ids, got 2",
    ),
    "eos ids as strings": (
        setting(eos_token_ids=["2"]),
        "eos_token_ids must be a non-empty list of token ids",
    ),
    "knots without returns": (setting(calibration={"values": [1, 2]}), 'knots\' "values" and "returns"'),
    "q without vocab_size": (
        lambda config: config.update(kind="q") or config.pop("vocab_size"),
        "vocab_size must be given for a LenVM of kind 'q'",
    ),
    "hidden_size as a string": (
        setting(hidden_size="64"),
        "hidden_size must be a positive integer, got '64'",
    ),
    "vocab_size as a string": (
        setting(vocab_size="x"),
        "vocab_size must be a positive integer, or null, got 'x'",
    ),
    "sampling as a string": (setting(sampling="temp=1"), "sampling must be an object of sampling settings"),
    "temperature as a string": (
        setting(sampling={"temperature": "1.0"}),
        "sampling: bad sampling parameters",
    ),
    "training as a list": (setting(training=[]), "training must be an object, or null, got []"),
    "fingerprint as a number": (setting(tokenizer_fingerprint=7), "tokenizer_fingerprint must be"),
    "base model null": (setting(base_model=None), "base_model must be a model's name or folder, got null"),
    "kind misspelled": (setting(kind="Attached"), "kind must be one of attached, standalone, q"),
    "version as a number": (setting(lenvm_version=1), "lenvm_version must be a version string"),
    "format_version as a string": (setting(format_version="1"), "format_version must be a positive integer"),
}


@pytest.mark.parametrize("name", BAD_EDITS)
def test_a_config_field_of_a_wrong_type_or_value_is_refused_as_it_is_read(name, saved, tmp_path):
    change, message = BAD_EDITS[name]
    folder = edited(saved, tmp_path, change)
    with pytest.raises(InputError, match=re.escape(message)) as err:
        read_config(folder)
    assert str(err.value).startswith(f"{folder / CONFIG_NAME}: ")


def test_a_config_that_is_not_an_object_is_not_a_lenvm(saved, tmp_path):
    folder = edited(saved, tmp_path, lambda config: [])
    with pytest.raises(NotALenVMError, match="not a LenVM folder"):
        read_config(folder)


def test_eos_ids_outside_the_generators_vocabulary_are_refused_on_load(saved, tmp_path, tiny_generator):
    folder = edited(saved, tmp_path, setting(eos_token_ids=[99999]))
    with pytest.raises(InputError, match="eos_token_ids holds token id 99999, outside the vocabulary"):
        LengthValueModel.from_pretrained(folder, generator=tiny_generator)


def test_the_command_line_says_what_is_wrong_with_a_config_and_exits_2(saved, tmp_path, capsys):
    folder = edited(saved, tmp_path, setting(gamma="0.8254"))
    assert main(["predict", "--lenvm", str(folder), "--prompt", "Hello"]) == 2
    assert f"{folder / CONFIG_NAME}: gamma must be a number" in capsys.readouterr().err


def test_unknown_config_fields_are_named_once_per_load(saved, tmp_path, tiny_generator):
    def misspelled(config):
        config["feature_layers"] = config.pop("feature_layer")

    folder = edited(saved, tmp_path, misspelled)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        LengthValueModel.from_pretrained(folder, generator=tiny_generator)
    said = [str(w.message) for w in caught if "does not know" in str(w.message)]
    assert len(said) == 1 and "feature_layers" in said[0] and "written by another lenvm version" in said[0]


def test_unknown_config_fields_are_kept_when_the_lenvm_is_written_again(saved, tmp_path, tiny_generator):
    folder = edited(saved, tmp_path, setting(my_note="trained on tuesday"))
    with pytest.warns(UserWarning, match="my_note"):
        lenvm = LengthValueModel.from_pretrained(folder, generator=tiny_generator)
    lenvm.config.gamma = 0.8  # what calibrate and train-end-head do: change the config, write it back
    save_config(folder, lenvm.config)
    save_config(folder, lenvm.config, tmp_path / "copy")
    lenvm.save_pretrained(tmp_path / "saved")
    for written in (folder, tmp_path / "copy", tmp_path / "saved"):
        config = json.loads((written / CONFIG_NAME).read_text())
        assert config["my_note"] == "trained on tuesday" and config["gamma"] == 0.8
        assert "extra_fields" not in config


def test_a_lenvm_of_a_newer_format_is_refused_an_older_one_loads(saved, tmp_path, tiny_generator):
    newer = edited(saved, tmp_path / "newer", setting(format_version=FORMAT_VERSION + 1, gamma="changed"))
    with pytest.raises(
        InputError, match=f"of format {FORMAT_VERSION + 1}, written by a newer lenvm.*upgrade lenvm"
    ):
        LengthValueModel.from_pretrained(newer, generator=tiny_generator)
    older = edited(saved, tmp_path / "older", without("format_version", "lenvm_version"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lenvm = LengthValueModel.from_pretrained(older, generator=tiny_generator)
    assert lenvm.config.format_version == 1
    assert json.loads((saved / CONFIG_NAME).read_text())["format_version"] == FORMAT_VERSION


def test_a_head_on_another_generator_than_its_rollouts_is_named_on_load(saved, tmp_path, tiny_generator):
    folder = edited(saved, tmp_path, setting(generator="someone-else/model"))
    with pytest.warns(UserWarning, match="trained on rollouts of someone-else/model, and its head reads"):
        LengthValueModel.from_pretrained(folder, generator=tiny_generator)


def test_a_config_round_trips_through_its_dict(saved):
    config = read_config(saved)
    data = {**config.to_dict(), "my_note": "kept"}
    again = LengthValueConfig.from_dict(data)
    assert again.extra_fields == {"my_note": "kept"} and again.to_dict() == data


def test_a_lenvm_trained_on_rollouts_of_other_tools_loads(saved, tmp_path, tiny_generator):
    """Rollouts of other tools record top_k -1 (vLLM's "off") or an unknown generator as "": a
    LenVM trained on them loads, reading them as top-k off and as no generator named."""
    sampling = {"temperature": 1.0, "top_p": 1.0, "top_k": -1, "min_p": 0.0, "max_new_tokens": 48, "seed": 0}
    folder = edited(saved, tmp_path, setting(generator="", sampling=sampling))
    lenvm = LengthValueModel.from_pretrained(folder, generator=tiny_generator)
    assert lenvm.config.generator is None and lenvm.config.sampling == sampling  # as recorded
    assert lenvm.sampling_params().top_k == 0


def test_a_field_that_would_not_load_is_refused_before_it_is_written(saved, tmp_path, tiny_generator):
    lenvm = LengthValueModel.from_pretrained(saved, generator=tiny_generator)
    lenvm.config.sampling = {"top_k": -5}  # set after the config was built: not checked then
    before = (saved / CONFIG_NAME).read_bytes()
    with pytest.raises(InputError, match="would not load once written: sampling: .*top_k"):
        save_config(saved, lenvm.config)
    with pytest.raises(InputError, match="would not load once written"):
        lenvm.save_pretrained(tmp_path / "copy")
    assert (saved / CONFIG_NAME).read_bytes() == before and not (tmp_path / "copy").exists()


@pytest.mark.parametrize(
    "change", [setting(gamma="0.8"), setting(format_version=FORMAT_VERSION + 1)], ids=["bad field", "newer"]
)
def test_a_lenvm_that_does_not_load_is_replaced_when_asked_only(
    saved, tmp_path, tiny_path, tiny_generator, change
):
    """What says a folder is a LenVM's is its config's format: replacing one that this lenvm cannot
    load (a hand edit, a newer lenvm's) is what --overwrite asks for."""
    folder = edited(saved, tmp_path, change)
    rollouts = tmp_path / "rollouts.jsonl"
    rollouts.write_text("".join(json.dumps(r) + "\n" for r in synthetic_records(tiny_generator[1])))
    argv = ["train", "--rollouts", str(rollouts), "--base", str(tiny_path), "--out", str(folder)]
    argv += ["--epochs", "1", "--no-progress", "--device", "cpu"]
    assert main(argv) == 2  # a LenVM: replaced only when asked
    refuse_to_replace(folder, "training")
    assert main([*argv, "--overwrite"]) == 0
    assert read_config(folder).format_version == FORMAT_VERSION


def test_the_config_constructor_takes_its_fields_in_their_order_with_their_defaults():
    fields = dict(kind="attached", gamma=0.9, hidden_size=64, base_model="m", tokenizer_fingerprint="f")
    config = LengthValueConfig(*fields.values(), 32, 1, None, [2])  # head, layer, vocab_size, EOS ids
    assert (config.head_hidden_size, config.feature_layer, config.eos_token_ids) == (32, 1, [2])
    with pytest.raises(
        InputError, match=re.escape("eos_token_ids must be a non-empty list of token ids, got []")
    ):
        LengthValueConfig(**fields)


def test_a_config_comes_back_from_its_dataclass_dict(saved):
    config = dataclasses.replace(read_config(saved), extra_fields={"my_note": "kept"})
    assert LengthValueConfig.from_dict(dataclasses.asdict(config)) == config
    with pytest.raises(InputError, match="extra_fields must be an object of fields, got 3"):
        LengthValueConfig.from_dict({**dataclasses.asdict(config), "extra_fields": 3})


def test_a_head_on_its_rollouts_generator_named_another_way_loads_without_a_warning(
    saved, tmp_path, tiny_path, tiny_generator, monkeypatch
):
    """A link to the generator's folder, or a built-in alias prepared there, is that generator; an
    alias not prepared is not, and is not prepared to tell."""
    from lenvm import hub

    monkeypatch.setenv("LENVM_CACHE", str(tmp_path / "cache"))
    link = tmp_path / "link"
    link.symlink_to(tiny_path)
    for i, same in enumerate((str(link), hub.DEFAULT_MODEL)):
        if same == hub.DEFAULT_MODEL:
            hub.builtin_path(same).parent.mkdir(parents=True)
            hub.builtin_path(same).symlink_to(tiny_path)
        folder = edited(saved, tmp_path / str(i), setting(generator=same))
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*trained on rollouts of")
            LengthValueModel.from_pretrained(folder, generator=tiny_generator)
    hub.builtin_path(hub.DEFAULT_MODEL).unlink()
    monkeypatch.setattr(hub, "prepare", lambda *a, **k: pytest.fail("prepared to compare names"))
    with pytest.warns(UserWarning, match=f"trained on rollouts of {hub.DEFAULT_MODEL}"):
        LengthValueModel.from_pretrained(folder, generator=tiny_generator)


def test_config_json_keeps_text_as_it_is(saved, tmp_path, tiny_generator):
    folder = edited(saved, tmp_path, setting(my_note="训练于星期二"))
    with pytest.warns(UserWarning, match="my_note"):
        lenvm = LengthValueModel.from_pretrained(folder, generator=tiny_generator)
    save_config(folder, lenvm.config)
    text = (folder / CONFIG_NAME).read_text(encoding="utf-8")
    assert "训练于星期二" in text and "\\u" not in text  # raw UTF-8, as lenvm's other files
