"""Train a plain TopK SAE and g-SAE(s) on the same cached activations and compare them.

Every run uses the same k, width, seed, data order, learning rate and number of steps; only the
selector differs. One activation cache (with dL/dx) is built once and read by every run. At the
end each run is validated on the same held-out rows and contexts, and a markdown table is printed:
explained variance, spliced ce_loss_score and kl_div_score, dead fraction and L0, with each g-SAE
scored both with gradient selection and with plain TopK selection on its weights.

    python tools/compare_gsae.py                       # embedded SmolLM2-135M, CPU-sized
    python tools/compare_gsae.py --beta 0.5 1 2 --out docs/gsae_table.md
    python tools/compare_gsae.py --model gpt2 --layer 7 --dataset Skylion007/openwebtext --streaming \\
        --num-tokens 20000000 --expansion-factor 32 --epochs 1 --batch-size 4096   # with a GPU
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger

from lightning_sae.data import EMBEDDED_CORPUS, EMBEDDED_MODEL, ActivationDataModule
from lightning_sae.data_request import DataRequest, Hook
from lightning_sae.module import SAEModule
from lightning_sae.registry import create_selector
from lightning_sae.selection import Selector

# Columns of the table: (metric name after "val/<mode>/", header, format).
COLUMNS = (
    ("explained_variance", "explained var.", "{:.4f}"),
    ("ce_loss_score", "CE loss score", "{:.4f}"),
    ("kl_div_score", "KL div score", "{:.4f}"),
    ("ce_loss_with_sae", "CE with SAE", "{:.4f}"),
    ("dead_fraction", "dead frac.", "{:.4f}"),
    ("frac_alive", "alive on val", "{:.4f}"),
    ("l0", "L0", "{:.1f}"),
)


class TopKOnGradientCache(SAEModule):
    """The plain TopK baseline, asking for the cached gradient only so that it reads the very
    cache the g-SAE runs read (a cache is keyed by its settings, gradients included). The topk
    selector ignores the gradient, so training and results are plain TopK's."""

    def data_request(self) -> DataRequest:
        return DataRequest({"x": Hook.site()}, gradients=True)


