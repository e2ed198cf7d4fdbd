"""Where the studies' results are kept, so that they outlive the machine that trained them.

A run writes its result.json into its run folder (<root>/runs/<run id>/, outside the repository,
beside its checkpoints) and copies it into the results folder (`results_dir` in the configs:
docs/results/records, committed), one JSON file per run. A new machine starts with an empty root
but with the committed folder, so the driver skips those runs and the report still has them.

`recovered/` in the results folder holds results that survive only as an earlier report's
tables (recover_results.py rebuilt them): per table cell, the seeds' runs and each metric's
values as the tables printed them (mean ± half range over n seeds, 4 decimals, gives the n = 2
values back). Which value was which seed's is not recoverable: the i-th value of every metric is
given to the i-th run, so a recovered run's metrics are not one run's, while every mean, spread
and count over a cell's seeds is the table's own. Each carries `"recovered"`: its source.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from study_data import CacheSpec
from study_runs import RunSpec, TrainSettings

from lightning_sae.atomic import atomic_write_text

# How a run was trained, not what it measured: results that differ only here are the same experiment.
NOT_THE_EXPERIMENT = frozenset({"threads", "checkpoint_every"})


def same_experiment(result: dict, spec: CacheSpec, settings: TrainSettings) -> bool:
    """Whether a kept result was trained on this cache with these settings (fields a result
    predates are not held against it)."""
    for recorded, current in ((result.get("cache", {}), vars(spec)), (result.get("settings", {}), vars(settings))):
        for key, value in current.items():
            if key in NOT_THE_EXPERIMENT or key not in recorded:
                continue
            if json.loads(json.dumps(value)) != recorded[key]:  # tuples as the JSON lists they were saved as
                return False
    return True


def kept_path(results_dir: Path, run_id: str) -> Path:
    return results_dir / f"{run_id}.json"


def keep(results_dir: Path, result: dict) -> Path:
    """Copy a run's result into the results folder (idempotent)."""
    return atomic_write_text(kept_path(results_dir, result["run_id"]), json.dumps(result, indent=1, sort_keys=True) + "\n")


def expand_recovered(cell: dict, source: dict) -> list[dict]:
    """A recovered cell's runs, the i-th value of each metric given to the i-th run (see above)."""
    results = []
    for i, run in enumerate(cell["runs"]):
        metrics = {name: values[i] for name, values in cell["metrics"].items() if i < len(values)}
        cpu = cell.get("tokens_per_cpu_second", [])
        results.append({
            "run": run, "run_id": RunSpec(**run).run_id, "metrics": metrics, "cache": source["cache"],
            "settings": source["settings"], "scale_ratio": cell.get("scale_ratio"),
            "test_mode": source["settings"].get("test_mode", False),
            "tokens_per_second": cell.get("tokens_per_second", math.nan),
            "tokens_per_cpu_second": cpu[i] if i < len(cpu) else math.nan,
            "recovered": source["source"],
        })
    return results


def load_recovered(results_dir: Path) -> list[dict]:
    results = []
    for path in sorted((results_dir / "recovered").glob("*.json")):
        source = json.loads(path.read_text())
        for cell in source["cells"]:
            results += expand_recovered(cell, source)
    return results


def completed(root: Path, results_dir: Path | None, spec: CacheSpec, settings: TrainSettings) -> dict[str, dict]:
    """Every finished run of this experiment by run id: the run folders' results first, then the
    kept ones, then the recovered ones (a result measured here wins over its copy or recovery)."""
    found: list[dict] = [json.loads(path.read_text()) for path in sorted((root / "runs").rglob("result.json"))]
    if results_dir is not None and results_dir.is_dir():
        found += [json.loads(path.read_text()) for path in sorted(results_dir.rglob("*.json"))
                  if "recovered" not in path.relative_to(results_dir).parts]
        found += load_recovered(results_dir)
    runs: dict[str, dict] = {}
    for result in found:
        if same_experiment(result, spec, settings):
            runs.setdefault(result["run_id"], result)
    return runs


def keep_new_results(results: dict[str, dict], results_dir: Path) -> list[str]:
    """Copy the measured results (`completed`'s) that the results folder lacks (runs trained by a
    driver without one, or before it had one); returns their run ids."""
    copied = []
    for run_id, result in results.items():
        if not result.get("recovered") and not kept_path(results_dir, run_id).is_file():
            keep(results_dir, result)
            copied.append(run_id)
    return copied
