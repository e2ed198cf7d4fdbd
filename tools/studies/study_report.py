"""The studies' report: markdown tables (mean over seeds, with the seed-to-seed spread) and PNG
plots, from the finished runs study_results.completed finds (run folders, the committed results
folder, and recovered tables).

Spread is half the range over seeds (max - min) / 2, written "0.9712 ± 0.0011 (2)" with the
number of seeds in brackets; one seed shows no spread. Plots need matplotlib (the `plots` extra);
without it the tables are written and the report says the plots were skipped.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import NamedTuple

from study_data import CacheSpec
from study_runs import RunSpec, scale_matched

GSAE_METRICS = (("explained_variance", "explained var."), ("ce_loss_score", "CE loss score"),
                ("kl_div_score", "KL div score"), ("frac_alive", "alive on val"), ("dead_fraction", "dead frac."))
PAPER_THRESHOLDS = (0.005, 0.01, 0.015, 0.02)
# The variant tables' columns (a table shows those its runs have).
VARIANT_METRICS = (("val/jacobian_at_x/count_above_0.01", "count abs(J) > 0.01 at x"), ("val/jacobian_at_x/l1", "mean abs(J) at x"),
                   ("val/sae_in/explained_variance", "sae_in EV"), ("val/sae_out/explained_variance", "sae_out EV"),
                   ("val/sae_out/ce_loss_score", "sae_out CE score"), ("val/explained_variance", "EV"),
                   ("val/ce_loss_score", "CE score"), ("val/plain_topk/ce_loss_score", "CE score, plain TopK sel."),
                   ("val/frac_alive", "alive on val"))
# What a curve over training tokens follows, per study (table, gap trend and plot alike).
CURVE_METRIC = {"gsae": "val/ce_loss_score", "jsae": "val/sae_out/explained_variance"}


START, END = "<!-- study_report: start -->", "<!-- study_report: end -->"


def tokens_label(tokens: int) -> str:
    return f"{tokens / 1e6:g}M" if tokens >= 1e6 else f"{tokens / 1e3:g}k" if tokens >= 1e3 else str(tokens)


def half_range(values: list[float]) -> float:
    """The seed spread the report uses: half the range over the measured values (0 for one)."""
    values = [v for v in values if not math.isnan(v)]
    return (max(values) - min(values)) / 2 if values else float("nan")


def summary(values: list[float]) -> str:
    values = [v for v in values if not math.isnan(v)]  # NaN: not measured
    if not values:
        return "n/a"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.4f} (1)"
    return f"{mean:.4f} ± {half_range(values):.4f} ({len(values)})"


def _mean(values: list[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return statistics.fmean(values) if values else float("nan")


def _groups(results: list[dict], study: str, **match) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for result in results:
        run = result["run"]
        if run["study"] == study and all(run[key] == value for key, value in match.items()):
            key = (run["layer"], run["k"], run["beta"], run["jacobian_coefficient"], run["tokens"])
            if run.get("normalized") or run.get("grad_normalize"):
                continue  # reported in their own table
            groups[key].append(result)
    return groups


def gsae_rows(results: list[dict], tokens: int) -> list[tuple[int, int, str, str, list[dict]]]:
    """(layer, k, row label, validation mode, results) for the sweep tables."""
    rows = []
    for (layer, k, beta, _, _), group in sorted(_groups(results, "gsae", tokens=tokens).items()):
        if beta == 0:
            rows.append((layer, k, "TopK", "", group))
        else:
            rows.append((layer, k, f"g-SAE beta={beta:g}, gradient selection", "", group))
            rows.append((layer, k, f"g-SAE beta={beta:g}, plain TopK selection", "plain_topk/", group))
    return rows


def metric(result: dict, name: str) -> float:
    return result["metrics"].get(name, float("nan"))


def gsae_table(results: list[dict], tokens: int) -> str:
    lines = ["| layer | k | run | " + " | ".join(title for _, title in GSAE_METRICS) + " |",
             "|---|---|---|" + "---|" * len(GSAE_METRICS)]
    for layer, k, label, mode, group in gsae_rows(results, tokens):
        cells = [summary([metric(r, f"val/{mode}{name}") for r in group]) for name, _ in GSAE_METRICS]
        lines.append(f"| {layer} | {k} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


WALL_SPEED_ROW = "training tokens / s, wall (the timed steps of each run)"
CPU_SPEED_ROW = "training tokens / CPU second (the timed steps; pauses excluded)"


def jsae_metric_rows(ratio: float) -> list[tuple[str, str]]:
    """(row label, metric name) of the lambda table's measured rows; `ratio` is RMS(mlp_out) /
    RMS(mlp_in), which sets the scale-matched thresholds."""
    rows = []
    for where in ("at_x", "at_xhat"):
        rows += [(f"{where}: count abs(J) > {t:g} per token", f"val/jacobian_{where}/count_above_{t:g}") for t in PAPER_THRESHOLDS]
        for t in PAPER_THRESHOLDS:
            matched = scale_matched(t, ratio)
            rows.append((f"{where}: count abs(J) > {matched:g} (= {t:g} x {ratio:.3g}, scale-matched)",
                         f"val/jacobian_{where}/count_above_{matched:g}"))
        rows.append((f"{where}: mean abs(J)", f"val/jacobian_{where}/l1"))
    for sae in ("sae_in", "sae_out"):
        rows += [(f"{sae} {name.replace('_', ' ')}", f"val/{sae}/{name}")
                 for name in ("explained_variance", "ce_loss_score", "kl_div_score", "dead_fraction")]
    return rows


class FrontPoint(NamedTuple):
    """One lambda: means over seeds of the count above the scale-matched 0.01 and of sae_out's
    explained variance, with their seed spreads (half ranges)."""

    lam: float
    count: float
    ev: float
    count_spread: float
    ev_spread: float


def jsae_table(results: list[dict], tokens: int) -> tuple[str, list[FrontPoint]]:
    """The lambda table, and a point of the count-against-cost plane per lambda."""
    groups = sorted(_groups(results, "jsae", tokens=tokens).items(), key=lambda item: item[0][3])
    if not groups:
        return "(no JSAE result at this budget yet)", []
    ratio = groups[0][1][0].get("scale_ratio") or 1.0
    head = "| metric | " + " | ".join(f"lambda = {key[3]:.4g}" for key, _ in groups) + " |"
    lines = [head, "|---" * (len(groups) + 1) + "|"]

    for label, name in jsae_metric_rows(ratio):
        lines.append(f"| {label} | " + " | ".join(summary([metric(r, name) for r in group]) for _, group in groups) + " |")

    def speeds(name: str) -> list[float]:
        return [_mean([r.get(name, math.nan) for r in group]) for _, group in groups]

    wall, cpu = speeds("tokens_per_second"), speeds("tokens_per_cpu_second")
    # Older runs did not record CPU time: each cell says how many of its runs it averages.
    timed = [sum(not math.isnan(r.get("tokens_per_cpu_second", math.nan)) for r in group) for _, group in groups]
    lines.append(f"| {WALL_SPEED_ROW} | " + " | ".join(f"{v:.0f}" for v in wall) + " |")
    lines.append(f"| {CPU_SPEED_ROW} | "
                 + " | ".join("n/a" if math.isnan(v) else f"{v:.0f} ({n})" for v, n in zip(cpu, timed)) + " |")
    if groups[0][0][3] == 0:  # lambda 0 first: each lambda's training time against it
        kind, base = ("CPU", cpu) if not any(math.isnan(v) for v in cpu) else ("wall", wall)
        ratios = " | ".join(f"{base[0] / v:.2f}x" for v in base)
        lines.append(f"| training time / lambda = 0 ({kind} time; same machine, not interleaved) | {ratios} |")
    matched_01 = scale_matched(0.01, ratio)
    front = []
    for key, group in groups:
        counts = [metric(r, f"val/jacobian_at_x/count_above_{matched_01:g}") for r in group]
        evs = [metric(r, "val/sae_out/explained_variance") for r in group]
        front.append(FrontPoint(key[3], _mean(counts), _mean(evs), half_range(counts), half_range(evs)))
    return "\n".join(lines), front


def pareto(points: list[FrontPoint]) -> list[float]:
    """Lambdas not dominated in (fewer Jacobian entries, higher output explained variance)."""
    keep = []
    for p in points:
        if not any(q.count <= p.count and q.ev >= p.ev and (q.count, q.ev) != (p.count, p.ev) for q in points):
            keep.append(p.lam)
    return keep


def variant_table(results: list[dict]) -> str:
    """One row per run configuration (seeds pooled); a normalised pair's |J| carries no scale ratio."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for result in results:
        groups[result["run_id"].rsplit("_s", 1)[0]].append(result)
    present = [(name, title) for name, title in VARIANT_METRICS if any(name in r["metrics"] for r in results)]
    lines = ["| run | " + " | ".join(title for _, title in present) + " |", "|---" * (len(present) + 1) + "|"]
    for label, group in sorted(groups.items()):
        lines.append(f"| {label} | " + " | ".join(summary([metric(r, name) for r in group]) for name, _ in present) + " |")
    return "\n".join(lines)