class TrainingClock(L.Callback):
    """Seconds spent in training batches, without validation or caching."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._start = 0.0

    def on_train_batch_start(self, *args: Any) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, *args: Any) -> None:
        self.seconds += time.perf_counter() - self._start


@dataclass
class Run:
    label: str
    selector: Selector
    rows: dict[str, dict[str, float]] = field(default_factory=dict)  # table row label -> metrics
    train_seconds: float = 0.0
    steps: int = 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    data = parser.add_argument_group("data (one cache, shared by every run)")
    data.add_argument("--model", default=EMBEDDED_MODEL)
    data.add_argument("--layer", type=int, default=15)
    data.add_argument("--hook", default="resid_post")
    data.add_argument("--dataset", default=EMBEDDED_CORPUS)
    data.add_argument("--dataset-config", default=None)
    data.add_argument("--streaming", action="store_true")
    data.add_argument("--context-size", type=int, default=128)
    data.add_argument("--num-tokens", type=int, default=102_400)
    data.add_argument("--validation-fraction", type=float, default=0.05)
    data.add_argument("--cache-dir", default=None, help="default: the user cache, keyed by the settings")
    data.add_argument("--device", default="auto", help="for caching and the spliced evaluation")
    data.add_argument("--model-batch-size", type=int, default=8)
    sae = parser.add_argument_group("SAEs (identical for every run but the selector)")
    sae.add_argument("--k", type=int, default=32)
    sae.add_argument("--expansion-factor", type=int, default=8)
    sae.add_argument("--batch-size", type=int, default=1024)
    sae.add_argument("--epochs", type=int, default=4)
    sae.add_argument("--lr", type=float, default=1e-3, help="the library default suits long runs; short ones need more")
    sae.add_argument("--dead-tokens", type=int, default=None, help="default: one epoch of training tokens")
    sae.add_argument("--seed", type=int, default=0)
    sae.add_argument("--beta", type=float, nargs="+", default=[1.0], help="one g-SAE per value")
    sae.add_argument("--normalize", default="rms", choices=["rms", "token", "none"])
    out = parser.add_argument_group("output")
    out.add_argument("--spliced-contexts", type=int, default=None, help="held-out contexts spliced into the model; default all")
    out.add_argument("--root", default="runs/compare_gsae", help="logs and saved SAEs")
    out.add_argument("--out", default=None, help="also write the markdown table (and a .json of all metrics) here")
    return parser.parse_args(argv)


def make_datamodule(args: argparse.Namespace) -> ActivationDataModule:
    return ActivationDataModule(
        model=args.model, layer=args.layer, hook=args.hook, dataset=args.dataset, dataset_config=args.dataset_config,
        streaming=args.streaming, context_size=args.context_size, num_tokens=args.num_tokens,
        validation_fraction=args.validation_fraction, cache_dir=args.cache_dir, device=args.device,
        model_batch_size=args.model_batch_size, batch_size=args.batch_size, seed=args.seed,
    )


def train(run: Run, args: argparse.Namespace) -> None:
    """Fits one SAE and records its final validation metrics, per validation mode."""
    L.seed_everything(args.seed, verbose=False)
    datamodule = make_datamodule(args)
    module_class = SAEModule if run.selector.needs_gradients else TopKOnGradientCache
    contexts = math.ceil(args.num_tokens / args.context_size)
    validation_contexts = math.ceil(contexts * args.validation_fraction)
    train_tokens = (contexts - validation_contexts) * args.context_size
    module = module_class(
        k=args.k, expansion_factor=args.expansion_factor, selector=run.selector, lr=args.lr, seed=args.seed,
        dead_tokens=args.dead_tokens or train_tokens,
        spliced_eval_contexts=args.spliced_contexts or validation_contexts,
    )
    clock = TrainingClock()
    # Validation runs once, after the last epoch, so every run is measured at the same point.
    trainer = L.Trainer(
        max_epochs=args.epochs, check_val_every_n_epoch=args.epochs, num_sanity_val_steps=0,
        accelerator="auto", precision="32-true", gradient_clip_val=1.0, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[clock], log_every_n_steps=20,
        logger=CSVLogger(args.root, name=run.label.replace(" ", "_").replace("=", "")),
        default_root_dir=args.root,
    )
    trainer.fit(module, datamodule)
    metrics = {name: float(value) for name, value in trainer.callback_metrics.items() if name.startswith("val/")}
    for mode in module.validation_modes():
        prefix = module.metric_prefix("sae", mode)
        selection = {"": "gradient selection" if run.selector.needs_gradients else "", "plain_topk": "plain TopK selection"}[mode]
        row_label = f"{run.label} ({selection})" if selection else run.label
        run.rows[row_label] = {name.removeprefix(prefix): value for name, value in metrics.items() if name.startswith(prefix) and "/" not in name.removeprefix(prefix)}
    run.train_seconds, run.steps = clock.seconds, trainer.global_step


def markdown_table(runs: list[Run]) -> str:
    header = "| run | " + " | ".join(title for _, title, _ in COLUMNS) + " | train s |"
    lines = [header, "|" + "---|" * (len(COLUMNS) + 2)]
    for run in runs:
        for label, metrics in run.rows.items():
            cells = [fmt.format(metrics[name]) if name in metrics else "n/a" for name, _, fmt in COLUMNS]
            lines.append(f"| {label} | " + " | ".join(cells) + f" | {run.train_seconds:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[Run]:
    args = parse_args(argv)
    runs = [Run("TopK", create_selector("topk"))]
    runs += [Run(f"g-SAE beta={beta:g}", create_selector("gradient_topk", beta=beta, normalize=args.normalize)) for beta in args.beta]
    for run in runs:
        train(run, args)
    table = markdown_table(runs)
    steps = runs[0].steps
    print(f"\n{args.model} layer {args.layer} {args.hook}; k={args.k}, d_sae={args.expansion_factor} x d_in; "
          f"{steps} steps x {args.batch_size} tokens, seed {args.seed}, selection normalisation {args.normalize!r}\n")
    print(table)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(table + "\n")
        record = {"args": vars(args), "runs": [{"label": r.label, "selector": repr(r.selector), "rows": r.rows,
                                                 "train_seconds": r.train_seconds, "steps": r.steps} for r in runs]}
        out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    return runs


if __name__ == "__main__":
    torch.set_float32_matmul_precision("high")  # TF32 on GPUs that have it; no effect on CPU
    main()
