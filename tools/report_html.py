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
        "<h2>Metrics</h2>",
        _metrics_table(report.metrics),
        "<h2>Feature density</h2>",
        _density_histogram(report.density),
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
