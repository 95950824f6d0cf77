"""PNG plots leave the process's matplotlib as the user set it up (a notebook's inline plots)."""

import matplotlib
import matplotlib.pyplot as plt
import pytest

from lenvm.bench.common import Run
from lenvm.bench.serve import _plot as plot_serve_bench
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
