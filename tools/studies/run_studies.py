"""Run the studies' whole plan in order, skipping what is done, then write the report.

    python tools/studies/run_studies.py configs/studies/gsae.yaml configs/studies/jsae.yaml
    python tools/studies/run_studies.py configs/studies/*.yaml --only-phase 0      # the headline runs
    python tools/studies/run_studies.py configs/studies/*.yaml --plan              # list, run nothing
    python tools/studies/run_studies.py configs/studies/*.yaml --report-only --out docs/results.md

Steps: (1) the shared activation cache (built, or resumed from its last complete shard; a missing
one is rebuilt), (2) every run of the plan, lowest phase first (each resumes from its checkpoint
and is skipped once its result exists, in its run folder or in the committed results folder,
`results_dir`, where each result is copied: study_results.py), (3) the report: markdown tables
and PNG plots from every result found (study_report.py). Drivers started side by side on one plan (one per core or GPU,
once the cache is complete) share it out: a run is locked while it trains and the others move on.
SIGTERM stops a driver (inside Lightning's loops the run resumes from its checkpoint; elsewhere it stops after the run in hand).
Each config says its cache, training settings and sweep;
the flags below override them, so the same plan runs on a GPU with a larger model, text or budget:

    python tools/studies/run_studies.py configs/studies/*.yaml --model gpt2 --dataset Skylion007/openwebtext \\
        --gsae-layers 7 --jsae-layer 6 --num-tokens 50000000 --train-tokens 20000000 --root /data/studies
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import signal
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import yaml
from study_data import CacheSpec, StudyData
from study_results import completed, keep, keep_new_results
from study_runs import RunSpec, TrainSettings, result_path, train_and_validate, training_lock

from lightning.pytorch.utilities.exceptions import SIGTERMException

from lightning_sae.atomic import LockHeld, lock_holder


REPOSITORY = Path(__file__).resolve().parents[2]


def load_config(paths: list[str]) -> dict:
    """The configs merged: `cache`, `root`, `cache_dir`, `train` and `results_dir` (optional) must
    agree; studies add up."""
    merged: dict = {"studies": {}}
    for path in paths:
        config = yaml.safe_load(Path(path).read_text())
        for key in ("cache", "root", "cache_dir", "train", "results_dir"):
            if key in merged and merged[key] != config.get(key):
                raise SystemExit(f"{path}: '{key}' differs from the other configs; the studies share one cache and root")
            merged[key] = config.get(key)
        merged["studies"][config["study"]] = config["sweep"]
    return merged


def plan(config: dict, spec: CacheSpec, train_tokens: int | None, curve_tokens: list[int] | None) -> list[RunSpec]:
    """Every run, in the order to run them: phase 0 (the headline pairs at the sweep budget, both
    seeds), 1 (the rest of the sweep), 2 (the curves over training tokens)."""
    runs: list[RunSpec] = []
    gsae = config["studies"].get("gsae")
    if gsae:
        tokens = train_tokens or gsae["tokens"]
        layers = [layer for layer in gsae.get("layers", spec.gsae_layers) if layer in spec.gsae_layers] or list(spec.gsae_layers)
        head = gsae["headline"]
        for layer in layers:
            for k in gsae["k"]:
                for beta in [0.0, *gsae["beta"]]:
                    for seed in gsae["seeds"]:
                        headline = layer == layers[0] and k == head["k"] and beta in [0.0, *head["beta"]]
                        runs.append(RunSpec("gsae", layer, k, seed, tokens, beta=beta, phase=0 if headline else 1))
        # Alternatives where the implementation could be at fault: another gradient normalisation.
        for normalize in gsae.get("alternative_gradient_normalizations", []):
            for beta in head["beta"]:
                for seed in gsae["seeds"]:
                    runs.append(RunSpec("gsae", layers[0], head["k"], seed, tokens, beta=beta, grad_normalize=normalize, phase=1))
        for budget in curve_tokens or gsae["curve_tokens"]:
            for beta in [0.0, *head["beta"]]:
                for seed in gsae["curve_seeds"]:
                    runs.append(RunSpec("gsae", layers[0], head["k"], seed, budget, beta=beta, phase=2))
    jsae = config["studies"].get("jsae")
    if jsae and spec.jsae_layer is not None and spec.jsae_layer >= 0:
        tokens = train_tokens or jsae["tokens"]
        k, d_model = jsae["k"], jsae["d_model"]
        rule = round(0.5 * k * k / d_model, 4)  # the reference's scaling: lambda 1 at Pythia-70m, 0.5 at 410m
        lambdas = [(lam, "") for lam in jsae["lambdas"]] + ([(rule, "0.5 k^2/d")] if rule not in jsae["lambdas"] else [])
        for lam, label in lambdas:
            for seed in jsae["seeds"]:
                headline = lam in jsae["headline_lambdas"]
                runs.append(RunSpec("jsae", spec.jsae_layer, k, seed, tokens, jacobian_coefficient=lam, lambda_label=label,
                                    phase=0 if headline else 1))
        # The scale-free setting (normalize_activations): lambda then weighs the Jacobian of the
        # normalised pair, whose |J| no longer carries RMS(mlp_out) / RMS(mlp_in).
        for lam in jsae.get("normalized_lambdas", []):
            for seed in jsae["seeds"]:
                runs.append(RunSpec("jsae", spec.jsae_layer, k, seed, tokens, jacobian_coefficient=lam, normalized=True, phase=1))
        for budget in curve_tokens or jsae["curve_tokens"]:
            for lam in jsae["headline_lambdas"]:
                for seed in jsae["curve_seeds"]:
                    runs.append(RunSpec("jsae", spec.jsae_layer, k, seed, budget, jacobian_coefficient=lam, phase=2))
    # A curve point may be a sweep run: it keeps its earliest phase.
    unique = {run.run_id: run for run in sorted(runs, key=lambda r: r.phase, reverse=True)}
    return sorted(unique.values(), key=lambda r: (r.phase, r.study, r.seed, r.tokens))


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def train_plan(runs: list[RunSpec], spec: CacheSpec, cache_dir: str, root: Path, settings: TrainSettings,
               max_runs: int | None, results_dir: Path | None = None) -> bool:
    """Train the plan's unfinished runs in order, copying each result into `results_dir`; False
    where it stopped early (a SIGTERM or a cache still being built), so that no report is written
    from a plan cut short. A run is finished when its run folder or the results folder has it.

    A SIGTERM stops the driver: Lightning's handler, which calls this one too while it trains, ends
    a fit at the next step (the run resumes from its last checkpoint); one that lands outside a fit,
    during the validation after it say, lets that run finish and stops before the next."""
    sigterm: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: sigterm.append(signum))
    try:
        trained = 0
        finished = completed(root, results_dir, spec, settings)
        for run in runs:
            if run.run_id in finished or result_path(root, run).is_file():
                continue
            if sigterm:
                say(f"stopped by SIGTERM before {run.run_id}; the same command resumes the plan")
                return False
            if max_runs is not None and trained >= max_runs:
                break
            say(f"run {run.run_id} (phase {run.phase})")
            try:
                result = train_and_validate(run, spec, cache_dir, root, settings)
            except SIGTERMException:
                say(f"stopped by SIGTERM in {run.run_id} (training or validating it); "
                    "the same command resumes it from its last checkpoint")
                raise SystemExit(128 + signal.SIGTERM) from None
            except FileNotFoundError as error:  # a partial cache without training shards yet
                print(f"  waiting for the cache: {error}", flush=True)
                return False
            except LockHeld as held:
                print(f"  PID {held.holder} is training it: on to the next run", flush=True)
                continue
            except Exception:  # noqa: BLE001 - one failed run must not stop the plan; its traceback is kept
                traceback.print_exc()
                continue
            trained += 1
            if results_dir is not None:
                keep(results_dir, result)
            print(f"  done: {result['tokens_trained']:,} tokens, {result['tokens_per_second']:.0f} tok/s", flush=True)
        return True
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("configs", nargs="+")
    parser.add_argument("--root", help="where runs and results go (outside the repository)")
    parser.add_argument("--cache-dir")
    parser.add_argument("--model")
    parser.add_argument("--dataset")
    parser.add_argument("--streaming", action="store_true", help="stream a hub dataset instead of downloading it whole")
    parser.add_argument("--gsae-layers", type=int, nargs="+")
    parser.add_argument("--jsae-layer", type=int)
    parser.add_argument("--d-model", type=int, help="the model's width, for JSAE's lambda rule 0.5 k^2 / d_model")
    parser.add_argument("--num-tokens", type=int, help="tokens cached")
    parser.add_argument("--train-tokens", type=int, help="training tokens per sweep run")
    parser.add_argument("--curve-tokens", type=int, nargs="+", help="budgets of the curves over training tokens")
    parser.add_argument("--only-phase", type=int, nargs="+", help="run only these phases (0 headline, 1 sweep, 2 curves)")
    parser.add_argument("--match", nargs="+", metavar="GLOB",
                        help="run only the runs whose id matches one of these patterns, e.g. 'gsae/L15_*' (see --plan)")
    parser.add_argument("--max-runs", type=int, help="stop after this many runs (newly trained)")
    parser.add_argument("--partial-cache", action="store_true", help="train on the cache's shards so far, while it is built")
    parser.add_argument("--plan", action="store_true", help="print the plan and what is done; run nothing")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--results-dir", help="the committed copy of every result (relative: to the repository); "
                        "'none' keeps results in the run folders only")
    parser.add_argument("--out", help="the report's markdown file (plots go beside it in <stem>/); default <root>/results.md")
    parser.add_argument("--test-mode", action="store_true", help="tiny CI mode: results are marked and never reported as findings")
    args = parser.parse_args(argv)

    config = load_config(args.configs)
    cache_fields = {key: tuple(value) if isinstance(value, list) else value for key, value in config["cache"].items()}
    spec = CacheSpec(**cache_fields)
    overrides = {name: value for name, value in (("model", args.model), ("dataset", args.dataset), ("jsae_layer", args.jsae_layer),
                                                 ("num_tokens", args.num_tokens)) if value is not None}
    if args.gsae_layers:
        overrides["gsae_layers"] = tuple(args.gsae_layers)
    if args.streaming:
        overrides["streaming"] = True
    if args.d_model and "jsae" in config["studies"]:
        config["studies"]["jsae"]["d_model"] = args.d_model
    spec = replace(spec, **overrides)
    root = Path(args.root or config["root"]).expanduser()
    if args.partial_cache:
        # Runs on an unfinished cache see fewer rows: kept apart, so they are never taken for the study's.
        root = root / "partial-cache"
    cache_dir = str(Path(args.cache_dir or config["cache_dir"]).expanduser())
    kept = args.results_dir or config["results_dir"]
    # runs on a partial cache are kept apart (above) and never committed
    results_dir = None if kept in (None, "none") or args.partial_cache else REPOSITORY / Path(kept).expanduser()
    settings = TrainSettings(**config["train"], partial_cache=args.partial_cache, test_mode=args.test_mode)
    runs = plan(config, spec, args.train_tokens, args.curve_tokens)
    if args.only_phase is not None:
        runs = [run for run in runs if run.phase in args.only_phase]
    if args.match:
        runs = [run for run in runs if any(fnmatch.fnmatchcase(run.run_id, pattern) for pattern in args.match)]
        if not runs:
            raise SystemExit(f"no run of the plan matches {args.match}: --plan lists the run ids")
    out = Path(args.out) if args.out else root / "results.md"

    if args.plan:
        finished = completed(root, results_dir, spec, settings)
        for run in runs:
            holder = lock_holder(training_lock(root, run))
            found = finished.get(run.run_id)
            state = ("pending" if holder is None else f"training (PID {holder})") if found is None else \
                "recovered" if found.get("recovered") else "done   "
            print(f"phase {run.phase}  {state}  {run.run_id}")
        return
    if not args.report_only:
        if not args.partial_cache:
            StudyData(spec, cache_dir).build()
        if not train_plan(runs, spec, cache_dir, root, settings, args.max_runs, results_dir):
            return
    from study_report import write_report

    finished = completed(root, results_dir, spec, settings)
    if results_dir is not None:
        for run_id in keep_new_results(finished, results_dir):
            print(f"kept {run_id} in {results_dir}")
    write_report(list(finished.values()), out, spec, runs)
    print(f"report: {out}")
    root.mkdir(parents=True, exist_ok=True)
    (root / "plan.json").write_text(json.dumps([run.run_id for run in runs], indent=1))


if __name__ == "__main__":
    main()
