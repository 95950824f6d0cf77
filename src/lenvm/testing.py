"""Tiny random models for tests and quick trials: a 2-layer Llama and a BPE tokenizer; a 2-layer
vision-language model of the Qwen2-VL family with its image processor; and a generated set of
images of coloured shapes with questions about them.

Everything is built in-process (no downloads) in about a second.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

# ChatML; like Qwen3's, the template writes an empty thinking block after the generation prompt
# when the variable enable_thinking is false (a template argument to test them with).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% if enable_thinking is defined and not enable_thinking %}{{ '<think>\n\n</think>\n\n' }}{% endif %}"
    "{% endif %}"
)

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "List three colors: red, green and blue.",
    "Explain why the sky is blue in one sentence.",
    "What is 12 plus 30? The answer is 42.",
    "Therefore the result follows. Wait, let me check again.",
    "Once upon a time there was a small model that counted tokens.",
    "One two three four five six seven eight nine ten.",
    "Write a short poem about the sea and the wind.",
]


def tiny_tokenizer(vocab_size: int = 256, extra_specials: tuple[str, ...] = ()):
    """A byte-level BPE tokenizer with ChatML special tokens (and ``extra_specials``), trained on a
    few sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *extra_specials]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def tiny_model(
    path: str | os.PathLike, seed: int = 0, hidden_size: int = 64, layers: int = 2, eos_logit: float = 0.0
) -> Path:
    """Write a tiny random Llama causal LM with a ChatML BPE tokenizer to ``path``.

    ``eos_logit`` > 0 makes EOS about that much more likely than a random token (in logits), so
    that answers end: every embedding gets the same large first coordinate, which the final norm
    turns into a near-constant feature of every hidden state, and EOS's output embedding
    (tied to its input one) weighs that feature more."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    tokenizer = tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    _finish(model, tokenizer, hidden_size, eos_logit)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _finish(model, tokenizer, hidden_size: int, eos_logit: float) -> None:
    """Make EOS ``eos_logit`` more likely (see :func:`tiny_model`) and set the generation config."""
    from transformers import GenerationConfig

    if eos_logit:
        with torch.no_grad():
            embeddings = model.get_input_embeddings().weight
            embeddings[:, 0] = 1.0  # dominates the residual stream: about sqrt(hidden) after the norm
            embeddings[tokenizer.eos_token_id, 0] += eos_logit / hidden_size**0.5
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


# -- vision-language ------------------------------------------------------------------------

VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")

# ChatML whose message content may be a list of parts: an image part becomes the Qwen2-VL
# placeholder run (start, one image pad that the processor expands, end).
VISION_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] in ('image', 'image_url') %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
VLM_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


def tiny_vlm(
    path: str | os.PathLike,
    family: str = "qwen2_5_vl",
    seed: int = 0,
    hidden_size: int = 64,
    layers: int = 2,
    eos_logit: float = 0.0,
    max_pixels: int = 112 * 112,
    max_position_embeddings: int = 1024,
) -> Path:
    """Write a tiny random vision-language model of the Qwen2-VL ``family`` (``qwen2_vl``,
    ``qwen2_5_vl`` or ``qwen3_vl``) to ``path``: a 2-layer language model with multimodal rotary
    positions, a small vision tower with its patch merger, the ChatML BPE tokenizer with the vision
    special tokens, and an image processor that scales images to at most ``max_pixels`` (112 x 112:
    at most 16 image tokens with 14-pixel patches). It loads with ``AutoModelForImageTextToText``,
    ``AutoTokenizer`` and ``AutoImageProcessor`` (and ``AutoProcessor`` where torchvision is
    installed, which ``transformers`` needs for this family's video processor). ``eos_logit``: as
    in :func:`tiny_model`."""
    import transformers
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    if family not in VLM_FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {VLM_FAMILIES}")
    path = Path(path)
    tokenizer = tiny_tokenizer(extra_specials=VISION_TOKENS)
    tokenizer.chat_template = VISION_CHAT_TEMPLATE
    ids = tokenizer.convert_tokens_to_ids
    head_dim = hidden_size // 4
    # M-RoPE: the rotary frequencies split between time, height and width.
    rope = {
        "rope_type": "default",
        "rope_theta": 10000.0,
        "mrope_section": [head_dim // 4, head_dim // 8, head_dim // 8],
    }
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=head_dim,
        max_position_embeddings=max_position_embeddings,
        rope_parameters=rope,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    patch = 14
    vision: dict[str, Any] = dict(depth=1, num_heads=2, patch_size=patch, spatial_merge_size=2)
    if family == "qwen2_vl":
        vision.update(embed_dim=32, hidden_size=hidden_size, mlp_ratio=2)
        names = ("Qwen2VLConfig", "Qwen2VLForConditionalGeneration")
    elif family == "qwen2_5_vl":
        vision.update(hidden_size=32, intermediate_size=64, out_hidden_size=hidden_size, window_size=56)
        vision.update(fullatt_block_indexes=[0])
        names = ("Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration")
    else:  # Qwen3-VL: 16-pixel patches, interleaved frequencies, vision features fed to early layers
        patch = 16
        rope["mrope_interleaved"] = True
        vision.update(
            depth=2, patch_size=patch, hidden_size=32, intermediate_size=64, out_hidden_size=hidden_size
        )
        vision.update(num_position_embeddings=64, deepstack_visual_indexes=[0])
        names = ("Qwen3VLConfig", "Qwen3VLForConditionalGeneration")
    config_type, model_type = (getattr(transformers, name) for name in names)
    config = config_type(
        text_config=text,
        vision_config=vision,
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = model_type(config)
    _finish(model, tokenizer, hidden_size, eos_logit)
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=(2 * patch) ** 2,
        max_pixels=max_pixels,
        patch_size=patch,
        temporal_patch_size=2,
        merge_size=2,
    )
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    image_processor.save_pretrained(path)
    return path


# -- a generated image set ------------------------------------------------------------------

SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 220), "yellow": (230, 190, 30)}


def shape_images(folder: str | os.PathLike, n: int = 8, seed: int = 0, size: int = 96) -> Path:
    """Draw ``n`` images of one to four coloured shapes (circles, squares, triangles in red, green,
    blue, yellow) with PIL into ``folder/images/``, and write ``folder/prompts.jsonl``: one question
    per image (how many shapes of a colour, which colours, or list every shape), its reference
    answer (a number, a few words, or a line per shape: answer lengths differ) and the shapes.
    Image paths in the file are relative to it. Returns the prompts file."""
    import json
    import random

    from PIL import Image, ImageDraw

    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    cell = size // 2
    records = []
    for i in range(n):
        image = Image.new("RGB", (size, size), (255, 255, 255))
        draw = ImageDraw.Draw(image)
        cells = rng.sample(range(4), rng.randint(1, 4))
        shapes = []
        for c in cells:
            shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
            x, y = (c % 2) * cell + cell // 6, (c // 2) * cell + cell // 6
            box = (x, y, x + 2 * cell // 3, y + 2 * cell // 3)
            if shape == "circle":
                draw.ellipse(box, fill=COLOURS[colour])
            elif shape == "square":
                draw.rectangle(box, fill=COLOURS[colour])
            else:
                draw.polygon(
                    [(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) // 2, box[1])],
                    fill=COLOURS[colour],
                )
            shapes.append({"shape": shape, "colour": colour})
        name = f"images/{i}.png"
        image.save(folder / name)
        question, answer = _question(i % 3, shapes, rng)
        records.append(
            {"id": f"shapes-{i}", "prompt": question, "images": [name], "answer": answer, "shapes": shapes}
        )
    prompts = folder / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return prompts


def _question(kind: int, shapes: list[dict[str, str]], rng) -> tuple[str, str]:
    if kind == 0:
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        count = sum(s["colour"] == colour and s["shape"] == shape for s in shapes)
        return f"How many {colour} {shape}s are in the picture?", str(count)
    if kind == 1:
        colours = sorted({s["colour"] for s in shapes})
        return "Which colours appear in the picture?", " and ".join(colours) + "."
    lines = [f"- a {s['colour']} {s['shape']}" for s in shapes]
    return "List every shape in the picture with its colour, one per line.", "\n".join(lines)
