"""Linearity of a trained JSAE pair's latent-to-latent functions (SPEC section 3, analysis b):
sweep an active input latent from 0 to twice its value (100 points) and classify each output
latent's response as linear, JumpReLU-like or other. Prints the fractions and saves a bar chart
and a few example response curves (SVG).

    python tools/jsae_linearity.py --pair runs/jsae/lightning_logs/version_0/sae \
        --inputs ~/.cache/lightning-sae/activations/<hash> --out jsae_linearity
"""

from __future__ import annotations

import argparse

from lightning_sae_jsae.analysis import CLASSES, linearity_sweep, load_mlp_inputs, load_pair
from lightning_sae_jsae.svg import bar_chart, line_plot


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pair", required=True, help="directory with sae_in/, sae_out/ and mlp.safetensors")
    parser.add_argument("--inputs", required=True, help="safetensors with key x, or an activation cache directory")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--max-pairs", type=int, default=1000)
    parser.add_argument("--min-abs-jacobian", type=float, default=0.01, help="only pairs with |J| above this")
    parser.add_argument("--tolerance", type=float, default=0.05, help="largest residual, as a fraction of the response's range")
    parser.add_argument("--examples", type=int, default=3, help="curves drawn per class")
    parser.add_argument("--out", default="jsae_linearity", help="prefix of the SVG files")
    args = parser.parse_args()

    mlp, sae_in, sae_out = load_pair(args.pair)
    sweep = linearity_sweep(
        mlp, sae_in, sae_out, load_mlp_inputs(args.inputs, args.tokens),
        max_pairs=args.max_pairs, min_abs_jacobian=args.min_abs_jacobian, tolerance=args.tolerance,
    )
    fractions = sweep.fractions()
    print(f"{len(sweep.classes)} (token, input latent, output latent) pairs with |J| > {args.min_abs_jacobian:g}")
    print("| response | fraction |")
    print("|---|---|")
    for name in CLASSES:
        print(f"| {name} | {fractions[name]:.3f} |")
    bar_chart(f"{args.out}_classes.svg", fractions, "Output-latent response to one input latent")
    curves = []
    for name in CLASSES:
        rows = [i for i, c in enumerate(sweep.classes) if c == name][: args.examples]
        curves += [(sweep.values[i].tolist(), sweep.responses[i].tolist(), f"{name} {i}") for i in rows]
    if curves:
        line_plot(f"{args.out}_examples.svg", curves, "input latent value", "output latent value", "Example responses")
    print(f"plots: {args.out}_classes.svg, {args.out}_examples.svg")


if __name__ == "__main__":
    main()
