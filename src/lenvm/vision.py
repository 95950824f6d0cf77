"""Images for vision-language generators: loading image references, turning a prompt with images
into token ids and pixel inputs, and the multimodal positions of such a prompt.

Supported generators: the Qwen2-VL family (``qwen2_vl``, ``qwen2_5_vl``, ``qwen3_vl``), loaded
with ``AutoModelForImageTextToText``. Their chat template puts a placeholder run
(``<|vision_start|><|image_pad|><|vision_end|>``) where an image goes; the image processor cuts
the image into square patches (14 or 16 pixels a side), and the image pad is repeated once per
group of ``merge_size**2`` patches, the number of image features the language model reads there.
The value of a state is read from the language model's hidden state, as for text; image tokens
are never states (a completion starts after the whole prompt).

Positions: these models rotate queries and keys by three position components (time, height,
width; "M-RoPE"). Text tokens have all three equal; an image's tokens get its grid's coordinates;
text after an image continues from the largest position so far + 1. So once a prompt is read,
every later token is at ``next position`` with three equal components, which a 1-D position id
expresses: only the prompt's forward needs the model's own rope-index function
(:func:`rope_positions`).

A :class:`Processor` is built from the tokenizer, the image processor and the chat template of a
model folder, without ``transformers``' processor class (which for this family needs torchvision
even for images); ``Processor.of`` takes a ``transformers`` processor too. The tokenizer a
vision-language generator is loaded with carries its :class:`Processor`
(:func:`processor_of`), so that everything that takes a ``(model, tokenizer)`` pair can read
images.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast
from urllib.parse import unquote, urlparse

import torch

from lenvm.io import InputError
from lenvm.prompts import Prompt, PromptInput, as_prompt, is_token_ids, template_ids

SUPPORTED = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
IMAGE_TOKEN = "<|image_pad|>"
# The longest side over the shortest that the supported image processors resize (their smart_resize).
MAX_ASPECT = 200
_ATTRIBUTE = "lenvm_processor"  # where a tokenizer carries its Processor


def is_vision_language(config) -> bool:
    """Whether a model config is a vision-language model's (it has a vision sub-config)."""
    return getattr(config, "vision_config", None) is not None


def check_supported(config, what: str = "the model") -> None:
    """Refuse a vision-language model outside the supported family, naming what works."""
    if is_vision_language(config) and config.model_type not in SUPPORTED:
        raise InputError(
            f"{what} is a vision-language model of type {config.model_type!r}; lenvm supports "
            f"vision-language models of the Qwen2-VL family ({', '.join(SUPPORTED)})"
        )


def placeholder_ids(config) -> list[int]:
    """The ids a vision-language model reads as image (or video) features, never as text: a
    decoder must not generate them (a generated one would stand for an image that is not there,
    and the model's forward refuses a sequence with more placeholders than images)."""
    if not is_vision_language(config):
        return []
    return [getattr(config, name) for name in ("image_token_id", "video_token_id") if hasattr(config, name)]


# -- image references -----------------------------------------------------------------------


