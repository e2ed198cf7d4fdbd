"""On-the-line check of a trained JSAE pair (SPEC section 3, analysis a): remove one unit of an
active input latent's decoder direction from the true MLP input, rerun the MLP and the output
encoder, and compare the change of each active output latent with the Jacobian
(|J + delta| < 0.1 agrees). Prints agreement per |J| bin and saves a scatter plot (SVG).

    python tools/jsae_on_the_line.py --pair runs/jsae/lightning_logs/version_0/sae \
        --inputs ~/.cache/lightning-sae/activations/<hash> --tokens 256 --out on_the_line.svg
"""

from __future__ import annotations

import argparse

import torch

from lightning_sae_jsae.analysis import load_mlp_inputs, load_pair, on_the_line
from lightning_sae_jsae.svg import scatter_plot


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pair", required=True, help="directory with sae_in/, sae_out/ and mlp.safetensors")
    parser.add_argument("--inputs", required=True, help="safetensors with key x, or an activation cache directory")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--step", type=float, default=1.0, help="units of the input latent removed")
    parser.add_argument("--tolerance", type=float, default=0.1)
    parser.add_argument("--points", type=int, default=5000, help="entries drawn in the scatter plot")
    parser.add_argument("--out", default="jsae_on_the_line.svg")
    args = parser.parse_args()

    mlp, sae_in, sae_out = load_pair(args.pair)
    result = on_the_line(mlp, sae_in, sae_out, load_mlp_inputs(args.inputs, args.tokens), step=args.step)
    print(f"on-the-line agreement (|J + delta| < {args.tolerance:g}, step {args.step:g}): {result.agreement(args.tolerance):.3f}")
    print("| abs(J) bin | entries | agreeing |")
    print("|---|---|---|")
    for label, count, fraction in result.table(tolerance=args.tolerance):
        print(f"| {label} | {count} | {fraction:.3f} |")
    # The largest entries matter most; the plot shows them all plus a random sample of the rest.
    J, minus_delta = result.J.flatten(), -result.delta.flatten()
    keep = torch.cat([J.abs().topk(min(J.numel(), args.points // 2)).indices, torch.randperm(J.numel())[: args.points // 2]]).unique()
    scatter_plot(args.out, J[keep].tolist(), minus_delta[keep].tolist(), "Jacobian J[b, a]", "-delta (measured change per unit)", "JSAE on-the-line check", diagonal=True)
    print(f"plot: {args.out}")


if __name__ == "__main__":
    main()