def curve_metrics(results: list[dict], study: str) -> list[tuple[str, str]]:
    """(label, metric) of each curve over tokens: the first is the one the gap trend follows. A
    JSAE curve has both sides of its trade-off, the cost and the Jacobian count it buys."""
    if study == "gsae":
        return [("spliced CE loss score", CURVE_METRIC["gsae"])]
    ratio = next((r["scale_ratio"] for r in results if r["run"]["study"] == "jsae" and r.get("scale_ratio")), 1.0)
    matched_01 = scale_matched(0.01, ratio)
    return [("sae_out explained var.", CURVE_METRIC["jsae"]),
            (f"count abs(J) > {matched_01:g} at x", f"val/jacobian_at_x/count_above_{matched_01:g}")]


def curve_table(results: list[dict], study: str) -> str:
    groups = _groups(results, study)
    budgets = sorted({key[4] for key in groups})
    if study == "gsae":
        series = sorted({(key[0], key[1], key[2]) for key in groups})
        label = lambda s, _: "TopK" if s[2] == 0 else f"g-SAE beta={s[2]:g} (gradient sel.)"  # noqa: E731
    else:
        series = sorted({(key[0], key[1], key[3]) for key in groups})
        label = lambda s, what: f"lambda={s[2]:.4g}: {what}"  # noqa: E731
    lines = ["| run | " + " | ".join(tokens_label(b) for b in budgets) + " |", "|---" * (len(budgets) + 1) + "|"]
    for what, name in curve_metrics(results, study):
        for s in series:
            if sum(any(key[4] == b and key[:4] == ((s[0], s[1], s[2], 0.0) if study == "gsae" else (s[0], s[1], 0.0, s[2]))
                       for key in groups) for b in budgets) < 2:
                continue  # a sweep point, not a curve
            cells = []
            for b in budgets:
                key = (s[0], s[1], s[2], 0.0, b) if study == "gsae" else (s[0], s[1], 0.0, s[2], b)
                cells.append(summary([metric(r, name) for r in groups.get(key, [])]))
            lines.append(f"| L{s[0]} k{s[1]} {label(s, what)} | " + " | ".join(cells) + " |")
    if len(lines) == 2:
        return "No curve yet: no setting has finished runs at two or more budgets (phase 2 runs them)."
    return "\n".join(lines)


