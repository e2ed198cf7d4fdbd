"""HTML for tools/report.py: one self-contained page (inline CSS and SVG, no scripts, no external
assets), so it can be mailed, archived or opened offline."""

from __future__ import annotations

import json
import math
from html import escape
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from report import LatentView, Report

_CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { margin-top: 1.8em; border-bottom: 1px solid #ddd; }
table.metrics { border-collapse: collapse; } table.metrics td, table.metrics th { padding: 2px 14px; border-bottom: 1px solid #eee; }
table.metrics td.value { text-align: right; font-variant-numeric: tabular-nums; }
h3.group { font-size: 1.05em; margin: 1.2em 0 0.3em; text-transform: capitalize; }
dl.info { display: grid; grid-template-columns: max-content auto; gap: 2px 16px; } dl.info dt { color: #666; }
.latent { border: 1px solid #ddd; border-radius: 6px; padding: 8px 12px; margin: 12px 0; }
.latent h3 { margin: 0 0 6px; font-size: 1.05em; } .latent .stats { color: #666; font-weight: normal; }
.context { font-family: ui-monospace, monospace; white-space: pre-wrap; margin: 4px 0; padding: 3px 6px; background: #fafafa; }
.tok { border-radius: 2px; }
.note { color: #666; }
"""


def render(report: "Report") -> str:
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{escape(report.title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{escape(report.title)}</h1>",
        _info(report.info),
        "<h2>SAEBench core metrics</h2>",
        _core_tables(report.metrics),
        "<h2>Other metrics</h2>",
        _metrics_table({name: value for name, value in report.metrics.items() if _core_name(name) is None}),
        "<h2>Feature density</h2>",
        _density_histogram(report.density),
        "<h2>Closest other latent</h2>",
        _cosine_histogram(report.max_decoder_cosine),
        f'<h2>Latents <span class="note">({len(report.latents)} sampled among those that fire on the held-out contexts)</span></h2>',
        *(_latent(view) for view in report.latents),
        # The exact numbers, machine-readable, for anyone comparing reports.
        f'<script type="application/json" id="metrics-json">{escape(json.dumps(report.metrics), quote=False)}</script>',
        "</body></html>",
    ]
    return "\n".join(parts)


def _info(info: dict[str, object]) -> str:
    rows = "".join(f"<dt>{escape(str(k))}</dt><dd>{escape(str(v))}</dd>" for k, v in info.items())
    return f'<dl class="info">{rows}</dl>'


def _core_name(logged: str) -> str | None:
    """`val/l2_ratio` -> `l2_ratio` for a core metric of the training selection; None otherwise."""
    from lightning_sae.evaluation import CORE_GROUPS

    name = logged.removeprefix("val/")
    return name if any(name in names for names in CORE_GROUPS.values()) else None


def _core_tables(metrics: dict[str, float]) -> str:
    """SAEBench's groups, in its order, each with its metrics (token counts are not logged)."""
    from lightning_sae.evaluation import CORE_GROUPS

    parts = []
    for group, names in CORE_GROUPS.items():
        rows = "".join(
            f'<tr><td>{escape(name)}</td><td class="value" data-metric="val/{escape(name)}" data-value="{metrics["val/" + name]!r}">'
            f'{metrics["val/" + name]:.6g}</td><td class="note">{escape(_DESCRIPTIONS.get(name, ""))}</td></tr>'
            for name in names if "val/" + name in metrics
        )
        if rows:
            parts.append(f'<h3 class="group">{escape(group.replace("_", " "))}</h3><table class="metrics" data-group="{group}">{rows}</table>')
    return "".join(parts) or '<p class="note">no core metric was logged</p>'


_DESCRIPTIONS = {
    "kl_div_score": "(KL_ablation - KL_sae) / KL_ablation; 1 is perfect",
    "kl_div_with_ablation": "KL(clean || activation zeroed)",
    "kl_div_with_sae": "KL(clean || reconstruction spliced in)",
    "ce_loss_score": "(CE_ablation - CE_sae) / (CE_ablation - CE_clean); 1 is perfect",
    "ce_loss_with_ablation": "next-token CE with the activation zeroed",
    "ce_loss_with_sae": "next-token CE with the reconstruction spliced in",
    "ce_loss_without_sae": "next-token CE of the clean model",
    "explained_variance": "1 - E||x - x̂||² / Σ_d Var(x_d)",
    "explained_variance_legacy": "per-token mean of 1 - ||x - x̂||² / ||x - batch mean||²",
    "mse": "E||x - x̂||² (summed over dimensions)",
    "cossim": "E cos(x, x̂)",
    "l2_norm_in": "E||x||",
    "l2_norm_out": "E||x̂||",
    "l2_ratio": "E ||x̂|| / ||x||; below 1 is shrinkage",
    "relative_reconstruction_bias": "E||x̂||² / E⟨x, x̂⟩; below 1 is shrinkage",
    "l0": "latents firing per token",
    "l1": "E Σ|z|",
    "freq_over_1_percent": "share of latents firing on > 1% of tokens",
    "freq_over_10_percent": "share of latents firing on > 10% of tokens",
    "normalized_freq_over_1_percent": "share of all firings made by latents firing on > 1% of tokens",
    "normalized_freq_over_10_percent": "share of all firings made by latents firing on > 10% of tokens",
    "average_max_encoder_cosine_sim": "mean over latents of the largest cosine with another latent's encoder row",
    "average_max_decoder_cosine_sim": "mean over latents of the largest cosine with another latent's decoder row",
    "frac_alive": "share of latents that fired on a held-out token",
}


def _metrics_table(metrics: dict[str, float]) -> str:
    rows = "".join(
        f'<tr><td>{escape(name)}</td><td class="value" data-metric="{escape(name)}" data-value="{value!r}">{value:.6g}</td></tr>'
        for name, value in sorted(metrics.items())
    )
    return f'<table class="metrics" id="metrics"><tr><th>metric</th><th>value</th></tr>{rows}</table>'


def _density_histogram(density: list[float], bins: int = 30, width: int = 720, height: int = 220) -> str:
    """Histogram of log10(fraction of tokens a latent fires on) over the latents that fire;
    the latents that never fired are counted in the caption (log10 of 0 has no bar)."""
    alive = [math.log10(d) for d in density if d > 0]
    dead = len(density) - len(alive)
    caption = f"{len(alive)} of {len(density)} latents fired on the held-out rows; {dead} never fired."
    if not alive:
        return f'<p class="note" id="density-caption">{caption}</p>'
    lo, hi = math.floor(min(alive)), 0.0
    step = (hi - lo) / bins or 1.0
    counts = [0] * bins
    for value in alive:
        counts[min(bins - 1, int((value - lo) / step))] += 1
    left, bottom, plot_w, plot_h = 40, 30, width - 50, height - 45
    bar_w, top = plot_w / bins, max(counts)
    bars = "".join(
        f'<rect class="bar" x="{left + i * bar_w:.1f}" y="{10 + plot_h * (1 - c / top):.1f}" width="{bar_w - 1:.1f}" '
        f'height="{plot_h * c / top:.1f}" fill="#4a7bd0"><title>{c} latents, log10 density in '
        f"[{lo + i * step:.2f}, {lo + (i + 1) * step:.2f})</title></rect>"
        for i, c in enumerate(counts)
    )
    ticks = "".join(
        f'<text x="{left + (t - lo) / (hi - lo) * plot_w:.1f}" y="{height - bottom + 18}" font-size="11" text-anchor="middle">1e{t}</text>'
        for t in range(int(lo), 1)
    )
    axes = (
        f'<line x1="{left}" y1="{10 + plot_h}" x2="{left + plot_w}" y2="{10 + plot_h}" stroke="#333"/>'
        f'<text x="{left - 6}" y="16" font-size="11" text-anchor="end">{top}</text>'
        f'<text x="{left - 6}" y="{10 + plot_h}" font-size="11" text-anchor="end">0</text>'
    )
    svg = (
        f'<svg id="density-histogram" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'role="img" aria-label="feature density histogram">{bars}{axes}{ticks}</svg>'
    )
    return f'{svg}<p class="note" id="density-caption">{caption} x: fraction of tokens a latent fires on (log scale); y: latents.</p>'


def _cosine_histogram(values: list[float], bins: int = 40, width: int = 720, height: int = 220) -> str:
    """Histogram of each latent's largest decoder cosine with any other latent: a mass near 1
    means near-duplicate latents."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return '<p class="note" id="cosine-caption">no latent has another to compare with</p>'
    lo, hi = min(0.0, math.floor(min(finite) * 10) / 10), 1.0
    step = (hi - lo) / bins
    counts = [0] * bins
    for value in finite:
        counts[min(bins - 1, max(0, int((value - lo) / step)))] += 1
    left, bottom, plot_w, plot_h = 40, 30, width - 50, height - 45
    bar_w, top = plot_w / bins, max(counts)
    bars = "".join(
        f'<rect class="cosine-bar" x="{left + i * bar_w:.1f}" y="{10 + plot_h * (1 - c / top):.1f}" width="{bar_w - 1:.1f}" '
        f'height="{plot_h * c / top:.1f}" fill="#3a9a6a"><title>{c} latents, max cosine in '
        f"[{lo + i * step:.3f}, {lo + (i + 1) * step:.3f})</title></rect>"
        for i, c in enumerate(counts)
    )
    ticks = "".join(
        f'<text x="{left + (t / 10 - lo) / (hi - lo) * plot_w:.1f}" y="{height - bottom + 18}" font-size="11" '
        f'text-anchor="middle">{t / 10:g}</text>'
        for t in range(int(round(lo * 10)), 11, 2)
    )
    axes = (
        f'<line x1="{left}" y1="{10 + plot_h}" x2="{left + plot_w}" y2="{10 + plot_h}" stroke="#333"/>'
        f'<text x="{left - 6}" y="16" font-size="11" text-anchor="end">{top}</text>'
        f'<text x="{left - 6}" y="{10 + plot_h}" font-size="11" text-anchor="end">0</text>'
    )
    svg = (
        f'<svg id="cosine-histogram" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'role="img" aria-label="largest decoder cosine similarity per latent">{bars}{axes}{ticks}</svg>'
    )
    mean = sum(finite) / len(finite)
    return (f'{svg}<p class="note" id="cosine-caption">x: each latent\'s largest cosine similarity with another latent\'s '
            f"decoder direction (mean {mean:.3f}, the average_max_decoder_cosine_sim); y: latents.</p>")


def _latent(view: "LatentView") -> str:
    header = (
        f'<h3>Latent {view.index} <span class="stats">density {view.density:.3g}, '
        f"max activation {view.max_activation:.3g}</span></h3>"
    )
    contexts = "".join(_context(tokens, view.max_activation) for tokens in view.contexts)
    if not view.contexts:
        contexts = '<p class="note">no activating context found</p>'
    return f'<section class="latent" data-latent="{view.index}">{header}{contexts}</section>'


def _context(tokens: list, scale: float) -> str:
    spans = []
    for token in tokens:
        strength = max(0.0, token.activation) / scale if scale > 0 else 0.0
        style = f' style="background: rgba(255, 120, 0, {strength:.3f})"' if strength > 0 else ""
        active = " active" if token.activation > 0 else ""
        spans.append(
            f'<span class="tok{active}" data-act="{token.activation:.4g}"{style} '
            f'title="{token.activation:.4g}">{escape(token.text)}</span>'
        )
    return f'<div class="context">{"".join(spans)}</div>'
