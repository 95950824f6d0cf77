"""Images in prompts: reference forms, the processor, the tiny vision-language models, the
multimodal stream and the engine on mixed batches, and bad input."""

import base64
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lenvm import vision
from lenvm.decoding import Control, Engine, LenVMLogitsProcessor, Request, SamplingParams
from lenvm.decoding.streams import Stream
from lenvm.hub import load_generator
from lenvm.io import InputError
from lenvm.model import LengthValueModel
from lenvm.prompts import Prompt, as_prompt, encode_prompt, read_prompts
from lenvm.rollouts import rollout
from lenvm.testing import VLM_FAMILIES, tiny_vlm

QUESTION = "How many red circles are in the picture?"


def image_prompt(*refs, text=QUESTION, pid="0"):
    return as_prompt(text, default_id=pid, images=list(refs))


@pytest.fixture(scope="module")
def image(shapes):
    return shapes.parent / "images" / "0.png"


# -- prompts and the processor ----------------------------------------------------------------


def test_every_reference_form_reads_the_same_image(shapes, image, vlm_generator):
    """A path relative to the prompts file, the plain part, a file:// URL and a data: URL."""
    data = "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()
    text = {"type": "text", "text": QUESTION}
    rows = [
        {"id": "path", "prompt": QUESTION, "images": ["images/0.png"]},
        {
            "id": "part",
            "messages": [{"role": "user", "content": [{"type": "image", "image": "images/0.png"}, text]}],
        },
        {"id": "file", "messages": [{"role": "user", "content": [_url(image.as_uri()), text]}]},
        {"id": "data", "messages": [{"role": "user", "content": [_url(data), text]}]},
    ]
    file = shapes.parent / "forms.jsonl"
    file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    prompts = read_prompts(file)
    assert prompts[0].images == [str(image)]  # made absolute against the file's folder
    assert prompts[1].images == [str(image)]
    assert prompts[2].images == [image.as_uri()] and prompts[3].images == [data]
    tokenizer = vlm_generator[1]
    encoded = [vision.encode(tokenizer, p) for p in prompts]
    first = encoded[0]
    assert first.image_tokens == 9  # 96 x 96 is scaled to 84 x 84: 6 x 6 patches, merged 2 x 2
    assert first.ids.count(vision.processor_of(tokenizer).image_token_id) == 9
    for e in encoded[1:]:
        assert e.ids == first.ids
        torch.testing.assert_close(e.images.pixel_values, first.images.pixel_values, rtol=0, atol=0)
        assert torch.equal(e.images.image_grid_thw, first.images.image_grid_thw)


def _url(ref):
    return {"type": "image_url", "image_url": {"url": ref}}


def test_text_only_prompts_are_unchanged(vlm_generator, tiny_generator):
    """Text content parts flatten to the string a text template expects; a VLM reads text alone."""
    plain = Prompt("p", messages=[{"role": "user", "content": "Hello there"}])
    parts = as_prompt([{"role": "user", "content": [{"type": "text", "text": "Hello there"}]}])
    for tokenizer in (tiny_generator[1], vlm_generator[1]):
        assert vision.encode(tokenizer, parts).ids == vision.encode(tokenizer, plain).ids
        assert vision.encode(tokenizer, plain).images is None


