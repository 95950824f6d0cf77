"""LengthValueModel: a transformer backbone plus a value head, ``V = -sigmoid(z)``.

Kinds:

- ``standalone``: its own backbone (any AutoModel checkpoint), fully trainable; the paper's setup.
  Saved whole: ``backbone/`` with the backbone and tokenizer, plus the head. A vision-language
  backbone (the Qwen2-VL family) keeps its vision tower and projector frozen, as the paper's
  Qwen2.5-VL recipe does, and saves its image processor beside the tokenizer.
- ``attached``: a head on the generator's own frozen hidden states (by default a middle layer's,
  see :data:`FEATURE_DEPTH`). Saves only the head and a reference to the generator; decoding
  gets values and next-token logits from one forward pass.
- ``q``: attached too, with a *length Q-head*: from the current hidden state it predicts the
  value of the state after every possible next token at once (one number per vocabulary entry,
  like an LM head), besides the value of the current state.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast, overload

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from lenvm import __version__, vision
from lenvm._lazy import LazyModule
from lenvm.calibration import Calibration
from lenvm.decoding.params import SamplingParams
from lenvm.io import (
    InputError,
    atomic_path,
    is_int,
    is_real,
    json_text,
    outside_vocabulary,
    plain_numbers,
    positive_count,
    write_text,
)
from lenvm.prompts import Messages, Prompt, PromptInput, TokenIds, is_token_ids
from lenvm.returns import _check_gamma, value_to_length

if TYPE_CHECKING:
    import transformers
else:  # imported when the hints are read: the model's own code imports transformers where it loads one
    transformers = LazyModule("transformers")

Kind = Literal["attached", "standalone", "q"]
KINDS: tuple[str, ...] = ("attached", "standalone", "q")
FORMAT = "lenvm"
# The version of a LenVM folder's layout and config fields: raised by a change that an older lenvm
# would misread; a folder of a newer format is refused (lenvm.model.check_format_version).
FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
HEAD_NAME = "head.safetensors"
END_HEAD_NAME = "end_head.safetensors"
BACKBONE_DIR = "backbone"


# A frozen generator's middle layers say more about how long its answer will be than its last
# one, which is tuned to the next token: on the demo's rollouts, layer 18 of 30 roughly halved
# the held-out prompt-boundary error of the last layer (docs/benchmarks.md).
FEATURE_DEPTH = 0.6


class TokenizerMismatchError(InputError):
    """The LenVM was trained for a generator with another tokenizer."""


class NotALenVMError(InputError):
    """A folder that holds no LenVM checkpoint."""


def tokenizer_fingerprint(tokenizer) -> str:
    """A short hash of the vocabulary and the EOS token: equal for tokenizers that agree on ids."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    blob = json.dumps([vocab, tokenizer.eos_token], ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


@dataclass
class LengthValueConfig:
    """Everything needed to rebuild a LenVM; round-trips through ``config.json``.

    ``format`` marks the folder as a LenVM's; ``format_version`` is the version of its layout and
    fields (:data:`FORMAT_VERSION`), raised when a change would make an older lenvm misread it;
    ``lenvm_version`` records the lenvm that wrote it, for information."""

    kind: Kind
    gamma: float
    hidden_size: int
    base_model: str  # the generator (attached, q) or where the backbone started (standalone)
    tokenizer_fingerprint: str
    head_hidden_size: int | None = None  # defaults to hidden_size: the paper's H -> H -> 1
    feature_layer: int = -1  # the head reads this entry of hidden_states; -1: the final, normed one
    vocab_size: int | None = None  # q kind only
    # Defaulted for callers of the constructor that leave it out; a config without EOS ids is refused.
    eos_token_ids: list[int] = field(default_factory=list)
    generator: str | None = None  # whose rollouts trained it
    sampling: dict[str, Any] | None = None  # the decoding policy of those rollouts
    training: dict[str, Any] | None = None  # summary of how it was trained
    calibration: dict[str, Any] | None = None  # knots of lenvm.calibration.Calibration, when fitted
    # The end head, when there is one (tokens until the generator's next natural-end opportunity,
    # lenvm.end_head): its gamma, the EOS probability it counts as natural, what it was trained on.
    end_head: dict[str, Any] | None = None
    format: str = FORMAT
    lenvm_version: str = __version__
    # Fields added since: at the end, so that positional calls of the constructor keep their meaning.
    format_version: int = FORMAT_VERSION
    # Fields of config.json that this lenvm does not know (another version's, or added by hand):
    # they mean nothing here, and are written back as they were, as Hugging Face configs keep theirs.
    extra_fields: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        plain_numbers(self)  # NumPy numbers made Python ones: the config holds what config.json gives back
        check_format_version(self.format_version)
        if self.head_hidden_size is None:
            self.head_hidden_size = self.hidden_size
        if self.generator == "":  # how rollouts of other tools say that the generator is not known
            self.generator = None
        for name, (valid, expected) in _FIELD_RULES.items():
            value = getattr(self, name)
            if not valid(value):
                raise InputError(f"{name} must be {expected}, got {_described(value)}")
        _check_gamma(self.gamma)
        if self.kind == "q" and self.vocab_size is None:
            raise InputError(
                "vocab_size must be given for a LenVM of kind 'q' (its head has a value per token)"
            )
        if clash := sorted(self.extra_fields.keys() & self.__dataclass_fields__.keys()):
            raise InputError(f"extra_fields holds fields of the config itself: {', '.join(clash)}")
        if self.sampling is not None:
            try:
                SamplingParams.from_policy(self.sampling)
            except InputError as err:
                raise InputError(f"sampling: {err}") from None
        if self.calibration is not None:
            Calibration.from_dict(self.calibration)  # a bad map fails on load, not mid-decoding
        if self.end_head is not None:
            if self.kind != "attached":
                raise InputError("an end head reads the generator's own states: a LenVM of kind 'attached'")
            if not is_real(self.end_head.get("gamma")):
                raise InputError(
                    f'end_head must hold a "gamma" number, got {_described(self.end_head.get("gamma"))}'
                )
            _check_gamma(self.end_head["gamma"])

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(data.pop("extra_fields"))
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LengthValueConfig:
        """The config of ``data`` (what ``config.json`` holds, or ``dataclasses.asdict`` of a config,
        whose ``extra_fields`` are merged in): a newer format than this lenvm reads is refused, fields
        it does not know are kept in :attr:`extra_fields`."""
        if not isinstance(data, dict):
            raise InputError(f"a LenVM config is a JSON object, got {_described(data)}")
        extra = data.get("extra_fields", {})
        if not isinstance(extra, dict):
            raise InputError(f"extra_fields must be an object of fields, got {_described(extra)}")
        # format_version left out: written before it existed, format 1
        data = {"format_version": 1, **extra, **{k: v for k, v in data.items() if k != "extra_fields"}}
        check_format_version(data["format_version"])  # before the fields a newer format may change
        declared = {f.name: f for f in fields(cls) if f.name != "extra_fields"}
        # The EOS ids have a default for the constructor's older callers only: every config.json has them.
        required = [
            name for name, f in declared.items() if f.default is MISSING and f.default_factory is MISSING
        ] + ["eos_token_ids"]
        if missing := [name for name in required if name not in data]:
            raise InputError(f"not a valid LenVM config (no {', '.join(missing)})")
        known = {k: v for k, v in data.items() if k in declared}
        return cls(**known, extra_fields={k: v for k, v in data.items() if k not in declared})


