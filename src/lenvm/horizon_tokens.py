"""Which tokens shift the length horizon: TD residual statistics per token over rollouts.

A token whose residual ``delta_t = -(1 - gamma) + gamma * V(s_{t+1}) - V(s_t)`` is often below
``-threshold`` tends to make the rest of the answer longer than the model expected ("wait",
"but"); one often above ``+threshold`` makes it shorter ("therefore", "\\n\\n"). The paper, whose
values are the positive mirror ``1 - gamma**l``, states the same with the opposite sign.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any, Literal

import numpy as np

from lenvm.dataset import examples_from_records
from lenvm.figures import save_png, subplots, text_label
from lenvm.io import InputError
from lenvm.model import LengthValueModel
from lenvm.returns import td_residual
from lenvm.training_data import check_rollouts_for
from lenvm.values_view import state_values, token_label

Direction = Literal["longer", "shorter"]
# With no threshold given, a token pushes when its residual is among the strongest tenth of the
# rollouts' residuals: a fixed one means little across LenVMs (a trained one's residuals mostly
# exceed 0.01, and every frequent token then pushes "always").
AUTO_QUANTILE = 0.9


@dataclass
class TokenStat:
    token: str
    count: int = 0
    longer: int = 0  # occurrences with residual < -threshold
    shorter: int = 0  # occurrences with residual > +threshold
    residual_sum: float = 0.0

    @property
    def longer_fraction(self) -> float:
        return self.longer / self.count

    @property
    def shorter_fraction(self) -> float:
        return self.shorter / self.count

    @property
    def mean_residual(self) -> float:
        return self.residual_sum / self.count

    def to_dict(self) -> dict[str, Any]:
        return {
            "token": self.token,
            "count": self.count,
            "longer_fraction": self.longer_fraction,
            "shorter_fraction": self.shorter_fraction,
            "mean_residual": self.mean_residual,
        }


@dataclass
class LengthTokenStats:
    """Residual counts per token string (ids that decode alike are pooled)."""

    gamma: float
    threshold: float = 0.01
    min_count: int = 3
    completions: int = 0
    tokens: dict[str, TokenStat] = field(default_factory=dict)

    def add(self, texts: list[str], residuals: Iterable[float]) -> None:
        """Count one completion: ``texts[t]`` is token ``t`` and ``residuals[t]`` its residual."""
        deltas = np.asarray(residuals, dtype=np.float64)
        if len(texts) != len(deltas):
            raise ValueError(f"{len(texts)} tokens but {len(deltas)} residuals")
        for text, delta in zip(texts, deltas.tolist(), strict=True):
            stat = self.tokens.setdefault(text, TokenStat(text))
            stat.count += 1
            stat.longer += delta < -self.threshold
            stat.shorter += delta > self.threshold
            stat.residual_sum += delta
        self.completions += 1

    @property
    def total_tokens(self) -> int:
        return sum(s.count for s in self.tokens.values())

    def top(self, n: int = 20, direction: Direction = "longer") -> list[TokenStat]:
        """Tokens seen at least ``min_count`` times, most often pushing in ``direction`` first."""
        if direction not in ("longer", "shorter"):
            raise InputError(f"direction must be 'longer' or 'shorter', got {direction!r}")
        frequent = [s for s in self.tokens.values() if s.count >= self.min_count]
        fraction = attrgetter(f"{direction}_fraction")
        sign = -1.0 if direction == "longer" else 1.0  # ties: the stronger mean push first
        ranked = sorted(frequent, key=lambda s: (fraction(s), s.count, sign * s.mean_residual), reverse=True)
        return [s for s in ranked if getattr(s, direction) > 0][:n]

    def to_dict(self, n: int = 20) -> dict[str, Any]:
        return {
            "gamma": self.gamma,
            "threshold": self.threshold,
            "min_count": self.min_count,
            "completions": self.completions,
            "tokens": self.total_tokens,
            "distinct_tokens": len(self.tokens),
            "longer": [s.to_dict() for s in self.top(n, "longer")],
            "shorter": [s.to_dict() for s in self.top(n, "shorter")],
        }

    def plot(self, path: str | os.PathLike, n: int = 15) -> None:
        """PNG bar chart: the top ``n`` tokens in each direction and how often they push."""
        from matplotlib import rcParams

        fig, axes = subplots(1, 2, figsize=(10, max(3.0, 0.32 * n + 1.2)))
        # Tokens in a monospace font, falling back to the fonts the user lists for other scripts.
        token_font = ["monospace", *rcParams["font.family"]]
        panels: tuple[tuple[Direction, str, str], ...] = (
            ("longer", "#e66101", "pushes longer (δ < −{:g})"),
            ("shorter", "#2166ac", "pushes shorter (δ > +{:g})"),
        )
        for ax, (direction, colour, title) in zip(axes, panels, strict=True):
            stats = self.top(n, direction)
            fractions = [getattr(s, f"{direction}_fraction") for s in stats]
            # repr shows whitespace tokens
            labels = [text_label(f"{s.token!r} ({s.count})", token_font) for s in stats]
            ax.barh(range(len(stats)), fractions, color=colour)
            ax.set_yticks(range(len(stats)), labels, fontfamily=token_font)
            ax.invert_yaxis()
            ax.set_xlim(0, 1)
            ax.set_xlabel("share of occurrences")
            ax.set_title(title.format(self.threshold))
            ax.grid(axis="x", alpha=0.3)
            if not stats:
                ax.text(0.5, 0.5, "no token", ha="center", va="center", transform=ax.transAxes)
        fig.suptitle(f"Tokens that shift the length horizon (count ≥ {self.min_count})")
        fig.tight_layout()
        save_png(fig, path)


def length_token_stats(
    lenvm: LengthValueModel,
    records: Iterable[dict[str, Any]],
    threshold: float | None = None,
    min_count: int = 3,
    batch_size: int = 8,
    progress: bool = True,
) -> LengthTokenStats:
    """TD residual statistics of every completion token in the rollout ``records``.

    Uses the generator's own ``completion_token_ids``. A finished completion's last token is
    its EOS (counted as the first EOS token when a stop string ended it); a cut completion's
    last residual uses the model's value at the cut. ``threshold`` None: the
    :data:`AUTO_QUANTILE` quantile of the residuals' magnitudes. The records must be ones the
    LenVM can read, as for calibration (:func:`lenvm.training_data.check_rollouts_for`).
    """
    if threshold is not None and not threshold >= 0:  # NaN too
        raise InputError(f"threshold must be a non-negative number, got {threshold}")
    eos = lenvm.config.eos_token_ids
    records = list(records)
    check_rollouts_for(lenvm, records, "find length tokens in")
    examples, _ = examples_from_records(records, eos, truncated="bootstrap")
    values = state_values(lenvm, examples, batch_size=batch_size, progress=progress)
    texts: dict[int, str] = {}
    completions = []
    for example, v in zip(examples, values, strict=True):
        ids = example.input_ids[example.start + 1 :] + ([eos[0]] if example.finished else [])
        for i in ids:
            if i not in texts:
                texts[i] = token_label(lenvm.tokenizer, i)
        completions.append(([texts[i] for i in ids], td_residual(v, lenvm.gamma)))
    if threshold is None:
        magnitudes = np.abs(np.concatenate([r for _, r in completions])) if completions else np.zeros(1)
        threshold = float(np.quantile(magnitudes, AUTO_QUANTILE))
    stats = LengthTokenStats(lenvm.gamma, threshold, min_count)
    for labels, residuals in completions:
        stats.add(labels, residuals)
    return stats