def linear_fit(xs: list[float], ys: list[float]) -> tuple[float, float, float]:
    """Least squares y = a + b x: (a, b, standard error of b); the error is NaN with two points."""
    n, x_mean, y_mean = len(xs), statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - x_mean) ** 2 for x in xs)
    b = sum((x - x_mean) * (y - y_mean) for x, y in zip(xs, ys)) / sxx
    a = y_mean - b * x_mean
    if n < 3:
        return a, b, float("nan")
    residual = sum((y - a - b * x) ** 2 for x, y in zip(xs, ys))
    return a, b, math.sqrt(residual / (n - 2) / sxx)


def estimate_label(tokens: float) -> str:
    """Two significant digits: an extrapolated budget is no more precise than that."""
    rounded = float(f"{tokens:.2g}")  # before the unit: 996M is 1B, not 1000M
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if rounded >= scale:
            return f"{rounded / scale:g}{unit}"  # :g, not :.2g, which writes 100M as 1e+02M
    return f"{rounded:g}"


# Past this budget an extrapolated crossing is not worth a number.
HORIZON_TOKENS = 1e15


def budget_estimate(tokens: float) -> str:
    return f"~{estimate_label(tokens)} tokens" if tokens <= HORIZON_TOKENS else "beyond 1e15 tokens"


def line_zero(x_mean: float, y_mean: float, slope: float) -> float:
    """Tokens where the fitted line y_mean + slope (log10 T - x_mean) is 0 (inf for a flat line)."""
    return 10 ** (x_mean - y_mean / slope) if slope else math.inf


