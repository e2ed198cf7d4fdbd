"""Rebuild the studies' results from a report's generated tables, for runs whose result files
are lost (the machine that held the run folders was replaced before the results were kept in
the repository).

    python tools/studies/recover_results.py configs/studies/gsae.yaml configs/studies/jsae.yaml \\
        --report old_results.md --source "docs/results.md at e2f3f0f" --scale-ratio 10.22

Each table cell "mean ± half range (n)" over n seeds gives the n values back for n <= 2 (for more
seeds it would not: the tool refuses). The cells of one run setting are gathered into one record
of the results folder's recovered/ (study_results.py says how they are read). `--scale-ratio` is
RMS(mlp_out) / RMS(mlp_in) on the cache's held-out rows, which the JSAE tables print to three
figures only: the tool checks that it reproduces every scale-matched row label.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run_studies import REPOSITORY, load_config, plan
from study_data import CacheSpec
from study_report import CPU_SPEED_ROW, END, GSAE_METRICS, START, VARIANT_METRICS, WALL_SPEED_ROW, jsae_metric_rows
from study_runs import RunSpec, TrainSettings

from lightning_sae.atomic import atomic_write_text

CELL = re.compile(r"^(-?[\d.]+)(?: ± ([\d.]+))? \((\d+)\)$")


def cell_values(text: str) -> list[float]:
    """The values behind one printed cell: "m ± h (2)" is m + h and m - h, "m (1)" is m, "n/a" none."""
    text = text.strip()
    if text == "n/a":
        return []
    match = CELL.match(text)
    if not match:
        raise ValueError(f"not a table cell of the report: {text!r}")
    mean, spread, count = float(match[1]), float(match[2] or 0), int(match[3])
    if count == 1:
        return [mean]
    if count == 2:
        return [mean + spread, mean - spread]
    raise ValueError(f"{text!r}: {count} seeds' values are not recoverable from their mean and half range")


def tables(report: str) -> dict[str, list[list[str]]]:
    """The generated part's tables by heading: each a list of rows of cells (header first)."""
    if START not in report or END not in report:
        raise SystemExit("the report has no generated part (study_report markers)")
    found: dict[str, list[list[str]]] = {}
    heading = None
    for line in report.split(START, 1)[1].split(END, 1)[0].splitlines():
        if line.startswith("### "):
            heading = line[4:]
        elif heading and line.startswith("|") and not line.startswith("|---"):
            found.setdefault(heading, []).append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return found


def setting(run: RunSpec) -> str:
    """A run's id without its seed: what the seeds of one table cell share."""
    return re.sub(r"_s\d+(_t\d+)$", r"\1", run.run_id)


class Recovery:
    """Cells gathered per run setting: its runs (the plan's, by seed) and each metric's values."""

    def __init__(self, runs: list[RunSpec]) -> None:
        self.plan = runs
        self.cells: dict[str, dict] = {}

    def add(self, matching: list[RunSpec], name: str, values: list[float]) -> None:
        if not values:
            return
        matching = sorted(matching, key=lambda run: run.seed)
        if len(values) > len(matching):
            raise ValueError(f"{name}: {len(values)} values but the plan has {len(matching)} runs for them")
        cell = self.cells.setdefault(setting(matching[0]), {"runs": [asdict(run) for run in matching[:len(values)]], "metrics": {}})
        if len(cell["runs"]) != len(values):
            raise ValueError(f"{setting(matching[0])}: {name} has {len(values)} values where the setting's other cells have {len(cell['runs'])}")
        cell["metrics"][name] = values

    def runs(self, **fields) -> list[RunSpec]:
        return [run for run in self.plan if all(getattr(run, key) == value for key, value in fields.items())]


