"""The training loss of a LenVM: pure functions that both trainers share.

Per supervised state, the prediction ``V`` and the target ``G`` both lie in ``(-1, 0]``:

- ``mse``: ``(V - G)**2``, the paper's loss.
- ``huber``: ``0.5 (V - G)**2`` where ``|V - G| <= delta``, ``delta (|V - G| - delta / 2)`` beyond
  (smooth L1). Values lie in ``(-1, 0)``, so no error reaches 1: with the released recipes'
  ``delta = 1`` Huber is exactly half the squared error, which Adam's scale-free steps make the
  same optimisation as MSE. A smaller ``delta`` makes large errors count linearly.
- ``bce``: binary cross-entropy of ``q = -V`` against ``p = -G = 1 - gamma**l``, the form the
  recipes offer; we subtract the entropy of ``p`` (which does not depend on the model), so the
  figure is the Bernoulli KL divergence: same gradients, and 0 at a perfect fit.

Relative loss (our definition; the recipes name one without defining it): with weight
``w > 0`` each state adds ``w * |l(V) - l(G)| / max(l(G), 1)``, the error of the predicted
remaining length relative to the target's, both read in tokens through
:func:`lenvm.returns.value_to_length`. It weighs an error of 5 tokens on a 10-token remainder
like one of 50 on 100, where the value-space losses weigh errors near the end of a completion
much more.

Prompt weight (our option, off at 1): the state ``s_0`` at the end of each prompt counts
``w`` times. It is one state among a completion's hundreds, yet it is the one a length prediction
from the prompt reads; weighing it more asks the head to fit what tells prompts apart.

Aggregation over the supervised states of a batch, as the sum of per-state losses times a
per-state weight, divided by a count. ``token-mean`` (the paper's; weight 1, divided by the
number of states) gives every supervised state the same weight; ``seq-mean-token-mean``
(weight ``1/n`` for a completion of ``n`` states, divided by the number of completions) gives
every completion the same weight; ``seq-mean-token-sum`` (weight 1, divided by the number of
completions) sums within a completion and averages across them. Because weights and counts
add up, any split of a batch into micro-batches and processes yields the same loss when each
part's weighted sum is divided by the whole batch's count (:func:`aggregation_count`).
"""

from __future__ import annotations

from typing import Literal, get_args

import torch

from lenvm.returns import value_to_length

Loss = Literal["mse", "huber", "bce"]
Aggregation = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"]
LOSSES: tuple[str, ...] = get_args(Loss)
AGGREGATIONS: tuple[str, ...] = get_args(Aggregation)

_EPS = 1e-7  # keeps log(q) and log(1 - q) finite when the head saturates


def pointwise_loss(
    values: torch.Tensor, targets: torch.Tensor, loss: Loss = "mse", huber_delta: float = 1.0
) -> torch.Tensor:
    """The value-space loss of each state (no reduction); see the module docstring."""
    if loss == "mse":
        return (values - targets) ** 2
    if loss == "huber":
        return torch.nn.functional.huber_loss(values, targets, reduction="none", delta=huber_delta)
    if loss == "bce":
        # In float32 at least: 1 - _EPS is 1 in half precision, where log(1 - q) would be -inf.
        dtype = torch.promote_types(values.dtype, torch.float32)
        q = (-values.to(dtype)).clamp(_EPS, 1.0 - _EPS)
        p = (-targets.to(dtype)).clamp(0.0, 1.0)
        xlogy = torch.special.xlogy
        return xlogy(p, p) - xlogy(p, q) + xlogy(1.0 - p, 1.0 - p) - xlogy(1.0 - p, 1.0 - q)
    raise ValueError(f"unknown loss {loss!r}; expected one of {LOSSES}")


def relative_length_error(values: torch.Tensor, targets: torch.Tensor, gamma: float) -> torch.Tensor:
    """``|l(V) - l(G)| / max(l(G), 1)`` per state, in tokens (the relative loss)."""
    predicted = value_to_length(values, gamma)
    true = value_to_length(targets.detach(), gamma)
    return (predicted - true).abs() / true.clamp(min=1.0)


def state_losses(
    values: torch.Tensor,
    targets: torch.Tensor,
    gamma: float,
    loss: Loss = "mse",
    huber_delta: float = 1.0,
    relative_weight: float = 0.0,
) -> torch.Tensor:
    """The loss of each state: :func:`pointwise_loss` plus the weighted relative loss."""
    out = pointwise_loss(values, targets, loss, huber_delta)
    if relative_weight:
        out = out + relative_weight * relative_length_error(values, targets, gamma)
    return out


def state_weights(
    completion_states: torch.Tensor,
    aggregation: Aggregation,
    at_prompt: torch.Tensor | None = None,
    prompt_weight: float = 1.0,
) -> torch.Tensor:
    """Each state's weight, given the number of supervised states of its completion; a state
    ``at_prompt`` (its completion's ``s_0``) counts ``prompt_weight`` times."""
    if aggregation == "seq-mean-token-mean":
        weights = 1.0 / completion_states.float()
    elif aggregation in ("token-mean", "seq-mean-token-sum"):
        weights = torch.ones_like(completion_states, dtype=torch.float32)
    else:
        raise ValueError(f"unknown aggregation {aggregation!r}; expected one of {AGGREGATIONS}")
    if at_prompt is None or prompt_weight == 1.0:
        return weights
    return torch.where(at_prompt, weights * prompt_weight, weights)


def aggregation_count(states: float, completions: float, aggregation: Aggregation) -> float:
    """What the weighted sum of a batch is divided by: its states or its completions."""
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {aggregation!r}; expected one of {AGGREGATIONS}")
    return states if aggregation == "token-mean" else completions


def sampled_states_count(
    batch_states: int, train_states: int, train_completions: int, aggregation: Aggregation
) -> float:
    """The count for a batch of states drawn uniformly from a training set (head training).

    Dividing the batch's weighted sum by this gives an unbiased estimate of the whole training
    set's aggregated loss: ``batch_states * aggregation_count(set) / train_states``. For
    ``token-mean`` that is the batch mean.
    """
    whole = aggregation_count(train_states, train_completions, aggregation)
    return batch_states * whole / train_states
