import dataclasses
import json
import os
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import synthetic_records

from lenvm import LengthValueModel, Prompt
from lenvm.io import InputError
from lenvm.model import NotALenVMError, TokenizerMismatchError
from lenvm.returns import gamma_from_lengths
from lenvm.testing import tiny_model
from lenvm.training import FeatureStore, HeadTrainer, TrainConfig, train

SHORT, LONG = "Prompt 0: give a short answer about the sea.", "Prompt 1: give a long answer about the sea."


def _config(**kw):
    base = dict(epochs=100, lr=3e-3, batch_tokens=32, eval_fraction=0.25, seed=0)
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("kind", ["attached", "q"])
def test_head_training_learns_prompt_dependent_length(tmp_path, tiny_path, tiny_generator, kind):
    records = synthetic_records(tiny_generator[1])
    result = train(
        records,
        str(tiny_path),
        tmp_path / "lenvm",
        # The last layer: in a random 2-layer model the prompt's one telling word reaches the last
        # prompt token's state mostly through both attention layers.
        _config(kind=kind, feature_layer=-1),
        generator=tiny_generator,
        progress=False,
    )
    assert result.losses[-1] < result.losses[0] / 5
    lenvm = LengthValueModel.from_pretrained(tmp_path / "lenvm", generator=tiny_generator)
    short, long = lenvm.predict_length([SHORT, LONG])
    assert long - short > 2  # true lengths 24 and 3; a random backbone hides most of the prompt
    m = result.metrics
    assert m["prompt_mre"] < m["baseline_prompt_mre"]
    assert m["token_mae"] < m["baseline_token_mae"]
    assert {"rel_error_at_0", "rel_error_at_90", "value_mse"} <= set(m)
    assert (tmp_path / "lenvm" / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert not (tmp_path / "lenvm.checkpoints").exists()


def test_gamma_auto_is_p99_rule_and_stored(tmp_path, tiny_path, tiny_generator):
    records = synthetic_records(tiny_generator[1])
    result = train(
        records, str(tiny_path), tmp_path / "lv", _config(epochs=1), generator=tiny_generator, progress=False
    )
    expected = gamma_from_lengths([r["num_tokens"] for r in records])
    assert result.gamma == pytest.approx(expected)
    saved = json.loads((tmp_path / "lv" / "config.json").read_text())
    assert saved["gamma"] == pytest.approx(expected)
    assert saved["training"]["data"]["finished"] == len(records)


def test_a_generator_that_is_not_a_model_and_tokenizer_pair_is_named(tmp_path, tiny_path, tiny_generator):
    LengthValueModel.from_base(str(tiny_path), generator=tiny_generator, gamma=0.9).save_pretrained(
        tmp_path / "l"
    )
    model, tok = tiny_generator
    for wrong in (model, str(tiny_path), (tok, model)):
        with pytest.raises(InputError, match=r"generator must be .*\(model, tokenizer\)"):
            LengthValueModel.from_pretrained(tmp_path / "l", generator=wrong)


def test_save_load_round_trip_and_errors(tmp_path, tiny_path, tiny_generator):
    records = synthetic_records(tiny_generator[1])
    train(
        records, str(tiny_path), tmp_path / "lv", _config(epochs=2), generator=tiny_generator, progress=False
    )
    a = LengthValueModel.from_pretrained(tmp_path / "lv", generator=tiny_generator)
    b = LengthValueModel.from_pretrained(tmp_path / "lv")  # loads the generator named in the config
    assert a.predict_length(LONG) == pytest.approx(b.predict_length(LONG), rel=1e-5)
    # Same architecture, different tokenizer (vocab 300 instead of 256): refused.
    from lenvm.hub import load_generator
    from lenvm.testing import tiny_tokenizer

    other = tiny_model(tmp_path / "other", seed=1)
    tiny_tokenizer(vocab_size=300).save_pretrained(other)
    with pytest.raises(TokenizerMismatchError):
        LengthValueModel.from_pretrained(tmp_path / "lv", generator=load_generator(other))
    with pytest.raises(NotALenVMError):
        LengthValueModel.from_pretrained(tiny_path)  # a model folder, not a LenVM
    with pytest.raises(NotALenVMError):
        LengthValueModel.from_pretrained(tmp_path / "missing")


def test_interrupted_head_training_resumes(tmp_path, tiny_path, tiny_generator, monkeypatch):
    records = synthetic_records(tiny_generator[1])
    calls = {"n": 0}
    original = HeadTrainer.loss

    def crash_after_some_steps(self, rows):
        calls["n"] += 1
        if calls["n"] == 25:
            raise KeyboardInterrupt
        return original(self, rows)

    monkeypatch.setattr(HeadTrainer, "loss", crash_after_some_steps)
    config = _config(epochs=6)
    with pytest.raises(KeyboardInterrupt):
        train(records, str(tiny_path), tmp_path / "lv", config, generator=tiny_generator, progress=False)
    assert (tmp_path / "lv.checkpoints" / "checkpoint.pt").exists()
    assert not (tmp_path / "lv").exists()  # nothing half-written in place of the result
    done_before = torch.load(tmp_path / "lv.checkpoints" / "checkpoint.pt", weights_only=False)["epoch"]
    assert done_before >= 1
    monkeypatch.setattr(HeadTrainer, "loss", original)
    calls["n"] = 0
    resumed = train(
        records, str(tiny_path), tmp_path / "lv", config, generator=tiny_generator, progress=False
    )
    uninterrupted = train(
        records, str(tiny_path), tmp_path / "lv2", config, generator=tiny_generator, progress=False
    )
    assert len(resumed.losses) == len(uninterrupted.losses)
    np.testing.assert_allclose(resumed.losses, uninterrupted.losses, rtol=1e-4)


def test_a_run_interrupted_while_writing_its_result_resumes(tmp_path, tiny_path, tiny_generator, monkeypatch):
    """Ctrl-C while the loss plot is drawn, after the LenVM's weights are written: no LenVM folder
    without its log stands at --out for the rerun to refuse; the rerun finishes the job. A damaged
    features-cache marker is built again, not a crash."""
    import lenvm.training as training

    records = synthetic_records(tiny_generator[1])
    config = _config(epochs=2)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "plot_losses", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(records, str(tiny_path), tmp_path / "lv", config, generator=tiny_generator, progress=False)
    assert not (tmp_path / "lv").exists()
    monkeypatch.undo()
    (tmp_path / "lv.checkpoints" / "features" / "store.json").write_text('{"fingerp')  # cut short
    result = train(records, str(tiny_path), tmp_path / "lv", config, generator=tiny_generator, progress=False)
    assert {"config.json", "head.safetensors", "training_log.json", "loss.png"} <= {
        p.name for p in (tmp_path / "lv").iterdir()
    }
    # Its time is the rerun's own, and says so: the interrupted invocation's was never recorded.
    saved = json.loads((tmp_path / "lv" / "config.json").read_text())["training"]
    assert "seconds" not in saved and saved["seconds_this_run"] == round(result.seconds_this_run, 2)
    assert not (tmp_path / "lv.checkpoints").exists()


@pytest.mark.parametrize(
    ("kind", "found"),
    [
        ("attached", "checkpoint.pt"),
        ("standalone", "state.json"),
        # The other path's, which the run would neither resume nor keep (the folder goes at its end).
        ("attached", "state.json"),
        ("standalone", "checkpoint.pt"),
        ("standalone", "features"),
    ],
)
def test_another_runs_checkpoint_is_refused_before_any_work(
    tmp_path, tiny_path, tiny_generator, monkeypatch, kind, found
):
    """A checkpoint another run wrote (or an older lenvm, whose fingerprint the message cannot tell
    apart; or a run of the other training path) is refused before hidden states are computed or a
    model prepared, and nothing lands beside it."""
    from accelerate import Accelerator

    def no_work(*args, **kwargs):
        raise AssertionError("the checkpoint should have been refused first")

    monkeypatch.setattr(LengthValueModel, "features", no_work)
    monkeypatch.setattr(Accelerator, "prepare", no_work)
    work = tmp_path / "lv.checkpoints"
    work.mkdir()
    if found == "checkpoint.pt":
        torch.save({"fingerprint": "0123456789abcdef", "epoch": 1}, work / found)
    elif found == "state.json":
        (work / found).write_text(json.dumps({"fingerprint": "0123456789abcdef", "step": 1}))
    else:  # hidden states of a head run interrupted before its first checkpoint
        (work / found).mkdir()
        (work / found / "features.bin").write_bytes(b"\0" * 64)
    if kind == "attached":
        config, generator = _config(epochs=2), tiny_generator
    else:
        config, generator = TrainConfig(kind="standalone", epochs=1, batch_size=4, eval_fraction=0.25), None
    records = synthetic_records(tiny_generator[1])
    with pytest.raises(InputError, match="cannot resume.*another training run.*another lenvm version"):
        train(records, str(tiny_path), tmp_path / "lv", config, generator=generator, progress=False)
    assert [p.name for p in work.iterdir()] == [found]


def _checkpointed_then_probe(monkeypatch, records, out, config, **kw):
    """Train into ``out`` until just before the LenVM is written (its checkpoint stays), then
    return a probe: ``probe(base, config)`` is True where a rerun resumes that checkpoint (it runs
    on to writing the LenVM, stopped there again) and raises where the checkpoint is refused."""
    import lenvm.training as training

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "plot_losses", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(records, kw.pop("base"), out, config, progress=False, **kw)

    def probe(base, config, **more):
        with pytest.raises(KeyboardInterrupt):
            train(records, base, out, config, progress=False, **{**kw, **more})
        return True

    return probe


def test_a_run_resumes_with_its_model_named_another_way_and_settings_that_train_the_same(
    tmp_path, tiny_path, tiny_generator, monkeypatch
):
    """The model is its weights, however --base names it; settings that cannot change what is
    trained (where checkpoints and hidden states go, options another path reads, a default named)
    may change on a resume; the others may not."""
    records = synthetic_records(tiny_generator[1])
    out, config = tmp_path / "lv", _config(epochs=2)
    probe = _checkpointed_then_probe(
        monkeypatch, records, out, config, base=str(tiny_path), generator=tiny_generator
    )
    (tmp_path / "link").symlink_to(tiny_path)
    monkeypatch.chdir(tiny_path.parent)
    for base in (f"{tiny_path}/", str(tmp_path / "link"), f"./{tiny_path.name}"):
        assert probe(base, config)
    layer = 1  # the tiny model's default
    for same in (
        dict(checkpoint_every=7, features_cache=str(tmp_path / "cache")),
        dict(batch_size=3, grad_accum=2, shuffle_buffer=5, gradient_checkpointing=False),
        dict(huber_delta=0.5, feature_layer=layer, head_hidden_size=64),
    ):
        assert probe(str(tiny_path), dataclasses.replace(config, **same))
    for other in (dict(lr=1e-3), dict(loss="huber"), dict(seed=1)):
        with pytest.raises(InputError, match="cannot resume"):
            probe(str(tiny_path), dataclasses.replace(config, **other))


def test_fine_tuning_resumes_with_settings_that_train_the_same(
    tmp_path, tiny_path, tiny_generator, monkeypatch
):
    records = synthetic_records(tiny_generator[1])
    held = [r for r in records if r["prompt_id"] == records[0]["prompt_id"]]
    rest = [r for r in records if r["prompt_id"] != records[0]["prompt_id"]]
    config = TrainConfig(kind="standalone", epochs=1, batch_size=4, checkpoint_every=1, bf16=False)
    out = tmp_path / "sa"
    probe = _checkpointed_then_probe(monkeypatch, rest, out, config, base=str(tiny_path), eval_rollouts=held)
    same = dict(
        checkpoint_every=2, gradient_checkpointing=True, batch_tokens=7, shuffle_buffer=5, eval_fraction=0.5
    )
    assert probe(f"{tiny_path}/", dataclasses.replace(config, **same))
    with pytest.raises(InputError, match="cannot resume"):
        probe(str(tiny_path), dataclasses.replace(config, batch_size=2))
    # Launched on two processes, each step deals out twice the completions: other batches.
    from accelerate import Accelerator

    monkeypatch.setattr(Accelerator, "num_processes", property(lambda self: 2))
    with pytest.raises(InputError, match="cannot resume.*number of processes"):
        probe(str(tiny_path), config)


def test_fine_tuning_checkpoints_keep_the_run_lock_and_resume_from_an_interrupted_move(
    tmp_path, tiny_path, tiny_generator, monkeypatch
):
    """A checkpoint is written in the checkpoint folder, which stays, so that the run's lock on it
    holds; one interrupted while it was moved into place is resumed, not trained again."""
    import lenvm.training as training
    from lenvm.io import RunLock
    from lenvm.training import FullTrainer

    records = synthetic_records(tiny_generator[1])
    config = TrainConfig(kind="standalone", epochs=2, batch_size=2, checkpoint_every=2, bf16=False)
    work, saved_at = tmp_path / "sa.checkpoints", []
    save, replace = FullTrainer.save, os.replace

    def checked_save(self, step, *args):
        save(self, step, *args)
        saved_at.append(step)
        with pytest.raises(InputError, match="another run is training"):
            RunLock(work, "training")  # a second run

    def interrupted_move(source, target):
        if Path(target) in (work, work / "accelerate") and len(saved_at) == 1:  # the second, staged whole
            raise KeyboardInterrupt
        return replace(source, target)

    monkeypatch.setattr(FullTrainer, "save", checked_save)
    monkeypatch.setattr(training.os, "replace", interrupted_move)
    with pytest.raises(KeyboardInterrupt):
        train(records, str(tiny_path), tmp_path / "sa", config, progress=False)
    monkeypatch.setattr(training.os, "replace", replace)
    train(records, str(tiny_path), tmp_path / "sa", config, progress=False)
    assert saved_at[:2] == [2, 6]  # resumed from the step the interrupted move had staged
    assert not work.exists()


def test_a_second_run_into_the_same_folder_is_refused_while_the_first_runs(
    tmp_path, tiny_path, tiny_generator
):
    from lenvm.io import RunLock

    records = synthetic_records(tiny_generator[1])
    out, work = tmp_path / "lv", tmp_path / "lv.checkpoints"
    work.mkdir()
    with (
        RunLock(work, "training"),  # the first run, holding its checkpoint folder
        pytest.raises(InputError, match=f"another run is training into {out}"),
    ):
        train(records, str(tiny_path), out, _config(epochs=1), generator=tiny_generator, progress=False)
    assert work.is_dir() and not out.exists()  # the first run's folder is left to it
    cache = tmp_path / "features"
    cache.mkdir()
    with (
        RunLock(cache, "training"),  # a features cache another run reads
        pytest.raises(InputError, match="another run is training with this features cache"),
    ):
        train(records, str(tiny_path), out, _config(epochs=1, features_cache=str(cache)),
              generator=tiny_generator, progress=False)  # fmt: skip
    train(records, str(tiny_path), out, _config(epochs=1), generator=tiny_generator, progress=False)
    assert (out / "config.json").is_file() and not work.exists()
    # The run's own checkpoint folder named as its features cache: one folder, held once.
    train(records, str(tiny_path), out, _config(epochs=1, features_cache=str(work)), generator=tiny_generator,
          progress=False, overwrite=True)  # fmt: skip


def test_a_prompt_under_several_ids_on_both_sides_of_the_split_is_named(tmp_path, tiny_path, tiny_generator):
    import warnings

    records = synthetic_records(tiny_generator[1], n_per_prompt=4)
    per_sample = [dict(r, prompt_id=f"{r['prompt_id']}-{r['sample_index']}") for r in records]  # request ids
    with pytest.warns(UserWarning, match=r"held-out prompt\(s\) are trained on too, under other prompt ids"):
        train(per_sample, str(tiny_path), tmp_path / "a", _config(epochs=1, eval_fraction=0.25),
              generator=tiny_generator, progress=False)  # fmt: skip
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*trained on too")  # one id per prompt: nothing to say
        train(records, str(tiny_path), tmp_path / "b", _config(epochs=1, eval_fraction=0.25),
              generator=tiny_generator, progress=False)  # fmt: skip


def test_numpy_counts_are_taken_and_saved_as_python_ints():
    config = TrainConfig(
        epochs=np.int64(2), batch_tokens=np.int32(64), seed=np.int64(1), gamma=np.float32(0.5)
    )
    kept = (config.epochs, config.batch_tokens, config.seed, config.gamma)
    assert [type(v) for v in kept] == [int, int, int, float]
    json.dumps(dataclasses.asdict(config))  # what the saved config holds


def test_a_config_copied_with_another_kind_takes_that_kinds_defaults():
    standalone = TrainConfig(kind="standalone").resolved()
    assert (standalone.freeze_backbone, standalone.epochs, standalone.lr) == (False, 2, 2e-5)
    assert dataclasses.replace(TrainConfig(), kind="standalone").resolved() == standalone
    attached = dataclasses.replace(TrainConfig(kind="standalone"), kind="attached").resolved()
    assert (attached.freeze_backbone, attached.epochs, attached.lr) == (True, 30, 1e-3)
    given = dataclasses.replace(TrainConfig(epochs=3, lr=0.01), kind="standalone").resolved()
    assert (given.epochs, given.lr) == (3, 0.01)  # what was given stays given
    config = TrainConfig()
    config.gamma = 1.5  # set after construction: checked again when training resolves it
    with pytest.raises(InputError, match="gamma"):
        config.resolved()


def test_bad_training_input(tmp_path, tiny_path, tiny_generator):
    records = synthetic_records(tiny_generator[1])
    with pytest.raises(InputError, match="gamma"):
        TrainConfig(gamma=1.5)
    with pytest.raises(InputError):
        TrainConfig(kind="attached", freeze_backbone=False)
    with pytest.raises(
        InputError, match=r"config must be a TrainConfig, got dict: TrainConfig\(\*\*settings\)"
    ):
        train(records, str(tiny_path), tmp_path / "d", {"epochs": 1}, generator=tiny_generator)
    # A backbone fine-tuned in float16 (no float32 copy, no loss scaling) gave NaN at any lr.
    with pytest.raises(InputError, match="cannot be fine-tuned in float16"):
        train(records, str(tiny_path), tmp_path / "f16", TrainConfig(kind="standalone"), dtype="float16")
    assert not (tmp_path / "f16").exists()
    vocab = tiny_generator[0].get_input_embeddings().weight.shape[0]
    with pytest.raises(InputError, match=r"eval fraction must lie in \[0, 1\)"):  # nothing left to train on
        train(records, str(tiny_path), tmp_path / "all", _config(epochs=1, eval_fraction=1.0), progress=False)
    bad = [dict(records[0], completion_token_ids=[vocab])] + records[1:]  # one past the vocabulary
    with pytest.raises(InputError, match="vocabulary"):
        train(
            bad, str(tiny_path), tmp_path / "x", _config(epochs=1), generator=tiny_generator, progress=False
        )
    # Longer than the model's context (rollouts made elsewhere): an error, or left out by --max-length.
    long = dict(records[1], completion_token_ids=[5] * 1100, num_tokens=1100, finish_reason="length")
    with pytest.raises(InputError, match=r"record 2 is \d+ tokens long .* context .*--max-length 1024"):
        train(
            [records[0], long, *records[2:]], str(tiny_path), tmp_path / "x", _config(epochs=1),
            generator=tiny_generator, progress=False,
        )  # fmt: skip
    result = train(
        [records[0], long, *records[2:]], str(tiny_path), tmp_path / "y", _config(epochs=1, max_length=1024),
        generator=tiny_generator, progress=False,
    )  # fmt: skip
    assert result.data.dropped == 1
    # Rollouts of another tokenizer, of two decoding policies, or held out from another policy.
    shifted = [dict(r, prompt_token_ids=[t + 1 for t in r["prompt_token_ids"]]) for r in records]
    mixed = records[:6] + [dict(r, sampling={"temperature": 0.5}) for r in records[6:]]
    for rollouts, held, match in [
        (shifted, None, "do not read back as its prompt"),
        (mixed, None, "record 7 was sampled with .*temperature': 0.5"),
        (records[:12], mixed[12:], "evaluation rollouts were sampled with"),
    ]:
        with pytest.raises(InputError, match=match):
            train(
                rollouts, str(tiny_path), tmp_path / "x", _config(epochs=1), generator=tiny_generator,
                eval_rollouts=held, progress=False,
            )  # fmt: skip
    # A learning rate that blows the head up saves nothing (no LenVM that predicts nan).
    with pytest.raises(InputError, match="training diverged.*lower --lr"):
        train(
            records, str(tiny_path), tmp_path / "nan", _config(epochs=2, lr=1e20), generator=tiny_generator,
            progress=False,
        )  # fmt: skip
    assert not (tmp_path / "nan").exists()
    cut = [dict(r, finish_reason="length") for r in records]
    with pytest.raises(InputError, match="no usable"):
        train(
            cut,
            str(tiny_path),
            tmp_path / "x",
            _config(epochs=1, truncated="drop"),
            generator=tiny_generator,
            progress=False,
        )


def test_a_head_trains_the_same_on_the_same_records_in_another_order(tmp_path, tiny_path, tiny_generator):
    """A resumed rollout run writes the same records in another order: the same LenVM."""
    from safetensors.torch import load_file

    records = synthetic_records(tiny_generator[1])
    for name, ordered in (("a", records), ("b", records[::-1])):
        train(
            ordered,
            str(tiny_path),
            tmp_path / name,
            _config(epochs=2),
            generator=tiny_generator,
            progress=False,
        )
    a, b = (load_file(tmp_path / name / "head.safetensors") for name in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_held_records_in_another_order_resume_the_run_and_reuse_its_hidden_states(
    tmp_path, tiny_path, tiny_generator, monkeypatch
):
    """Held records train in a canonical order, so the same ones in another file order are the
    same run: its checkpoint resumes and its cached hidden states serve. (A stream trains in its
    file's order: see test_features_cache_is_not_reused_for_other_weights_or_held_out_answers.)"""
    import lenvm.training as training

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    def no_backbone_pass(*args, **kwargs):
        raise AssertionError("the hidden states should have come from the cache")

    records = synthetic_records(tiny_generator[1])
    config = _config(epochs=2, features_cache=str(tmp_path / "cache"))
    monkeypatch.setattr(training, "plot_losses", interrupted)  # each run stops before its LenVM is written
    with pytest.raises(KeyboardInterrupt):
        train(records, str(tiny_path), tmp_path / "lv", config, generator=tiny_generator, progress=False)
    monkeypatch.setattr(LengthValueModel, "features", no_backbone_pass)
    for out in ("lv", "new"):  # its checkpoint resumed (not refused), then another run
        with pytest.raises(KeyboardInterrupt):
            train(
                records[::-1],
                str(tiny_path),
                tmp_path / out,
                config,
                generator=tiny_generator,
                progress=False,
            )


def test_training_bars_are_redrawn_at_their_interval_not_at_every_step(
    tmp_path, tiny_path, tiny_generator, monkeypatch, lazy_bars
):
    import lenvm.training

    bar, drawn = lazy_bars
    monkeypatch.setattr(lenvm.training, "tqdm", bar)
    records = synthetic_records(tiny_generator[1])
    head = train(records, str(tiny_path), tmp_path / "head", _config(epochs=5), generator=tiny_generator)
    backbone = TrainConfig(kind="standalone", epochs=2, batch_size=2, bf16=False, eval_fraction=0.25)
    tuned = train(records, str(tiny_path), tmp_path / "sa", backbone)
    assert len(head.losses) >= 10 and len(tuned.losses) >= 10
    # Drawn when opened and closed (and, for fine-tuning, where a checkpoint writes a line).
    assert drawn.getvalue().count("training head") <= 2
    assert drawn.getvalue().count("fine-tuning") <= 4


def test_full_finetune_standalone(tmp_path, tiny_path, tiny_generator):
    records = synthetic_records(tiny_generator[1])
    config = TrainConfig(kind="standalone", epochs=3, lr=1e-3, batch_size=4, bf16=False, eval_fraction=0.25)
    result = train(records, str(tiny_path), tmp_path / "sa", config, progress=False)
    assert np.mean(result.losses[-3:]) < np.mean(result.losses[:3])
    lenvm = LengthValueModel.from_pretrained(tmp_path / "sa", generator=tiny_generator)
    assert lenvm.config.kind == "standalone"
    assert (tmp_path / "sa" / "backbone" / "config.json").exists()
    assert "token_mae" in result.metrics
    # The same records in another order (a resumed rollout run writes them so) train the same weights.
    again = train(records[::-1], str(tiny_path), tmp_path / "reversed", config, progress=False)
    assert again.losses == result.losses


@pytest.mark.parametrize("feature_layer", [None, -1, 2])
def test_feature_layer_is_stored_and_used(tmp_path, tiny_path, tiny_generator, feature_layer):
    records = synthetic_records(tiny_generator[1])
    config = _config(epochs=2, feature_layer=feature_layer)
    train(records, str(tiny_path), tmp_path / "lv", config, generator=tiny_generator, progress=False)
    lenvm = LengthValueModel.from_pretrained(tmp_path / "lv", generator=tiny_generator)
    expected = 1 if feature_layer is None else feature_layer  # default: 60% of the tiny model's 2 layers
    assert lenvm.feature_layer == expected
    ids = torch.tensor([records[1]["prompt_token_ids"]], device=lenvm.device)
    with torch.no_grad():
        out = lenvm.body(input_ids=ids, output_hidden_states=True)
    hidden = out.hidden_states[expected]
    if expected != -1:  # a middle layer is RMS-normalized; the last one is the model's own output
        hidden = hidden / hidden.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
    torch.testing.assert_close(lenvm.features(ids), hidden, atol=1e-5, rtol=0)
    with torch.no_grad():  # inference stops the forward at the feature layer: same features
        torch.testing.assert_close(lenvm.features(ids), hidden, atol=1e-5, rtol=0)


def test_bad_feature_layer(tiny_path, tiny_generator):
    with pytest.raises(InputError, match="feature_layer"):
        LengthValueModel.from_base(tiny_path, generator=tiny_generator, feature_layer=-2)
    with pytest.raises(InputError, match="exceeds"):
        LengthValueModel.from_base(tiny_path, generator=tiny_generator, feature_layer=3)


def test_separate_evaluation_rollouts(tmp_path, tiny_path, tiny_generator):
    records = synthetic_records(tiny_generator[1])
    held = [r for r in records if r["prompt_id"] in ("0", "1")]
    rest = [r for r in records if r["prompt_id"] not in ("0", "1")]
    result = train(
        rest,
        str(tiny_path),
        tmp_path / "lv",
        _config(),
        generator=tiny_generator,
        progress=False,
        eval_rollouts=held,
    )
    saved = json.loads((tmp_path / "lv" / "config.json").read_text())["training"]
    assert saved["train_completions"] == len(rest) and saved["eval_completions"] == len(held)
    assert result.metrics["eval_prompts"] == 2
    with pytest.raises(InputError, match="both the training and the evaluation"):
        train(
            records, str(tiny_path), tmp_path / "x", _config(), generator=tiny_generator, eval_rollouts=held
        )


def test_head_lambda_targets_match_the_recursion_and_lambda_one_adds_nothing(
    tmp_path, tiny_path, tiny_generator
):
    from lenvm.returns import td_lambda_targets

    records = synthetic_records(tiny_generator[1], truncate_long=True)  # some completions are cut
    config = _config(epochs=3, lam=0.5, loss="huber", huber_delta=0.05, aggregation="seq-mean-token-mean")
    result = train(records, str(tiny_path), tmp_path / "lv", config, generator=tiny_generator, progress=False)
    assert result.losses[-1] < result.losses[0]
    # Held-out figures logged at every epoch end, in the log and the result.
    log = json.loads((tmp_path / "lv" / "training_log.json").read_text())
    assert [e["epoch"] for e in log["evaluations"]] == [1, 2, 3]
    assert {"prompt_mre", "rel_error_at_30", "rel_error_at_60", "train_loss"} <= set(log["evaluations"][-1])
    assert log["evaluations"] == result.evaluations

    # The refreshed targets of the head path against the per-completion TD(lambda) recursion.
    lenvm = LengthValueModel.from_pretrained(tmp_path / "lv", generator=tiny_generator)
    from lenvm.training_data import RolloutSource, training_data

    data = training_data(
        RolloutSource(records), None, lenvm.config.eos_token_ids, "bootstrap", None, 0.25, 0, 256, "tiny"
    )
    trainer = HeadTrainer(lenvm, _config(lam=0.5), tmp_path / "work", "fp", progress=False)
    trainer.store = FeatureStore.open_or_build(
        tmp_path / "work" / "features", "fp", lenvm, data.train, data.eval, False
    )
    trainer.refresh_targets()
    store, gamma = trainer.store, lenvm.gamma
    checked_cut = 0
    for c in range(store.train_completions):
        first, n, finished = int(store.first_row[c]), int(store.states[c]), bool(store.finished[c])
        rows = np.arange(first, first + n + (0 if finished else 1))
        v = trainer._state_values(rows).double().cpu().numpy()
        v = np.append(v, 0.0) if finished else v
        expected = td_lambda_targets(v, gamma, 0.5, finished=finished)
        got = trainer.targets(rows[:n]).double().cpu().numpy()  # what the loss regresses on
        np.testing.assert_allclose(got, expected, atol=1e-5)
        checked_cut += not finished
    assert checked_cut > 0


def test_head_and_q_targets_are_bootstrapped_at_a_cut(tmp_path, tiny_path, tiny_generator):
    """lambda = 1: a state's target is its discounted return, plus, where its completion was cut,
    gamma**steps times the head's value at the cut (not 0, as if it had ended there); the Q-head's
    target for the token taken is the next state's."""
    from lenvm.training_data import RolloutSource, training_data

    records = synthetic_records(tiny_generator[1], truncate_long=True)
    lenvm = LengthValueModel.from_base(str(tiny_path), kind="q", gamma=0.9, generator=tiny_generator)
    data = training_data(
        RolloutSource(records), None, lenvm.config.eos_token_ids, "bootstrap", None, 0.25, 0, 256, "tiny"
    )
    trainer = HeadTrainer(lenvm, _config(), tmp_path / "work", "fp", progress=False)
    trainer.store = store = FeatureStore.open_or_build(
        tmp_path / "work" / "features", "fp", lenvm, data.train, data.eval, False
    )
    trainer.train_states = trainer.train_completions = 1
    seen = []  # the targets of each call of the per-state loss: the states', then the Q-head's
    trainer._state_losses = lambda values, targets: seen.append(targets) or values * 0
    gamma, cut_seen = lenvm.gamma, 0
    for c in range(store.train_completions):
        first, n, finished = int(store.first_row[c]), int(store.states[c]), bool(store.finished[c])
        rows = np.arange(first, first + n)
        steps = np.arange(n, 0, -1, dtype=np.float64)
        at_cut = 0.0 if finished else float(trainer._state_values(np.array([first + n]))[0])
        expected = -(1 - gamma**steps) + gamma**steps * at_cut
        np.testing.assert_allclose(trainer.targets(rows).double().cpu().numpy(), expected, atol=1e-6)
        cut_seen += not finished and abs(at_cut) > 1e-3
        if n > 1:  # the loss's Q part regresses on the next states' targets
            seen.clear()
            trainer.loss(rows)
            np.testing.assert_allclose(seen[1].double().cpu().numpy(), expected[1:], atol=1e-6)
    assert cut_seen > 0
    trainer.config = _config(lam=1.0)
    trainer.refresh_targets()
    assert torch.count_nonzero(trainer.correction) == 0  # lambda = 1: the Monte-Carlo targets exactly


def test_prompt_weight_weighs_the_first_state_of_each_completion_in_both_trainers(
    tmp_path, tiny_path, tiny_generator
):
    from types import SimpleNamespace

    from lenvm.dataset import collate
    from lenvm.training import FullTrainer
    from lenvm.training_data import RolloutSource, training_data

    records = synthetic_records(tiny_generator[1])
    lenvm = LengthValueModel.from_base(str(tiny_path), kind="attached", gamma=0.9, generator=tiny_generator)
    data = training_data(
        RolloutSource(records), None, lenvm.config.eos_token_ids, "bootstrap", None, 0.25, 0, 256, "tiny"
    )
    # Head path: the s_0 rows of the feature store count 3 times, every other row once.
    trainer = HeadTrainer(lenvm, _config(prompt_weight=1.0), tmp_path / "work", "fp", progress=False)
    trainer.store = store = FeatureStore.open_or_build(
        tmp_path / "work" / "features", "fp", lenvm, data.train, data.eval, False
    )
    trainer.train_states, trainer.train_completions = int(store.states.sum()), store.train_completions
    first = store.first_row[: store.train_completions]
    later = first + 1
    with torch.no_grad():
        plain = [float(trainer.loss(np.sort(rows))) for rows in (first, later)]
        trainer.config = _config(prompt_weight=3.0)
        weighted = [float(trainer.loss(np.sort(rows))) for rows in (first, later)]
    assert weighted == pytest.approx([3 * plain[0], plain[1]], rel=1e-5)
    # Fine-tuning path: the first supervised position of each row.
    batch = collate(list(data.train)[:4], lenvm.gamma).to(lenvm.device)
    losses = []
    for weight in (1.0, 3.0):
        holder = SimpleNamespace(config=TrainConfig(kind="standalone", prompt_weight=weight), lenvm=lenvm)
        with torch.no_grad():
            losses.append(float(FullTrainer.micro_loss(holder, lenvm, batch)))
    with torch.no_grad():
        values = lenvm(batch.input_ids, batch.attention_mask).float()
    start = batch.supervised.float().argmax(1)
    rows = torch.arange(4, device=values.device)
    at_start = values[rows, start] - batch.mc[rows, start]
    assert losses[1] - losses[0] == pytest.approx(2 * float((at_start**2).sum()), rel=1e-4)


def test_streamed_rollouts_train_exactly_like_loaded_ones(tmp_path, tiny_path, tiny_generator):
    records = synthetic_records(tiny_generator[1], truncate_long=True)
    path = tmp_path / "rollouts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    runs = {}
    for stream in (False, True):
        runs[stream] = train(
            str(path),
            str(tiny_path),
            tmp_path / f"lv-{stream}",
            _config(epochs=3, stream=stream),
            generator=tiny_generator,
            progress=False,
        )
        saved = json.loads((tmp_path / f"lv-{stream}" / "config.json").read_text())["training"]
        assert saved["streamed"] is stream
    assert runs[True].losses == runs[False].losses
    assert runs[True].metrics == runs[False].metrics
    assert runs[True].data == runs[False].data


@pytest.mark.skipif(not os.path.isdir("/dev/fd"), reason="pipes by path: /dev/fd")
def test_streaming_a_pipe_is_refused_before_any_work(tmp_path, tiny_path, tiny_generator):
    """A pipe (``/dev/stdin``, a shell's ``<(...)``) gives its records once: streamed, every pass
    after the first would find none."""
    records = synthetic_records(tiny_generator[1])
    read, write = os.pipe()
    os.write(write, "".join(json.dumps(r) + "\n" for r in records).encode())  # within its buffer
    os.close(write)
    try:
        with pytest.raises(InputError, match="a pipe can be read only once"):
            train(
                f"/dev/fd/{read}",
                str(tiny_path),
                tmp_path / "lv",
                _config(epochs=2, stream=True),
                generator=tiny_generator,
                progress=False,
            )
    finally:
        os.close(read)
    assert not (tmp_path / "lv").exists() and not (tmp_path / "lv.checkpoints").exists()


def test_datasets_folder_trains_like_the_jsonl_file(tmp_path, tiny_path, tiny_generator):
    import datasets  # in the test extra: an install that fails to import fails here, not skips

    records = synthetic_records(tiny_generator[1])
    path = tmp_path / "rollouts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    datasets.Dataset.from_list(records).save_to_disk(str(tmp_path / "rollouts-ds"))
    a = train(
        str(path), str(tiny_path), tmp_path / "a", _config(epochs=2), generator=tiny_generator, progress=False
    )
    b = train(
        str(tmp_path / "rollouts-ds"),
        str(tiny_path),
        tmp_path / "b",
        _config(epochs=2),
        generator=tiny_generator,
        progress=False,
    )
    assert a.losses == b.losses
    assert json.loads((tmp_path / "b" / "config.json").read_text())["training"]["streamed"]


def test_full_finetuning_runs_again_in_the_same_session_with_another_precision(
    tmp_path, tiny_path, tiny_generator
):
    """accelerate keeps one state per process: a second run (a notebook) must not be refused
    because the first one trained in another precision."""
    records = synthetic_records(tiny_generator[1], n_per_prompt=1)
    for bf16 in (True, False):
        config = TrainConfig(kind="standalone", epochs=1, batch_size=4, bf16=bf16, eval_fraction=0.25)
        result = train(records, str(tiny_path), tmp_path / f"sa-{bf16}", config, progress=False)
        assert np.isfinite(result.losses).all()


def test_full_finetune_gradient_checkpointing_matches(tmp_path, tiny_path, tiny_generator, monkeypatch):
    import transformers.modeling_utils as hf

    recomputed = []
    original = hf.checkpoint
    monkeypatch.setattr(hf, "checkpoint", lambda *a, **k: recomputed.append(1) or original(*a, **k))
    records = synthetic_records(tiny_generator[1])
    runs = []
    for checkpointing in (False, True):
        config = TrainConfig(
            kind="standalone",
            epochs=1,
            lr=1e-3,
            batch_size=4,
            bf16=False,
            eval_fraction=0.25,
            gradient_checkpointing=checkpointing,
            loss="bce",
            relative_loss_weight=0.1,
            aggregation="seq-mean-token-sum",
        )
        runs.append(train(records, str(tiny_path), tmp_path / f"sa-{checkpointing}", config, progress=False))
        assert bool(recomputed) is checkpointing  # the backbone's layers were recomputed
    np.testing.assert_allclose(runs[0].losses, runs[1].losses, rtol=1e-5)
    assert runs[1].evaluations[-1]["step"] == len(runs[1].losses)
    with pytest.raises(InputError, match="lower the batch size"):
        train(
            records,
            str(tiny_path),
            tmp_path / "x",
            TrainConfig(kind="standalone", batch_size=64),
            progress=False,
        )


def test_bf16_where_the_hardware_has_it():
    from lenvm.training import cpu_has_native_bf16, resolve_bf16

    assert resolve_bf16(None, torch.device("cpu")) is cpu_has_native_bf16()
    assert resolve_bf16(True, torch.device("cpu")) is True
    assert resolve_bf16(False, torch.device("cpu")) is False


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(lam=1.5), "lambda"),
        (dict(loss="l1"), "loss"),
        (dict(aggregation="seq-mean-token-mean-max"), "aggregation"),
        (dict(huber_delta=0), "huber_delta"),
        (dict(relative_loss_weight=-1), "relative_loss_weight"),
        (dict(prompt_weight=0), "prompt_weight"),
        (dict(gradient_checkpointing=True), "gradient checkpointing"),
        (dict(shuffle_buffer=0), "shuffle_buffer"),
        (dict(lr=float("inf")), "learning rate"),
        (dict(huber_delta=float("nan")), "huber_delta"),
        (dict(prompt_weight=float("inf")), "prompt_weight"),
        (dict(head_hidden_size=0), "head_hidden_size"),
        (dict(checkpoint_every=0), "checkpoint_every"),
        (dict(epochs=1.5), "epochs"),
        (dict(seed=1.5), "seed"),
        (dict(warmup_ratio=5), "warmup_ratio"),
        (dict(stream="no"), "stream"),
    ],
)
def test_bad_training_options(bad, match):
    with pytest.raises(InputError, match=match):
        TrainConfig(**bad)