def check_format_version(version: object) -> None:
    """Refuse a LenVM folder format this lenvm does not read: a newer one (written by a newer
    lenvm, whose fields this one could misread), or a version that is no positive integer."""
    if not is_int(version) or version < 1:
        raise InputError(f"format_version must be a positive integer, got {_described(version)}")
    if version > FORMAT_VERSION:
        raise InputError(
            f"the LenVM is of format {version}, written by a newer lenvm; this lenvm ({__version__}) reads "
            f"formats up to {FORMAT_VERSION}: upgrade lenvm to load it"
        )


def _positive_int(value: object) -> bool:
    return is_int(value) and value >= 1


def _text(value: object) -> bool:
    return isinstance(value, str) and value != ""


def _optional(valid: Callable[[object], bool]) -> Callable[[object], bool]:
    return lambda value: value is None or valid(value)


def _token_ids(value: object) -> bool:
    return isinstance(value, list) and bool(value) and all(is_int(i) and i >= 0 for i in value)


# What each field of config.json must hold: a test, and what it expects in words.
_FIELD_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "kind": (lambda value: value in KINDS, f"one of {', '.join(KINDS)}"),
    "gamma": (is_real, "a number in (0, 1)"),
    "hidden_size": (_positive_int, "a positive integer"),
    "base_model": (_text, "a model's name or folder"),
    "tokenizer_fingerprint": (_text, "a tokenizer fingerprint (a string)"),
    "eos_token_ids": (_token_ids, "a non-empty list of token ids"),
    "head_hidden_size": (_positive_int, "a positive integer"),
    "feature_layer": (lambda value: is_int(value) and value >= -1, "-1 (the final layer) or a layer index"),
    "vocab_size": (_optional(_positive_int), "a positive integer, or null"),
    "generator": (_optional(_text), "a model's name or folder, or null"),
    "sampling": (_optional(lambda value: isinstance(value, dict)), "an object of sampling settings, or null"),
    "training": (_optional(lambda value: isinstance(value, dict)), "an object, or null"),
    "calibration": (
        _optional(lambda value: isinstance(value, dict)),
        "an object of calibration knots, or null",
    ),
    "end_head": (_optional(lambda value: isinstance(value, dict)), "an object of end head settings, or null"),
    "format": (lambda value: value == FORMAT, f'"{FORMAT}"'),
    "lenvm_version": (_text, "a version string"),
    "extra_fields": (lambda value: isinstance(value, dict), "a mapping of field names to values"),
}


def _described(value: object) -> str:
    """``value`` as JSON names it, with its type: a hand-edited number may be a string that looks
    like one."""
    if value is None:
        return "null"
    kinds = {bool: "a boolean", str: "a string", list: "a list", dict: "an object"}
    kind = kinds.get(type(value), "an integer" if is_int(value) else "a number" if is_real(value) else None)
    return f"{value!r} ({kind})" if kind else repr(value)


class ValueHead(nn.Module):
    """``z = W2 · SiLU(W1 · h + b1) + b2``; the value is ``-sigmoid(z)``."""

    def __init__(self, hidden_size: int, head_hidden_size: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, head_hidden_size)
        self.fc2 = nn.Linear(head_hidden_size, 1)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.fc2(nn.functional.silu(self.fc1(hidden))).squeeze(-1)


