"""Selection rules side by side on one setup: a fit per rule (same config, budget and seed), then
each trained SAE's training step timed against the first rule's, on the same batch.

    python tools/compare_rules.py --config configs/quickstart.yaml --out rules \\
        --rule "topk=" \\
        --rule "batch_topk=--model.selector=batch_topk" \\
        --rule "jumprelu=--model.selector=jumprelu --model.selector.init_threshold=8" \\
        --common "--trainer.max_epochs=2 --trainer.check_val_every_n_epoch=2"

Each fit runs through the `lightning-sae fit` entry point (in this process, one after another)
and leaves <out>/<name>.json with its final validation metrics; a rerun skips the rules whose
JSON exists, so an interrupted comparison resumes at the first missing fit. The step timing
loads each rule's last checkpoint, takes one training batch of the shared DataModule and runs
one optimizer step of every rule per repeat, interleaved, so that load on a shared machine
falls on all of them alike; it reports the median of the per-repeat ratios to the first rule
(wall clock and process CPU time). <out>/table.md is the markdown table.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from lightning_sae.cli import main as cli_main

METRICS = ("val/explained_variance", "val/ce_loss_score", "val/frac_alive", "val/l0")


def fit_rule(name: str, config: str | None, common: list[str], args: list[str], out: Path) -> dict:
    """One fit; its validation metrics, checkpoint and module class, as written to <out>/<name>.json."""
    record_path = out / f"{name}.json"
    if record_path.exists():
        return json.loads(record_path.read_text())
    root = out / name
    started = time.perf_counter()
    cli = cli_main(["fit", *(["--config", config] if config else []), f"--trainer.default_root_dir={root}",
                    "--trainer.enable_progress_bar=false", *common, *args])
    checkpoints = sorted(Path(cli.trainer.log_dir).rglob("*.ckpt"), key=os.path.getmtime)
    if not checkpoints:
        raise RuntimeError(f"the {name} fit wrote no checkpoint under {cli.trainer.log_dir}: the step timing needs one")
    record = {
        "name": name, "args": args, "common": common, "wall_s": time.perf_counter() - started, "steps": cli.trainer.global_step,
        "load_at_end": os.getloadavg()[0],
        "metrics": {key: float(value) for key, value in cli.trainer.callback_metrics.items() if key.startswith(("val/", "train/"))},
        "checkpoint": str(checkpoints[-1]),
        "module_class": f"{type(cli.model).__module__}:{type(cli.model).__qualname__}",
    }
    record_path.write_text(json.dumps(record, indent=1))
    return record


def _load_module(record: dict) -> torch.nn.Module:
    module_name, class_name = record["module_class"].split(":")
    module_class = getattr(importlib.import_module(module_name), class_name)
    module = module_class.load_from_checkpoint(record["checkpoint"], map_location="cpu", weights_only=True)
    return module.train()


def time_steps(records: list[dict], batch: dict[str, torch.Tensor], repeats: int) -> dict[str, dict[str, float]]:
    """Per rule: median wall and CPU ms of one optimizer step, and the medians of the per-repeat
    ratios to the first rule's step."""
    steppers = {}
    for record in records:
        module = _load_module(record)
        optimizer = module.optimizer_and_schedule(max(repeats + 1, 2))["optimizer"]

        def step(module=module, optimizer=optimizer) -> None:
            module.training_loss(batch).backward()
            module.on_before_optimizer_step(optimizer)
            module.optimizer_step(0, 0, optimizer, lambda: None)
            optimizer.zero_grad(set_to_none=True)

        step()  # warm-up: allocations and lazily built state
        steppers[record["name"]] = step
    wall = {name: [] for name in steppers}
    cpu = {name: [] for name in steppers}
    for _ in range(repeats):
        for name, step in steppers.items():
            wall_start, cpu_start = time.perf_counter(), time.process_time()
            step()
            wall[name].append(time.perf_counter() - wall_start)
            cpu[name].append(time.process_time() - cpu_start)
    reference = records[0]["name"]
    return {
        name: {
            "wall_ms": 1e3 * statistics.median(wall[name]),
            "cpu_ms": 1e3 * statistics.median(cpu[name]),
            "wall_ratio": statistics.median(a / b for a, b in zip(wall[name], wall[reference])),
            "cpu_ratio": statistics.median(a / b for a, b in zip(cpu[name], cpu[reference])),
        }
        for name in steppers
    }