def test_features_cache_is_reused_across_training_options(tmp_path, tiny_path, tiny_generator, monkeypatch):
    records = synthetic_records(tiny_generator[1])
    cache = str(tmp_path / "features")
    first = train(
        records,
        str(tiny_path),
        tmp_path / "a",
        _config(epochs=2, features_cache=cache),
        generator=tiny_generator,
    )
    assert (tmp_path / "features" / "store.json").is_file()  # kept after the run
    plain = train(
        records, str(tiny_path), tmp_path / "b", _config(epochs=2, loss="huber"), generator=tiny_generator
    )

    def no_backbone_pass(*args, **kwargs):
        raise AssertionError("the hidden states should have come from the cache")

    monkeypatch.setattr(LengthValueModel, "features", no_backbone_pass)
    cached = train(
        records,
        str(tiny_path),
        tmp_path / "c",
        _config(epochs=2, loss="huber", features_cache=cache),
        generator=tiny_generator,
    )
    assert cached.losses == plain.losses and first.losses != plain.losses
    # naming the default layer is the same cache
    layer = LengthValueModel.from_pretrained(tmp_path / "a", generator=tiny_generator).feature_layer
    named = _config(epochs=1, features_cache=cache, feature_layer=layer)
    train(records, str(tiny_path), tmp_path / "d", named, generator=tiny_generator)
    # and so is the model named another way
    train(records, f"{tiny_path}/", tmp_path / "e", named, generator=tiny_generator)
    with pytest.raises(InputError, match="features cache"):
        TrainConfig(kind="standalone", features_cache=cache)


