"""Training throughput of the studies' SAEs at their real shapes, on random data, for the budget
estimates in docs/results.md: tokens per second of a Trainer step (forward, backward, Adam,
decoder maintenance) for TopK, g-SAE (beta 1) and the JSAE pair (lambda 0 and 1), interleaved
over rounds so that a change in the machine's load hits every kind alike.

    python tools/studies/throughput.py --rounds 3 --steps 8            # SmolLM2-135M shapes (d 576, SwiGLU 1536)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))

from study_runs import TrainClock

from lightning_sae.module import SAEModule
from lightning_sae.registry import create_selector
from lightning_sae.tensor_data import TensorDataModule


def random_data(path: Path, d: int, d_mlp: int, rows: int):
    from lightning_sae_jsae import FrozenMLP

    generator = torch.Generator().manual_seed(0)
    mlp = FrozenMLP(torch.randn(2 * d_mlp, d, generator=generator) / d**0.5, torch.randn(d, d_mlp, generator=generator) / d_mlp**0.5,
                    family="swiglu")
    x = torch.randn(rows, d, generator=generator)
    with torch.no_grad():
        y = mlp(x)
    save_file({"x": x, "y": y, "grad": torch.randn(rows, d, generator=generator)}, str(path))
    return mlp


def module_for(kind: str, d: int, mlp) -> L.LightningModule:
    if kind == "topk":
        return SAEModule(k=32, expansion_factor=8, spliced_eval_contexts=0, lr=1e-3)
    if kind == "gsae":
        return SAEModule(k=32, expansion_factor=8, selector=create_selector("gradient_topk", beta=1.0), spliced_eval_contexts=0, lr=1e-3)
    from lightning_sae_jsae import JSAEModule

    lam = float(kind.removeprefix("jsae"))
    return JSAEModule(k=32, d_sae=4 * d, jacobian_coefficient=lam, jacobian_warmup_fraction=0.0, reconstruction_loss="fvu",
                      mlp=mlp, spliced_eval_contexts=0, lr=1e-3, example_jacobians=0)


def tokens_per_second(kind: str, data_file: Path, d: int, mlp, steps: int, batch: int) -> float:
    L.seed_everything(0, verbose=False)
    clock = TrainClock()
    trainer = L.Trainer(max_steps=steps + 2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0, callbacks=[clock])
    module = module_for(kind, d, mlp)
    module.configure_callbacks = list  # no export at the end
    started = {}

    class SkipWarmup(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 2:
                started["seconds"], started["steps"] = clock.seconds, clock.steps

    trainer.callbacks.append(SkipWarmup())
    trainer.fit(module, TensorDataModule(str(data_file), batch_size=batch, validation_fraction=0.05))
    seconds, counted = clock.seconds - started["seconds"], clock.steps - started["steps"]
    return counted * batch / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--d", type=int, default=576)
    parser.add_argument("--d-mlp", type=int, default=1536)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per measurement (after 2 warm-up steps)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--kinds", nargs="+", default=["topk", "gsae", "jsae0", "jsae1"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    measured: dict[str, list[float]] = {kind: [] for kind in args.kinds}
    loads = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory() as folder:
        data_file = Path(folder) / "x.safetensors"
        mlp = random_data(data_file, args.d, args.d_mlp, rows=args.batch_size * (args.steps + 4))
        for _ in range(args.rounds):
            for kind in args.kinds:
                measured[kind].append(tokens_per_second(kind, data_file, args.d, mlp, args.steps, args.batch_size))
                loads.append(os.getloadavg()[0])
    print(f"{time.strftime('%Y-%m-%d %H:%M')}; threads {args.threads}; load average (1 min) {min(loads):.1f}-{max(loads):.1f}")
    print("| kind | tokens/s (median of rounds) | rounds |")
    print("|---|---|---|")
    for kind, values in measured.items():
        print(f"| {kind} | {statistics.median(values):.0f} | {', '.join(f'{v:.0f}' for v in values)} |")


if __name__ == "__main__":
    main()