class QHead(nn.Module):
    """Values of the current state and of every next state, from one hidden vector.

    ``z(s, x) = z_state(h) + (U · h) · e_x + b_x`` where ``e_x`` is the generator's (frozen) input
    embedding of token ``x``: the token term is a learned LM-head-like projection, so the values of
    all candidates cost one matrix product, like the logits.
    """

    def __init__(self, hidden_size: int, head_hidden_size: int, vocab_size: int, embed_dim: int):
        super().__init__()
        self.state = ValueHead(hidden_size, head_hidden_size)
        self.proj = nn.Linear(hidden_size, embed_dim, bias=False)
        nn.init.zeros_(self.proj.weight)  # start as a pure state-value head
        self.token_bias = nn.Parameter(torch.zeros(vocab_size))

    def next_logits(
        self, hidden: torch.Tensor, embeddings: torch.Tensor, token_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits ``z(s, x)``: for all tokens (``[..., V]``) or the given ids (``[..., k]``)."""
        base = self.state(hidden).unsqueeze(-1)
        query = self.proj(hidden)
        # The head may be kept in float32 beside a half-precision generator's embeddings.
        if token_ids is None:
            return base + query @ embeddings.T.to(query.dtype) + self.token_bias
        cand = embeddings[token_ids].to(query.dtype)  # [..., k, E]
        return base + (cand @ query.unsqueeze(-1)).squeeze(-1) + self.token_bias[token_ids]


class LengthValueModel(nn.Module):
    """A Length Value Model. Build one with :meth:`from_base`, load one with :meth:`from_pretrained`."""

    def __init__(self, config: LengthValueConfig, backbone: transformers.PreTrainedModel, tokenizer):
        super().__init__()
        self.config = config
        self.backbone = backbone
        self.tokenizer = tokenizer
        # The config's __post_init__ fills head_hidden_size (from hidden_size) and requires a q
        # kind's vocab_size.
        head_hidden_size = cast(int, config.head_hidden_size)
        self.head: QHead | ValueHead
        if config.kind == "q":
            embed_dim = embedding_matrix(backbone).shape[1]
            self.head = QHead(config.hidden_size, head_hidden_size, cast(int, config.vocab_size), embed_dim)
        else:
            self.head = ValueHead(config.hidden_size, head_hidden_size)
        self.end_head = None
        if config.end_head is not None:
            self.end_head = ValueHead(config.hidden_size, head_hidden_size)
        if self.attached:
            self.backbone.requires_grad_(False)
        elif self.sees_images:
            vision.check_supported(backbone.config, "the LenVM's backbone")
            vision.freeze_vision(backbone)
        layers = backbone.config.get_text_config().num_hidden_layers
        if config.feature_layer > layers:
            raise InputError(f"feature_layer {config.feature_layer} exceeds the backbone's {layers} layers")
        vocab = embedding_matrix(backbone).shape[0]
        if (why := outside_vocabulary(config.eos_token_ids, vocab, "eos_token_ids")) is not None:
            raise InputError(f"the LenVM's {why} of its backbone")
        # The head goes where the backbone is; the backbone is never moved.
        self.head.to(embedding_matrix(backbone).device)
        if self.end_head is not None:
            self.end_head.to(embedding_matrix(backbone).device)

    # -- construction ---------------------------------------------------------------------

    @classmethod
    def from_base(
        cls,
        base: str | os.PathLike,
        kind: Kind = "attached",
        gamma: float = 0.99,
        generator=None,
        head_hidden_size: int | None = None,
        feature_layer: int | None = None,
        dtype: str | torch.dtype = torch.float32,
        device: str | torch.device | None = None,
    ) -> LengthValueModel:
        """A fresh (untrained head) LenVM on ``base``.

        ``feature_layer`` picks the entry of the backbone's ``hidden_states`` the head reads
        (``-1``: the final, normed output); ``None`` takes :func:`default_feature_layer`.

        ``generator`` may pass an already loaded ``(model, tokenizer)`` for ``base`` so that an
        attached LenVM shares the generator's weights instead of loading them a second time; it
        stays where it is, in its dtype. It must be the model ``base`` names, since the LenVM records
        ``base`` and loads that in its place later: one named as another model (its
        ``name_or_path``, as :func:`lenvm.hub.load_generator` sets it) is refused, and so is one
        whose depth or input embeddings differ from those stored for ``base`` (a model built in
        memory; a hub model's are compared where they are in the local cache, else a generator
        without a name is refused). ``dtype`` and ``device`` apply to what this call loads
        (default device: the generator's, else :func:`lenvm.hub.default_device`). The head sits
        on its backbone's device, in float32.
        """
        from lenvm import hub

        if kind not in KINDS:
            raise InputError(f"unknown LenVM kind {kind!r}; expected one of {KINDS}")
        generator = _as_generator(generator)
        device = _device_for(device, generator)
        if kind == "standalone":
            backbone, tokenizer = _load_backbone(hub.resolve(base), dtype, device)
        elif generator is not None:
            _check_is_base(generator[0], base)
            backbone, tokenizer = generator
        else:
            backbone, tokenizer = hub.load_generator(base, device=device, dtype=dtype)
        text_config = backbone.config.get_text_config()
        if feature_layer is None:
            feature_layer = default_feature_layer(kind, text_config.num_hidden_layers)
        hidden = text_config.hidden_size
        config = LengthValueConfig(
            kind=kind,
            gamma=gamma,
            hidden_size=hidden,
            base_model=hub.model_name(base),  # a folder by its absolute path: found from anywhere
            tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
            head_hidden_size=head_hidden_size,
            feature_layer=feature_layer,
            vocab_size=embedding_matrix(backbone).shape[0] if kind == "q" else None,
            eos_token_ids=hub.eos_token_ids(backbone, tokenizer),
        )
        return cls(config, backbone, tokenizer)

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        generator=None,
        dtype: str | torch.dtype = torch.float32,
        device: str | torch.device | None = None,
    ) -> LengthValueModel:
        """Load a LenVM folder.

        For an attached or q LenVM, ``generator`` (a loaded ``(model, tokenizer)``) is used as the
        backbone, where it is; without it the generator named in the config is loaded. For a
        standalone LenVM, ``generator``, when given, is only checked for a matching tokenizer. A
        mismatch raises :class:`TokenizerMismatchError`. ``dtype`` and ``device`` apply to what
        this call loads (default device: the generator's, else
        :func:`lenvm.hub.default_device`).
        """
        from lenvm import hub

        path = Path(path)
        config = read_config(path)
        warn_about_config(config, path / CONFIG_NAME)
        generator = _as_generator(generator)
        device = _device_for(device, generator)
        if config.kind == "standalone":
            backbone, tokenizer = _load_backbone(path / BACKBONE_DIR, dtype, device)
            if generator is not None:
                check_tokenizer(config, generator[1], what="the generator")
        else:
            if generator is None:
                generator = hub.load_generator(config.base_model, device=device, dtype=dtype)
            backbone, tokenizer = generator
            loaded = getattr(backbone, "name_or_path", "") or config.base_model
            check_tokenizer(config, tokenizer, what=f"the generator {loaded!r}")
            width = getattr(backbone.config.get_text_config(), "hidden_size", config.hidden_size)
            if width != config.hidden_size:
                raise InputError(
                    f"the LenVM's head reads hidden states of width {config.hidden_size}, the generator's "
                    f"are {width}: it was trained on another generator ({config.base_model!r})"
                )
        model = cls(config, backbone, tokenizer)
        _load_weights(model.head, path / HEAD_NAME)
        if model.end_head is not None:
            _load_weights(model.end_head, path / END_HEAD_NAME)
        return model.eval()

    def save_pretrained(
        self, path: str | os.PathLike, state_dict: dict[str, torch.Tensor] | None = None
    ) -> None:
        """Write ``config.json`` and ``head.safetensors`` (plus ``end_head.safetensors`` and, if
        standalone, ``backbone/``), atomically. Saved over a LenVM, the folder's other files (a
        training log, a model card) stay, as with Hugging Face's ``save_pretrained``.

        ``state_dict`` (this module's keys) replaces the weights held by the module: a model
        sharded by FSDP or DeepSpeed ZeRO-3 holds only a shard, and its full weights come from
        ``accelerator.get_state_dict``.
        """
        state_dict = state_dict if state_dict is not None else self.state_dict()
        text = _config_text(self.config)
        refuse_to_replace(path, "saving a LenVM there")
        own = {CONFIG_NAME, HEAD_NAME, END_HEAD_NAME, BACKBONE_DIR}
        with atomic_path(path) as tmp:
            if Path(path).is_dir():
                top = Path(path).resolve()
                shutil.copytree(
                    path, tmp, ignore=lambda d, names: own & set(names) if Path(d).resolve() == top else ()
                )
            else:
                tmp.mkdir()
            (tmp / CONFIG_NAME).write_text(text)
            head = {
                k.removeprefix("head."): v.detach().float().contiguous().cpu()
                for k, v in state_dict.items()
                if k.startswith("head.")
            }
            save_file(head, str(tmp / HEAD_NAME), metadata={"format": "pt"})
            end_head = {
                k.removeprefix("end_head."): v.detach().float().contiguous().cpu()
                for k, v in state_dict.items()
                if k.startswith("end_head.")
            }
            if end_head:
                save_file(end_head, str(tmp / END_HEAD_NAME), metadata={"format": "pt"})
            if not self.attached:
                backbone = {
                    k.removeprefix("backbone."): v for k, v in state_dict.items() if k.startswith("backbone.")
                }
                self.backbone.save_pretrained(tmp / BACKBONE_DIR, state_dict=backbone)
                (vision.processor_of(self.tokenizer) or self.tokenizer).save_pretrained(tmp / BACKBONE_DIR)

    # -- description ----------------------------------------------------------------------

    def extra_repr(self) -> str:
        """What the LenVM is, in one line: what PyTorch's repr shows above its modules."""
        return (
            f"kind={self.config.kind!r}, base={self.config.base_model!r}, gamma={self.gamma:.6g}, "
            f"feature_layer={self.feature_layer}, end_head={self.end_head is not None}, "
            f"calibrated={self.config.calibration is not None}"
        )

    def __repr__(self) -> str:
        # PyTorch writes extra_repr on a line of its own below the class name when there are
        # modules: here it completes the first line, and the module tree follows as usual.
        return super().__repr__().replace("(\n  ", "(", 1)

    # -- properties -----------------------------------------------------------------------

    @property
    def gamma(self) -> float:
        return self.config.gamma

    @property
    def attached(self) -> bool:
        """True when the backbone is the generator itself (kinds ``attached`` and ``q``)."""
        return self.config.kind != "standalone"

    @property
    def device(self) -> torch.device:
        return next(self.head.parameters()).device

    @property
    def _no_split_modules(self) -> list[str] | None:
        """The backbone's layer classes: what FSDP's transformer auto-wrap policy wraps."""
        return getattr(self.backbone, "_no_split_modules", None)

    @property
    def sees_images(self) -> bool:
        """Whether the backbone is a vision-language model (it reads the images of a prompt)."""
        return vision.is_vision_language(self.backbone.config)

    @property
    def context(self) -> int:
        """The most tokens the backbone reads at once."""
        return context_length(self.backbone)

    def check_tokens(self, ids: list[int], image_tokens: int = 0, what: str = "a sequence") -> None:
        """Refuse ``what`` (token ids) if it is longer than :attr:`context`, saying how much of it
        is images, or holds an id outside the vocabulary (ids made by another tokenizer)."""
        if len(ids) > self.context:
            of_images = f", {image_tokens} of them for its images" if image_tokens else ""
            raise InputError(
                f"{what}: {len(ids)} tokens{of_images}, beyond the LenVM's context of {self.context} tokens"
            )
        vocab = embedding_matrix(self.backbone).shape[0]
        if (why := outside_vocabulary(ids, vocab, what)) is not None:
            raise InputError(f"{why} of {self.config.base_model!r}: were its ids made by another tokenizer?")

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    # -- forward --------------------------------------------------------------------------

    @property
    def body(self) -> transformers.PreTrainedModel:
        """The transformer without any LM head."""
        return cast(
            "transformers.PreTrainedModel", self.backbone.base_model
        )  # typed as any Module by transformers

    @property
    def feature_layer(self) -> int:
        return self.config.feature_layer

    def features(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The head's input at every position: ``[B, T, H]`` (see :func:`select_features`).

        ``pixel_values`` and ``image_grid_thw``: the images of the rows (in row order), for a
        vision-language backbone; the positions are then the model's multimodal ones. Without
        gradients, a head that reads a middle layer of a text model stops the forward there: the
        layers above it cannot change its features (a 60%-depth head saves 40% of the forward)."""
        layer = self.feature_layer
        if pixel_values is None and not torch.is_grad_enabled() and can_stop_at(self.body, layer):
            hidden = run_until(
                self.body, layer, input_ids=input_ids, attention_mask=attention_mask, use_cache=False
            )
            return normalized(hidden)
        return select_features(
            self.body_output(input_ids, attention_mask, pixel_values, image_grid_thw), layer
        )

    def body_output(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
    ):
        """One whole forward of the body (images as in :meth:`features`): its final hidden states
        (``last_hidden_state``, which the generator's logits come from) and, for a head reading a
        middle layer, every layer's (``hidden_states``)."""
        extra = {}
        if pixel_values is not None:
            if image_grid_thw is None:
                raise InputError("pixel_values come with their image_grid_thw (each image's grid of patches)")
            images = vision.ImageInputs(pixel_values, image_grid_thw)
            mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
            positions = vision.rope_positions(self.body, input_ids, mask, images)
            extra = {"position_ids": positions, **vision.model_kwargs(images)}
        return self.body(
            input_ids=input_ids,
            attention_mask=attention_mask,
            output_hidden_states=self.feature_layer != -1,
            **extra,
        )

    @property
    def calibration(self) -> Calibration | None:
        """The monotone map applied to every value (:mod:`lenvm.calibration`), when fitted."""
        data = self.config.calibration
        if data is None:
            return None
        if getattr(self, "_calibration_of", None) is not data:  # built once per config entry
            self._calibration, self._calibration_of = Calibration.from_dict(data), data
        return self._calibration

    def _calibrated(self, values: torch.Tensor, calibrated: bool) -> torch.Tensor:
        calibration = self.calibration if calibrated else None
        return values if calibration is None else calibration(values)

    def values_from_hidden(self, hidden: torch.Tensor, calibrated: bool = True) -> torch.Tensor:
        """``V(s) = -sigmoid(z)`` for each hidden vector (``[..., H] -> [...]``), through the
        calibration unless ``calibrated`` is False (the head's own values, which training fits)."""
        head = self.head.state if isinstance(self.head, QHead) else self.head
        return self._calibrated(_value(head(hidden.to(head.fc1.weight.dtype))), calibrated)

    def end_lengths_from_hidden(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """The end head's prediction for each hidden vector (``[..., H] -> [...]``, float64): the
        tokens left, EOS included, until the generator's next natural-end opportunity (a position
        where it gives EOS at least the natural bar); None without an end head."""
        head, settings = self.end_head, self.config.end_head
        if head is None or settings is None:  # the head is built from the settings: both or neither
            return None
        value = _value(head(hidden.to(head.fc1.weight.dtype))).double()
        return value_to_length(value, settings["gamma"]).clamp(min=1.0)

    def next_values_from_hidden(
        self, hidden: torch.Tensor, token_ids: torch.Tensor | None = None, calibrated: bool = True
    ) -> torch.Tensor:
        """Q kind only: values of ``s + x`` for every token ``x`` (or the given candidate ids)."""
        if not isinstance(self.head, QHead):
            raise TypeError("next-token values from one state need a LenVM of kind 'q'")
        embeddings = embedding_matrix(self.backbone)
        logits = self.head.next_logits(hidden.to(self.head.proj.weight.dtype), embeddings, token_ids)
        return self._calibrated(_value(logits), calibrated)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        calibrated: bool = True,
    ) -> torch.Tensor:
        """Values ``V(s_t)`` at every position: ``[B, T]`` (images as in :meth:`features`;
        ``calibrated`` as in :meth:`values_from_hidden`)."""
        features = self.features(input_ids, attention_mask, pixel_values, image_grid_thw)
        return self.values_from_hidden(features, calibrated)

    # -- prediction -----------------------------------------------------------------------

    def sampling_params(self, **settings: Any) -> SamplingParams:
        """A :class:`~lenvm.decoding.SamplingParams` under the decoding policy this LenVM was
        trained on (its temperature, top-p, top-k and min-p: its values describe answers sampled
        so), with ``settings`` (``max_new_tokens``, ``seed``, ...) added or taking precedence."""
        return SamplingParams.from_policy(self.config.sampling, **settings)

    def encode_prompts(self, prompts: Sequence[PromptInput]) -> list[vision.Encoded]:
        """Each prompt as the LenVM reads it (chat template applied, images read, token ids taken
        as they are), checked against the context window and the vocabulary."""
        if not prompts:
            raise InputError("no prompts to predict for")
        encoded = []
        for i, prompt in enumerate(prompts):
            e = vision.encode(self.tokenizer, prompt)
            if not e.ids:
                raise InputError(f"prompt {i + 1} encodes to no tokens")
            named = f"prompt {i + 1}" + (f" (id {prompt.id!r})" if isinstance(prompt, Prompt) else "")
            self.check_tokens(e.ids, e.image_tokens, named)
            encoded.append(e)
        return encoded

    @torch.no_grad()
    def predict_values(
        self, prompts: Sequence[PromptInput], batch_size: int = 16, progress: bool = False
    ) -> list[float]:
        """``V(s_0)`` for each prompt: the value at the last prompt token, chat template applied
        (token ids are taken as they are)."""
        return self.values_of_prompts(self.encode_prompts(prompts), batch_size, progress)

    @torch.no_grad()
    def values_of_prompts(
        self, encoded: list[vision.Encoded], batch_size: int = 16, progress: bool = False
    ) -> list[float]:
        """``V(s_0)`` of already encoded prompts (:meth:`encode_prompts`), in order: one forward
        per batch of ``batch_size`` prompts, batched by length so that little of a forward is
        padding."""
        batch_size = positive_count(batch_size, "batch_size")
        from tqdm.auto import tqdm

        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].ids))
        values = [0.0] * len(encoded)
        with tqdm(total=len(encoded), unit="prompt", desc="predicting", disable=not progress) as bar:
            for start in range(0, len(order), batch_size):
                chunk = order[start : start + batch_size]
                ids, mask, last = right_pad([encoded[i].ids for i in chunk], self.device)
                images = vision.ImageInputs.cat([encoded[i].images for i in chunk])
                pixels = vision.model_kwargs(images.to(self.device) if images is not None else None)
                hidden = self.features(ids, mask, **pixels)[torch.arange(len(chunk), device=ids.device), last]
                for i, v in zip(chunk, self.values_from_hidden(hidden).float().tolist(), strict=True):
                    values[i] = v
                bar.update(len(chunk))
        return values

    def lengths_from_values(self, values: Iterable[float]) -> list[float]:
        """Predicted total lengths (tokens, EOS included) from prompt-boundary values: at least 1,
        since every answer has its EOS (a value within ``1 - gamma`` of 0 reads as less)."""
        return [max(float(value_to_length(v, self.gamma)), 1.0) for v in values]

    # Chat messages and a list of prompts-file records are both lists of dicts: which one a list
    # is shows at run time only (a role in its first dict), so the first overload claims both.
    @overload
    def predict_length(  # type: ignore[overload-overlap]
        self,
        prompts: str | Prompt | dict[str, Any] | TokenIds | Messages,
        batch_size: int = ...,
        progress: bool = ...,
    ) -> float: ...
    @overload
    def predict_length(
        self, prompts: Sequence[PromptInput], batch_size: int = ..., progress: bool = ...
    ) -> list[float]: ...
    def predict_length(self, prompts, batch_size: int = 16, progress: bool = False) -> float | list[float]:
        """Total answer length (tokens, EOS included) predicted from the prompt alone.

        Returns a float for one prompt (text, messages, a prompts-file record, token ids) and a
        list for a list of prompts (an empty list is an error). The number is the return-consistent
        length ``value_to_length(V(s_0))``, at least 1: below the mean length when lengths vary
        (docs/method.md, section 1). Prompts run in batches of ``batch_size``, one forward each;
        ``progress`` shows a bar.
        """
        if not isinstance(prompts, str | Prompt | dict | list | tuple):
            raise InputError(f"expected a prompt or a list of prompts, got {type(prompts).__name__}")
        single = (
            isinstance(prompts, str | Prompt | dict)
            or is_token_ids(prompts)
            or (  # one conversation: messages, not prompts-file records (which may carry a role field)
                isinstance(prompts, list)
                and prompts
                and isinstance(prompts[0], dict)
                and "role" in prompts[0]
                and not {"prompt", "messages"} & prompts[0].keys()
            )
        )
        # One prompt is never a tuple (no case of single takes one): a list of PromptInput either way.
        batch = cast(
            list[PromptInput],
            list(prompts) if isinstance(prompts, list | tuple) and not single else [prompts],
        )
        lengths = self.lengths_from_values(self.predict_values(batch, batch_size, progress))
        return lengths[0] if single else lengths


def _value(logits: torch.Tensor) -> torch.Tensor:
    """``-sigmoid(z)`` in float32 whatever the head's dtype: in bfloat16 (training under
    autocast) a value near -1 rounds to exactly -1, where the sigmoid's gradient is 0, and the
    head could never come back from it."""
    return -torch.sigmoid(logits.float())


def embedding_matrix(model: transformers.PreTrainedModel) -> torch.Tensor:
    """``model``'s input embeddings (``[vocab, hidden]``)."""
    # Typed as any Module by transformers; a model's input embeddings are an nn.Embedding.
    return cast(nn.Embedding, model.get_input_embeddings()).weight


def context_length(model) -> int:
    """The most tokens ``model`` reads at once: its text config's ``max_position_embeddings``."""
    config = model.config.get_text_config()
    return int(getattr(config, "max_position_embeddings", None) or 2**31)


def default_feature_layer(kind: Kind, num_layers: int) -> int:
    """Where the head reads by default: the final layer for a standalone LenVM (trained whole, as in
    the paper), the residual stream at ``FEATURE_DEPTH`` for heads on a frozen generator."""
    return -1 if kind == "standalone" else max(1, round(FEATURE_DEPTH * num_layers))


def select_features(output, layer: int) -> torch.Tensor:
    """The head's input from a body's output: the final (normed) hidden states for ``layer == -1``,
    else ``hidden_states[layer]`` RMS-normalized without weights (the residual stream's scale grows
    with depth, and the head must not depend on it)."""
    if layer == -1:
        return output.last_hidden_state
    return normalized(output.hidden_states[layer])


def normalized(hidden: torch.Tensor) -> torch.Tensor:
    scale = torch.rsqrt(hidden.float().pow(2).mean(-1, keepdim=True) + 1e-6)
    return hidden * scale.to(hidden.dtype)


class _FeaturesReady(Exception):
    def __init__(self, hidden: torch.Tensor):
        self.hidden = hidden


def can_stop_at(body: nn.Module, layer: int) -> bool:
    """Whether a forward of ``body`` can stop after its first ``layer`` layers (:func:`run_until`):
    a text body whose layers are listed, and a layer strictly inside it."""
    layers = getattr(body, "layers", None)
    return layers is not None and 0 < layer < len(layers)


def run_until(body: nn.Module, layer: int, **inputs) -> torch.Tensor:
    """The residual stream after ``body``'s first ``layer`` layers (``hidden_states[layer]``), with
    the layers after them skipped: a hook stops the forward as soon as that layer has run. A KV
    cache passed in ``inputs`` then holds those layers only."""

    def stop(module, args, output):
        raise _FeaturesReady(output[0] if isinstance(output, tuple) else output)

    layers = cast(nn.ModuleList, body.layers)  # a text body lists its layers (can_stop_at)
    handle = layers[layer - 1].register_forward_hook(stop)
    try:
        body(**inputs)
    except _FeaturesReady as ready:
        return ready.hidden
    finally:
        handle.remove()
    raise RuntimeError("the feature layer never ran")


def right_pad(sequences: list[list[int]], device, pad_id: int = 0):
    """Pad on the right; with causal attention real tokens never see the padding."""
    if not sequences or any(len(s) == 0 for s in sequences):
        raise InputError("cannot run the model on an empty token sequence")
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
    last = torch.tensor([len(s) - 1 for s in sequences])
    return ids.to(device), mask.to(device), last.to(device)


def _config_text(config: LengthValueConfig) -> str:
    """The text of ``config.json`` for ``config``, refused (:class:`InputError`) where it would not
    load: a field assigned after the config was built is checked here, before it is written."""
    data = config.to_dict()
    try:
        LengthValueConfig.from_dict(data)
    except InputError as err:
        raise InputError(f"the LenVM's config would not load once written: {err}") from None
    return json_text(data, indent=2, ensure_ascii=False) + "\n"


def save_config(
    path: str | os.PathLike,
    config: LengthValueConfig,
    out: str | os.PathLike | None = None,
    weights: dict[str, dict[str, torch.Tensor]] | None = None,
) -> Path:
    """Write ``config`` into the LenVM folder ``path`` (its weights and any other file kept), or
    into a copy of the folder at ``out``; atomically either way. ``weights`` adds or replaces
    safetensors files of the folder (by file name: their tensors). Returns the folder written."""
    path = Path(path)
    read_config(path)  # a LenVM folder, not any folder
    text = _config_text(config)
    in_place = out is None or Path(out).resolve() == path.resolve()
    if in_place and not weights:
        write_text(path / CONFIG_NAME, text)
        return path
    target = path if out is None or in_place else Path(out)
    refuse_to_replace(target, "writing the LenVM there")
    with atomic_path(target) as tmp:
        shutil.copytree(path, tmp)
        (tmp / CONFIG_NAME).write_text(text)
        for name, tensors in (weights or {}).items():
            tensors = {k: v.detach().float().contiguous().cpu() for k, v in tensors.items()}
            save_file(tensors, str(tmp / name), metadata={"format": "pt"})
    return target


def _load_weights(module: nn.Module, file: Path) -> None:
    try:
        module.load_state_dict(load_file(str(file)))
    except (SafetensorError, RuntimeError) as err:  # not safetensors, or other shapes or names
        reason = str(err).strip().splitlines()[0]
        raise InputError(f"{file}: not the weights of this LenVM's head ({reason})") from None


def generator_of(path: str | os.PathLike) -> str | None:
    """The generator a LenVM folder was made for: the one an attached or q head reads, or the one
    whose rollouts trained a standalone LenVM (None where that is not recorded)."""
    config = read_config(path)
    return config.generator if config.kind == "standalone" else config.base_model


def generator_for(model: str | os.PathLike | None, lenvm: str | os.PathLike | None) -> str | os.PathLike:
    """The generator to load: ``model`` where given, else the one the LenVM folder ``lenvm`` was
    made for (its head reads that generator's states), else the built-in default."""
    if model is not None:
        return model
    from lenvm.hub import DEFAULT_MODEL

    return (generator_of(lenvm) if lenvm is not None else None) or DEFAULT_MODEL


def read_config(path: str | os.PathLike) -> LengthValueConfig:
    """The config of the LenVM folder ``path``, every field checked: a folder that holds no LenVM
    raises :class:`NotALenVMError`, a config with a field of a wrong type or value (a hand edit)
    :class:`InputError`, naming the file."""
    path = Path(path)
    data = _lenvm_config_data(path)
    if not (path / HEAD_NAME).is_file():
        raise NotALenVMError(f"{path}: LenVM folder without {HEAD_NAME}")
    if data.get("end_head") is not None and not (path / END_HEAD_NAME).is_file():
        raise NotALenVMError(f"{path}: its config names an end head but the folder has no {END_HEAD_NAME}")
    try:
        return LengthValueConfig.from_dict(data)
    except InputError as err:
        raise InputError(f"{path / CONFIG_NAME}: {err}") from None


def _lenvm_config_data(path: Path) -> dict[str, Any]:
    """What the ``config.json`` of the folder ``path`` holds, unchecked but for saying that the
    folder is a LenVM's; :class:`NotALenVMError` where it does not."""
    config_file = path / CONFIG_NAME
    if not path.is_dir() or not config_file.is_file():
        raise NotALenVMError(f"{path}: not a LenVM folder (no {CONFIG_NAME})")
    try:
        data = json.loads(config_file.read_bytes().decode("utf-8-sig"))  # an editor's byte-order mark too
    except UnicodeDecodeError as err:
        raise NotALenVMError(f"{config_file}: not UTF-8 text (byte {err.start + 1})") from None
    except json.JSONDecodeError as err:
        raise NotALenVMError(f"{config_file}: malformed JSON ({err.msg})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise NotALenVMError(
            f'{path}: not a LenVM folder (its config.json is not an object with "format": "{FORMAT}")'
        )
    return data


def warn_about_config(config: LengthValueConfig, config_file: str | os.PathLike) -> None:
    """Warn, once per load, of what a config read from ``config_file`` holds that loads but may
    not mean what it says: fields this lenvm does not know (a misspelled one is ignored, its
    default taking its place), and a head that reads another generator than the one whose
    rollouts trained it (made before training refused to say nothing of that)."""
    if config.extra_fields:
        names = ", ".join(sorted(config.extra_fields))
        by = (
            f"lenvm {config.lenvm_version}"
            if config.lenvm_version != __version__
            else "another lenvm version"
        )
        warnings.warn(
            f"{config_file}: fields this lenvm ({__version__}) does not know are ignored: {names} "
            f"(written by {by}, or misspelled?); they are kept when the LenVM is written again",
            stacklevel=3,
        )
    from lenvm.hub import same_model

    sampled_by = config.generator
    if config.kind != "standalone" and sampled_by and not same_model(sampled_by, config.base_model):
        warnings.warn(
            f"{config_file}: the LenVM was trained on rollouts of {sampled_by}, and its head reads "
            f"{config.base_model}: it tells how long {sampled_by}'s answers are from "
            f"{config.base_model}'s hidden states",
            stacklevel=3,
        )


def refuse_to_replace(path: str | os.PathLike, writes: str, lenvm: bool = True) -> None:
    """A LenVM is written as a new folder in place of what stood at ``path`` (keeping only the other
    files of a LenVM folder): refuse when that is anything but a LenVM or an empty folder (a
    generator's folder, say), naming what ``writes``; and a LenVM too unless ``lenvm`` (may be
    replaced). A LenVM is a folder whose config says so: one this lenvm would not load (a bad field,
    a newer format) may be replaced all the same."""
    path = Path(path)
    if not path.exists() or (path.is_dir() and not any(path.iterdir())):
        return
    try:
        _lenvm_config_data(path)
    except NotALenVMError:
        raise InputError(
            f"{path} exists and is not a LenVM folder; {writes} would replace it: choose another folder"
        ) from None
    if not lenvm:
        raise InputError(
            f"{path} already holds a LenVM (with its end head and calibration, if any): {writes} would "
            "replace it; allow that (overwrite=True) or choose another folder"
        )


def check_tokenizer(config: LengthValueConfig, tokenizer, what: str = "this tokenizer") -> None:
    found = tokenizer_fingerprint(tokenizer)
    if found != config.tokenizer_fingerprint:
        raise TokenizerMismatchError(
            f"the LenVM was trained for a generator whose tokenizer differs from {what} "
            f"(fingerprint {config.tokenizer_fingerprint} vs {found}); its values would be meaningless"
        )


def check_lenvm(lenvm: object, who: str) -> None:
    """Refuse anything but a loaded LengthValueModel where ``who`` takes one: a folder or hub id
    in its place would fail later on a missing attribute."""
    if not isinstance(lenvm, LengthValueModel):
        where = repr(str(lenvm)) if isinstance(lenvm, str | os.PathLike) else "path"
        raise InputError(
            f"{who} takes a loaded LengthValueModel (LengthValueModel.from_pretrained({where}) loads one), "
            f"got {type(lenvm).__name__}"
        )


def check_generator(model: object, tokenizer: object, who: str) -> None:
    """Refuse a generator that is not loaded where ``who`` takes one: a name or folder given for
    the model, or a missing tokenizer, would fail later on a missing attribute."""
    if not hasattr(model, "get_input_embeddings") or not callable(tokenizer):
        where = repr(str(model)) if isinstance(model, str | os.PathLike) else "name_or_path"
        raise InputError(
            f"{who} must be a loaded (model, tokenizer) pair (lenvm.hub.load_generator({where}) loads one), "
            f"got ({type(model).__name__}, {type(tokenizer).__name__})"
        )


def _as_generator(generator):
    """A ``(model, tokenizer)`` pair whose second part may also be a ``transformers`` processor."""
    if generator is None:
        return None
    if not isinstance(generator, tuple | list) or len(generator) != 2:
        raise InputError(
            f"generator must be a loaded (model, tokenizer) pair, got {type(generator).__name__}: load one "
            "with lenvm.hub.load_generator(name_or_path), or leave it out to load the config's"
        )
    model, tokenizer = generator
    check_generator(model, tokenizer, "generator")
    return model, vision.as_tokenizer(tokenizer)


def _check_is_base(model, base: str | os.PathLike) -> None:
    """Refuse a loaded generator that is not the model ``base`` names: a head trained on its hidden
    states would be saved for ``base``, and later read ``base``'s (or fail to load at all).

    A generator named as another model is refused by its name, any other by its weights (one built
    in memory has no name, one built from ``base``'s config has its name): see
    :func:`_check_stored_weights`."""
    from lenvm.hub import same_model

    loaded = getattr(model, "name_or_path", "")
    if loaded and not same_model(loaded, base):
        raise InputError(
            f"the generator passed in is {str(loaded)!r}, not {str(base)!r}: the LenVM would record "
            f"{str(base)!r} and read that model in its place once saved; pass the generator loaded from "
            f"{str(base)!r}, or name {str(loaded)!r} as the base"
        )
    _check_stored_weights(model, base, named=bool(loaded))


def _check_stored_weights(model, base: str | os.PathLike, named: bool) -> None:
    """Refuse a generator whose depth or input embeddings (a few rows of them) differ from those
    stored for ``base``, read from its files without loading the model. A hub model's files are
    looked for in the local cache only: where they are not there, a generator ``named`` as base is
    taken by its name, one without a name is refused."""
    embeddings = embedding_matrix(model)
    if embeddings.is_meta:  # placeholder weights (no data) run nothing a head could learn from
        return
    from lenvm import hub

    location = hub.resolve(base)
    files, config = _stored_weight_files(location), _stored_file(location, "config.json")
    if files is None or config is None or not embeddings.dtype.is_floating_point:
        if named:
            return
        raise InputError(
            f"the generator passed in has no name (built in memory?) and cannot be compared with "
            f"{str(base)!r} (its weights are not on this machine, or the generator's embeddings are "
            "quantized): save it with its tokenizer (save_pretrained) and pass that folder as the base, or "
            f"load {str(base)!r} with lenvm.hub.load_generator"
        )
    from transformers import AutoConfig

    depth = getattr(model.config.get_text_config(), "num_hidden_layers", None)
    stored_depth = getattr(
        AutoConfig.from_pretrained(Path(config).parent).get_text_config(), "num_hidden_layers", None
    )
    shape = tuple(embeddings.shape)
    rows = sorted({round(k * (shape[0] - 1) / (_FINGERPRINT_ROWS - 1)) for k in range(_FINGERPRINT_ROWS)})
    ours = embeddings.detach()[rows].cpu()
    stored = _stored_rows(files, shape, rows)
    if depth != stored_depth:
        differs = f"it has {depth} layers, {str(base)!r} has {stored_depth}"
    elif not stored:
        differs = f"its input embeddings are {shape[0]} x {shape[1]}, {str(base)!r} stores none of that shape"
    elif not any(torch.equal(ours, theirs.to(ours.dtype)) for theirs in stored):
        differs = f"its input embeddings differ from those stored for {str(base)!r}"
    else:
        return
    raise InputError(
        f"the generator passed in is not {str(base)!r}: {differs}; the LenVM would record {str(base)!r} and "
        f"read that model in its place once saved; pass the generator loaded from {str(base)!r}, or save "
        "this one with its tokenizer (save_pretrained) and pass that folder as the base"
    )


# Rows of the input embeddings compared, spread over the vocabulary: another model's differ in
# all of them, and a fine-tuned one's in most.
_FINGERPRINT_ROWS = 8


def _stored_file(location: str, name: str) -> str | None:
    """The path of file ``name`` of a model folder, or of a hub id's in the local cache (nothing is
    downloaded), or None where it is not there."""
    if os.path.isdir(location):
        path = os.path.join(location, name)
        return path if os.path.isfile(path) else None
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(location, name)
    return found if isinstance(found, str) else None


def _stored_weight_files(location: str) -> list[str] | None:
    """The files holding a model's weights (safetensors preferred, sharded or not), or None where
    any is not on this machine."""
    for single in ("model.safetensors", "pytorch_model.bin"):
        if index := _stored_file(location, single + ".index.json"):
            shards = sorted(set(json.loads(Path(index).read_text(encoding="utf-8"))["weight_map"].values()))
            files = [f for f in (_stored_file(location, shard) for shard in shards) if f is not None]
            return files if len(files) == len(shards) else None
        if path := _stored_file(location, single):
            return [path]
    return None


def _stored_rows(files: list[str], shape: tuple[int, ...], rows: list[int]) -> list[torch.Tensor]:
    """``rows`` of every stored tensor of ``shape`` (the input embeddings, and an output layer of
    their shape), read alone: a safetensors file by slices, a PyTorch one memory-mapped."""
    from safetensors import safe_open

    found = []
    for path in files:
        if path.endswith(".safetensors"):
            with safe_open(path, framework="pt") as stored:
                for key in stored.keys():  # noqa: SIM118 (a safetensors file is not iterable)
                    part = stored.get_slice(key)
                    if tuple(part.get_shape()) == shape:
                        found.append(torch.cat([part[r : r + 1] for r in rows]))
        else:
            state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            found += [tensor[rows] for tensor in state.values() if tuple(tensor.shape) == shape]
    return found


def _device_for(device, generator) -> torch.device:
    """Where models loaded beside ``generator`` go: ``device``, else the generator's, else the
    default device."""
    from lenvm.hub import default_device

    if device is None and generator is not None:
        return embedding_matrix(generator[0]).device
    return default_device(device)


def _load_backbone(location: str | os.PathLike, dtype, device):
    """A standalone LenVM's backbone (``AutoModel``: no LM head) and tokenizer; a vision-language
    one's tokenizer carries its image processor."""
    from transformers import AutoModel

    from lenvm.hub import load_tokenizer, torch_dtype

    tokenizer = load_tokenizer(location)
    backbone = AutoModel.from_pretrained(str(location), dtype=torch_dtype(dtype)).to(device)
    if vision.is_vision_language(backbone.config):
        vision.check_supported(backbone.config, f"the backbone {str(location)!r}")
        vision.Processor.load(location, tokenizer)
    return backbone, tokenizer