def test_features_cache_is_not_reused_for_other_weights_or_held_out_answers(
    tmp_path, tiny_path, tiny_generator, monkeypatch
):
    """The cache is keyed on the model's weights (a generator replaced or fine-tuned at the same
    path) and on every held-out answer, not on a path and a count."""
    from lenvm.hub import load_generator
    from lenvm.training import weights_digest

    records = synthetic_records(tiny_generator[1])
    gen = str(tiny_model(tmp_path / "gen"))
    first = load_generator(gen)
    assert weights_digest(load_generator(gen)[0]) == weights_digest(first[0])
    cache = str(tmp_path / "features")
    held = [r for r in records if r["prompt_id"] == records[0]["prompt_id"]]
    rest = [r for r in records if r["prompt_id"] != records[0]["prompt_id"]]
    config = _config(epochs=1, features_cache=cache)
    train(rest, gen, tmp_path / "a", config, generator=first, eval_rollouts=held)
    replaced = load_generator(tiny_model(gen, seed=5))  # the same tokenizer and shape, at the same path
    assert weights_digest(replaced[0]) != weights_digest(first[0])
    passes = []
    original = LengthValueModel.features
    monkeypatch.setattr(LengthValueModel, "features", lambda *a, **k: passes.append(1) or original(*a, **k))
    train(rest, gen, tmp_path / "b", config, generator=replaced, eval_rollouts=held)
    assert passes  # other weights under the same name: computed anew
    passes.clear()
    changed = [dict(r, completion_token_ids=r["completion_token_ids"][::-1]) for r in held]
    train(rest, gen, tmp_path / "c", config, generator=replaced, eval_rollouts=changed)
    assert passes  # other held-out answers: computed anew
    path = tmp_path / "rest.jsonl"  # not in the canonical order that held answers train in
    path.write_text("".join(json.dumps(r) + "\n" for r in rest[::-1]))
    train(str(path), gen, tmp_path / "d", config, generator=replaced, eval_rollouts=held)
    passes.clear()
    streamed = dataclasses.replace(config, stream=True)
    train(str(path), gen, tmp_path / "e", streamed, generator=replaced, eval_rollouts=held)
    assert passes  # a stream trains in the file's order: its hidden states are laid out otherwise


