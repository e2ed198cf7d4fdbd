"""Checkpoint files that are either whole or absent, and that never run code when read.

Lightning's own `_atomic_save` buffers the checkpoint and writes it inside an fsspec
"transaction", whose local implementation writes a temporary file in the *system* temporary
directory and `shutil.move`s it over the target. When that directory is on another filesystem
(a tmpfs /tmp, a container's overlay, a cluster's scratch disk), the move is a copy into the final
name, so a process killed during it leaves a truncated `last.ckpt` that `--ckpt_path=last` picks
up. Nothing is fsynced either.

`AtomicCheckpointIO` writes next to the target under a dot-name, fsyncs, and renames over it
(`os.replace`, atomic on POSIX and Windows within one directory), then fsyncs the directory
(`lightning_sae.atomic.atomic_write`, the library's one way of writing a file).
Reading defaults to `weights_only=True`. The `lightning-sae` command installs it unless the
Trainer is given another CheckpointIO.

`load_checkpoint` reads one SAE out of a Lightning checkpoint, as plain weights (`init_from` and
`lightning-sae-export` use it).
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO

from lightning_sae.atomic import atomic_write
from lightning_sae.errors import one_line, unsafe_checkpoint_message
from lightning_sae.formats import SAELENS_METADATA_KEYS, SAEFormatError, check_finite, sae_from_tensors
from lightning_sae.sae import TopKSAE
from lightning_sae.selection import Selector, selector_from_config

SAE_TENSORS = ("W_enc", "b_enc", "W_dec", "b_dec")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save `obj` to `path` through a sibling temporary file renamed into place."""
    atomic_write(path, lambda handle: torch.save(obj, handle))


class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO with same-directory temp-file-and-rename saves and weights_only loads."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None or not isinstance(get_filesystem(path), LocalFileSystem):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_torch_save(checkpoint, os.fspath(path).removeprefix("file://"))

    def load_checkpoint(
        self,
        path: Any,
        map_location: Optional[Callable] = lambda storage, loc: storage,
        weights_only: Optional[bool] = None,
    ) -> dict[str, Any]:
        # torch >= 2.6 defaults to True as well, but TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD flips that default.
        return super().load_checkpoint(path, map_location, True if weights_only is None else weights_only)


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
    selector = _checkpoint_selector(path, hparams)
    sae = sae_from_tensors(*tensors.values(), k=k, selector=selector)
    if selector is not None:
        _load_selector_state(path, hparams, sae, state, prefix)
    metadata = {key: hparams[key] for key in (*SAELENS_METADATA_KEYS, "hookpoint") if key in hparams}
    return sae, metadata


def _checkpoint_selector(path: str | Path, hparams: dict[str, Any]) -> Selector | None:
    """The SAE's selector as the checkpoint records it (class path and arguments in the
    hyper-parameters), without its state; None (TopK) for checkpoints that record none."""
    config = hparams.get("selector")
    if not isinstance(config, dict):
        return None
    try:
        return selector_from_config(config)
    except (ImportError, AttributeError, TypeError, ValueError) as error:
        raise SAEFormatError(f"{path}: cannot rebuild its selector {config.get('class_path')!r}: {error}") from None


def _load_selector_state(path: str | Path, hparams: dict[str, Any], sae: TopKSAE, state: dict[str, Any], prefix: str) -> None:
    """The selector's state (under `<prefix>selector.`) loaded after the SAE's `setup` sized it
    (a per-latent threshold is [0] before), so that e.g. a learned threshold is exported."""
    selector_state = {key[len(prefix + "selector."):]: value for key, value in state.items() if key.startswith(prefix + "selector.")}
    try:
        sae.selector.load_state_dict(selector_state)
    except RuntimeError as error:
        raise SAEFormatError(f"{path}: its selector state does not fit {hparams['selector'].get('class_path')}: {one_line(error)}") from None
