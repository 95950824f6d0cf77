"""PNG plots leave the process's matplotlib as the user set it up (a notebook's inline plots), and
show text from data as it is written."""

import io

import matplotlib
import matplotlib.pyplot as plt
import pytest
from matplotlib import cbook

from lenvm import horizon_tokens
from lenvm.bench import predict
from lenvm.bench.common import Run
from lenvm.bench.serve import _plot as plot_serve_bench
from lenvm.figures import subplots, text_label
from lenvm.horizon_tokens import LengthTokenStats
from lenvm.training import plot_losses


@pytest.fixture
def user_matplotlib():
    """A backend other than Agg, chosen by the user, and one figure of theirs open in pyplot."""
    before = matplotlib.get_backend()
    matplotlib.use("svg")
    figure = plt.figure()
    yield
    plt.close(figure)
    matplotlib.use(before)


def _untouched() -> bool:
    return matplotlib.get_backend() == "svg" and plt.get_fignums() == [1]


def test_loss_plot_leaves_backend_and_figures(user_matplotlib, tmp_path):
    plot_losses([1.0, 0.5], tmp_path / "loss.png")
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert _untouched()


def test_token_plot_leaves_backend_and_figures(user_matplotlib, tmp_path):
    LengthTokenStats(gamma=0.9).plot(tmp_path / "tokens.png")
    assert (tmp_path / "tokens.png").read_bytes()[:4] == b"\x89PNG"
    assert _untouched()


def test_bench_plot_leaves_backend_and_figures(user_matplotlib, tmp_path):
    row = dict(mode="plain", clients=1, tokens_per_s=10.0, latency_p50=0.1, latency_p99=0.2)
    with Run(tmp_path / "bench", {}) as run:
        plot_serve_bench(run, [row])
    assert (tmp_path / "bench" / "serve.png").read_bytes()[:4] == b"\x89PNG"
    assert _untouched()


# Text from data: math markup, CJK (where no installed font draws it, it must come out escaped, and
# without matplotlib's missing-glyph warnings), a legend-hiding "_". The tests below turn warnings
# into errors: a missing glyph warns while a figure is drawn.
DOMAINS = ["tex $\\frac$", "a $x$ b", "中文", "果", "_hidden", "line\nbreak"]


def _draw(figure) -> None:
    figure.savefig(io.BytesIO(), format="png")


@pytest.mark.filterwarnings("error")
def test_labels_show_text_as_written_and_distinct():
    labels = [text_label(d) for d in DOMAINS]
    assert len(set(labels)) == len(labels)
    assert not any(cbook.is_math_text(label) for label in labels)
    assert text_label("tex $\\frac$") == "tex \\$\\frac\\$"  # matplotlib shows "\$" as "$"
    assert text_label("line\nbreak") == "line\\nbreak"
    figure, ax = subplots(figsize=(4, 3))
    ax.set_xticks(range(len(labels)), labels)
    for family in (None, "monospace"):
        ax.set_title(" ".join(text_label(d, family) for d in DOMAINS), fontfamily=family)
        _draw(figure)


@pytest.mark.filterwarnings("error")
def test_labels_fall_back_through_the_fonts_listed():
    """cmr10 (shipped with matplotlib) has no "ü"; listed after it, DejaVu Sans draws it."""
    for families, shown in ((["cmr10"], "\\xfcber"), (["cmr10", "DejaVu Sans"], "über")):
        with matplotlib.rc_context({"font.family": families, "axes.formatter.use_mathtext": True}):
            assert text_label("über") == shown
            figure, ax = subplots(figsize=(2, 2))
            ax.set_title(shown)
            _draw(figure)


@pytest.mark.filterwarnings("error")
def test_token_plot_draws_any_token(monkeypatch, tmp_path):
    """Tokens in a monospace font, falling back to font.family's (matplotlib's DejaVu Sans has
    the emoji its DejaVu Sans Mono lacks); what neither draws is escaped."""
    stats = LengthTokenStats(gamma=0.9, threshold=0.01, min_count=1)
    stats.add(["中", "果", "$x$", "\u200b", "😀"], [-0.5, -0.4, -0.3, 0.2, 0.1])
    figures = []
    monkeypatch.setattr(horizon_tokens, "save_png", lambda figure, path: figures.append(figure))
    stats.plot(tmp_path / "tokens.png")
    longer, shorter = ([t.get_text() for t in ax.get_yticklabels()] for ax in figures[0].axes)
    assert longer == ["'\\u4e2d' (1)", "'\\u679c' (1)", "'\\$x\\$' (1)"]
    assert shorter == ["'\\u200b' (1)", "'😀' (1)"]
    _draw(figures[0])


@pytest.mark.filterwarnings("error")
def test_prediction_plots_label_every_domain(monkeypatch, tmp_path):
    rows = [
        {"prompt_id": str(k), "domain": d, "truth": 10.0 + k, "lenvm": 12.0 + k, "mean": 15.0}
        for k, d in enumerate(DOMAINS)
    ]
    scores = {"mre": 0.2, "mae": 2.0, "spearman": 0.5}
    results = {
        "per_prompt": rows,
        "cross_per_prompt": {DOMAINS[0]: rows[:1]},
        "metrics": {d: {"lenvm": scores, "mean": scores} for d in DOMAINS},
    }
    figures = {}
    monkeypatch.setattr(predict, "save_png", lambda figure, path, crop: figures.setdefault(path.name, figure))
    predict._plot(tmp_path, results)
    legend = figures["calibration.png"].axes[0].get_legend().get_texts()
    assert [t.get_text() for t in legend] == [text_label(d) for d in sorted(DOMAINS)]
    ticks = figures["prediction.png"].axes[0].get_xticklabels()
    assert [t.get_text() for t in ticks] == [text_label(d) for d in DOMAINS]
    for figure in figures.values():
        _draw(figure)