def test_a_predicted_length_is_never_below_one_token(tiny_path, tiny_generator):
    lenvm = LengthValueModel.from_base(tiny_path, generator=tiny_generator, gamma=0.9)
    # A value nearer 0 than one step's reward reads as less than one token: every answer has its EOS.
    assert lenvm.lengths_from_values([0.0, -0.05, -0.1]) == pytest.approx([1.0, 1.0, 1.0])
    assert lenvm.lengths_from_values([-0.19])[0] == pytest.approx(2.0, abs=0.01)


def test_a_saturated_head_keeps_its_gradient_under_bf16_autocast(tiny_path, tiny_generator):
    """Training runs the head under bf16 autocast where the hardware has it: a value near -1 must
    not round to exactly -1, where the sigmoid's gradient (and so every loss's) is 0."""
    lenvm = LengthValueModel.from_base(tiny_path, generator=tiny_generator, gamma=0.9)
    with torch.no_grad():
        lenvm.head.fc2.bias.fill_(7.0)  # z about 7: the value is -0.999
    hidden = torch.randn(4, lenvm.config.hidden_size)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        values = lenvm.values_from_hidden(hidden)
    assert values.dtype == torch.float32 and (values > -1.0).all()
    (values + 0.5).pow(2).mean().backward()
    assert lenvm.head.fc2.bias.grad.abs().item() > 1e-4  # 0 when the value rounds to -1


