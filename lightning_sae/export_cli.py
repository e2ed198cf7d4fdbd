"""`lightning-sae-export SRC DST --format saelens|sparsify|circuit-tracer`: convert an SAE between formats.

`--format circuit-tracer` takes a fit's checkpoint of transcoders on every layer or of a
cross-layer transcoder and writes circuit-tracer's folder (lightning_sae.circuit_tracer).

SRC is a SAELens or sparsify directory (detected from its files) or a Lightning checkpoint
(.ckpt), whose SAE sits in the state_dict under a prefix (`sae.` unless --prefix says otherwise).

Exit status: 0 written; 2 for any bad input (a SRC that is missing, truncated, garbage, or whose
weights do not fit its cfg.json; bad arguments), reported as one `lightning-sae-export: error:`
line, the same status the `lightning-sae` command uses for bad input.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning_sae.checkpoint_io import load_checkpoint
from lightning_sae.errors import one_line
from lightning_sae.formats import DTYPES, SAEFormatError, load_sae, save_saelens, save_sparsify
from lightning_sae.sae import TopKSAE

EXIT_BAD_INPUT = 2


def _load_source(args: argparse.Namespace) -> tuple[TopKSAE, dict[str, Any]]:
    if Path(args.src).is_file():
        return load_checkpoint(args.src, args.prefix, args.k)
    # --hookpoint names the written sparsify SAE, and also picks one out of a sparsify SRC
    # that holds several.
    hookpoint = args.hookpoint if args.hookpoint and Path(args.src, args.hookpoint).is_dir() else None
    return load_sae(args.src, hookpoint)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="lightning-sae-export",
        description="Convert an SAE between SAELens and sparsify formats.",
        epilog="Exit status: 0 when the SAE was written; 2 on bad input (a SRC that is missing, truncated or "
               "corrupt, garbage cfg.json, weights that do not fit it, bad arguments), with one error line.",
    )
    parser.add_argument("src", help="SAELens or sparsify directory, or a Lightning .ckpt file")
    parser.add_argument("dst", help="directory to write (sparsify: the directory holding <hookpoint>/)")
    parser.add_argument("--format", required=True, choices=["saelens", "sparsify", "circuit-tracer"])
    parser.add_argument("--hookpoint", help="sparsify hookpoint name (default: SRC's, if it is sparsify)")
    parser.add_argument("--prefix", default="sae.", help="state_dict prefix of the SAE in a checkpoint (default: sae.)")
    parser.add_argument("--k", type=int, help="k for a checkpoint without hyper_parameters['k']")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="dtype of the written weights")
    args = parser.parse_args(argv)

    if args.format == "circuit-tracer":
        return _export_circuit_tracer(args)
    try:
        sae, metadata = _load_source(args)
        if args.format == "saelens":
            written = save_saelens(sae, args.dst, metadata, dtype=args.dtype)
        else:
            hookpoint = args.hookpoint or metadata.get("hookpoint")
            if not hookpoint:
                parser.error("--hookpoint is required to write sparsify format")
            # The hookpoint is the directory name, so it is not repeated in the metadata.
            metadata = {key: value for key, value in metadata.items() if key != "hookpoint"}
            written = save_sparsify(sae, args.dst, hookpoint, metadata, dtype=args.dtype)
    except (SAEFormatError, OSError, ValueError) as error:
        print(f"lightning-sae-export: error: {one_line(error)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"wrote {args.format} SAE (d_in={sae.d_in}, d_sae={sae.d_sae}, k={sae.k}) to {written}")
    return 0


def _export_circuit_tracer(args: argparse.Namespace) -> int:
    from lightning_sae.circuit_tracer import export_checkpoint

    try:
        written, variant = export_checkpoint(args.src, args.dst)
    except (SAEFormatError, OSError, ValueError) as error:
        print(f"lightning-sae-export: error: {one_line(error)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"wrote circuit-tracer transcoders ({variant}) to {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
