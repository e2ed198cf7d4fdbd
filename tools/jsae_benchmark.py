"""Step time of the JSAE pair with the Jacobian penalty (lambda > 0) against the same pair at
lambda = 0 (two independent TopK SAEs), under a real Trainer: forward, backward, optimizer step
and decoder maintenance, timed per batch.

    python tools/jsae_benchmark.py                          # SmolLM2-135M shapes, random data
    python tools/jsae_benchmark.py --data pair.safetensors --mlp mlp.safetensors
    python tools/jsae_benchmark.py --compare-precision --lr 1e-3   # training outcome: exact vs bf16 penalty

With random data every latent fires in a batch (the worst case for the shared-row tables of the
Jacobian); real activations reuse fewer latents per batch. Other processes on the machine add
noise: rounds alternate the two settings, steps are timed in process CPU time with one thread
(the default), and medians are reported.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from safetensors.torch import save_file

from lightning_sae.tensor_data import TensorDataModule
from lightning_sae_jsae import FrozenMLP, JSAEModule


class StepTimer(L.Callback):
    def __init__(self) -> None:
        self.times: list[float] = []

    # Process CPU time: with one thread it does not count time spent descheduled by other
    # processes on a shared machine, which wall time would.
    def on_train_batch_start(self, *args) -> None:
        self.start = time.process_time()

    def on_train_batch_end(self, *args) -> None:
        self.times.append(time.process_time() - self.start)


def random_setup(directory: Path, d_model: int, d_mlp: int, tokens: int, family: str) -> tuple[str, FrozenMLP]:
    generator = torch.Generator().manual_seed(0)
    rows = 2 * d_mlp if family in ("swiglu",) or family.startswith("gated_") else d_mlp
    mlp = FrozenMLP(
        torch.randn(rows, d_model, generator=generator) / d_model**0.5,
        torch.randn(d_model, d_mlp, generator=generator) / d_mlp**0.5,
        family=family,
    )
    x = torch.randn(tokens, d_model, generator=generator)
    with torch.no_grad():
        y = mlp(x)
    path = directory / "pair.safetensors"
    save_file({"x": x, "y": y}, str(path))
    return str(path), mlp


def time_steps(path: str, mlp: FrozenMLP, lam: float, args: argparse.Namespace, root: str) -> list[float]:
    module = JSAEModule(
        k=args.k, d_sae=args.d_sae, jacobian_coefficient=lam, jacobian_warmup_fraction=0.0, mlp=mlp,
        jacobian_chunk_tokens=args.chunk, jacobian_precision=args.precision, lr=1e-4,
    )
    timer = StepTimer()
    trainer = L.Trainer(
        max_steps=args.steps, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, gradient_clip_val=1.0, callbacks=[timer],
        default_root_dir=root,  # the end-of-fit export lands in the scratch folder
    )
    data = TensorDataModule(path=path, batch_size=args.batch_size, validation_fraction=0.0)
    trainer.fit(module, data)
    return timer.times[args.skip :]


def train_and_validate(path: str, mlp: FrozenMLP, precision: str, args: argparse.Namespace, root: str) -> dict[str, float]:
    """Train the lambda > 0 pair for --steps from a fixed initialisation and batch order, then
    validate it (exact Jacobian) on the held-out tenth of the rows."""
    module = JSAEModule(
        k=args.k, d_sae=args.d_sae, jacobian_coefficient=args.lam, jacobian_warmup_fraction=0.0, mlp=mlp,
        jacobian_chunk_tokens=args.chunk, jacobian_precision=precision, lr=args.lr, seed=0,
    )
    trainer = L.Trainer(
        max_steps=args.steps, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0, gradient_clip_val=1.0, default_root_dir=root,
    )
    data = TensorDataModule(path=path, batch_size=args.batch_size, validation_fraction=0.1, seed=0)
    trainer.fit(module, data)
    validator = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=root)
    return {name: float(value) for name, value in validator.validate(module, data, verbose=False)[0].items()}


def compare_precision(path: str, mlp: FrozenMLP, args: argparse.Namespace, root: str) -> None:
    results = {precision: train_and_validate(path, mlp, precision, args, root) for precision in ("exact", "bf16")}
    names = ["val/jacobian_at_x/l1", "val/jacobian_at_x/count_above_0.01", "val/sae_in/explained_variance", "val/sae_out/explained_variance"]
    print(f"after {args.steps} steps of {args.batch_size} tokens, lambda = {args.lam:g}, lr = {args.lr:g}; validation on held-out rows")
    print("| metric | exact products | bf16 products | relative difference |")
    print("|---|---|---|---|")
    for name in names:
        exact, bf16 = results["exact"][name], results["bf16"][name]
        print(f"| {name} | {exact:.5g} | {bf16:.5g} | {(bf16 - exact) / abs(exact):+.2e} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="safetensors with x and y = MLP(x); random data when omitted")
    parser.add_argument("--mlp", help="FrozenMLP safetensors (with --data)")
    parser.add_argument("--d-model", type=int, default=576)
    parser.add_argument("--d-mlp", type=int, default=1536)
    parser.add_argument("--family", default="swiglu")
    parser.add_argument("--d-sae", type=int, default=4608)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--chunk", type=int, default=16, help="jacobian_chunk_tokens")
    parser.add_argument("--precision", default="auto", choices=("auto", "exact", "bf16"), help="jacobian_precision of the lambda > 0 pair")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--skip", type=int, default=5, help="first steps left out (warm-up, allocator)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--lambda", dest="lam", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (CPU time is only meaningful with 1)")
    parser.add_argument("--lr", type=float, default=1e-4, help="learning rate of --compare-precision")
    parser.add_argument(
        "--compare-precision", action="store_true",
        help="instead of timing: train the lambda > 0 pair with exact and with bf16 penalty products and compare validation metrics",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as scratch:
        if args.data:
            path, mlp = args.data, FrozenMLP.load(args.mlp)
        else:
            tokens = args.batch_size * (args.steps + 1)
            path, mlp = random_setup(Path(scratch), args.d_model, args.d_mlp, tokens, args.family)
        if args.compare_precision:
            compare_precision(path, mlp, args, scratch)
            return
        times: dict[float, list[float]] = {0.0: [], args.lam: []}
        for _ in range(args.rounds):
            for lam in times:
                times[lam] += time_steps(path, mlp, lam, args, scratch)
    base, jsae = statistics.median(times[0.0]), statistics.median(times[args.lam])
    print(
        f"D={mlp.d_in} d_mlp={mlp.d_mlp} ({mlp.family}) d_sae={args.d_sae} k={args.k} N={args.batch_size} "
        f"threads={torch.get_num_threads()} jacobian_precision={args.precision}"
    )
    print("| pair step | median CPU s | steps timed |")
    print("|---|---|---|")
    print(f"| lambda = 0 (two TopK SAEs) | {base:.4f} | {len(times[0.0])} |")
    print(f"| lambda = {args.lam:g} (JSAE) | {jsae:.4f} | {len(times[args.lam])} |")
    print(f"ratio JSAE / baseline: {jsae / base:.2f}x")


if __name__ == "__main__":
    main()