def test_gamma_comes_from_the_training_prompts_alone(tiny_generator):
    """The p99 rule reads the lengths of the prompts trained on: a held-out prompt's long answers
    must not stretch the horizon (and through it every held-out figure)."""
    from lenvm.dataset import held_out_prompts
    from lenvm.training_data import RolloutSource, training_data

    records = synthetic_records(tiny_generator[1])
    held = held_out_prompts([r["prompt_id"] for r in records], 0.25, 0)
    long_ids = list(range(10, 210))
    records = [
        dict(r, completion_token_ids=long_ids, num_tokens=len(long_ids), finish_reason="length")
        if r["prompt_id"] in held
        else r
        for r in records
    ]
    data = training_data(RolloutSource(records), None, [tiny_generator[1].eos_token_id], "bootstrap", None,
                         0.25, 0, 256, "tiny")  # fmt: skip
    trained = [r["num_tokens"] for r in records if r["prompt_id"] not in held]
    assert sorted(data.gamma_lengths.tolist()) == sorted(trained)
    assert gamma_from_lengths(data.gamma_lengths) == pytest.approx(gamma_from_lengths(np.array(trained)))
    assert max(trained) < 200


def test_nothing_but_a_lenvm_is_replaced_by_training_or_saving(tmp_path, tiny_path, tiny_generator):
    """The CLI's rule holds for Python callers too: a LenVM is written as a new folder, and a
    folder holding anything else (a generator, notes) is refused before any work."""
    import shutil

    records = synthetic_records(tiny_generator[1])
    generator_copy = tmp_path / "generator"
    shutil.copytree(tiny_path, generator_copy)
    before = sorted(p.name for p in generator_copy.iterdir())
    with pytest.raises(InputError, match="is not a LenVM folder; training would replace it"):
        train(
            records,
            str(tiny_path),
            generator_copy,
            _config(epochs=1),
            generator=tiny_generator,
            progress=False,
        )
    assert sorted(p.name for p in generator_copy.iterdir()) == before
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "important.txt").write_text("mine")
    lenvm = LengthValueModel.from_base(tiny_path, generator=tiny_generator, gamma=0.9)
    with pytest.raises(InputError, match="not a LenVM folder"):
        lenvm.save_pretrained(notes)
    assert (notes / "important.txt").read_text() == "mine"
    lenvm.save_pretrained(tmp_path / "lv")
    lenvm.save_pretrained(tmp_path / "lv")  # a LenVM may be saved over a LenVM
    # Training replaces a LenVM (and any end head and calibration fitted for it) only when asked.
    again = dict(config=_config(epochs=1), generator=tiny_generator, progress=False)
    before = (tmp_path / "lv" / "head.safetensors").read_bytes()
    with pytest.raises(InputError, match="already holds a LenVM"):
        train(records, str(tiny_path), tmp_path / "lv", **again)
    assert (tmp_path / "lv" / "head.safetensors").read_bytes() == before
    train(records, str(tiny_path), tmp_path / "lv", overwrite=True, **again)
    assert (tmp_path / "lv" / "head.safetensors").read_bytes() != before


