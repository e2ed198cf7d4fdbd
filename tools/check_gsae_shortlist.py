"""How often does the g-SAE selector's bf16 shortlist change which latents fire?

Compares `GradientTopKSelector(shortlist="bf16").select` with the top-k of the full fp32 score
(the SPEC's formula computed directly) on cached activations and gradients, for each SAE and
beta given. Where the two differ, the latents they disagree on are re-scored in float64 to show
how far apart they really are (a relative gap near fp32's 6e-8 is a tie that summation order
alone can flip).

    python tools/check_gsae_shortlist.py --cache ~/.cache/lightning-sae/activations/<key> \
        --sae runs/gsae/lightning_logs/version_0/sae --sae init --betas 0.25 1 4
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from lightning_sae.data import CacheView, read_cache
from lightning_sae.formats import load_sae
from lightning_sae.sae import TopKSAE
from lightning_sae_gsae import GradientTopKSelector, normalize_gradient


def load_rows(cache: CacheView, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `tokens` training rows of x and grad of a gradient cache."""
    if "grad" not in cache.widths:
        raise SystemExit(f"{cache.path} has no gradients (it holds {cache.keys}): cache with a gradient selector")
    rows = cache.reader("train", ["x", "grad"])(torch.arange(min(tokens, cache.rows["train"])))
    return rows["x"], rows["grad"]


def disagreements(sae: TopKSAE, x: torch.Tensor, grad: torch.Tensor, beta: float, block: int = 4096) -> tuple[int, list[float]]:
    """(tokens whose selected set differs, fp64 relative score gaps of the swapped latents)."""
    fast = GradientTopKSelector(beta=beta, shortlist="bf16")
    exact = GradientTopKSelector(beta=beta, shortlist="off")
    differing, gaps = 0, []
    W_dec64 = sae.W_dec.detach().double()
    for start in range(0, x.shape[0], block):
        xb, gb = x[start : start + block], grad[start : start + block]
        pre = sae.pre_activations(xb)
        chosen = fast.select(pre, sae, gb)
        reference = exact.score(pre, sae, gb).topk(sae.k, dim=1).indices
        for t in range(xb.shape[0]):
            a, b = set(chosen[t].tolist()), set(reference[t].tolist())
            if a == b:
                continue
            differing += 1
            g64 = normalize_gradient(gb, "rms")[t].double() * beta
            score64 = pre[t].double() * (1 + (W_dec64 @ g64).abs())
            swapped = sorted(a ^ b)
            values = score64[swapped]
            gaps.append(((values.max() - values.min()) / values.abs().max()).item())
    return differing, gaps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, required=True, help="an activation cache directory with gradients")
    parser.add_argument("--sae", action="append", required=True, help="a SAELens/sparsify SAE directory, or 'init' (random, seed 0)")
    parser.add_argument("--betas", type=float, nargs="+", default=[0.25, 1.0, 4.0])
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--d-sae", type=int, default=None, help="latents of the 'init' SAE (default 8 x width)")
    parser.add_argument("--k", type=int, default=32, help="k of the 'init' SAE")
    args = parser.parse_args()

    try:
        cache = read_cache(args.cache)
    except FileNotFoundError as error:
        raise SystemExit(str(error)) from None
    x, grad = load_rows(cache, args.tokens)
    print(f"{x.shape[0]} tokens of width {x.shape[1]} from {args.cache}")
    for name in args.sae:
        sae = TopKSAE(x.shape[1], args.d_sae or 8 * x.shape[1], args.k, seed=0) if name == "init" else load_sae(name)[0]
        for beta in args.betas:
            differing, gaps = disagreements(sae, x, grad, beta)
            detail = f"; fp64 relative score gaps of the swapped latents: {', '.join(f'{g:.1e}' for g in gaps)}" if gaps else ""
            print(f"{name} (M={sae.d_sae}, k={sae.k}) beta={beta}: {differing} of {x.shape[0]} tokens select differently{detail}")


if __name__ == "__main__":
    main()