def crossing(x_mean: float, y_mean: float, b: float, se: float, last_gap: float) -> str:
    """Where the fitted line y_mean + b (log10 T - x_mean) reaches 0, if the gap is closing, with
    the range a slope of b ± one standard error gives (pivoting at the data's centre, where the
    line is best known). An extrapolation: the table's text says so."""
    def at(slope: float) -> float:
        if slope == 0 or (slope > 0) == (last_gap > 0):
            return math.inf  # this slope never closes the gap
        return line_zero(x_mean, y_mean, slope)

    point = at(b)
    if point == math.inf:
        return "not closing"
    if point > HORIZON_TOKENS:
        return budget_estimate(point)
    if math.isnan(se):
        return f"{budget_estimate(point)} (two budgets: no uncertainty)"
    low, high = sorted((at(b - se), at(b + se)))
    high_label = "never (a slope one standard error smaller does not close it)" if high > HORIZON_TOKENS else estimate_label(high)
    return f"{budget_estimate(point)} (slope ± 1 s.e.: {estimate_label(low)} to {high_label})"


def sign_change(points: list[tuple[int, float]]) -> str | None:
    """Where the measured gap last changed sign between consecutive budgets ("2M and 5M"), if it did:
    a crossing in the data, which no extrapolation should hide."""
    for (low, low_gap), (high, high_gap) in reversed(list(zip(points, points[1:]))):
        if (low_gap < 0) != (high_gap < 0):
            return f"{tokens_label(low)} and {tokens_label(high)}"
    return None


def gap_trend(results: list[dict], study: str) -> str:
    """Each variant's gap to its baseline at every budget of the curves, its trend per decade of
    training tokens (least squares on log10 tokens) and where an extrapolated closing gap would
    cross zero. g-SAE: ce_loss_score (gradient selection) minus TopK's; JSAE: sae_out explained
    variance minus lambda 0's (the penalty's reconstruction cost)."""
    groups = _groups(results, study)
    budgets = sorted({key[4] for key in groups})
    name = CURVE_METRIC[study]
    lines = []
    for layer, k, beta, lam in sorted({key[:4] for key in groups}):
        if (beta if study == "gsae" else lam) == 0:
            continue
        base = (layer, k, 0.0, 0.0) if study == "gsae" else (layer, k, beta, 0.0)
        points = [(b, _mean([metric(r, name) for r in groups[(layer, k, beta, lam, b)]]) - _mean([metric(r, name) for r in groups[(*base, b)]]))
                  for b in budgets if (layer, k, beta, lam, b) in groups and (*base, b) in groups]
        points = [(b, gap) for b, gap in points if not math.isnan(gap)]
        if len(points) < 2:
            continue
        xs, ys = [math.log10(b) for b, _ in points], [gap for _, gap in points]
        _, slope, se = linear_fit(xs, ys)
        x_mean, y_mean = statistics.fmean(xs), statistics.fmean(ys)
        label = f"L{layer} k{k} " + (f"g-SAE beta={beta:g} - TopK" if study == "gsae" else f"lambda={lam:.4g} - lambda=0")
        gaps = ", ".join(f"{tokens_label(b)}: {gap:+.4f}" for b, gap in points)
        trend = f"{slope:+.4f}" + ("" if math.isnan(se) else f" ± {se:.4f}")
        between = sign_change(points)
        if between:
            fitted = budget_estimate(line_zero(x_mean, y_mean, slope))
            where = f"measured: the gap changes sign between {between} (the fitted line: {fitted})"
        else:
            where = crossing(x_mean, y_mean, slope, se, ys[-1])
        lines.append(f"| {label} | {gaps} | {trend} | {where} |")
    if not lines:
        return ""
    what = "ce_loss_score (gradient selection)" if study == "gsae" else "sae_out explained variance"
    return "\n".join([f"Gap to the baseline in {what}, by budget (seed 0 where the curve has one seed; the mean over "
                      "seeds where there are more), its change per decade of training tokens (least squares on log10 "
                      "tokens, ± one standard error) and, where it is closing, the budget at which the fitted line "
                      "would cross zero, with the range its slope ± one standard error gives: **an extrapolation** of "
                      "a straight line in log tokens, not a measurement.", "",
                      "| gap | by budget | per decade of tokens | would cross zero at |", "|---|---|---|---|", *lines])