def test_a_run_is_identified_by_every_record_not_only_its_ends(tiny_generator):
    """A features cache or a checkpoint is reused only on the same data: changing a record in the
    middle (same count, same first and last) changes the run's fingerprint."""
    from lenvm.training_data import RolloutSource, training_data

    records = synthetic_records(tiny_generator[1])
    middle = len(records) // 2
    other = dict(records[middle], completion_token_ids=[11, 12, tiny_generator[1].eos_token_id], num_tokens=3)
    changed = [*records[:middle], other, *records[middle + 1 :]]

    def fingerprint(rs):
        eos = [tiny_generator[1].eos_token_id]
        return training_data(
            RolloutSource(rs), None, eos, "bootstrap", None, 0.25, 0, 256, "tiny"
        ).fingerprint_data

    assert fingerprint(records) == fingerprint([dict(r) for r in records])
    assert fingerprint(changed) != fingerprint(records)


def test_held_out_rollouts_are_told_apart_by_their_prompts_not_their_ids(tiny_generator):
    """Two prompt files read with default ids (0, 1, ...) share ids, not prompts: training on one
    and evaluating on the other is fine; the same prompt under another id is refused."""
    from lenvm.training_data import RolloutSource, training_data

    records = synthetic_records(tiny_generator[1])
    train_part = [r for r in records if int(r["prompt_id"]) < 6]
    held = [dict(r, prompt_id=str(int(r["prompt_id"]) - 6)) for r in records if int(r["prompt_id"]) >= 6]
    eos = [tiny_generator[1].eos_token_id]

    def data(evaluation):
        return training_data(RolloutSource(train_part), RolloutSource(evaluation), eos, "bootstrap", None,
                             0.1, 0, 256, "tiny")  # fmt: skip

    assert len(data(held).eval) == len(held)  # ids 0 and 1 in both files, other prompts
    again = [dict(r, prompt_id="renamed") for r in train_part[:1]]
    with pytest.raises(InputError, match="1 prompt.s. are in both the training and the evaluation"):
        data(again)


def test_the_same_text_with_other_template_arguments_is_another_prompt_to_the_held_out_check(tiny_generator):
    """Trained with thinking off and evaluated with it on: two prompts, neither a leak nor one
    prompt under two ids; with the same arguments (as JSON: 0 is not false) the same prompt."""
    import warnings

    from lenvm.training_data import RolloutSource, training_data

    records = synthetic_records(tiny_generator[1])
    off = [dict(r, chat_template_kwargs={"enable_thinking": False}) for r in records]
    on = [dict(r, chat_template_kwargs={"enable_thinking": True}) for r in records]
    eos = [tiny_generator[1].eos_token_id]

    def data(train_part, evaluation, eval_fraction=0.1):
        return training_data(RolloutSource(train_part), evaluation and RolloutSource(evaluation), eos,
                             "bootstrap", None, eval_fraction, 0, 256, "tiny")  # fmt: skip

    assert len(data(off, on).eval) == len(on)
    zero = [dict(r, chat_template_kwargs={"enable_thinking": 0}) for r in records]
    assert len(data(off, zero).eval) == len(zero)
    with pytest.raises(InputError, match="8 prompt.s. are in both the training and the evaluation"):
        data(off, [dict(r, prompt_id=f"eval-{r['prompt_id']}") for r in off])
    # Each text under two ids, with other arguments: the split may part them, and that is no leak.
    both = off + [dict(r, prompt_id=f"on-{r['prompt_id']}") for r in on]
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*trained on too")
        data(both, None, eval_fraction=0.5)


