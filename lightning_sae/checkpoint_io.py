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
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO

from lightning_sae.atomic import atomic_write


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
