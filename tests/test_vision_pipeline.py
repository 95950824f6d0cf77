"""A vision-language generator end to end: rollouts with images, training every kind, prediction,
guided decoding with a trained LenVM, the values view and the command line."""

import json

import pytest
import torch
from PIL import Image

from lenvm import vision
from lenvm.cli import main
from lenvm.dataset import forward_images, iter_examples
from lenvm.decoding import Control, Engine, Request, SamplingParams
from lenvm.end_head import end_data, natural_end_distances
from lenvm.io import InputError
from lenvm.model import BACKBONE_DIR, LengthValueModel
from lenvm.prompts import read_prompts
from lenvm.rollouts import read_rollouts, rollout
from lenvm.training import TrainConfig, train
from lenvm.values_view import render_html, token_values

SAMPLING = SamplingParams(max_new_tokens=12, seed=0)


@pytest.fixture(scope="module")
def rollouts(tmp_path_factory, vlm_generator, shapes):
    out = tmp_path_factory.mktemp("rollouts") / "r.jsonl"
    rollout(vlm_generator, read_prompts(shapes), out, 2, SAMPLING, batch_size=4, progress=False)
    return out


def test_rollouts_reference_images_and_resume(tmp_path, rollouts, vlm_generator, shapes):
    prompts = read_prompts(shapes)
    records = read_rollouts(rollouts)
    assert len(records) == 12 and "base64" not in rollouts.read_text()
    # The engine never generates an image placeholder (this random model would, now and then).
    placeholders = set(vision.placeholder_ids(vlm_generator[0].config))
    assert not placeholders & {t for r in records for t in r["completion_token_ids"]}
    for record in records:
        prompt = next(p for p in prompts if p.id == record["prompt_id"])
        assert record["prompt"] == prompt.to_json()  # the references, absolute
        assert record["prompt_token_ids"] == vision.encode(vlm_generator[1], prompt).ids
    out = tmp_path / "r.jsonl"
    out.write_text("".join(line + "\n" for line in rollouts.read_text().splitlines()[:5]))
    summary = rollout(vlm_generator, prompts, out, 2, SAMPLING, batch_size=4, progress=False)
    assert summary.completions_written == 7  # only what was missing
    key = lambda r: (r["prompt_id"], r["sample_index"])  # noqa: E731
    assert sorted(read_rollouts(out), key=key) == sorted(records, key=key)  # seeded: same samples


@pytest.mark.parametrize("kind", ["attached", "q"])
def test_head_training_with_images(tmp_path, rollouts, vlm_path, vlm_generator, shapes, kind):
    generator = vlm_generator[0]
    before = {k: v.clone() for k, v in generator.state_dict().items()}
    config = TrainConfig(kind=kind, epochs=3, eval_fraction=0.34, bf16=False)
    result = train(rollouts, str(vlm_path), tmp_path / "lv", config, generator=vlm_generator, progress=False)
    assert result.data.supervised_tokens > 0 and all(map(torch.isfinite, torch.tensor(result.losses)))
    assert all(torch.equal(before[k], v) for k, v in generator.state_dict().items())  # frozen
    lenvm = LengthValueModel.from_pretrained(tmp_path / "lv", generator=vlm_generator)
    lengths = lenvm.predict_length(read_prompts(shapes) + ["Hello there"])
    assert all(length > 0 for length in lengths)


def test_an_image_that_fails_in_training_names_its_record(tmp_path, rollouts, vlm_path, vlm_generator):
    """In a large rollouts file the image alone does not say which record to mend."""
    records = read_rollouts(rollouts)
    config = TrainConfig(epochs=1, eval_fraction=0.34, bf16=False)

    def with_image(path):  # record 5 with its image replaced
        message = records[4]["prompt"][0]
        content = [{"type": "image_url", "image_url": {"url": str(path)}}, *message["content"][1:]]
        return [*records[:4], dict(records[4], prompt=[dict(message, content=content)]), *records[5:]]

    pid = records[4]["prompt_id"]
    missing = tmp_path / "gone.png"
    with pytest.raises(
        InputError, match=rf"rollout record 5 \(prompt id '{pid}'\): image .*gone.png: no such file"
    ):
        train(
            with_image(missing),
            str(vlm_path),
            tmp_path / "a",
            config,
            generator=vlm_generator,
            progress=False,
        )
    # Another image in its place makes another number of image tokens than the record's ids hold.
    Image.new("RGB", (112, 56), "red").save(tmp_path / "wide.png")
    with pytest.raises(
        InputError, match=rf"rollout record 5 \(prompt id '{pid}'\) holds 9 image tokens where"
    ):
        train(
            with_image(tmp_path / "wide.png"),
            str(vlm_path),
            tmp_path / "b",
            config,
            generator=vlm_generator,
            progress=False,
        )