def test_one_prompt_in_any_form_gives_one_prediction(tiny_path, tiny_generator):
    lenvm = LengthValueModel.from_base(tiny_path, generator=tiny_generator, gamma=0.9)
    text = "Count to 3 please."
    alone = lenvm.predict_length(text)
    messages = [{"role": "user", "content": text}]
    ids = lenvm.encode_prompts([text])[0].ids
    for same in ({"prompt": text}, {"messages": messages}, messages, ids):
        assert lenvm.predict_length(same) == pytest.approx(alone)
    assert lenvm.predict_length([{"prompt": text}, text]) == pytest.approx([alone, alone])
    with pytest.raises(InputError, match="a prompt or a list of prompts"):
        lenvm.predict_length(5)
    with pytest.raises(InputError, match="prompt 2 holds token id 100000, outside the vocabulary"):
        lenvm.predict_length([ids, [*ids, 100000]])
    # Prompts-file records that carry a role field of their own are records, not one conversation.
    records = [{"id": "a", "prompt": text, "role": "tutor"}, {"id": "b", "prompt": text, "role": "tutor"}]
    assert lenvm.predict_length(records) == pytest.approx([alone, alone])
    with pytest.raises(InputError, match=r"prompt 2 \(id 'long'\): \d+ tokens, beyond the LenVM's context"):
        lenvm.predict_length([Prompt(id="short", text=text), Prompt(id="long", text="word " * 1100)])


def test_a_lenvm_refuses_a_generator_of_another_width(tmp_path, tiny_path, tiny_generator):
    from lenvm.hub import load_generator

    LengthValueModel.from_base(tiny_path, generator=tiny_generator, gamma=0.9).save_pretrained(
        tmp_path / "lv"
    )
    narrow = load_generator(tiny_model(tmp_path / "narrow", hidden_size=32))  # the same tokenizer
    with pytest.raises(InputError, match="width 64, the generator's are 32"):
        LengthValueModel.from_pretrained(tmp_path / "lv", generator=narrow)


def test_a_generator_folder_is_recorded_by_its_absolute_path(
    tmp_path, tiny_path, tiny_generator, monkeypatch
):
    import shutil

    from lenvm.hub import load_generator

    shutil.copytree(tiny_path, tmp_path / "gen")
    monkeypatch.chdir(tmp_path)
    lenvm = LengthValueModel.from_base("gen", generator=load_generator("gen"), gamma=0.9)
    assert lenvm.config.base_model == str(tmp_path / "gen")  # found again from any working directory
    # The same folder named another way is the same model.
    LengthValueModel.from_base(tmp_path / "gen", generator=load_generator("./gen/"), gamma=0.9)


def test_a_generator_passed_in_must_be_the_base_model(tmp_path, tiny_path, tiny_generator):
    """The head trains on the generator's hidden states but the LenVM records the base, which
    loading it alone reads instead: another model (same tokenizer) or one that does not exist."""
    other = tiny_model(tmp_path / "other", seed=1, eos_logit=3.0)
    records = synthetic_records(tiny_generator[1])
    for base in (other, tmp_path / "missing"):
        with pytest.raises(
            InputError, match=re.escape(f"the generator passed in is {str(tiny_path)!r}, not")
        ):
            train(records, base, tmp_path / "lv", _config(epochs=1), generator=tiny_generator, progress=False)
        assert not (tmp_path / "lv").exists()
    # A standalone LenVM loads its backbone from the base whatever generator is passed.
    LengthValueModel.from_base(other, kind="standalone", generator=tiny_generator)
    # Another name of the same folder (a link to it; likewise a built-in alias and the folder it is
    # prepared in) is the same model.
    (tmp_path / "link").symlink_to(tiny_path)
    LengthValueModel.from_base(tmp_path / "link", generator=tiny_generator)


def _in_memory(path, name="", layers=None, weights_of=None):
    """A generator built in memory from ``path``'s config (random weights, or ``weights_of``'s),
    named ``name`` (a model built from a hand-made config has no name)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    if layers is not None:
        config.num_hidden_layers = layers
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(config)
    if weights_of is not None:
        model.load_state_dict(weights_of.state_dict())
    model.name_or_path = name
    return model.eval()


def test_a_generator_built_in_memory_must_hold_the_base_models_weights(tmp_path, tiny_path, tiny_generator):
    """Without a name (or with the one its config came with) a generator is checked by its depth
    and a few rows of its input embeddings against the files of the base, which is not loaded."""
    model, tokenizer = tiny_generator
    right = _in_memory(tiny_path, weights_of=model)
    lenvm = LengthValueModel.from_base(tiny_path, generator=(right, tokenizer))
    assert lenvm.backbone is right
    # In another dtype it is the same model: the stored weights are converted as loading them does.
    LengthValueModel.from_base(tiny_path, generator=(right.to(torch.bfloat16), tokenizer))
    # The weights in a sharded folder, or in a PyTorch file, are read the same way.
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="20KB")
    tokenizer.save_pretrained(sharded)
    assert (sharded / "model.safetensors.index.json").is_file()
    LengthValueModel.from_base(sharded, generator=(_in_memory(tiny_path, weights_of=model), tokenizer))
    pickled = tmp_path / "pickled"
    tokenizer.save_pretrained(pickled)
    model.config.save_pretrained(pickled)
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    LengthValueModel.from_base(pickled, generator=(_in_memory(tiny_path, weights_of=model), tokenizer))
    with pytest.raises(InputError, match="its input embeddings differ from those stored for"):
        LengthValueModel.from_base(pickled, generator=(_in_memory(tiny_path), tokenizer))

    records = synthetic_records(tokenizer)
    wrong = {
        "its input embeddings differ from those stored for": _in_memory(tiny_path),
        # Named by the config it was built from, which is base's: its weights are not base's.
        "its input embeddings differ": _in_memory(tiny_path, name=str(tiny_path)),
        "it has 3 layers, ": _in_memory(tiny_path, layers=3),
    }
    wrong["are 300 x 64"] = _in_memory(tiny_path, weights_of=model)
    wrong["are 300 x 64"].resize_token_embeddings(300)
    for message, generator in wrong.items():
        with pytest.raises(InputError, match=re.escape(message)):
            train(records, tiny_path, tmp_path / "lv", _config(epochs=1), generator=(generator, tokenizer))
        assert not (tmp_path / "lv").exists()
    # A hub model not in the local cache: a generator named as it is taken by its name, one without
    # a name cannot be checked and is refused.
    named = _in_memory(tiny_path, name="someone/model", weights_of=model)
    LengthValueModel.from_base("someone/model", generator=(named, tokenizer))
    with pytest.raises(InputError, match="has no name .* cannot be compared with 'someone/model'"):
        LengthValueModel.from_base("someone/model", generator=(right, tokenizer))


def test_an_epoch_ending_on_a_checkpoint_is_evaluated_once(tmp_path, tiny_path, tiny_generator):
    """Fine-tuning evaluates at each checkpoint and each epoch's end: where the two fall on one
    step it logs one evaluation, as a run resumed from that checkpoint does."""
    records = synthetic_records(tiny_generator[1], n_per_prompt=1)  # one step an epoch
    config = TrainConfig(
        kind="standalone", epochs=2, batch_size=4, bf16=False, eval_fraction=0.25, checkpoint_every=1
    )
    result = train(records, str(tiny_path), tmp_path / "sa", config, progress=False)
    steps = [e["step"] for e in result.evaluations]
    assert steps == sorted(set(steps)) and steps[-1] == len(result.losses)


def test_a_damaged_lenvm_folder_is_a_clear_error(tmp_path, tiny_path, tiny_generator):
    import shutil

    good = tmp_path / "lv"
    LengthValueModel.from_base(tiny_path, generator=tiny_generator, gamma=0.9).save_pretrained(good)

    def damaged(name, change):
        folder = tmp_path / name
        shutil.copytree(good, folder)
        change(folder)
        return folder

    def edit_config(**fields):
        def change(folder):
            config = json.loads((folder / "config.json").read_text())
            config.update(fields)
            (folder / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v != "-"}))

        return change

    def garbage(folder):
        (folder / "head.safetensors").write_bytes(b"garbage" * 10)

    cases = {
        "not safetensors": (garbage, "head.safetensors"),
        "gamma 1.5": (edit_config(gamma=1.5), "gamma must lie in (0, 1)"),
        "no kind": (edit_config(kind="-"), "not a valid LenVM config"),
        "other width": (edit_config(hidden_size=32), "width 32"),
    }
    for name, (change, message) in cases.items():
        with pytest.raises(InputError, match=re.escape(message)):
            LengthValueModel.from_pretrained(damaged(name, change), generator=tiny_generator)


def test_an_empty_evaluation_file_is_named_as_such(tmp_path, tiny_path, tiny_generator):
    records = synthetic_records(tiny_generator[1])
    (tmp_path / "held.jsonl").write_text("")
    with pytest.raises(InputError, match="no evaluation rollout records"):
        train(
            records,
            str(tiny_path),
            tmp_path / "lv",
            _config(epochs=1),
            generator=tiny_generator,
            progress=False,
            eval_rollouts=tmp_path / "held.jsonl",
        )


def test_training_warns_where_its_targets_cannot_mean_what_they_should(tmp_path, tiny_path, tiny_generator):
    records = synthetic_records(tiny_generator[1])
    eos = tiny_generator[1].eos_token_id
    cut = []
    for r in records:
        ids = [t for t in r["completion_token_ids"] if t != eos] or [5]
        cut.append(dict(r, completion_token_ids=ids, num_tokens=len(ids), finish_reason="length"))
    again = dict(config=_config(epochs=1), generator=tiny_generator, progress=False)
    with pytest.warns(UserWarning, match="no training completion ended with EOS"):
        train(cut, str(tiny_path), tmp_path / "cut", **again)
    other = [dict(r, generator="someone-else/model") for r in records]
    with pytest.warns(UserWarning, match="the rollouts were sampled from someone-else/model"):
        train(other, str(tiny_path), tmp_path / "other", **again)
    # Two runs that wrote one file: the same samples twice. Other seeds' samples are not that.
    with pytest.warns(UserWarning, match=f"{len(records)} rollout records repeat earlier ones"):
        train(records + records, str(tiny_path), tmp_path / "twice", **again)
    reseeded = [dict(r, completion_token_ids=r["completion_token_ids"][1:], num_tokens=r["num_tokens"] - 1)
                for r in records if r["num_tokens"] > 1]  # fmt: skip
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*repeat earlier ones")
        train(records + reseeded, str(tiny_path), tmp_path / "two-seeds", **again)


def test_full_finetuning_targets_are_bootstrapped_at_a_cut(monkeypatch):
    """The full fine-tuning loss regresses each state on its discounted return plus, for a cut
    completion, gamma**steps times the model's own value at the cut (collated from examples)."""
    from types import SimpleNamespace

    import lenvm.training as training
    from lenvm.dataset import Example, collate
    from lenvm.training import FullTrainer

    gamma = 0.9
    examples = [
        Example("a", [5, 6, 7, 8, 9, 10], start=2, num_states=3, finished=False),  # cut: s_T ends at 5
        Example("b", [5, 6, 7, 8], start=1, num_states=3, finished=True),
    ]
    batch = collate(examples, gamma)
    values = -torch.rand(batch.input_ids.shape, generator=torch.Generator().manual_seed(0)) * 0.9 - 0.05
    seen = []
    monkeypatch.setattr(training, "state_losses", lambda v, targets, *rest: seen.append(targets) or v * 0)
    trainer = SimpleNamespace(config=_config(), lenvm=SimpleNamespace(gamma=gamma))
    FullTrainer.micro_loss(trainer, lambda ids, mask: values, batch)
    steps = torch.tensor([3.0, 2.0, 1.0])
    cut = -(1 - gamma**steps) + gamma**steps * values[0, 5]
    ended = -(1 - gamma**steps)
    torch.testing.assert_close(seen[0][0, 2:5], cut)
    torch.testing.assert_close(seen[0][1, 1:4], ended)