def test_processor_matches_the_transformers_processor(vlm_path, vlm_generator, shapes):
    """Ids, pixels and grids equal those of transformers' Qwen2-VL processor. That class insists on
    its video processor, which needs torchvision; only its argument check is bypassed here."""
    from PIL import Image
    from transformers import AutoImageProcessor, AutoTokenizer, Qwen2VLProcessor
    from transformers.processing_utils import ProcessorMixin

    tokenizer = vlm_generator[1]
    check = ProcessorMixin.check_argument_for_proper_class
    ProcessorMixin.check_argument_for_proper_class = lambda self, name, arg: None
    try:
        theirs = Qwen2VLProcessor(
            image_processor=AutoImageProcessor.from_pretrained(vlm_path),
            tokenizer=AutoTokenizer.from_pretrained(vlm_path),
            video_processor=None,
            chat_template=tokenizer.chat_template,
        )
    finally:
        ProcessorMixin.check_argument_for_proper_class = check
    paths = [shapes.parent / "images" / f"{i}.png" for i in (0, 1)]
    messages = [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Compare."}],
        }
    ]
    text = theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    expected = theirs(text=[text], images=[Image.open(p).convert("RGB") for p in paths], return_tensors="pt")
    prompt = image_prompt(*map(str, paths), text="Compare.")
    ours = vision.encode(tokenizer, prompt)
    assert ours.ids == expected["input_ids"][0].tolist()
    assert torch.equal(ours.images.pixel_values, expected["pixel_values"])
    assert torch.equal(ours.images.image_grid_thw, expected["image_grid_thw"])
    # A transformers processor passed where a tokenizer goes is read the same way.
    assert Engine(vlm_generator[0], theirs).tokenizer is theirs.tokenizer
    assert vision.encode(theirs.tokenizer, prompt).ids == ours.ids


def test_a_processor_chat_template_kept_apart_from_the_tokenizer(tmp_path, vlm_generator, image):
    """Some vision-language folders keep the image-aware template in chat_template.json only."""
    from lenvm.testing import VISION_CHAT_TEMPLATE

    path = tiny_vlm(tmp_path / "m")
    (path / "chat_template.jinja").unlink()
    (path / "chat_template.json").write_text(json.dumps({"chat_template": VISION_CHAT_TEMPLATE}))
    tokenizer = load_generator(path)[1]
    assert not tokenizer.chat_template
    for prompt in (image_prompt(str(image)), as_prompt("Hello there")):
        assert encode_prompt(tokenizer, prompt) == encode_prompt(vlm_generator[1], prompt)


@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_tiny_vlm_round_trip(tmp_path, family):
    """The folder loads with the Auto classes, and its tokenizer keeps its ids exactly."""
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

    from lenvm.testing import VISION_CHAT_TEMPLATE, VISION_TOKENS, tiny_tokenizer

    path = tiny_vlm(tmp_path / family, family=family)
    built = tiny_tokenizer(extra_specials=VISION_TOKENS)
    loaded = AutoTokenizer.from_pretrained(path)
    text = "Once upon a time <|vision_start|><|image_pad|><|vision_end|> 12 plus 30."
    assert loaded(text)["input_ids"] == built(text)["input_ids"]
    assert loaded.get_vocab() == built.get_vocab() and loaded.chat_template == VISION_CHAT_TEMPLATE
    model = AutoModelForImageTextToText.from_pretrained(path)
    assert model.config.model_type == family
    assert AutoImageProcessor.from_pretrained(path).merge_size == 2
    generator, tokenizer = load_generator(path)
    assert type(generator) is type(model) and vision.processor_of(tokenizer) is not None


def test_unsupported_vision_language_models_are_named():
    config = SimpleNamespace(vision_config={}, model_type="llava")
    with pytest.raises(InputError, match="Qwen2-VL family"):
        vision.check_supported(config)
    vision.check_supported(SimpleNamespace(model_type="llama"))  # text-only: nothing to say


# -- the stream -------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=VLM_FAMILIES)
def family_generator(request, tmp_path_factory, vlm_generator):
    if request.param == "qwen2_5_vl":
        return vlm_generator
    return load_generator(tiny_vlm(tmp_path_factory.mktemp("q2") / "m", family=request.param))


def _rows(tokenizer, shapes):
    """Two image prompts (one with two images) and a text prompt: left padding and mixed rows."""
    images = [str(shapes.parent / "images" / f"{i}.png") for i in range(3)]
    prompts = [image_prompt(images[0]), as_prompt("Hello there"), image_prompt(images[1], images[2])]
    return [vision.encode(tokenizer, p) for p in prompts]


