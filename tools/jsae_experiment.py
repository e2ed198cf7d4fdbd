"""JSAE against its lambda = 0 baseline on the embedded SmolLM2-135M (layer 15 MLP), on CPU.

Each lambda trains the pair from the same seed on the same cached activations (mlp_in and mlp_out
of one model pass) and reports, from the final validation: counts per token of |J| above the
paper's thresholds (at the true x and at the pair's own latents), both SAEs' explained variance, spliced CE scores when the core computes them,
and the summed training-step time.

    python tools/jsae_experiment.py --lambdas 0 1 4 --epochs 2 --out runs/jsae_experiment
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_sae.data import EMBEDDED_CORPUS, EMBEDDED_MODEL, ActivationDataModule
from lightning_sae_jsae import DEFAULT_THRESHOLDS, JSAEModule


class TrainTime(L.Callback):
    """Seconds spent in training steps (forward, backward, optimizer), validation excluded."""

    def __init__(self) -> None:
        self.total, self.steps = 0.0, 0

    def on_train_batch_start(self, *args) -> None:
        self.start = time.perf_counter()

    def on_train_batch_end(self, *args) -> None:
        self.total += time.perf_counter() - self.start
        self.steps += 1


def run(lam: float, args: argparse.Namespace) -> dict[str, float]:
    L.seed_everything(args.seed, verbose=False)
    data = ActivationDataModule(
        model=args.model, dataset=args.dataset, context_size=args.context_size, layer=args.layer, num_tokens=args.num_tokens, validation_fraction=0.1, batch_size=args.batch_size, device="cpu"
    )
    module = JSAEModule(
        k=args.k, d_sae=args.d_sae, jacobian_coefficient=lam, reconstruction_loss=args.loss, lr=args.lr,
        dead_tokens=args.dead_tokens, spliced_eval_contexts=args.spliced_contexts, seed=args.seed,
        jacobian_thresholds=tuple(args.thresholds),
    )
    timer = TrainTime()
    logger = TensorBoardLogger(args.out, name=f"lambda_{lam:g}", default_hp_metric=False)
    trainer = L.Trainer(
        max_epochs=args.epochs, accelerator="cpu", logger=logger, callbacks=[timer], gradient_clip_val=1.0,
        enable_checkpointing=False, enable_progress_bar=False, num_sanity_val_steps=0, log_every_n_steps=10,
        check_val_every_n_epoch=args.epochs,  # validate (and splice) once, at the end
    )
    trainer.fit(module, data)
    metrics = {name: float(value) for name, value in trainer.callback_metrics.items() if name.startswith("val/")}
    metrics["train_seconds"], metrics["train_steps"] = timer.total, timer.steps
    return metrics


def table(results: dict[float, dict[str, float]]) -> str:
    lambdas = sorted(results)
    head = "| metric | " + " | ".join(f"lambda = {lam:g}" for lam in lambdas) + " |"
    lines = [head, "|---" * (len(lambdas) + 1) + "|"]

    def row(label: str, key: str, fmt: str = "{:.4f}") -> None:
        cells = [fmt.format(results[lam][key]) if key in results[lam] else "n/a" for lam in lambdas]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    # The Jacobian at the true x (what training penalises) and at the pair's own latents (the
    # function the trained pair computes); see docs/jsae.md.
    for where, label in (("at_x", "at x"), ("at_xhat", "at xhat")):
        prefix = f"val/jacobian_{where}/"
        thresholds = sorted({float(key.rsplit("_", 1)[1]) for r in results.values() for key in r if key.startswith(prefix + "count_above_")})
        for t in thresholds:
            row(f"{label}: mean count of abs(J) > {t:g} per token", f"{prefix}count_above_{t:g}", "{:.1f}")
        row(f"{label}: mean abs(J) (l1)", prefix + "l1")
    for name in ("sae_in", "sae_out"):
        row(f"{name} explained variance", f"val/{name}/explained_variance")
        row(f"{name} ce_loss_score (spliced)", f"val/{name}/ce_loss_score")
        row(f"{name} l0", f"val/{name}/l0", "{:.1f}")
        row(f"{name} dead fraction", f"val/{name}/dead_fraction", "{:.3f}")
    row("training seconds (steps only)", "train_seconds", "{:.0f}")
    base = results.get(0.0)
    if base:
        lines.append("| training time / baseline | " + " | ".join(f"{results[lam]['train_seconds'] / base['train_seconds']:.2f}x" for lam in lambdas) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lambdas", type=float, nargs="+", default=[0.0, 1.0])
    parser.add_argument("--model", default=EMBEDDED_MODEL, help="a model name or local folder")
    parser.add_argument("--dataset", default=EMBEDDED_CORPUS, help="a dataset name, local text file or folder")
    parser.add_argument("--context-size", type=int, default=128)
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--num-tokens", type=int, default=200_000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--d-sae", type=int, default=2304)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--loss", default="fvu", choices=["fvu", "mse"])
    parser.add_argument("--dead-tokens", type=int, default=100_000)
    parser.add_argument("--spliced-contexts", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--thresholds", type=float, nargs="+", default=[*DEFAULT_THRESHOLDS, 0.06, 0.12, 0.18, 0.24],
        help="|J| levels counted; the last four are the paper's times 12, SmolLM2 layer 15's RMS(mlp_out) / RMS(mlp_in)",
    )
    parser.add_argument("--out", default="runs/jsae_experiment")
    parser.add_argument("--threads", type=int, default=1, help="torch threads; 1 keeps timings stable on a shared machine")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_file = out / "results.json"
    results = {float(k): v for k, v in json.loads(results_file.read_text()).items()} if results_file.is_file() else {}
    for lam in args.lambdas:
        results[lam] = run(lam, args)
        results_file.write_text(json.dumps({str(k): v for k, v in results.items()}, indent=1))
        print(table(results), flush=True)
    print(f"threads: {torch.get_num_threads()}; results in {results_file}")


if __name__ == "__main__":
    main()