def _training_data(tokenizer, records, max_length=None, context=None, eval_records=None):
    from lenvm.training_data import RolloutSource, training_data

    eval_source = RolloutSource(eval_records) if eval_records is not None else None
    eos, vocab = [tokenizer.eos_token_id], len(tokenizer)
    return training_data(
        RolloutSource(records),
        eval_source,
        eos,
        "bootstrap",
        max_length,
        0.0,
        0,
        vocab,
        "tiny",
        context=context,
    )


def test_the_baseline_is_the_mean_length_of_the_training_answers_that_ended(tiny_generator):
    tokenizer = tiny_generator[1]
    records = synthetic_records(tokenizer, truncate_long=True)  # 12 answers of 3, 8 of 24, 4 cut
    records = [r if r["finish_reason"] == "stop" else dict(r, completion_token_ids=[5] * 60) for r in records]
    assert _training_data(tokenizer, records).baseline_length == pytest.approx((12 * 3 + 8 * 24) / 20)
    # Where none ended, the mean of the cut lengths is all there is.
    cut = [dict(r, completion_token_ids=[5] * 60, finish_reason="length") for r in records]
    assert _training_data(tokenizer, cut).baseline_length == pytest.approx(60.0)


def test_a_record_beyond_the_context_is_refused_unless_max_length_within_it_leaves_it_out(tiny_generator):
    tokenizer = tiny_generator[1]
    records = synthetic_records(tokenizer)
    context = 128  # the records are 66 and 86 tokens long
    prompt = len(records[1]["prompt_token_ids"])

    def with_length(n: int) -> list[dict]:  # record 2 cut at n tokens, prompt and answer together
        long = dict(records[1], completion_token_ids=[5] * (n - prompt), finish_reason="length")
        return [records[0], long, *records[2:]]

    beyond = rf"record 2 is {context + 1} tokens long .* context of 'tiny' \({context} tokens\)"
    assert _training_data(tokenizer, with_length(context), context=context).report.dropped == 0
    with pytest.raises(InputError, match=beyond):
        _training_data(tokenizer, with_length(context + 1), context=context)
    # A max_length up to the context leaves such records out; one beyond it cannot.
    assert _training_data(tokenizer, with_length(context + 1), context, context).report.dropped == 1
    assert _training_data(tokenizer, with_length(context), context + 1, context).report.dropped == 0
    with pytest.raises(InputError, match=beyond):
        _training_data(tokenizer, with_length(context + 1), context + 1, context)
    # Held-out records are never left out by max_length: beyond the context they are refused.
    with pytest.raises(InputError, match=beyond):
        _training_data(tokenizer, records[12:], context, context, eval_records=with_length(context + 1)[:12])


def test_rollouts_of_other_tools_train_a_lenvm_that_loads(tmp_path, tiny_path, tiny_generator):
    """vLLM records top-k off as -1, and a tool that does not know its generator records "": the
    LenVM trained on such rollouts loads, and its rollouts' policy holds."""
    records = [
        dict(r, generator="", sampling={**r["sampling"], "top_k": -1})
        for r in synthetic_records(tiny_generator[1])
    ]
    train(
        records, str(tiny_path), tmp_path / "lv", _config(epochs=1), generator=tiny_generator, progress=False
    )
    lenvm = LengthValueModel.from_pretrained(tmp_path / "lv", generator=tiny_generator)
    assert lenvm.config.generator is None and lenvm.sampling_params().top_k == 0


def test_rollouts_whose_policy_a_lenvm_cannot_record_are_refused_before_training(
    tmp_path, tiny_path, tiny_generator, monkeypatch
):
    records = [dict(r, sampling={**r["sampling"], "top_k": -5}) for r in synthetic_records(tiny_generator[1])]
    monkeypatch.setattr(HeadTrainer, "fit", lambda *a, **k: pytest.fail("trained"))
    with pytest.raises(InputError, match="the rollouts' generator and sampling .* sampling: .*top_k must be"):
        train(
            records,
            str(tiny_path),
            tmp_path / "lv",
            _config(epochs=1),
            generator=tiny_generator,
            progress=False,
        )
    assert not (tmp_path / "lv").exists()


def test_rollouts_of_the_base_named_another_way_train_and_load_without_a_warning(
    tmp_path, tiny_path, tiny_generator
):
    link = tmp_path / "link"
    link.symlink_to(tiny_path)
    records = [dict(r, generator=str(tiny_path)) for r in synthetic_records(tiny_generator[1])]
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*(sampled from|trained on rollouts of)")
        train(
            records, str(link), tmp_path / "lv", _config(epochs=1), generator=tiny_generator, progress=False
        )
        LengthValueModel.from_pretrained(tmp_path / "lv", generator=tiny_generator)