def _alone(body, ids, images):
    """The last hidden state of ``ids`` from the model's own forward (its own positions)."""
    x = torch.tensor([ids], device=body.device)
    extra = {}
    if images is not None:
        extra = {
            **vision.model_kwargs(images.to(body.device)),
            "mm_token_type_ids": (x == body.config.image_token_id).int(),
        }
    with torch.no_grad():
        return body(input_ids=x, **extra).last_hidden_state[0, -1]


def test_candidate_block_with_images_matches_appending_each_candidate_alone(family_generator, shapes):
    model, tokenizer = family_generator
    body = model.base_model
    rows = _rows(tokenizer, shapes)
    stream = Stream.prefill(body, [r.ids for r in rows], -1, [r.images for r in rows])
    for i, r in enumerate(rows):
        torch.testing.assert_close(stream.last.last[i], _alone(body, r.ids, r.images), atol=1e-4, rtol=0)
    candidates = torch.tensor([[40, 41, 42], [50, 51, 52], [60, 61, 62]], device=body.device)
    block = stream.forward(candidates).last
    for i, r in enumerate(rows):
        for j in range(3):
            expected = _alone(body, r.ids + [int(candidates[i, j])], r.images)
            torch.testing.assert_close(block[i, j], expected, atol=1e-4, rtol=0)
    choice = torch.tensor([2, 0, 1], device=body.device)
    stream.keep(choice)
    hidden = stream.forward(torch.tensor([[7], [8], [9]], device=body.device)).last
    for i, r in enumerate(rows):
        expected = _alone(body, r.ids + [int(candidates[i, choice[i]]), 7 + i], r.images)
        torch.testing.assert_close(hidden[i, 0], expected, atol=1e-4, rtol=0)


# -- the engine -------------------------------------------------------------------------------


def _requests(shapes, control=None, values=False):
    prompts = read_prompts(shapes)[:3] + [as_prompt("Hello there", default_id="text")]
    sampling = [SamplingParams(max_new_tokens=10, seed=i) for i in range(len(prompts))]
    return [
        Request(p, s, control=control, return_values=values) for p, s in zip(prompts, sampling, strict=True)
    ]


def test_mixed_batch_equals_each_request_alone(family_generator, shapes):
    engine = Engine(*family_generator)
    requests = _requests(shapes)
    batched = engine.generate(requests, batch_size=4)
    assert [r.token_ids for r in batched] == [engine.generate([q], 1)[0].token_ids for q in requests]


@pytest.mark.parametrize("kind", ["attached", "q", "standalone"])
def test_guided_decoding_with_images(vlm_path, vlm_generator, shapes, kind):
    """Every kind guides a mixed batch as it guides each request alone; Equal To's retries
    rejoin from their kept caches where they keep some of the answer, and prefill rows with
    their images again where they keep none (natural_eos 1: no end counts as natural, so each
    retries); the values returned are the LenVM's on the whole sequence, images read (the q
    kind's are its Q-head's predictions instead)."""
    lenvm = LengthValueModel.from_base(vlm_path, kind=kind, gamma=0.9, generator=vlm_generator)
    engine = Engine(*vlm_generator, lenvm=lenvm, num_candidates=4)
    control = Control("equal_to", target=6, retries=2, natural_eos=1.0)
    requests = _requests(shapes, control, values=True)
    batched = engine.generate(requests, batch_size=4)
    assert all(r.retries == 2 for r in batched)
    alone = [engine.generate([q], 1)[0] for q in requests]
    assert [r.token_ids for r in batched] == [r.token_ids for r in alone]
    if kind == "q":
        return
    eos = set(lenvm.config.eos_token_ids)
    for request, result in zip(requests, batched, strict=True):
        encoded = vision.encode(lenvm.tokenizer, request.prompt)
        ids = torch.tensor([result.prompt_token_ids + result.token_ids], device=lenvm.device)
        images = None if encoded.images is None else encoded.images.to(lenvm.device)
        with torch.no_grad():
            full = lenvm(ids, **vision.model_kwargs(images))[0]
        n = len(result.prompt_token_ids)
        for i, token in enumerate(result.token_ids):
            expected = 0.0 if token in eos else float(full[n + i])
            assert result.values[i] == pytest.approx(expected, abs=1e-4)