def test_standalone_training_freezes_vision_and_keeps_the_processor(
    tmp_path, rollouts, vlm_path, vlm_generator, shapes
):
    """Full fine-tuning: the language model trains, the vision tower and patch merger do not; the
    saved LenVM carries its image processor and guides decoding of image prompts."""
    config = TrainConfig(kind="standalone", epochs=1, batch_size=4, lr=1e-3, eval_fraction=0.34, bf16=False)
    train(rollouts, str(vlm_path), tmp_path / "lv", config, progress=False)
    assert (tmp_path / "lv" / BACKBONE_DIR / "preprocessor_config.json").is_file()
    lenvm = LengthValueModel.from_pretrained(tmp_path / "lv", generator=vlm_generator)
    assert lenvm.sees_images and vision.processor_of(lenvm.tokenizer) is not None
    start = vlm_generator[0].base_model.state_dict()
    trained = lenvm.backbone.state_dict()
    visual = [k for k in trained if k.startswith("visual.")]
    language = [k for k in trained if k.startswith("language_model.layers.")]
    assert visual and language
    assert all(torch.equal(trained[k], start[k]) for k in visual)
    assert any(not torch.equal(trained[k], start[k]) for k in language)
    fresh = LengthValueModel.from_base(vlm_path, kind="standalone")
    assert not any(p.requires_grad for p in fresh.backbone.visual.parameters())
    assert all(p.requires_grad for p in fresh.backbone.language_model.parameters())
    engine = Engine(*vlm_generator, lenvm=lenvm, num_candidates=4)
    prompts = read_prompts(shapes)[:2] + ["Hello there"]
    requests = [
        Request(p, SamplingParams(max_new_tokens=12, seed=1), Control("at_most", target=5)) for p in prompts
    ]
    assert all(r.num_tokens <= 5 for r in engine.generate(requests, batch_size=3))


@torch.no_grad()
def test_the_end_head_trains_on_states_read_with_the_images(rollouts, vlm_path, vlm_generator):
    """Its features are the value head's (the images read, at their multimodal positions), and its
    targets come from the generator's logits over the same forward."""
    lenvm = LengthValueModel.from_base(vlm_path, gamma=0.9, generator=vlm_generator)
    eos_ids = lenvm.config.eos_token_ids
    for record in read_rollouts(rollouts)[:3]:
        (example,) = iter_examples([record], eos_ids)
        assert example.images
        ids = torch.tensor([example.input_ids], device=lenvm.device)
        images = forward_images(lenvm.tokenizer, [example], lenvm.device)
        span = slice(example.start, example.start + example.num_states)
        logits = vlm_generator[0](input_ids=ids, **images).logits[0, span].float()
        eos = torch.log_softmax(logits, dim=-1)[:, eos_ids].amax(-1).exp().cpu().numpy()
        ranked = sorted(eos)  # a bar between two states' EOS: some end naturally, some do not
        bar = float(ranked[len(eos) // 2 - 1] + ranked[len(eos) // 2]) / 2
        data = end_data(lenvm, [record], bar)
        expected = natural_end_distances(eos, example.finished, bar)
        known = ~torch.from_numpy(expected).isnan()
        assert torch.allclose(data.distances, torch.from_numpy(expected)[known])
        features = lenvm.features(ids, **images)[0, span].float().cpu()
        assert torch.allclose(data.features, features[known], atol=1e-5)


def test_values_view_shows_the_image(vlm_path, vlm_generator, shapes):
    lenvm = LengthValueModel.from_base(vlm_path, gamma=0.9, generator=vlm_generator)
    prompt = read_prompts(shapes)[0]
    trace = token_values(lenvm, prompt, [40, 41, 42], finished=True)
    assert trace.images == prompt.images and "[image: 9 tokens]" in trace.prompt_text
    page = render_html(trace)
    assert page.count('<img src="data:image/png;base64,') == 1
    assert trace.to_dict()["images"] == prompt.images
    # The prompt-boundary value is the one prediction gives.
    assert trace.tokens[0].value_before == pytest.approx(lenvm.predict_values([prompt])[0], abs=1e-5)


def test_rollouts_with_images_for_a_text_only_lenvm_are_refused(tmp_path, rollouts, tiny_path):
    with pytest.raises(InputError, match="text-only"):
        train(rollouts, str(tiny_path), tmp_path / "lv", TrainConfig(kind="standalone"), progress=False)


def test_cli_with_images(tmp_path, rollouts, vlm_path, shapes, capsys):
    image = str(shapes.parent / "images" / "1.png")
    lv = str(tmp_path / "lv")
    assert (
        main(["train", "--rollouts", str(rollouts), "--base", str(vlm_path), "--out", lv, "--epochs", "2"])
        == 0
    )
    end = ["train-end-head", "--lenvm", lv, "--rollouts", str(rollouts), "--epochs", "2", "--no-progress"]
    assert main(end) == 0
    assert LengthValueModel.from_pretrained(lv).end_head is not None
    capsys.readouterr()
    assert (
        main(["predict", "--lenvm", lv, "--prompt", "Which colours appear?", "--image", image, "--json"]) == 0
    )
    assert json.loads(capsys.readouterr().out)["predicted_length"] > 0
    args = ["generate", "--model", str(vlm_path), "--lenvm", lv, "--prompt", "Describe it.", "--image", image]
    assert main([*args, "--equal-to", "5", "--max-new-tokens", "12", "--seed", "0", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["num_tokens"] >= 1
    html = tmp_path / "v.html"
    values = ["values", "--lenvm", lv, "--prompt", "Describe it.", "--image", image, "--completion", "a red"]
    assert main([*values, "--html", str(html)]) == 0
    assert 'src="data:image/png;base64,' in html.read_text()
    capsys.readouterr()
    assert (
        main(["predict", "--lenvm", lv, "--prompt", "Describe it.", "--image", str(tmp_path / "no.png")]) == 2
    )
    assert "no such file" in capsys.readouterr().err
