"""PNG figures drawn apart from pyplot.

A library that called ``matplotlib.use("Agg")`` or kept figures in pyplot would change the
process it runs in: a notebook's inline plots stop showing after one ``train()``. Figures made
here are plain :class:`matplotlib.figure.Figure` objects that pyplot never hears of; saving one
renders it with Agg without selecting Agg for anyone else, and it is freed like any object.

Text from data (a domain, a token) goes into a figure through :func:`text_label`, which shows it
as it is rather than as matplotlib markup, and legibly in the fonts installed.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from lenvm.io import atomic_path

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from matplotlib.ft2font import FT2Font


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


def text_label(text: str, fontfamily: str | Sequence[str] | None = None) -> str:
    """``text`` for a figure's label, drawn in ``fontfamily`` (None: matplotlib's default), shown
    as it is: ``$`` escaped (two would start math text), and a character none of the family's
    fonts can draw, or one that prints nothing, as its Python escape (``\\u4e2d``): distinct
    texts stay distinct where the fonts lack their script, and matplotlib draws no empty boxes
    and warns of no missing glyph. Where the installed fonts have a script (matplotlib falls back
    through every family listed in ``font.family``), its characters are drawn."""
    fonts = _fonts(fontfamily)
    shown = "".join(
        c if c.isprintable() and any(font.get_char_index(ord(c)) for font in fonts) else _escaped(c)
        for c in text
    )
    return shown.replace("$", r"\$")


def _escaped(character: str) -> str:
    return character.encode("unicode_escape").decode("ascii")


def _fonts(fontfamily: str | Sequence[str] | None) -> list[FT2Font]:
    """The fonts matplotlib draws ``fontfamily`` with: the first installed font of each family
    listed, or matplotlib's default font where none is installed."""
    from matplotlib import font_manager, rcParams

    family = fontfamily or rcParams["font.family"]
    families = [family] if isinstance(family, str) else list(family)
    paths = []
    for name in families:
        try:
            paths.append(
                font_manager.findfont(font_manager.FontProperties(family=[name]), fallback_to_default=False)
            )
        except ValueError:  # not installed
            continue
    if not paths:
        paths.append(font_manager.findfont(font_manager.FontProperties(family=families)))
    return [font_manager.get_font(path) for path in paths]
