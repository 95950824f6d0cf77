"""KV-cached forwards over a batch of left-padded rows, and exact scoring of candidate tokens.

A :class:`Stream` is one transformer body (no LM head) with its KV cache, the padding mask of
the cached columns and the next position id of every row. Rows have different lengths: they
are left-padded (in a prefill, and when rows join a running batch); padded columns are masked
out of attention and position ids count real tokens only, so a row computes what it would
compute alone.

Candidate block: to score ``k`` candidate next tokens of every row in ONE forward, they are fed
as a length-``k`` block at the same position id, with a 4D additive mask in which each candidate
sees its row's cached prefix and its own column only, never the other candidates. Each
candidate's hidden state then equals that of appending it alone. :meth:`Stream.keep` afterwards
keeps the chosen candidate's cache entry and drops the others, so the prefix is never recomputed.
:meth:`Stream.advance` moves a stream one token on either way: it keeps the chosen candidate
when a block was fed, and feeds the chosen token otherwise.

In a grouped-query model several query heads share one key/value head. ``transformers``' SDPA
path copies every cached key and value once per query head when a mask is given, as a candidate
block's is; :func:`packed_sdpa` lets the heads of a group ride together instead (the block's
queries stacked per key/value head, the mask repeated per head), the same attention without
the copies. A stream runs its body so while the body's attention is ``"sdpa"``.

A row that leaves to come back later (a retry, which keeps the start of its answer) need not
be prefilled again: :meth:`Stream.prefix` keeps its cache over the tokens it keeps but the last,
and :meth:`Stream.resume` feeds that last token to bring back the hidden states the cache does
not hold.

The cache grows in place: each layer's keys and values are views of a buffer with room behind
them, so a step writes its own columns instead of copying the whole cache (which
``transformers``' own cache does at every step, a cost that grows with the answer).

A forward returns :class:`Hidden`: the final hidden states (for an LM head) and the features a
LenVM head reads (another layer's, when the LenVM's ``feature_layer`` says so), from the same pass.
A *shallow* stream (``shallow``) runs and caches only the layers below a middle feature layer: a
LenVM's own stream needs no more unless something reads the final states (an LM head); its
:class:`Hidden` then holds the features only.

Images (vision-language bodies of the Qwen2-VL family): a row's prefill may carry the pixel
inputs of its prompt's images. The prefill then passes them, with the 3-D multimodal positions of
every row from the model's own rope-index function (:func:`lenvm.vision.rope_positions`), and
each row's next position is its largest position + 1. Every later token (a step, a candidate
block) has three equal position components, so the 1-D position ids of the text path serve
unchanged.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from lenvm.io import InputError
from lenvm.model import (
    can_stop_at,
    context_length,
    embedding_matrix,
    normalized,
    run_until,
    select_features,
)
from lenvm.vision import ImageInputs, model_kwargs, rope_positions


def attention_span(model, what: str) -> int:
    """The most tokens a stream over ``model``'s body computes as the model does: its context, or
    its sliding window where that is shorter (a ``sliding_window`` without per-layer
    ``layer_types``, as in Mistral's configs). A stream's masks let every token see its whole
    prefix, which a window changes only beyond its span. A body that mixes attention kinds across
    layers (``layer_types``) is refused: its cache is not one our streams keep."""
    config = model.config.get_text_config()
    layer_types = getattr(config, "layer_types", None)
    kinds = set(layer_types or ["full_attention"])
    if kinds != {"full_attention"}:
        raise InputError(
            f"{what} uses attention kinds {sorted(kinds)}; lenvm's decoding supports full attention only"
        )
    span = context_length(model)
    window = getattr(config, "sliding_window", None)
    if layer_types or getattr(config, "use_sliding_window", True) is False or not window:
        return span  # with layer_types, a window applies only to the layers they name
    return min(span, int(window))


@dataclass
class Hidden:
    """Hidden states of one forward: ``last`` (final, normed) and ``features`` (the LenVM head's
    input; the same tensor when the head reads the final layer). Indexing applies to both."""

    last: torch.Tensor
    features: torch.Tensor

    def __getitem__(self, index) -> Hidden:
        last = self.last[index]
        return Hidden(last, last if self.features is self.last else self.features[index])

    @classmethod
    def cat(cls, parts: list[Hidden]) -> Hidden:
        last = torch.cat([p.last for p in parts])
        shared = all(p.features is p.last for p in parts)
        return cls(last, last if shared else torch.cat([p.features for p in parts]))

    @classmethod
    def of(cls, output, feature_layer: int) -> Hidden:
        return cls(output.last_hidden_state, select_features(output, feature_layer))

    @classmethod
    def shallow(cls, residual: torch.Tensor) -> Hidden:
        """The features alone (from the residual stream at the feature layer): no final states."""
        features = normalized(residual)
        return cls(features, features)


class Stream:
    """A body with its KV cache over ``B`` rows: ``mask`` is ``[B, T]`` (True = real column).
    ``feature_layer`` is the ``hidden_states`` entry returned as :attr:`Hidden.features`;
    ``last`` holds the hidden states at each row's last kept token (``[B, H]``); ``shallow``:
    only the layers below the feature layer run (see the module doc)."""

    def __init__(
        self,
        body: PreTrainedModel,
        cache,
        mask: torch.Tensor,
        positions: torch.Tensor,
        feature_layer: int = -1,
        last: Hidden | None = None,
        shallow: bool = False,
    ):
        self.body = body
        self.grouped = _grouped_attention_configs(body)  # once: walking the modules costs ~0.5 ms
        self.feature_layer = feature_layer
        self.shallow = shallow
        self.cache = cache
        self.mask = mask
        self.positions = positions
        self.last: Hidden  # set here, by prefill, or (a view fed candidates only) by the first keep
        if last is not None:
            self.last = last
        self.padded = not bool(mask.all())  # kept on the host: a forward must not sync to learn it
        self.pending: Hidden | None = None  # the block fed by the last forward, until keep() or discard()

    @classmethod
    @torch.no_grad()
    def prefill(
        cls,
        body: PreTrainedModel,
        rows: list[list[int]],
        feature_layer: int = -1,
        images: list[ImageInputs | None] | None = None,
        shallow: bool = False,
    ) -> Stream:
        """A stream over the token ids ``rows``, left-padded into one forward; ``images``: the pixel
        inputs of each row's images (None for a row without), for a vision-language body.
        ``shallow``: run only the layers below the feature layer, where the body allows it (a text
        body, a middle feature layer)."""
        from transformers import DynamicCache

        device = next(body.parameters()).device
        width = max(len(r) for r in rows)
        ids = torch.zeros((len(rows), width), dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.bool)
        for i, row in enumerate(rows):
            ids[i, width - len(row) :] = torch.tensor(row)
            mask[i, width - len(row) :] = True
        ids, mask = ids.to(device), mask.to(device)
        attention = None  # no padding: the kernel's causal fast path
        if not bool(mask.all()):
            # Causal over real tokens; a padding position sees itself only, which keeps it finite.
            causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
            eye = torch.eye(width, dtype=torch.bool, device=device)
            attention = _additive(causal & mask[:, None, :] | eye, _dtype(body))
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        following = mask.sum(1)
        pixels = ImageInputs.cat(images or [])
        if pixels is not None:
            pixels = pixels.to(device)
            positions = rope_positions(body, ids, mask, pixels)
            following = positions.amax(dim=(0, 2)) + 1
        shallow = shallow and pixels is None and can_stop_at(body, feature_layer)
        stream = cls(body, DynamicCache(), mask, following, feature_layer, shallow=shallow)
        stream.last = stream._run(ids, attention, positions, **model_kwargs(pixels))[:, -1]
        _grow_in_place(stream.cache)
        return stream

    @torch.no_grad()
    def prefix(self, row: int, length: int) -> Stream:
        """A new one-row stream over the first ``length`` tokens of row ``row``, in tensors of its
        own (this stream's may then be freed), without :attr:`last`: the cache does not hold the
        hidden states at a row's last token, so :meth:`resume` feeds the row's next token. Its
        next position counts back from the row's by the tokens cut off, as those of text do (the
        3-D positions of a prompt's image tokens do not: cut after them)."""
        from transformers import DynamicCache

        real = int(self.mask[row].sum())
        start = self.mask.shape[1] - real  # rows are left-padded
        columns = slice(start, start + length)
        # Copies, so that the batch's buffer can go (the cache itself may or may not copy).
        cache = DynamicCache(
            ddp_cache_data=[
                (
                    layer.keys[row : row + 1, :, columns].clone(),
                    layer.values[row : row + 1, :, columns].clone(),
                )
                for layer in self.cache.layers
            ]
        )
        _grow_in_place(cache)
        mask = torch.ones((1, length), dtype=torch.bool, device=self.mask.device)
        positions = self.positions[row : row + 1] - (real - length)
        return Stream(self.body, cache, mask, positions, self.feature_layer, shallow=self.shallow)

    @classmethod
    @torch.no_grad()
    def resume(cls, prefixes: list[Stream], tokens: list[int]) -> Stream:
        """One stream over the rows of ``prefixes`` (see :meth:`prefix`), each fed its next token
        of ``tokens``: what a prefill of each row's prefix and token gives, for one single-token
        forward instead of a forward over every token again. The prefixes are consumed."""
        stream = cls.cat(prefixes)
        stream.feed(torch.tensor(tokens, device=stream.mask.device)[:, None])
        return stream

    @property
    def batch_size(self) -> int:
        return self.mask.shape[0]

    def _tensors(self) -> list[tuple[object, str]]:
        return [(layer, name) for layer in self.cache.layers for name in ("keys", "values")]

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor) -> Hidden:
        """Feed ``tokens`` (``[B, k]``) as candidates for the next position; returns ``[B, k, H]``.

        With ``k == 1`` this is an ordinary decoding step. Call :meth:`keep` or :meth:`discard`
        before the next forward.
        """
        batch, k = tokens.shape
        mask = None  # one token and nothing to hide: the attention kernel's fast path
        if k > 1 or self.padded:
            # Each candidate sees its row's real prefix and itself, not the other candidates.
            eye = torch.eye(k, dtype=torch.bool, device=tokens.device).expand(batch, k, k)
            allowed = torch.cat([self.mask[:, None, :].expand(batch, k, -1), eye], dim=-1)
            mask = _additive(allowed, _dtype(self.body))
        self.pending = self._run(tokens, mask, self.positions[:, None].expand(batch, k))
        return self.pending

    def _run(self, ids: torch.Tensor, attention, positions: torch.Tensor, **extra) -> Hidden:
        """One forward of the body over ``ids``, appended to the cache."""
        inputs = {
            "input_ids": ids,
            "attention_mask": attention,
            "position_ids": positions,
            "use_cache": True,
            cache_argument(type(self.body)): self.cache,
            **extra,
        }
        with packed_attention(self.grouped):
            if self.shallow:
                return Hidden.shallow(run_until(self.body, self.feature_layer, **inputs))
            return Hidden.of(
                self.body(**inputs, output_hidden_states=self.feature_layer != -1), self.feature_layer
            )

    @torch.no_grad()
    def keep(self, choice: torch.Tensor | None = None) -> None:
        """Keep the cache entry of candidate ``choice[b]`` of every row (the only one when ``k == 1``)."""
        block, self.pending = self.pending, None
        if block is None:
            raise ValueError("nothing to keep: feed a block with forward() first")
        k = block.last.shape[1]
        rows = torch.arange(self.batch_size, device=self.mask.device)
        if k > 1:
            if choice is None:
                raise ValueError(f"a block of {k} candidates per row: say which one to keep")
            start = self.mask.shape[1]
            for layer, name in self._tensors():
                kv = getattr(layer, name)
                kv[:, :, start] = kv[rows, :, start + choice]
                setattr(layer, name, kv[:, :, : start + 1])
            self.last = block[rows, choice]
        else:
            self.last = block[:, 0]
        real = torch.ones((self.batch_size, 1), dtype=torch.bool, device=self.mask.device)
        self.mask = torch.cat([self.mask, real], dim=1)
        self.positions = self.positions + 1

    @torch.no_grad()
    def discard(self) -> None:
        """Drop the block fed by the last forward without keeping any of it."""
        if self.pending is not None:
            self.pending = None
            start = self.mask.shape[1]
            for layer, name in self._tensors():
                setattr(layer, name, getattr(layer, name)[:, :, :start])

    @torch.no_grad()
    def advance(self, choice: torch.Tensor, token: torch.Tensor) -> None:
        """Move every row one token on: keep candidate ``choice`` of a block fed for scoring, or
        feed ``token`` (``[B]``) when none was."""
        if self.pending is not None:
            self.keep(choice)
        else:
            self.forward(token[:, None])
            self.keep()

    @torch.no_grad()
    def feed(self, tokens: torch.Tensor) -> None:
        """Drop any pending block and feed ``tokens`` (``[B, n]``), one position at a time."""
        self.discard()
        for j in range(tokens.shape[1]):
            self.forward(tokens[:, j : j + 1])
            self.keep()

    @torch.no_grad()
    def select(self, rows: torch.Tensor) -> None:
        """Keep only ``rows``, and drop leading columns that are padding in every remaining row."""
        self.mask = self.mask[rows]
        self.positions = self.positions[rows]
        self.last = self.last[rows]
        start = int(self.mask.any(0).to(torch.int8).argmax())
        for layer, name in self._tensors():
            setattr(layer, name, getattr(layer, name)[rows, :, start:])
        self.mask = self.mask[:, start:]
        self.padded = not bool(self.mask.all())

    @classmethod
    @torch.no_grad()
    def cat(cls, streams: list[Stream]) -> Stream:
        """One stream with the rows of ``streams`` (same body), left-padded to a common length.

        The streams are consumed: the result reuses the first one's cache object."""
        if len({s.shallow for s in streams}) > 1:
            raise ValueError("cannot join a shallow stream and a full one: their caches hold other layers")
        width = max(s.mask.shape[1] for s in streams)
        first = streams[0]
        mask = torch.cat([F.pad(s.mask, (width - s.mask.shape[1], 0)) for s in streams])
        positions = torch.cat([s.positions for s in streams])
        for index, (layer, name) in enumerate(first._tensors()):
            parts = []
            for s in streams:
                kv = getattr(*s._tensors()[index])
                parts.append(F.pad(kv, (0, 0, width - kv.shape[2], 0)))
            setattr(layer, name, torch.cat(parts))
        # A stream over prefixes has no last hidden states until it is fed (see prefix).
        known = all("last" in vars(s) for s in streams)
        last = Hidden.cat([s.last for s in streams]) if known else None
        return cls(first.body, first.cache, mask, positions, first.feature_layer, last, first.shallow)


def cache_argument(body_type: type[nn.Module]) -> str:
    """The name under which a body's ``forward`` takes its KV cache: ``cache`` in recent
    ``transformers`` releases (which deprecate ``past_key_values``), else ``past_key_values``."""
    # mypy takes a class for unhashable against functools.cache's Hashable (python/mypy#11470).
    return _cache_argument(body_type)  # type: ignore[arg-type]


@functools.cache
def _cache_argument(body_type: type[nn.Module]) -> str:
    parameters = inspect.signature(body_type.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def _grow_in_place(cache) -> None:
    """Make every layer of ``cache`` append in place (see :func:`_append_in_place`)."""
    for layer in cache.layers:
        layer.update = functools.partial(_append_in_place, layer)


def _append_in_place(layer, keys: torch.Tensor, values: torch.Tensor, *args, **kwargs):
    """A cache layer's ``update``: append ``keys`` and ``values`` (``[B, heads, q, d]``) along the
    sequence axis. ``transformers`` concatenates, copying the whole cache at every step; here the
    cache is a view of a buffer with room behind it, and a step writes its q columns only."""
    layer.keys = _appended(layer.keys, keys)
    layer.values = _appended(layer.values, values)
    return layer.keys, layer.values


def _appended(cached: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """``cached`` followed by ``new`` on axis 2: in place, in the room its buffer has behind it (its
    heads' stride says how many columns that buffer holds), else in a new buffer with room for
    half as many columns again. (An empty ``cached``, as a prefix of no tokens holds, has strides
    that say nothing of a buffer.)"""
    batch, heads, n, dim = cached.shape
    total = n + new.shape[2]
    stride = cached.stride()
    roomy = stride[0] == heads * stride[1] and stride[1] >= total * dim
    if n and stride[3] == 1 and stride[2] == dim and roomy:
        grown = cached.as_strided((batch, heads, total, dim), stride)
    else:
        room = total + max(total // 2, 16)
        grown = cached.new_empty((batch, heads, room, dim))[:, :, :total]
        grown[:, :, :n] = cached
    grown[:, :, n:] = new
    return grown


def _dtype(body: PreTrainedModel) -> torch.dtype:
    return embedding_matrix(body).dtype


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean ``[B, q, kv]`` visibility mask as the ``[B, 1, q, kv]`` mask attention adds."""
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


PACKED_SDPA = "lenvm_packed_sdpa"


def packed_sdpa(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """SDPA attention (``transformers``' signature) that, for several queries of a grouped-query
    model under a mask shared by all heads (``[B, 1, q, kv]``), runs each key/value head once
    for the queries of all the heads that share it, instead of copying the keys and values per
    head. Anything else goes to ``transformers``' own SDPA function, and so does a long block
    (a padded prefill), where the mask repeated per head would outgrow the copies it saves."""
    batch, heads, length, dim = query.shape
    groups = getattr(module, "num_key_value_groups", 1)
    if (
        groups == 1
        or length == 1
        or groups * length > 2 * heads * dim  # mask rows added against key and value rows copied
        or attention_mask is None
        or attention_mask.dim() != 4
        or attention_mask.shape[1] != 1
        or kwargs.get("position_bias") is not None
        or module.training
    ):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    # Head h reads key/value head h // groups: its queries go to that head's block of rows.
    query = query.reshape(batch, heads // groups, groups * length, dim)
    mask = attention_mask.expand(batch, groups, length, -1).reshape(batch, 1, groups * length, -1)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=kwargs.get("scaling"))
    return out.reshape(batch, heads, length, dim).transpose(1, 2).contiguous(), None


AttentionInterface.register(PACKED_SDPA, packed_sdpa)


@contextmanager
def packed_attention(grouped: list) -> Iterator[None]:
    """Run the grouped-query attention layers that read the configs ``grouped`` (see
    :func:`_grouped_attention_configs`) with :func:`packed_sdpa` while their implementation is
    ``"sdpa"`` (the same attention: others, such as eager or flash attention, are left as they
    are), and restore it afterwards."""
    configs = [c for c in grouped if c._attn_implementation == "sdpa"]
    for config in configs:
        config._attn_implementation = PACKED_SDPA
    try:
        yield
    finally:
        for config in configs:
            config._attn_implementation = "sdpa"


def _grouped_attention_configs(body: nn.Module) -> list:
    """The configs the grouped-query attention layers of ``body`` read their implementation from
    (one for a text model; a vision-language model's language layers read its text config)."""
    configs = {}
    for module in body.modules():
        if getattr(module, "num_key_value_groups", 1) > 1 and hasattr(module, "config"):
            configs[id(module.config)] = module.config
    return list(configs.values())