def test_transformers_processor_refuses_image_prompts(vlm_path, vlm_generator, shapes):
    lenvm = LengthValueModel.from_base(vlm_path, gamma=0.9, generator=vlm_generator)
    processor = LenVMLogitsProcessor(lenvm, Control("equal_to", target=5))
    ids = vision.encode(lenvm.tokenizer, read_prompts(shapes)[0]).ids
    with pytest.raises(InputError, match="lenvm's engine"):
        processor(torch.tensor([ids]), torch.zeros(1, len(lenvm.tokenizer)))


# -- bad input --------------------------------------------------------------------------------


def test_missing_and_unreadable_images(tmp_path, vlm_generator):
    tokenizer = vlm_generator[1]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image at all")
    with pytest.raises(InputError, match="no such file"):
        vision.encode(tokenizer, image_prompt(str(tmp_path / "missing.png")))
    with pytest.raises(InputError, match="not a readable image"):
        vision.encode(tokenizer, image_prompt(str(broken)))
    with pytest.raises(InputError, match="base64"):
        vision.encode(tokenizer, image_prompt("data:image/png;base64,@@@"))
    with pytest.raises(InputError, match="not downloaded"):
        image_prompt("https://example.com/cat.png")
    with pytest.raises(InputError, match="content part"):
        as_prompt([{"role": "user", "content": [{"type": "audio", "audio": "a.wav"}]}])
    out = tmp_path / "r.jsonl"
    prompts = [as_prompt("fine", default_id="a"), image_prompt(str(tmp_path / "missing.png"), pid="b")]
    with pytest.raises(InputError, match="no such file"):
        rollout(vlm_generator, prompts, out, 1, SamplingParams(max_new_tokens=4), progress=False)
    assert not out.exists()  # nothing was written, not even the completions of the good prompt


def test_images_load_as_transformers_loads_them(tmp_path):
    """Upright by EXIF orientation, transparency on white, wrapped base64 in a data URL."""
    from PIL import Image
    from transformers.image_utils import load_image as hf_load_image

    turned = tmp_path / "turned.jpg"
    exif = Image.Image().getexif()
    exif[0x0112] = 6  # rotated 90 degrees, as phone cameras write it
    Image.new("RGB", (64, 16), (255, 0, 0)).save(turned, exif=exif.tobytes())
    assert vision.load_image(str(turned)).size == hf_load_image(str(turned)).size == (16, 64)

    clear = tmp_path / "clear.png"
    Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(clear)
    assert vision.load_image(str(clear)).getcolors() == [(64, (255, 255, 255))]

    wrapped = base64.encodebytes(clear.read_bytes()).decode()  # a line break every 76 characters
    assert "\n" in wrapped
    assert vision.load_image("data:image/png;base64," + wrapped).getcolors() == [(64, (255, 255, 255))]


