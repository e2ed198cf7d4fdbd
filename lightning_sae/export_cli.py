"""`lightning-sae-export SRC DST --format saelens|sparsify`: convert an SAE between formats.

SRC is a SAELens or sparsify directory (detected from its files) or a Lightning checkpoint
(.ckpt), whose SAE sits in the state_dict under a prefix (`sae.` unless --prefix says otherwise).

Exit status: 0 written; 2 for any bad input (a SRC that is missing, truncated, garbage, or whose
weights do not fit its cfg.json; bad arguments), reported as one `lightning-sae-export: error:`
line, the same status the `lightning-sae` command uses for bad input.
"""

from __future__ import annotations

import argparse
import pickle
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from lightning_sae.errors import one_line, unsafe_checkpoint_message
from lightning_sae.formats import (
    DTYPES,
    SAELENS_METADATA_KEYS,
    SAEFormatError,
    check_finite,
    load_sae,
    sae_from_tensors,
    save_saelens,
    save_sparsify,
)
from lightning_sae.sae import TopKSAE
from lightning_sae.selection import Selector, selector_from_config

SAE_TENSORS = ("W_enc", "b_enc", "W_dec", "b_dec")
EXIT_BAD_INPUT = 2


def load_checkpoint(path: str | Path, prefix: str = "sae.", k: int | None = None) -> tuple[TopKSAE, dict[str, Any]]:
    """The SAE stored under `prefix` in a Lightning checkpoint; k from hyper_parameters["k"]
    unless given. Returns the SAE and whatever SAELens metadata the hyper-parameters carry."""
    try:
        # weights_only: a checkpoint must never be able to run code on load.
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise SAEFormatError(unsafe_checkpoint_message(path, error)) from None
    except (RuntimeError, EOFError, OSError) as error:  # a zip cut short: OSError "Invalid argument"
        raise SAEFormatError(f"{path} is not a readable checkpoint (truncated or corrupt?): {error}") from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise SAEFormatError(f"{path} has no state_dict; is it a Lightning checkpoint?")
    state = checkpoint["state_dict"]
    missing = [prefix + name for name in SAE_TENSORS if prefix + name not in state]
    if missing:
        prefixes = sorted({key[: -len("W_enc")] for key in state if key.endswith("W_enc")})
        raise SAEFormatError(f"{path} lacks {missing}; SAE prefixes present: {prefixes} (choose one with --prefix)")
    hparams = checkpoint.get("hyper_parameters") or {}
    if k is None:
        k = hparams.get("k")
        if not isinstance(k, int):
            raise SAEFormatError(f"{path} has no integer hyper_parameters['k'] (got {k!r}); give --k")
    tensors = {name: state[prefix + name] for name in SAE_TENSORS}
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            raise SAEFormatError(f"{path}: {prefix + name} is {type(tensor).__name__} {getattr(tensor, 'dtype', '')}, "
                                 "expected a floating-point tensor")
    check_finite(tensors, path)
    sae = sae_from_tensors(*tensors.values(), k=k, selector=_checkpoint_selector(path, hparams, state, prefix))
    metadata = {key: hparams[key] for key in (*SAELENS_METADATA_KEYS, "hookpoint") if key in hparams}
    return sae, metadata


def _checkpoint_selector(path: str | Path, hparams: dict[str, Any], state: dict[str, Any], prefix: str) -> Selector | None:
    """The SAE's selector as the checkpoint records it (class path and arguments in the
    hyper-parameters, state under `<prefix>selector.`), so that e.g. a learned threshold is
    exported; None (TopK) for checkpoints that record none."""
    config = hparams.get("selector")
    if not isinstance(config, dict):
        return None
    try:
        selector = selector_from_config(config)
    except (ImportError, AttributeError, TypeError, ValueError) as error:
        raise SAEFormatError(f"{path}: cannot rebuild its selector {config.get('class_path')!r}: {error}") from None
    selector_state = {key[len(prefix + "selector."):]: value for key, value in state.items() if key.startswith(prefix + "selector.")}
    try:
        selector.load_state_dict(selector_state)
    except RuntimeError as error:
        raise SAEFormatError(f"{path}: its selector state does not fit {config.get('class_path')}: {one_line(error)}") from None
    return selector


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
    parser.add_argument("--format", required=True, choices=["saelens", "sparsify"])
    parser.add_argument("--hookpoint", help="sparsify hookpoint name (default: SRC's, if it is sparsify)")
    parser.add_argument("--prefix", default="sae.", help="state_dict prefix of the SAE in a checkpoint (default: sae.)")
    parser.add_argument("--k", type=int, help="k for a checkpoint without hyper_parameters['k']")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="dtype of the written weights")
    args = parser.parse_args(argv)

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


if __name__ == "__main__":
    sys.exit(main())