def recover(report: str, runs: list[RunSpec], scale_ratio: float) -> list[dict]:
    recovery = Recovery(runs)
    titles = {title: name for name, title in GSAE_METRICS}
    jsae_names = dict(jsae_metric_rows(scale_ratio))
    variant_names = {title: name for name, title in VARIANT_METRICS}
    for heading, rows in tables(report).items():
        gsae = re.fullmatch(r"g-SAE vs TopK, ([\d,]+) training tokens", heading)
        jsae = re.fullmatch(r"JSAE lambda sweep, ([\d,]+) training tokens", heading)
        if gsae:
            tokens = int(gsae[1].replace(",", ""))
            head, *body = rows
            for layer, k, label, *cells in body:
                beta = 0.0 if label == "TopK" else float(re.match(r"g-SAE beta=([\d.]+),", label)[1])
                mode = "plain_topk/" if label.endswith("plain TopK selection") else ""
                matching = recovery.runs(study="gsae", layer=int(layer), k=int(k), beta=beta, tokens=tokens,
                                         normalized=False, grad_normalize="")
                for title, text in zip(head[3:], cells):
                    recovery.add(matching, f"val/{mode}{titles[title]}", cell_values(text))
        elif jsae:
            tokens = int(jsae[1].replace(",", ""))
            head, *body = rows
            lambdas = [float(column.removeprefix("lambda = ")) for column in head[1:]]
            by_lambda = [recovery.runs(study="jsae", tokens=tokens, normalized=False, jacobian_coefficient=lam) for lam in lambdas]
            for label, *cells in body:
                if label not in jsae_names and label not in (WALL_SPEED_ROW, CPU_SPEED_ROW):
                    if label.startswith("training time / lambda = 0"):
                        continue  # a ratio of the speed rows
                    raise SystemExit(f"'{label}' is no row of the lambda table at scale ratio {scale_ratio}: wrong --scale-ratio?")
                for matching, text in zip(by_lambda, cells):
                    if label not in (WALL_SPEED_ROW, CPU_SPEED_ROW):
                        recovery.add(matching, jsae_names[label], cell_values(text))
                    cell = recovery.cells[setting(matching[0])]
                    if label == WALL_SPEED_ROW:
                        cell["tokens_per_second"] = float(text)
                    elif label == CPU_SPEED_ROW:  # "mean (n)": the mean of the n runs that were timed
                        cell["tokens_per_cpu_second"] = cell_values(text)[:1] * int(text.rsplit("(", 1)[1].rstrip(")")) \
                            if text != "n/a" else []
                    else:
                        cell["scale_ratio"] = scale_ratio
        elif heading.startswith(("With activation normalisation", "g-SAE with another gradient normalisation")):
            head, *body = rows
            for label, *cells in body:
                matching = [run for run in runs if run.run_id.rsplit("_s", 1)[0] == label]
                for title, text in zip(head[1:], cells):
                    recovery.add(matching, variant_names[title], cell_values(text))
        # the curves over tokens and the gap trends repeat the tables above
    return list(recovery.cells.values())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("configs", nargs="+")
    parser.add_argument("--report", required=True, help="the report whose tables hold the lost results")
    parser.add_argument("--source", required=True, help="what the report is, for the record (e.g. 'docs/results.md at <commit>')")
    parser.add_argument("--scale-ratio", type=float, required=True, help="RMS(mlp_out) / RMS(mlp_in) of the JSAE runs")
    parser.add_argument("--out", help="default: <results_dir>/recovered/<report's stem>.json")
    args = parser.parse_args(argv)
    config = load_config(args.configs)
    spec = CacheSpec(**{key: tuple(value) if isinstance(value, list) else value for key, value in config["cache"].items()})
    settings = TrainSettings(**config["train"])
    cells = recover(Path(args.report).read_text(), plan(config, spec, None, None), args.scale_ratio)
    out = Path(args.out) if args.out else REPOSITORY / config["results_dir"] / "recovered" / f"{Path(args.report).stem}.json"
    record = {"source": args.source, "cache": asdict(spec), "settings": asdict(settings), "cells": cells}
    atomic_write_text(out, json.dumps(record, indent=1) + "\n")
    print(f"{sum(len(cell['runs']) for cell in cells)} runs in {len(cells)} settings recovered into {out}")


if __name__ == "__main__":
    main()