def table(records: list[dict], steps: dict[str, dict[str, float]] | None) -> str:
    reference = records[0]["name"]
    head = ["rule", "arguments", "steps", *(m.removeprefix("val/") for m in METRICS)]
    if steps:
        head += [f"step vs {reference} (wall)", f"step vs {reference} (CPU)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for record in records:
        metrics = record["metrics"]
        row = [record["name"], " ".join(record["args"]) or "(config as is)", str(record["steps"]),
               *(f"{metrics[m]:.4f}" if m in metrics else "not computed" for m in METRICS)]
        if steps:
            timing = steps[record["name"]]
            row += [f"{timing['wall_ratio']:.2f}x", f"{timing['cpu_ratio']:.2f}x"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="the lightning-sae YAML config every rule starts from")
    parser.add_argument("--rule", action="append", required=True, metavar="NAME=ARGS",
                        help="a rule: its name and the CLI arguments that select it (the first is the reference)")
    parser.add_argument("--common", default="", help="CLI arguments added to every fit (budget, validation)")
    parser.add_argument("--out", required=True, help="folder for the fits, their JSON records and table.md")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved timing repeats (0: no step timing)")
    args = parser.parse_args(argv)
    # The fits get their arguments from here; LightningCLI warns when sys.argv carries others.
    saved_argv, sys.argv = sys.argv, sys.argv[:1]
    try:
        return _compare(args, parser)
    finally:
        sys.argv = saved_argv


def _compare(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rules = []
    for spec in args.rule:
        name, sep, rest = spec.partition("=")
        if not sep or not name:
            parser.error(f"--rule takes NAME=ARGS, got {spec!r}")
        rules.append((name, shlex.split(rest)))
    if len({name for name, _ in rules}) != len(rules):
        parser.error("two rules share a name")
    common = shlex.split(args.common)
    records = [fit_rule(name, args.config, common, rule_args, out) for name, rule_args in rules]

    steps = None
    if args.repeats > 0:
        steps = time_steps(records, _one_batch(args.config, [*common, *rules[0][1]]), args.repeats)
        for name, timing in steps.items():
            print(f"{name:24s} step {timing['wall_ms']:8.1f} ms wall, {timing['cpu_ms']:8.1f} ms CPU; "
                  f"vs {rules[0][0]}: {timing['wall_ratio']:.2f}x wall, {timing['cpu_ratio']:.2f}x CPU")
    text = table(records, steps)
    load = os.getloadavg()
    text += (f"\nStep timing: {args.repeats} interleaved repeats, one training batch, load average at the end "
             f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}.\n" if steps else "")
    (out / "table.md").write_text(text)
    print(text)
    return 0


def _one_batch(config: str | None, args: list[str]) -> dict[str, torch.Tensor]:
    """A training batch of the reference rule's DataModule (the same cache every fit read)."""
    import lightning as L

    from lightning_sae.cli import SAEArgumentParser, SAECLI
    from lightning_sae.module import SAETrainingModule

    cli = SAECLI(SAETrainingModule, L.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                 parser_class=SAEArgumentParser, run=False, save_config_callback=None,
                 args=[*(["--config", config] if config else []), *args])
    datamodule, model = cli.datamodule, cli.model
    datamodule.trainer = type("Trainer", (), {"global_rank": 0, "world_size": 1, "lightning_module": model})()
    datamodule.prepare_data()
    datamodule.setup("fit")
    return next(iter(datamodule.train_dataloader()))


if __name__ == "__main__":
    raise SystemExit(main())
