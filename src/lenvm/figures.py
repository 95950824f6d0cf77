"""PNG figures drawn apart from pyplot.

A library that called ``matplotlib.use("Agg")`` or kept figures in pyplot would change the
process it runs in: a notebook's inline plots stop showing after one ``train()``. Figures made
here are plain :class:`matplotlib.figure.Figure` objects that pyplot never hears of; saving one
renders it with Agg without selecting Agg for anyone else, and it is freed like any object.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from lenvm.io import atomic_path

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def subplots(
    nrows: int = 1, ncols: int = 1, *, figsize: tuple[float, float], **kwargs: Any
) -> tuple[Figure, Any]:
    """A figure and its axes as ``pyplot.subplots`` gives them (``kwargs`` as it takes them),
    leaving pyplot's backend and open figures as they were."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=figsize)
    return figure, figure.subplots(nrows, ncols, **kwargs)


def save_png(figure: Figure, path: str | os.PathLike, crop: bool = False) -> None:
    """Write ``figure`` to ``path`` as a PNG, atomically; ``crop`` trims the margins to what is drawn."""
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=120, bbox_inches="tight" if crop else None)