def test_images_the_image_processor_cannot_take(tmp_path, vlm_generator, monkeypatch):
    from PIL import Image

    tokenizer = vlm_generator[1]
    strip = tmp_path / "strip.png"
    Image.new("RGB", (2010, 10)).save(strip)
    with pytest.raises(InputError, match="strip.png: 2010x10 pixels, more than 200 times"):
        vision.encode(tokenizer, image_prompt(str(strip)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # beyond it, PIL suspects a decompression bomb
    big = tmp_path / "big.png"
    Image.new("RGB", (100, 100)).save(big)
    with pytest.raises(InputError, match="big.png: not a readable image"):
        vision.encode(tokenizer, image_prompt(str(big)))


def test_image_placeholders_without_images_are_refused(vlm_generator):
    """Token ids (a rollout's prompt_token_ids, say) or text that hold image pads but come without
    the images: the model would read the pad's embedding where the image belongs."""
    model, tokenizer = vlm_generator
    pad = vision.processor_of(tokenizer).image_token_id
    ids = encode_prompt(tokenizer, as_prompt("Hi"))
    with pytest.raises(InputError, match="1 image placeholder token"):
        Engine(model, tokenizer).generate(
            [Request(ids[:2] + [pad] + ids[2:], SamplingParams(max_new_tokens=2))]
        )
    with pytest.raises(InputError, match="2 image placeholder token"):
        vision.encode(tokenizer, "Look: " + vision.IMAGE_TOKEN * 2)
    with pytest.raises(InputError, match="image placeholder"):
        vision.forward_images(tokenizer, [(ids, ()), ([pad, *ids], ())], "cpu")
    assert vision.encode(tokenizer, ids).ids == ids  # without pads, ids are taken as they are


def test_image_prompt_for_a_text_only_generator(tmp_path, tiny_path, tiny_generator, image):
    prompt = image_prompt(str(image))
    with pytest.raises(InputError, match="text-only"):
        Engine(*tiny_generator).generate([Request(prompt)])
    out = tmp_path / "r.jsonl"
    with pytest.raises(InputError, match="text-only"):
        rollout(tiny_generator, [prompt], out, 1, SamplingParams(max_new_tokens=4), progress=False)
    assert not out.exists()
    with pytest.raises(InputError, match="text-only"):
        LengthValueModel.from_base(tiny_path, generator=tiny_generator).predict_length(prompt)
    with pytest.raises(InputError, match="text-only"):
        rollout(
            str(tiny_path), [prompt], out, 1, backend="openai", base_url="http://127.0.0.1:9", progress=False
        )


def test_image_prompt_for_a_text_only_standalone_lenvm(tmp_path, vlm_generator, image):
    """A text-only backbone with the generator's tokenizer guides its text prompts, and refuses
    image prompts."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = vlm_generator[1]
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
    )
    LlamaForCausalLM(config).save_pretrained(tmp_path / "text")
    tokenizer.save_pretrained(tmp_path / "text")
    lenvm = LengthValueModel.from_base(tmp_path / "text", kind="standalone", gamma=0.9)
    assert not lenvm.sees_images
    engine = Engine(*vlm_generator, lenvm=lenvm)
    control = Control("at_most", target=3)
    assert (
        engine.generate([Request("Hello there", SamplingParams(max_new_tokens=6), control)])[0].num_tokens
        <= 3
    )
    with pytest.raises(InputError, match="text-only LenVM"):
        engine.generate([Request(image_prompt(str(image)), SamplingParams(max_new_tokens=6), control)])


def test_too_many_image_tokens_for_the_context(tmp_path):
    """A 224 x 224 image is 64 image tokens, more than this model's context of 64 positions."""
    from PIL import Image

    path = tiny_vlm(tmp_path / "small", max_pixels=224 * 224, max_position_embeddings=64)
    generator = load_generator(path)
    big = tmp_path / "big.png"
    Image.new("RGB", (224, 224), (200, 30, 30)).save(big)
    prompt = image_prompt(str(big))
    with pytest.raises(InputError, match="64 of them for its images"):
        Engine(*generator).generate([Request(prompt, SamplingParams(max_new_tokens=4))])
    out = tmp_path / "r.jsonl"
    with pytest.raises(InputError, match="context"):
        rollout(generator, [prompt], out, 1, SamplingParams(max_new_tokens=4), progress=False)
    assert not out.exists()
    lenvm = LengthValueModel.from_base(path, gamma=0.9, generator=generator)
    with pytest.raises(InputError, match="64 of them for its images"):
        lenvm.predict_length(prompt)


def test_image_references_stay_references(shapes):
    """Prompt records hold the references as given (absolute), never pixels."""
    prompt = read_prompts(shapes)[0]
    record = json.dumps(prompt.to_json())
    assert "base64" not in record and str(Path(prompt.images[0])) in record
