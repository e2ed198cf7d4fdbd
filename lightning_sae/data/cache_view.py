"""The public, read-only way to open an activation cache and read what it holds.

    from lightning_sae.data import read_cache

    cache = read_cache("runs/cache")            # checks the manifest's schema; reads no shard
    cache.complete, cache.widths, cache.rows    # True, {"x": 576}, {"train": 51200, "val": 2048}
    cache.settings["model_dtype"], cache.sites  # the settings it was made with, its hook points
    batch = cache.reader("train")(torch.arange(8))   # {"x": float32 [8, 576], ...}
    problems = cache.verify("full")             # {shard file: what is wrong}; empty when intact

Tools, plugins and notebooks use this rather than manifest.json, whose layout (lightning_sae.data.cache
describes it) is the cache's own business and may change between formats.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from lightning_sae.data import cache


@dataclass(frozen=True)
class ShardInfo:
    """One shard of a cache: its file stem, split ("train" or "val"), rows (kept tokens) and contexts."""

    file: str
    split: str
    rows: int
    contexts: int


class CacheView:
    """What a cache directory holds, read once from its manifest; nothing here writes. The
    dictionaries it returns are copies: changing them changes nothing on disk or in the view."""

    def __init__(self, path: str | os.PathLike, manifest: dict[str, Any]):
        self.path = Path(path)
        self._manifest = manifest

    @property
    def manifest(self) -> dict[str, Any]:
        """The whole manifest (a copy), for what the properties below do not cover."""
        return copy.deepcopy(self._manifest)

    @property
    def format(self) -> int:
        return int(self._manifest["format"])

    @property
    def complete(self) -> bool:
        """False while a fit is still writing it (or was stopped before it finished)."""
        return bool(self._manifest["complete"])

    @property
    def settings(self) -> dict[str, Any]:
        """The settings that identify the cache (model, text, context size, dtype, roles, ...)."""
        return copy.deepcopy(self._manifest["settings"])

    @property
    def widths(self) -> dict[str, int]:
        """Width of each stored batch key (x, y, grad, or `<site>/x` with several hook points)."""
        return dict(self._manifest["widths"])

    @property
    def keys(self) -> list[str]:
        return sorted(self._manifest["widths"])

    @property
    def has_gradients(self) -> bool:
        return bool(self._manifest["settings"].get("gradients"))

    @property
    def sites(self) -> list[str]:
        """The hook points the activations were read at (empty for caches that did not record them)."""
        return list(self._manifest.get("sites") or [])

    @property
    def model_name(self) -> str | None:
        return self._manifest.get("model_name")

    @property
    def dataset_path(self) -> str | None:
        return self._manifest.get("dataset_path")

    @property
    def vocab_size(self) -> int | None:
        return self._manifest.get("vocab_size")

    @property
    def context_size(self) -> int:
        return int(self._manifest["settings"]["context_size"])

    @property
    def dtype(self) -> str:
        """How the rows are stored: "float32", "float16" or "bfloat16" (read back as float32)."""
        return str(self._manifest["settings"]["cache_dtype"])

    @property
    def shards(self) -> list[ShardInfo]:
        return [ShardInfo(s["file"], s["split"], int(s["rows"]), int(s["contexts"])) for s in self._manifest["shards"]]

    @property
    def rows(self) -> dict[str, int]:
        """Rows (kept tokens) per split, over the shards written so far."""
        return {split: sum(s.rows for s in self.shards if s.split == split) for split in ("train", "val")}

    def reader(self, split: str = "train", keys: list[str] | None = None) -> cache.ShardReader:
        """reader(row_indices) -> {key: float32 [N, width]} over `split`'s shards (memory-mapped; only
        the rows asked for are read). It checks nothing: call `verify` first if in doubt."""
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        keys = self.keys if keys is None else list(keys)
        unknown = sorted(set(keys) - set(self._manifest["widths"]))
        if unknown:
            raise KeyError(f"{self.path} holds no {unknown}; it holds {self.keys}")
        return cache.ShardReader(self.path, self._manifest, split, keys)

    def contexts(self, split: str = "val", limit: int | None = None) -> Tensor:
        """The token contexts [B, context_size] of `split`, in cache order (up to `limit`)."""
        return self.reader(split, []).contexts(limit if limit is not None else 2**62)

    def verify(self, level: str = "full", vocab_size: int | None = None) -> dict[str, str]:
        """{shard file: what is wrong} for every damaged shard; empty when all are intact. "full"
        checks every byte against the hash recorded when it was written; "header" checks the npy
        headers, file lengths and token ids (against `vocab_size`, default the recorded one)."""
        problems = cache.check_shards(self.path, self._manifest, level, vocab_size or self.vocab_size)
        return {self._manifest["shards"][position]["file"]: problem for position, problem in sorted(problems.items())}

    def __repr__(self) -> str:
        state = "complete" if self.complete else "unfinished"
        return f"CacheView({str(self.path)!r}: {state}, format {self.format}, {self.rows}, widths {self.widths})"


def read_cache(path: str | os.PathLike) -> CacheView:
    """The cache at `path`, its manifest checked against the schema (one-line ManifestError
    otherwise); FileNotFoundError when `path` holds no cache. Reads no shard."""
    manifest = cache.read_manifest(Path(path))
    if manifest is None:
        raise FileNotFoundError(f"{path} holds no activation cache (no {cache.MANIFEST})")
    return CacheView(path, manifest)
