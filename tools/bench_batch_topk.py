"""BatchTopK against TopK in one run: the selection alone and a whole SAE training step
(forward, FVU, backward), interleaved, best of several. Ratios only mean something within a run.

    python tools/bench_batch_topk.py [--tokens 2048 --d-in 256 --d-sae 8192 --k 32 --repeats 7]
"""

from __future__ import annotations

import argparse
import time

import torch

from lightning_sae import TopKSAE
from lightning_sae.selection import TopK
from lightning_sae_batch_topk import BatchTopK


def best_time(function, repeats: int) -> float:
    function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--d-in", type=int, default=256)
    parser.add_argument("--d-sae", type=int, default=8192)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.manual_seed(0)
    x = torch.randn(args.tokens, args.d_in)
    saes = {"topk": TopKSAE(args.d_in, args.d_sae, args.k, seed=0, selector=TopK()),
            "batch_topk": TopKSAE(args.d_in, args.d_sae, args.k, seed=0, selector=BatchTopK())}
    saes["batch_topk"](x)  # a threshold for the evaluation rule
    pre = saes["topk"].pre_activations(x)

    def step(sae: TopKSAE) -> None:
        sae.zero_grad(set_to_none=True)
        sae(x).fvu.backward()

    def evaluate(sae: TopKSAE) -> None:
        with torch.no_grad():
            sae.eval()(x)
        sae.train()

    rows = {
        "select": {name: (lambda s=sae: s.selector.select(pre, s, None)) for name, sae in saes.items()},
        "training step": {name: (lambda s=sae: step(s)) for name, sae in saes.items()},
        "eval forward": {name: (lambda s=sae: evaluate(s)) for name, sae in saes.items()},
    }
    print(f"N={args.tokens} d_in={args.d_in} d_sae={args.d_sae} k={args.k}, threads={torch.get_num_threads()}, best of {args.repeats}")
    for label, functions in rows.items():
        times = {name: best_time(function, args.repeats) for name, function in functions.items()}
        print(f"  {label:14s} TopK {times['topk'] * 1e3:8.1f} ms   BatchTopK {times['batch_topk'] * 1e3:8.1f} ms   "
              f"ratio {times['batch_topk'] / times['topk']:.2f}x")
    saes["batch_topk"].eval()
    print(f"  evaluation L0 with the threshold {float(saes['batch_topk'].selector.threshold):.4f}: "
          f"{saes['batch_topk'].encode(x).indices.numel() / args.tokens:.1f} per token")


if __name__ == "__main__":
    main()