Line = tuple[list[int], list[float], list[float]]  # x values, means over seeds, seed spreads


def score_vs_k(results: list[dict]) -> tuple[int, dict[int, dict[tuple[float, str], Line]]]:
    """The score-against-k plot's lines: at the budget most g-SAE sweep runs have, per layer and
    (beta, validation mode), the k values and the spliced ce_loss_score's mean and spread over
    seeds. The alternative gradient normalisations are left out, as in the tables."""
    groups = _groups(results, "gsae")
    if not groups:
        return 0, {}
    budget = max({key[4] for key in groups}, key=lambda t: sum(len(g) for key, g in groups.items() if key[4] == t))
    lines: dict[int, dict[tuple[float, str], Line]] = {}
    for (layer, k, beta, _, tokens), group in sorted(groups.items()):
        if tokens != budget:
            continue
        for mode in ("",) if beta == 0 else ("", "plain_topk/"):
            ks, ys, spreads = lines.setdefault(layer, {}).setdefault((beta, mode), ([], [], []))
            scores = [metric(r, f"val/{mode}ce_loss_score") for r in group]
            ks.append(k)
            ys.append(_mean(scores))
            spreads.append(half_range(scores))
    return budget, lines


def plots(results: list[dict], folder: Path, fronts: dict[int, list[FrontPoint]]) -> list[str]:
    """The PNGs (small: 100 dpi, few points); returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    budget, lines_by_layer = score_vs_k(results)
    if lines_by_layer:
        fig, axes = plt.subplots(1, len(lines_by_layer), figsize=(5 * len(lines_by_layer), 3.6), squeeze=False)
        for axis, (layer, lines) in zip(axes[0], lines_by_layer.items()):
            for (beta, mode), (ks, ys, spreads) in lines.items():
                name = "TopK" if beta == 0 else f"beta={beta:g}" + (" plain sel." if mode else "")
                axis.errorbar(ks, ys, yerr=spreads, fmt=":x" if mode else "-o", capsize=3, label=name)
            axis.set(xscale="log", xlabel="k", ylabel="spliced CE loss score", title=f"layer {layer}, {tokens_label(budget)} tokens")
            axis.xaxis.set_minor_formatter(NullFormatter())  # labelled minor ticks overprint the k labels
            ks = sorted({k for ks, _, _ in lines.values() for k in ks})
            axis.set_xticks(ks, [str(k) for k in ks])
            axis.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(folder / "gsae_score_vs_k.png", dpi=100)
        plt.close(fig)
        written.append("gsae_score_vs_k.png")
    for budget, front in fronts.items():
        if len(front) < 3:
            continue  # a curve's budget (lambda 0 and 1): the curves plot has it, and its table the numbers
        fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
        counts, count_spreads = [p.count for p in front], [p.count_spread for p in front]
        left.errorbar([p.lam for p in front], counts, yerr=count_spreads, fmt="-o", capsize=3)
        left.set(xlabel="lambda", ylabel="count |J| > scale-matched 0.01 / token", title=f"JSAE, {tokens_label(budget)} tokens")
        right.errorbar(counts, [p.ev for p in front], xerr=count_spreads, yerr=[p.ev_spread for p in front], fmt="o", capsize=3)
        for p in front:
            right.annotate(f"{p.lam:.3g}", (p.count, p.ev), fontsize=7)
        right.set(xlabel="count |J| > scale-matched 0.01 / token", ylabel="sae_out explained variance", title="Pareto front")
        fig.tight_layout()
        name = f"jsae_lambda_{budget}.png"
        fig.savefig(folder / name, dpi=100)
        plt.close(fig)
        written.append(name)
    panels = []  # (study, y label, {series: Line over tokens}) of the studies with a curve
    for study in ("gsae", "jsae"):
        groups = _groups(results, study)
        for ylabel, name in curve_metrics(results, study):
            curves = {}
            for s in sorted({key[:4] for key in groups}):
                xs = sorted(key[4] for key in groups if key[:4] == s)
                if len(xs) >= 2:
                    values = [[metric(r, name) for r in groups[(*s, x)]] for x in xs]
                    curves[s] = (xs, [_mean(v) for v in values], [half_range(v) for v in values])
            if curves:
                panels.append((study, ylabel, curves))
    if panels:
        fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
        for axis, (study, ylabel, curves) in zip(axes[0], panels):
            for s, (xs, ys, spreads) in curves.items():
                label = (("TopK" if s[2] == 0 else f"beta={s[2]:g}") if study == "gsae" else f"lambda={s[3]:.3g}") + f" L{s[0]} k{s[1]}"
                axis.errorbar(xs, ys, yerr=spreads, fmt="-o", capsize=3, label=label)
            axis.set(xscale="log", xlabel="training tokens", ylabel=ylabel, title=f"{study}: over training tokens")
            axis.xaxis.set_minor_formatter(NullFormatter())  # labelled minor ticks overprint each other
            budgets = sorted({x for xs, _, _ in curves.values() for x in xs})
            axis.set_xticks(budgets, [tokens_label(b) for b in budgets])
            axis.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(folder / "curves_tokens.png", dpi=100)
        plt.close(fig)
        written.append("curves_tokens.png")
    return written


def write_report(results: list[dict], out: Path, spec: CacheSpec, runs: list[RunSpec]) -> None:
    """Rewrite the generated part of `out` from `results` (study_results.completed's) and plot them."""
    planned = {run.run_id for run in runs}
    done = [r for r in results if r["run_id"] in planned]
    test_mode = any(r.get("test_mode") for r in done)
    lines = [START, "<!-- everything up to the end marker is rewritten by tools/studies/study_report.py -->", ""]
    if test_mode:
        lines += ["**TEST MODE: tiny random model, a few thousand tokens. These numbers mean nothing.**", ""]
    lines += [f"Model {spec.model}, text {spec.dataset}; {len(done)} of {len(planned)} planned runs done"
              + ("" if done else ": nothing measured yet (PARTIAL)") + ".", ""]
    sources = sorted({r["recovered"] for r in done if r.get("recovered")})
    if sources:
        recovered = sum(bool(r.get("recovered")) for r in done)
        lines += [f"{recovered} of these runs are recovered from an earlier report's tables ({'; '.join(sources)}): their "
                  "result files were lost with the machine that trained them. Their cells are those tables' means and "
                  "spreads (4 decimals); which seed gave which value is not known. Rows derived from them (speed ratios, "
                  "gaps between curves) are recomputed from those rounded values and can differ from the earlier "
                  "report's in the last digit.", ""]
    fronts = {}
    for budget in sorted({r["run"]["tokens"] for r in done if r["run"]["study"] == "gsae"}):
        lines += [f"### g-SAE vs TopK, {budget:,} training tokens", "", gsae_table(done, budget), ""]
    for budget in sorted({r["run"]["tokens"] for r in done if r["run"]["study"] == "jsae"}):
        table, front = jsae_table(done, budget)
        fronts[budget] = front
        lines += [f"### JSAE lambda sweep, {budget:,} training tokens", "", table, "",
                  (f"Pareto front (count above the scale-matched 0.01 at x against sae_out explained variance): "
                  f"lambda in {pareto(front)}"), ""]
    normalized = [r for r in done if r["run"].get("normalized")]
    if normalized:
        lines += ["### With activation normalisation (normalize_activations: expected_average_only_in)", "",
                  variant_table(normalized), ""]
    alternatives = [r for r in done if r["run"].get("grad_normalize")]
    if alternatives:
        lines += ["### g-SAE with another gradient normalisation (compare with the sweep's rms rows)", "",
                  variant_table(alternatives), ""]
    for study in ("gsae", "jsae"):
        if any(r["run"]["study"] == study for r in done):
            lines += [f"### {study}: over training tokens", "", curve_table(done, study), ""]
            trend = gap_trend(done, study)
            lines += [trend, ""] if trend else []
    try:
        names = plots(done, out.parent / out.stem, fronts)
        if names:
            lines += ["Plots: means over seeds; bars are ± half the range over seeds (none where a point has one seed).", ""]
        lines += [f"![{name}]({out.stem}/{name})" for name in names]
    except ImportError:
        lines += ["(plots skipped: matplotlib is not installed; `pip install -e .[plots]`)"]
    lines.append(END)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Hand-written text around the markers (method, commands, estimates) is kept.
    old = out.read_text() if out.is_file() else ""
    if START in old and END in old:
        before, rest = old.split(START, 1)
        text = before + "\n".join(lines) + rest.split(END, 1)[1]
    else:
        text = old + ("\n" if old else "") + "\n".join(lines) + "\n"
    out.write_text(text)
