"""Does caching activations (and dL/dx) with the language model in bfloat16 change the SAE trained
on them? The same TopK SAE and g-SAE are trained on a float32 cache and on a bfloat16 cache of the
embedded SmolLM2-135M (layer 15 resid_post, python-docs text), plus a second seed on the float32
cache as the yardstick of run-to-run noise. Every run is then validated on the same float32
held-out rows and contexts, spliced into the float32 model, so only the training data differs.

    python tools/bench_model_dtype_sae.py                  # CPU-sized: 32k tokens, ~330 steps
    python tools/bench_model_dtype_sae.py --num-tokens 65536 --epochs 4 --out runs/dtype_sae.md

Prints one markdown table (SAELens/SAEBench metric names) and the bf16 caches' relative error
against the float32 ones on the held-out rows.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import lightning as L
from compare_gsae import TopKOnGradientCache  # tools/ is on sys.path when this script runs

from lightning_sae.data import EMBEDDED_CORPUS, EMBEDDED_MODEL, ActivationDataModule
from lightning_sae.module import SAEModule
from lightning_sae.registry import create_selector

METRICS = ("explained_variance", "fvu", "l0", "dead_fraction", "ce_loss_score", "kl_div_score")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=EMBEDDED_MODEL)
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--dataset", default=EMBEDDED_CORPUS)
    parser.add_argument("--num-tokens", type=int, default=32_768)
    parser.add_argument("--validation-fraction", type=float, default=0.125)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--expansion-factor", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seeds", type=int, nargs=2, default=[0, 1], help="the run seed and the noise-yardstick seed")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--root", default="runs/bench_model_dtype_sae")
    parser.add_argument("--out", default=None, help="also write the table here (and the metrics as .json)")
    return parser.parse_args(argv)


def datamodule(args: argparse.Namespace, model_dtype: str, seed: int) -> ActivationDataModule:
    # The shuffling seed follows the run seed; it is not part of the cache's identity.
    return ActivationDataModule(
        model=args.model, model_dtype=model_dtype, layer=args.layer, hook="resid_post", dataset=args.dataset,
        context_size=128, num_tokens=args.num_tokens, validation_fraction=args.validation_fraction,
        device=args.device, model_batch_size=8, batch_size=args.batch_size, seed=seed,
    )


def run(args: argparse.Namespace, selector: str, model_dtype: str, seed: int) -> tuple[dict[str, float], ActivationDataModule]:
    """Fits on the `model_dtype` cache without validating, then validates on the float32 one."""
    L.seed_everything(seed, verbose=False)
    contexts = math.ceil(args.num_tokens / 128)
    train_tokens = (contexts - math.ceil(contexts * args.validation_fraction)) * 128
    gradient = selector == "gradient_topk"
    module_class = SAEModule if gradient else TopKOnGradientCache  # both read the cache with dL/dx
    module = module_class(
        k=args.k, expansion_factor=args.expansion_factor, selector=create_selector(selector), lr=args.lr, seed=seed,
        dead_tokens=train_tokens, spliced_eval_contexts=contexts,  # every held-out context
    )
    common = dict(accelerator=args.device, precision="32-true", enable_checkpointing=False, enable_progress_bar=False,
                  enable_model_summary=False, logger=False, default_root_dir=args.root)
    training = datamodule(args, model_dtype, seed)
    trainer = L.Trainer(max_epochs=args.epochs, limit_val_batches=0, num_sanity_val_steps=0, gradient_clip_val=1.0, **common)
    trainer.fit(module, training)
    validating = L.Trainer(**common)
    validating.validate(module, datamodule(args, "float32", seed), verbose=False)
    metrics = {name: float(validating.callback_metrics[f"val/{name}"]) for name in METRICS}
    metrics["steps"] = trainer.global_step
    return metrics, training


def relative_errors(reference: ActivationDataModule, other: ActivationDataModule) -> dict[str, float]:
    """||other - reference|| / ||reference|| over the held-out rows, per batch key."""
    squared_error, squared_norm = {}, {}
    for ref, oth in zip(reference.val_dataloader(), other.val_dataloader(), strict=True):
        for key in ref:
            if ref[key].is_floating_point():
                squared_error[key] = squared_error.get(key, 0.0) + float((oth[key] - ref[key]).double().square().sum())
                squared_norm[key] = squared_norm.get(key, 0.0) + float(ref[key].double().square().sum())
    return {key: math.sqrt(squared_error[key] / squared_norm[key]) for key in squared_error}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    seed, other_seed = args.seeds
    plan = [(selector, dtype, s) for selector in ("topk", "gradient_topk")
            for dtype, s in (("float32", seed), ("bfloat16", seed), ("float32", other_seed))]
    results, modules = [], {}
    start = time.perf_counter()
    for selector, dtype, s in plan:
        metrics, dm = run(args, selector, dtype, s)
        results.append({"selector": selector, "model_dtype": dtype, "seed": s, **metrics})
        modules.setdefault(dtype, dm)
        print(json.dumps(results[-1]), flush=True)
    errors = relative_errors(modules["float32"], modules["bfloat16"])
    names = {"topk": "TopK", "gradient_topk": "g-SAE"}
    lines = ["| SAE | training cache | seed | " + " | ".join(METRICS) + " |", "|" + "---|" * (len(METRICS) + 3)]
    for r in results:
        cells = [f"{r[name]:.1f}" if name == "l0" else f"{r[name]:.4f}" for name in METRICS]
        lines.append(f"| {names[r['selector']]} | {r['model_dtype']} | {r['seed']} | " + " | ".join(cells) + " |")
    steps = results[0]["steps"]
    table = "\n".join(lines)
    print(f"\n{args.model} layer {args.layer} resid_post; k={args.k}, d_sae={args.expansion_factor} x d_in, "
          f"{steps} steps x {args.batch_size} tokens; validated on float32 held-out rows, spliced into the float32 model\n")
    print(table)
    print("\nbf16 cache vs float32 cache on the held-out rows, relative error: "
          + ", ".join(f"{key} {value:.4f}" for key, value in errors.items()))
    print(f"total {time.perf_counter() - start:.0f} s")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(table + "\n")
        out.with_suffix(".json").write_text(json.dumps({"args": vars(args), "runs": results, "relative_errors": errors}, indent=1) + "\n")


if __name__ == "__main__":
    main()
