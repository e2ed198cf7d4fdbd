"""The latent browser's plots: matplotlib figures as PNG data URIs embedded in the page.

matplotlib is the `plots` extra (`pip install -e ".[plots]"`); without it the page says so in
place of each plot and is otherwise complete."""

from __future__ import annotations

import base64
import io
import math

from report_stats import HIST_BINS, HIST_LOG10_RANGE

try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter
except ImportError:  # the page is still complete without its plots
    plt = None

MISSING = "matplotlib is not installed (pip install -e '.[plots]'): no plot"


def _png(figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def density_histogram(validation: list[float], sample: list[float]) -> str | None:
    """log10 feature density of the latents that fired, on the held-out rows and on the sample."""
    if plt is None:
        return None
    figure, axis = plt.subplots(figsize=(7.2, 2.6), dpi=100, layout="constrained")
    for values, label, colour in ((validation, "held-out rows", "#4a7bd0"), (sample, "browser sample", "#e08a2c")):
        alive = [math.log10(v) for v in values if v > 0]
        if alive:
            axis.hist(alive, bins=40, alpha=0.6, label=f"{label} ({len(alive)} fired)", color=colour)
    axis.set_xlabel("log10 fraction of tokens a latent fires on")
    axis.set_ylabel("latents")
    axis.legend(fontsize=8)
    try:
        return _png(figure)
    finally:
        plt.close(figure)


def cosine_histogram(values: list[float]) -> str | None:
    """Each latent's largest decoder cosine with another latent: mass near 1 is near-duplicates."""
    finite = [v for v in values if math.isfinite(v)]
    if plt is None or not finite:
        return None
    figure, axis = plt.subplots(figsize=(7.2, 2.4), dpi=100, layout="constrained")
    axis.hist(finite, bins=40, color="#3a9a6a")
    axis.set_xlabel("largest cosine with another latent's decoder direction")
    axis.set_ylabel("latents")
    try:
        return _png(figure)
    finally:
        plt.close(figure)


class LatentHistograms:
    """Small per-latent activation histograms, drawn on one reused figure (thousands of latents)."""

    def __init__(self) -> None:
        self.available = plt is not None
        if not self.available:
            return
        lo, hi = HIST_LOG10_RANGE
        self.edges = [10 ** (lo + (hi - lo) * i / HIST_BINS) for i in range(HIST_BINS + 1)]
        self.figure, self.axis = plt.subplots(figsize=(3.4, 1.3), dpi=80, layout="constrained")

    def __call__(self, counts: list[int]) -> str | None:
        """A PNG of one latent's histogram (x: activation, log scale, cut to the bins it uses)."""
        if not self.available or not any(counts):
            return None
        used = [i for i, c in enumerate(counts) if c]
        first, last = used[0], used[-1] + 1
        axis = self.axis
        axis.clear()
        axis.stairs(counts[first:last], self.edges[first : last + 1], fill=True, color="#e08a2c")
        axis.set_xscale("log")
        # A span under a decade gets labelled minor ticks by default, and they overprint each other.
        axis.xaxis.set_minor_formatter(NullFormatter())
        axis.set_xlabel("activation", fontsize=7)
        axis.set_ylabel("count", fontsize=7)
        axis.tick_params(labelsize=6)
        return _png(self.figure)

    def close(self) -> None:
        if self.available:
            plt.close(self.figure)