def load_image(ref: str):
    """The RGB image a reference names (a path, a ``file://`` URL or a ``data:image/`` URL), as
    ``transformers`` and vLLM load it: turned upright by its EXIF orientation, transparency laid
    on white; :class:`InputError` when it is missing or not a readable image."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    shown = _shown(ref)
    if ref.startswith("data:"):
        try:
            # Line breaks allowed: `base64` wraps its output at 76 characters.
            data = base64.b64decode("".join(ref.split(",", 1)[1].split()), validate=True)
        except (binascii.Error, ValueError, IndexError):
            raise InputError(f"image {shown}: the data URL holds no valid base64 data") from None
        source: Any = io.BytesIO(data)
    else:
        path = Path(unquote(urlparse(ref).path)) if ref.startswith("file:") else Path(ref)
        if not path.is_file():
            raise InputError(f"image {shown}: no such file")
        source = path
    try:
        with Image.open(source) as image:
            # Decodes the whole file: a truncated one fails here. A new image, never None (Pillow
            # before 11.2 types it as Image | None).
            image = cast(Image.Image, ImageOps.exif_transpose(image))
            if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
                rgba = image.convert("RGBA")
                return Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("RGB")
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as err:
        raise InputError(f"image {shown}: not a readable image ({err})") from None


def _shown(ref: str) -> str:
    """An image reference as errors name it: a long data URL cut short."""
    return ref if len(ref) < 100 else ref[:60] + "..."


@dataclass
class ImageInputs:
    """The pixel inputs of one or more images, as the model's forward takes them:
    ``pixel_values`` (``[patches, channels * temporal patch * patch * patch]``) and
    ``image_grid_thw`` (``[images, 3]``: each image's grid of patches)."""

    pixel_values: torch.Tensor
    image_grid_thw: torch.Tensor

    def to(self, device) -> ImageInputs:
        return ImageInputs(self.pixel_values.to(device), self.image_grid_thw.to(device))

    @staticmethod
    def cat(parts: list[ImageInputs | None]) -> ImageInputs | None:
        """The images of several rows, in row order (None when no row has any)."""
        present = [p for p in parts if p is not None]
        if not present:
            return None
        return ImageInputs(
            torch.cat([p.pixel_values for p in present]), torch.cat([p.image_grid_thw for p in present])
        )


def model_kwargs(images: ImageInputs | None) -> dict[str, torch.Tensor]:
    """Keyword arguments of a forward for ``images`` (none for None)."""
    if images is None:
        return {}
    return {"pixel_values": images.pixel_values, "image_grid_thw": images.image_grid_thw}


# -- the processor --------------------------------------------------------------------------


@dataclass
class Encoded:
    """A prompt as the model reads it: ``ids`` (image placeholders expanded) and the pixel inputs
    of its images (None for a text prompt)."""

    ids: list[int]
    images: ImageInputs | None = None
    image_tokens: int = 0  # how many of ``ids`` stand for the images


class Processor:
    """Prompts with images to token ids and pixel inputs, for a Qwen2-VL-family generator: its
    tokenizer, image processor and chat template. The tokenizer carries the processor from then
    on (:func:`processor_of`)."""

    def __init__(self, tokenizer, image_processor, chat_template: str | None = None):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.chat_template = chat_template or getattr(tokenizer, "chat_template", None)
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        if self.image_token_id is None or self.image_token_id == tokenizer.unk_token_id:
            raise InputError(f"the tokenizer has no {IMAGE_TOKEN} token: not a Qwen2-VL-family tokenizer")
        self.merge_size = int(image_processor.merge_size)
        setattr(tokenizer, _ATTRIBUTE, self)

    @classmethod
    def load(cls, location: str | os.PathLike, tokenizer=None) -> Processor:
        """The processor of a model folder (or hub id): ``tokenizer`` (default: the folder's), its
        image processor, and the processor's chat template where the folder has one."""
        from transformers import AutoImageProcessor
        from transformers.utils import logging as hf_logging

        from lenvm.hub import load_tokenizer

        tokenizer = tokenizer if tokenizer is not None else load_tokenizer(location)
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # "torchvision is missing, using the PIL backend"
        try:
            image_processor = AutoImageProcessor.from_pretrained(str(location))
        finally:
            hf_logging.set_verbosity(verbosity)
        return cls(tokenizer, image_processor, _processor_template(location))

    @classmethod
    def of(cls, processor) -> Processor:
        """From a ``transformers`` processor (``AutoProcessor``) of this family."""
        return cls(processor.tokenizer, processor.image_processor, getattr(processor, "chat_template", None))

    def save_pretrained(self, path: str | os.PathLike) -> None:
        self.tokenizer.save_pretrained(path)
        self.image_processor.save_pretrained(path)
        if self.chat_template is not None and self.chat_template != getattr(
            self.tokenizer, "chat_template", None
        ):
            Path(path, "chat_template.jinja").write_text(self.chat_template, encoding="utf-8")

    def pixels(self, refs: list[str]) -> ImageInputs:
        """Load the images ``refs`` and run the image processor on them."""
        images = [load_image(ref) for ref in refs]
        for ref, image in zip(refs, images, strict=True):
            # The image processor refuses these mid-batch, without naming the image.
            if max(image.size) > MAX_ASPECT * min(image.size):
                raise InputError(
                    f"image {_shown(ref)}: {image.width}x{image.height} pixels, more than {MAX_ASPECT} times "
                    "longer than wide, which the image processor does not take"
                )
        out = self.image_processor(images=images, return_tensors="pt")
        return ImageInputs(out["pixel_values"], out["image_grid_thw"].long())

    def tokens_per_image(self, images: ImageInputs) -> list[int]:
        return (images.image_grid_thw.prod(-1) // self.merge_size**2).tolist()

    def encode(
        self, prompt: Prompt, *, add_generation_prompt: bool = True, continue_final_message: bool = False
    ) -> Encoded:
        """Token ids (the chat template applied, each image pad repeated once per image token) and
        pixel inputs of ``prompt``; the switches are :func:`lenvm.prompts.encode_prompt`'s."""
        ids = template_ids(
            self.tokenizer,
            prompt,
            self.chat_template,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
        )
        refs = prompt.images
        if not refs:
            return Encoded(self.without_images(ids, f"prompt {prompt.id!r}"))
        images = self.pixels(refs)
        counts = self.tokens_per_image(images)
        slots = [i for i, t in enumerate(ids) if t == self.image_token_id]
        if len(slots) != len(counts):
            raise InputError(
                f"prompt {prompt.id!r}: its chat template placed {len(slots)} image placeholder(s) "
                f"for {len(counts)} image(s)"
            )
        expanded: list[int] = []
        start = 0
        for slot, count in zip(slots, counts, strict=True):
            expanded += ids[start:slot] + [self.image_token_id] * count
            start = slot + 1
        return Encoded(expanded + ids[start:], images, sum(counts))

    def without_images(self, ids: list[int], what: str) -> list[int]:
        """``ids`` of a sequence without images, refused where they hold image placeholders: the
        model would read the placeholder's own embedding where an image's features belong."""
        found = ids.count(self.image_token_id)
        if found:
            raise InputError(
                f"{what} holds {found} image placeholder token(s) ({IMAGE_TOKEN}) but no images: "
                "give the images with the prompt (as content parts), not their tokens"
            )
        return ids

    def inputs_for(
        self, rows: list[tuple[list[int], list[str]]], names: list[str] | None = None
    ) -> ImageInputs | None:
        """Pixel inputs of model rows given as ``(token ids, image references)`` (ids from
        rollouts, say): each row's image tokens must be what its images make. ``names``: how
        errors name each row (the rollout record it came from, say)."""
        parts = []
        for n, (ids, refs) in enumerate(rows):
            what = names[n] if names else "a sequence"
            try:
                images = self.pixels(list(refs)) if refs else None
            except InputError as err:
                raise InputError(f"{what}: {err}") from None
            found = sum(1 for t in ids if t == self.image_token_id)
            expected = sum(self.tokens_per_image(images)) if images is not None else 0
            if found != expected:
                raise InputError(
                    f"{what} holds {found} image tokens where its {len(refs)} image(s) make "
                    f"{expected}: were the ids made with another image processor, or did the images change?"
                )
            parts.append(images)
        return ImageInputs.cat(parts)


def _processor_template(location: str | os.PathLike) -> str | None:
    """A processor's own chat template (``chat_template.json``), which some vision-language
    folders keep apart from the tokenizer's."""
    import json

    from transformers.utils import cached_file

    file = cached_file(
        str(location),
        "chat_template.json",
        _raise_exceptions_for_missing_entries=False,
        _raise_exceptions_for_connection_errors=False,
    )
    if file is None:
        return None
    return json.loads(Path(file).read_text(encoding="utf-8")).get("chat_template")


def forward_images(
    tokenizer, rows: list[tuple[list[int], tuple[str, ...]]], device, names: list[str] | None = None
) -> dict[str, torch.Tensor]:
    """Forward keyword arguments with the pixel inputs of model rows ``(token ids, image
    references)`` (none when no row has images), checked against the rows' image tokens;
    ``names``: how errors name each row."""
    processor = processor_of(tokenizer)
    if not any(refs for _, refs in rows):
        if processor is not None:
            for n, (ids, _) in enumerate(rows):
                processor.without_images(ids, names[n] if names else "a sequence")
        return {}
    if processor is None:
        raise InputError("these sequences have images, but the model that reads them is text-only")
    images = processor.inputs_for([(ids, list(refs)) for ids, refs in rows], names)
    return model_kwargs(images.to(device) if images is not None else None)


def processor_of(tokenizer) -> Processor | None:
    """The :class:`Processor` a vision-language generator's tokenizer carries, else None."""
    return getattr(tokenizer, _ATTRIBUTE, None)


def as_tokenizer(tokenizer_or_processor):
    """A tokenizer, given a tokenizer or a ``transformers`` processor (whose tokenizer then carries
    it as a :class:`Processor`)."""
    if hasattr(tokenizer_or_processor, "image_processor") and hasattr(tokenizer_or_processor, "tokenizer"):
        return Processor.of(tokenizer_or_processor).tokenizer
    return tokenizer_or_processor


def encode(
    tokenizer,
    prompt: PromptInput,
    *,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
) -> Encoded:
    """Token ids and pixel inputs of ``prompt`` for the generator of ``tokenizer``. A prompt with
    images needs a vision-language generator's tokenizer (see :func:`processor_of`). Token ids
    are taken as they are (a prompt tokenized without the template, as an OpenAI-style text
    completion is). The switches are :func:`lenvm.prompts.encode_prompt`'s."""
    processor = processor_of(tokenizer)
    if is_token_ids(prompt):
        ids = list(prompt)
        return Encoded(processor.without_images(ids, "the prompt") if processor else ids)
    prompt = as_prompt(prompt)
    if processor is not None:
        return processor.encode(
            prompt, add_generation_prompt=add_generation_prompt, continue_final_message=continue_final_message
        )
    if prompt.images:
        raise InputError(
            f"prompt {prompt.id!r} has {len(prompt.images)} image(s), but the generator is text-only: "
            "images need a vision-language generator of the Qwen2-VL family, loaded with "
            "lenvm.load_generator (or given with its transformers processor), in lenvm's own engine"
        )
    return Encoded(
        template_ids(
            tokenizer,
            prompt,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
        )
    )


# -- positions and frozen parts -------------------------------------------------------------


def rope_positions(body, input_ids: torch.Tensor, mask: torch.Tensor, images: ImageInputs) -> torch.Tensor:
    """The 3-D positions (``[3, B, T]``) of rows with images, from the model's own rope-index
    function; ``mask`` marks the real tokens (padding gets position 0)."""
    rope_index = getattr(body, "get_rope_index", None)
    if rope_index is None:
        raise InputError(f"{type(body).__name__} has no multimodal positions: not a Qwen2-VL-family model")
    image_tokens = (input_ids == body.config.image_token_id).int()
    positions, _ = rope_index(
        input_ids,
        mm_token_type_ids=image_tokens,
        image_grid_thw=images.image_grid_thw,
        attention_mask=mask.long(),
    )
    return positions


def freeze_vision(backbone) -> int:
    """Freeze every parameter outside the language model (the vision tower and its projector, the
    patch merger); returns how many tensors were frozen."""
    language = {id(p) for p in backbone.base_model.get_decoder().parameters()}
    frozen = [p for p in backbone.parameters() if id(p) not in language]
    for p in frozen:
        p.requires_grad_(False)
    return len(frozen)
