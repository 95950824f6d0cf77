"""The end head: where the generator could end next, a second head on an attached LenVM.

The value head predicts how long the generator's answer runs if it is left alone. A target rule
that brings an answer to its end wants something else once it wraps up: how soon the answer
*could* end naturally, at the next position where the generator gives EOS at least the natural
bar (:data:`lenvm.decoding.params.NATURAL_EOS`). The end head predicts that, as a discounted
value like the LenVM's own: ``-(1 - gamma**d)``, ``d`` the tokens left until that position, the
EOS included. Its targets are as free as the LenVM's: one forward of the generator over its own
rollouts gives its EOS probability at every position, and the same forward gives the features
both heads read (an attached LenVM reads the generator's hidden states). It adds nothing to a
decoding step but one small product over states already computed.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch
from numpy.typing import ArrayLike

from lenvm.io import InputError, is_int, is_real
from lenvm.model import LengthValueModel, ValueHead, select_features


def natural_end_distances(eos_probs: ArrayLike, ended: bool, bar: float) -> np.ndarray:
    """For each state ``t`` of a completion (``eos_probs[t]``: the generator's probability of EOS
    as token ``t``), the tokens left until the next state ``j >= t`` whose EOS probability is at
    least ``bar``, EOS included (``j - t + 1``; 1 at such a state itself). The last state counts
    as one where the completion ``ended`` there; after the last such state of a completion cut
    short, NaN (unknown)."""
    p = np.asarray(eos_probs, dtype=np.float64)
    out = np.full(len(p), np.nan)
    upcoming = len(p) - 1 if ended and len(p) else None
    for t in range(len(p) - 1, -1, -1):
        if p[t] >= bar:
            upcoming = t
        if upcoming is not None:
            out[t] = upcoming - t + 1
    return out


@dataclass
class EndData:
    """The end head's training states: their features (``[N, H]``) and tokens left until the
    next natural-end opportunity (``[N]``)."""

    features: torch.Tensor
    distances: torch.Tensor


@torch.no_grad()
def end_data(
    lenvm,
    records: Iterable[dict[str, Any]] | str | os.PathLike,
    bar: float,
    batch_size: int = 8,
    progress: bool = False,
) -> EndData:
    """One forward of the generator over each rollout (an attached ``lenvm``'s backbone, reading
    the prompt's images as training does): the features of every completion state and, from the
    logits, the tokens left until the next natural-end opportunity after it (states with none
    known are left out)."""
    from lenvm.dataset import forward_images, padded_batches

    if lenvm.config.kind != "attached":
        raise InputError("an end head is trained on a LenVM of kind 'attached' (it reads the generator)")
    eos_ids = lenvm.config.eos_token_ids
    lm_head = lenvm.backbone.get_output_embeddings()
    features, distances = [], []
    purpose, desc = "train the end head on", "end head: states"
    for chunk, batch in padded_batches(lenvm, records, purpose, batch_size, progress, desc):
        images = forward_images(lenvm.tokenizer, chunk, lenvm.device)
        out = lenvm.body_output(batch.input_ids, batch.attention_mask, **images)
        feats = select_features(out, lenvm.feature_layer)
        logits = lm_head(out.last_hidden_state).float()
        # The EOS the generator finds most likely, at temperature 1, as a natural end is judged.
        eos = torch.log_softmax(logits, dim=-1)[..., eos_ids].amax(-1).exp()
        for row, e in enumerate(chunk):
            span = slice(e.start, e.start + e.num_states)
            d = torch.from_numpy(natural_end_distances(eos[row, span].cpu().numpy(), e.finished, bar))
            known = ~d.isnan()
            features.append(feats[row, span][known.to(feats.device)].float().cpu())
            distances.append(d[known])
    return EndData(torch.cat(features), torch.cat(distances))


def train_end_head(
    lenvm: LengthValueModel,
    records: Iterable[dict[str, Any]] | str | os.PathLike,
    eval_records: Iterable[dict[str, Any]] | str | os.PathLike | None = None,
    bar: float | None = None,
    epochs: int = 30,
    lr: float = 1e-3,
    batch_states: int = 4096,
    batch_size: int = 8,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, float]:
    """Train ``lenvm``'s end head on rollouts of its generator and set it (its settings go into
    the config, so :meth:`~lenvm.model.LengthValueModel.save_pretrained` keeps it). Gamma follows
    the p99 rule over the training states' distances. Returns the training figures, and with
    ``eval_records`` (rollouts of other prompts) the held-out mean absolute error in tokens beside
    that of the training states' median."""
    from tqdm.auto import tqdm

    from lenvm.decoding.params import NATURAL_EOS
    from lenvm.returns import gamma_from_lengths, length_to_value, value_to_length
    from lenvm.training import cosine_schedule

    bar = NATURAL_EOS if bar is None else float(bar)
    if not 0.0 < bar < 1.0:
        raise InputError(f"the natural-end bar must lie in (0, 1), got {bar!r}")
    if not (is_int(epochs) and epochs >= 1):
        raise InputError(f"epochs must be at least 1, got {epochs!r}")
    if not (is_real(lr) and lr > 0):
        raise InputError(f"the learning rate must be a positive finite number, got {lr!r}")
    if not is_int(batch_states) or batch_states < 1:
        raise InputError(f"batch_states must be an integer of at least 1, got {batch_states!r}")
    data = end_data(lenvm, records, bar, batch_size, progress)
    if len(data.distances) == 0:
        raise InputError("the rollouts have no state with a known next natural end")
    gamma = gamma_from_lengths(data.distances.numpy())
    with torch.random.fork_rng():  # the same seed, the same head, whatever ran before
        torch.manual_seed(seed)
        # The config's __post_init__ fills head_hidden_size from hidden_size.
        head = ValueHead(lenvm.config.hidden_size, cast(int, lenvm.config.head_hidden_size))
    targets = length_to_value(data.distances, gamma).float()
    steps_per_epoch = math.ceil(len(targets) / batch_states)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.0)
    scheduler = cosine_schedule(optimizer, steps_per_epoch * epochs, 0.05)
    shuffle = torch.Generator().manual_seed(seed)
    loss = torch.tensor(0.0)
    for _ in tqdm(range(epochs), desc="end head: training", unit="epoch", disable=not progress):
        for rows in torch.randperm(len(targets), generator=shuffle).split(batch_states):
            loss = (-torch.sigmoid(head(data.features[rows])) - targets[rows]).pow(2).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    head.eval()
    if not math.isfinite(loss.item()):
        raise InputError(
            f"the end head's training diverged (loss {loss.item()}): train it with a lower lr than {lr:g}"
        )
    figures = {"states": float(len(targets)), "gamma": gamma, "final_loss": loss.item()}
    if eval_records is not None:
        held = end_data(lenvm, eval_records, bar, batch_size, progress)
        with torch.no_grad():
            predicted = value_to_length(-torch.sigmoid(head(held.features)).double(), gamma).clamp(min=1.0)
        truth = held.distances
        figures["eval_states"] = float(len(truth))
        figures["eval_mae"] = float((predicted - truth).abs().mean())
        figures["eval_mae_constant"] = float((data.distances.median() - truth).abs().mean())
    lenvm.end_head = head.to(lenvm.device)
    lenvm.config.end_head = {"gamma": gamma, "natural_eos": bar, "training": figures}
    return figures
