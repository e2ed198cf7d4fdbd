"""HTML for tools/report.py: one self-contained page (inline CSS, embedded PNG plots, the
latents' data as inline JSON and a small inline script for the index and the panels; nothing
loaded from elsewhere), so it can be mailed, archived or opened offline."""

from __future__ import annotations

import json
from html import escape
from typing import TYPE_CHECKING

from report_plots import MISSING, LatentHistograms, cosine_histogram, density_histogram

from lightning_sae.progress import progress_bar

if TYPE_CHECKING:
    from report import LatentView, Report

_CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { margin-top: 1.8em; border-bottom: 1px solid #ddd; }
table.metrics { border-collapse: collapse; } table.metrics td, table.metrics th { padding: 2px 14px; border-bottom: 1px solid #eee; }
table.metrics td.value { text-align: right; font-variant-numeric: tabular-nums; }
h3.group { font-size: 1.05em; margin: 1.2em 0 0.3em; text-transform: capitalize; }
dl.info { display: grid; grid-template-columns: max-content auto; gap: 2px 16px; } dl.info dt { color: #666; }
.note { color: #666; }
.browser { display: grid; grid-template-columns: minmax(380px, 38%) 1fr; gap: 16px; align-items: start; }
.index-box { max-height: 80vh; overflow: auto; border: 1px solid #ddd; }
table#latent-index { border-collapse: collapse; width: 100%; font-size: 12.5px; }
#latent-index th { position: sticky; top: 0; background: #f4f4f4; cursor: pointer; text-align: left; padding: 3px 6px; }
#latent-index td { padding: 2px 6px; border-bottom: 1px solid #f0f0f0; font-variant-numeric: tabular-nums; }
#latent-index tr.current { background: #fff3e0; }
.controls { display: flex; gap: 10px; margin: 6px 0; } .controls input { padding: 3px 6px; }
#panel { border: 1px solid #ddd; border-radius: 6px; padding: 8px 14px; min-height: 200px; }
#panel h3 { margin: 4px 0; } .stats { color: #555; }
.columns { display: flex; gap: 24px; flex-wrap: wrap; } .columns ul { margin: 2px 0; padding-left: 18px; font-family: ui-monospace, monospace; font-size: 12.5px; }
.context { font-family: ui-monospace, monospace; white-space: pre-wrap; margin: 3px 0; padding: 3px 6px; background: #fafafa; font-size: 12.5px; }
.context .act { color: #888; margin-right: 8px; }
.tok { border-radius: 2px; } .tok.peak { outline: 1px solid #c05000; }
#dead-latents a { margin-right: 6px; }
"""


def render(report: "Report") -> str:
    histograms = LatentHistograms()
    try:
        data = _latent_data(report, histograms)
    finally:
        histograms.close()
    dead = [view.index for view in report.latents if view.sample_density == 0]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{escape(report.title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{escape(report.title)}</h1>",
        _info(report.info),
        f'<h2 id="latents">Latents <span class="note">(all {len(report.latents)}; click a row, or search, sort, jump)</span></h2>',
        '<div class="browser"><div>',
        '<div class="controls"><input id="search" type="search" placeholder="search: latent number or token text">'
        '<input id="jump" type="number" min="0" placeholder="jump to latent"></div>',
        '<div class="index-box">', _index(report), "</div></div>",
        '<section id="panel"><p class="note">Choose a latent in the index.</p></section></div>',
        f'<h2>Dead latents <span class="note">({len(dead)} never fired in the sample)</span></h2>',
        '<p id="dead-latents">' + (" ".join(f'<a href="#latent-{i}">{i}</a>' for i in dead) or "none") + "</p>",
        "<h2>SAEBench core metrics</h2>",
        _core_tables(report.metrics),
        "<h2>Other metrics</h2>",
        _metrics_table({name: value for name, value in report.metrics.items() if _core_name(name) is None}),
        "<h2>Feature density</h2>",
        _plot(density_histogram(report.density, [view.sample_density for view in report.latents]), "density-histogram",
              f"{sum(d > 0 for d in report.density)} of {len(report.density)} latents fired on the held-out rows; "
              f"{len(report.latents) - len(dead)} fired in the browser's sample."),
        "<h2>Closest other latent</h2>",
        _plot(cosine_histogram(report.max_decoder_cosine), "cosine-histogram",
              "x: each latent's largest cosine with another latent's decoder direction (mean: average_max_decoder_cosine_sim)."),
        f'<script type="application/json" id="latent-data">{_json(data)}</script>',
        # The exact numbers, machine-readable, for anyone comparing reports.
        f'<script type="application/json" id="metrics-json">{_json(report.metrics)}</script>',
        f"<script>{_SCRIPT}</script>",
        "</body></html>",
    ]
    return "\n".join(parts)


def _json(value: object) -> str:
    # "</" cannot end the script element early once escaped; JSON.parse reads "<\/" as "</".
    return json.dumps(value, separators=(",", ":")).replace("</", "<\\/")


def _plot(uri: str | None, name: str, caption: str) -> str:
    image = f'<img id="{name}" alt="{escape(caption)}" src="{uri}">' if uri else f'<p class="note">{MISSING}</p>'
    return f'{image}<p class="note" id="{name}-caption">{escape(caption)}</p>'


def _index(report: "Report") -> str:
    """The table of every latent; its cells' data-value attributes are what the script sorts by."""
    text = report.token_text
    rows = []
    for view in report.latents:
        peak = text.get(view.top[0]["tokens"][view.top[0]["peak"]], "") if view.top else ""
        promoted = text.get(view.promoted[0][0], "") if view.promoted else ""
        neighbour = f"{view.neighbours[0][0]} ({view.neighbours[0][1]:.2f})" if view.neighbours else ""
        cells = [
            (view.index, f'<a href="#latent-{view.index}">{view.index}</a>'),
            (view.density, f"{view.density:.3g}"),
            (view.sample_density, f"{view.sample_density:.3g}"),
            (view.max_activation, f"{view.max_activation:.3g}"),
            (None, escape(repr(peak)[1:-1])),
            (None, escape(repr(promoted)[1:-1])),
            (view.neighbours[0][1] if view.neighbours else 0, escape(neighbour)),
        ]
        tds = "".join(f'<td data-value="{value!r}">{html}</td>' if value is not None else f"<td>{html}</td>" for value, html in cells)
        rows.append(f'<tr data-latent="{view.index}">{tds}</tr>')
    head = "".join(f'<th data-column="{i}" title="{escape(tip)}">{escape(name)}</th>' for i, (name, tip) in enumerate([
        ("latent", "click a header to sort"), ("density", "fraction of held-out tokens it fired on"),
        ("sample", "fraction of the sample's tokens it fired on"), ("max act", "largest activation in the sample"),
        ("top token", "the token of its strongest example"), ("promotes", "the token its decoder direction promotes most"),
        ("nearest", "closest latent by decoder cosine"),
    ]))
    return f'<table id="latent-index"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def _latent_data(report: "Report", histograms: LatentHistograms) -> dict:
    """What the script draws a panel from: token texts once, and per latent its examples (token
    ids with this latent's non-zero activations), bands, effects, neighbours and histogram."""
    bar = progress_bar(len(report.latents), "latent browser histograms", "latent")
    latents = []
    for view in report.latents:
        latents.append(_one_latent(view, histograms))
        bar.update(1)
    bar.close()
    return {"vocab": {str(k): v for k, v in report.token_text.items()}, "latents": latents, "histograms": histograms.available}


def _one_latent(view: "LatentView", histograms: LatentHistograms) -> dict:
    return {
        "i": view.index, "density": view.density, "sample_density": view.sample_density, "max": view.max_activation,
        "scale": view.scale, "hist": histograms(view.histogram) if view.sample_density > 0 else None,
        "top": view.top, "bands": view.bands,
        "promoted": view.promoted, "suppressed": view.suppressed, "neighbours": view.neighbours,
    }


# The index's search, sort and jump, and the panel of the chosen latent (built from #latent-data).
# Opening the page at #latent-N shows latent N; ?q=TEXT starts with that search.
_SCRIPT = r"""
const data = JSON.parse(document.getElementById('latent-data').textContent);
const vocab = data.vocab, rows = Array.from(document.querySelectorAll('#latent-index tbody tr'));
const el = (tag, attrs, text) => { const e = document.createElement(tag); Object.assign(e, attrs || {}); if (text !== undefined) e.textContent = text; return e; };
const fmt = x => Number(x).toPrecision(3);
function filter(query) {
  const q = query.trim().toLowerCase();
  for (const row of rows) {
    const hit = !q || row.dataset.latent === q || row.textContent.toLowerCase().includes(q);
    row.hidden = !hit;
  }
}
function example(ex, scale) {
  const div = el('div', {className: 'context', title: `sample context ${ex.context}, position ${ex.position}`});
  div.appendChild(el('span', {className: 'act'}, fmt(ex.act)));
  ex.tokens.forEach((token, i) => {
    const text = (vocab[token] ?? '?').replace(/\n/g, '\u21b5\n');
    const span = el('span', {className: 'tok'}, text);
    const act = ex.acts[i];
    if (act !== undefined) {
      span.classList.add('active');
      span.title = fmt(act);
      span.dataset.act = act;
      span.style.background = `rgba(255, 120, 0, ${Math.min(1, scale > 0 ? act / scale : 1).toFixed(3)})`;
    }
    if (i === ex.peak) span.classList.add('peak');
    div.appendChild(span);
  });
  return div;
}
function tokenList(title, pairs, cls) {
  const box = el('div', {className: cls});
  box.appendChild(el('b', {}, title));
  const ul = el('ul');
  for (const [token, value] of pairs) ul.appendChild(el('li', {}, `${JSON.stringify(vocab[token] ?? '?')}  ${value >= 0 ? '+' : ''}${fmt(value)}`));
  box.appendChild(ul);
  return box;
}
function show(index) {
  const latent = data.latents[index];
  if (!latent) return;
  const panel = document.getElementById('panel');
  panel.replaceChildren();
  panel.dataset.latent = index;
  panel.appendChild(el('h3', {}, `Latent ${index}`));
  panel.appendChild(el('p', {className: 'stats'}, `density ${fmt(latent.density)} (held out), ${fmt(latent.sample_density)} (sample); ` +
    `max activation ${fmt(latent.max)}; colour scale top ${fmt(latent.scale)} (99th percentile)`));
  if (latent.hist) panel.appendChild(el('img', {src: latent.hist, className: 'histogram', alt: 'activation histogram'}));
  const columns = el('div', {className: 'columns'});
  columns.appendChild(tokenList('promotes', latent.promoted, 'promoted'));
  columns.appendChild(tokenList('suppresses', latent.suppressed, 'suppressed'));
  const near = el('div', {className: 'neighbours'});
  near.appendChild(el('b', {}, 'nearest latents'));
  const ul = el('ul');
  for (const [other, cos] of latent.neighbours) {
    const li = el('li'); li.appendChild(el('a', {href: `#latent-${other}`}, String(other))); li.append(` cos ${fmt(cos)}`); ul.appendChild(li);
  }
  near.appendChild(ul); columns.appendChild(near); panel.appendChild(columns);
  panel.appendChild(el('h4', {}, latent.top.length ? 'Top activations' : 'Never fired in the sample'));
  const top = el('div', {className: 'top-examples'});
  for (const ex of latent.top) top.appendChild(example(ex, latent.scale));
  panel.appendChild(top);
  for (const band of latent.bands) {
    panel.appendChild(el('h4', {}, `Quantile band ${fmt(band.low)} to ${fmt(band.high)}`));
    const box = el('div', {className: 'band-examples'});
    for (const ex of band.examples) box.appendChild(example(ex, latent.scale));
    panel.appendChild(box);
  }
  for (const row of rows) row.classList.toggle('current', row.dataset.latent === String(index));
}
function fromHash() { const m = location.hash.match(/^#latent-(\d+)$/); if (m) show(Number(m[1])); }
document.getElementById('search').addEventListener('input', e => filter(e.target.value));
document.getElementById('jump').addEventListener('change', e => { location.hash = `latent-${e.target.value}`; });
for (const row of rows) row.addEventListener('click', () => { location.hash = `latent-${row.dataset.latent}`; });
let sorted = {};
for (const th of document.querySelectorAll('#latent-index th')) th.addEventListener('click', () => {
  const column = Number(th.dataset.column), sign = sorted[column] = -(sorted[column] || 1);
  const key = row => { const cell = row.children[column]; return cell.dataset.value !== undefined ? Number(cell.dataset.value) : cell.textContent; };
  const body = document.querySelector('#latent-index tbody');
  rows.sort((a, b) => (key(a) > key(b) ? 1 : key(a) < key(b) ? -1 : 0) * sign).forEach(row => body.appendChild(row));
});
window.addEventListener('hashchange', fromHash);
const query = new URLSearchParams(location.search).get('q');
if (query !== null) { document.getElementById('search').value = query; filter(query); }
fromHash();
"""


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


