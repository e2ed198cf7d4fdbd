"""The on-disk activation cache: writing it in one model pass per batch, resumably, and reading rows.

Layout of a cache directory:

    manifest.json            settings, widths, completed shards (rewritten atomically after each)
    shard_00000.tokens.npy   int32 [contexts, context_size]: the token contexts of the shard
    shard_00000.x.npy        [rows, width] per batch key (x, y, ..., grad), one row per kept token
                             ("/" and ":" of multi-site keys such as layers.9/x become "~" and "@")

Several ranks can write one cache together: writer r of W writes the shards of its own
training contexts (ContextPlan: context j belongs to writer j % W; writer 0 also writes the
validation shards) as shard_w<r>_NNNNN, records them in manifest.writer<r>.json, and rank 0
merges the writers' lists into manifest.json once all are done. A finished cache is the same
for any world size that reads it; an unfinished one resumes only with the world size that
started it. A single writer keeps its progress in manifest.json itself.

Shards are written under temporary names and renamed only when complete, and a shard counts
only once the manifest lists it, so a half-written shard is never read and an interrupted run
resumes at the first shard the manifest lacks. bfloat16 is stored as raw uint16 (numpy has no
bfloat16); the manifest's dtype says how to read it back.

Gradients follow the convention stated in lightning_sae.data.extract.
"""

from __future__ import annotations

import json
import os
import time
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch import Tensor, nn

from lightning_sae.data.extract import Extractor, extract_rows, keep_mask
from lightning_sae.errors import DataError

__all__ = ["Extractor", "ShardReader", "build_cache", "merge_writers", "open_cache", "read_manifest", "keep_mask"]

FORMAT_VERSION = 2
MANIFEST = "manifest.json"
_NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}


class CacheMismatchError(ValueError):
    """A cache directory holds activations made with other settings."""


def settings_mismatch(expected: dict, found: dict) -> list[str]:
    return sorted(key for key in expected.keys() | found.keys() if expected.get(key) != found.get(key))


def read_manifest(cache_dir: Path, name: str = MANIFEST) -> dict | None:
    path = Path(cache_dir) / name
    return json.loads(path.read_text()) if path.is_file() else None


def _write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    write(temporary)
    os.replace(temporary, path)


def _write_manifest(cache_dir: Path, manifest: dict, name: str = MANIFEST) -> None:
    _write_atomic(cache_dir / name, lambda p: p.write_text(json.dumps(manifest, indent=1, sort_keys=True)))


def check_settings(manifest: dict, settings: dict, cache_dir: Path) -> None:
    if manifest.get("format") != FORMAT_VERSION:
        raise CacheMismatchError(f"{cache_dir} holds cache format {manifest.get('format')}, this library writes {FORMAT_VERSION}")
    differing = settings_mismatch(settings, manifest["settings"])
    if differing:
        details = "; ".join(f"{k}: cache has {manifest['settings'].get(k)!r}, wanted {settings.get(k)!r}" for k in differing)
        raise CacheMismatchError(
            f"{cache_dir} holds activations made with other settings ({details}). "
            "Use another cache_dir (or leave it unset for one keyed by the settings), or delete this one."
        )


def shard_plan(val_contexts: int, train_contexts: int, contexts_per_shard: int) -> list[tuple[str, int]]:
    """(split, contexts) per shard: validation first (so a short dataset only shortens training)."""
    plan = []
    for split, total in (("val", val_contexts), ("train", train_contexts)):
        for start in range(0, total, contexts_per_shard):
            plan.append((split, min(contexts_per_shard, total - start)))
    return plan


def _to_numpy(values: Tensor, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        return values.to(torch.bfloat16).view(torch.uint16).cpu().numpy()
    return values.to(getattr(torch, dtype)).cpu().numpy()


def _check_finite(values: Tensor, dtype: str, key: str, shard: str) -> None:
    """NaN/inf activations would poison every SAE trained on them; refuse to cache them."""
    if bool(torch.isfinite(values.to(getattr(torch, dtype))).all()):
        return
    if bool(torch.isfinite(values).all()):
        cause = f"values beyond the range of cache_dtype={dtype} (float16 ends at 65504; use bfloat16 or float32)"
    else:
        cause = "NaN/inf from the model itself (a float16 overflow? use model_dtype bfloat16 or float32)"
    raise DataError(f"the activations '{key}' of {shard} hold {cause}; nothing of that shard was kept")


def verify_shards(cache_dir: Path, manifest: dict) -> None:
    """Every shard file the manifest lists exists with its header's shape and dtype, and is as long
    as that header says. A truncated or damaged file would otherwise fail mid-training."""
    dtype = np.dtype(_NUMPY_DTYPES[manifest["settings"]["cache_dtype"]])
    for index, shard in enumerate(manifest["shards"]):
        expected = {key: ((shard["rows"], width), dtype) for key, width in manifest["widths"].items()}
        expected["tokens"] = None  # shape [contexts, context_size], int32
        for key, want in expected.items():
            path = Path(cache_dir) / shard_file(shard, index, key)
            try:
                array = np.load(path, mmap_mode="r") if shard["rows"] or key == "tokens" else np.load(path)
            except (OSError, ValueError, EOFError) as error:
                raise DataError(
                    f"the activation cache at {cache_dir} is damaged: {path.name} is missing, truncated or "
                    f"corrupt ({error}). Delete the cache directory and run again to rebuild it"
                ) from None
            found = (tuple(array.shape), array.dtype)
            if want is not None and found != want:
                raise DataError(
                    f"the activation cache at {cache_dir} is damaged: {path.name} holds {found[1]} {list(found[0])}, "
                    f"the manifest says {want[1]} {list(want[0])}. Delete the cache directory and run again to rebuild it"
                )


def shard_stem(writer: int, index: int) -> str:
    return f"shard_{index:05d}" if writer == 0 else f"shard_w{writer}_{index:05d}"


def shard_file(shard: dict, index: int, key: str) -> str:
    """File of `key` in the manifest's shard entry (format-1 entries had no "file": by position)."""
    stem = shard.get("file") or shard_stem(0, index)
    return f"{stem}.{key.replace('/', '~').replace(':', '@')}.npy"


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as handle:  # a handle, so numpy does not append ".npy" to temp names
        np.save(handle, array)


def _open_rows(path: Path, rows: int, width: int, dtype: str) -> np.ndarray:
    if rows == 0:  # numpy cannot memory-map an empty file
        empty = np.empty((0, width), _NUMPY_DTYPES[dtype])
        _save_npy(path, empty)
        return empty
    return np.lib.format.open_memmap(path, mode="w+", dtype=_NUMPY_DTYPES[dtype], shape=(rows, width))


def _write_shard(
    cache_dir: Path,
    stem: str,
    tokens: Tensor,
    extractor: Extractor,
    cache_dtype: str,
    exclude_token: int | None,
    model_batch_size: int,
    on_batch: Callable[[int], None],
) -> tuple[int, dict[str, int]]:
    """Runs the model over one shard's contexts; returns (rows, widths). Files land under
    temporary names and are renamed only after every batch is written and flushed."""
    rows = int(keep_mask(tokens, exclude_token).sum())
    entry = {"file": stem}
    arrays: dict[str, np.ndarray] = {}
    row = 0
    for start in range(0, tokens.shape[0], model_batch_size):
        group = tokens[start : start + model_batch_size]
        out = extract_rows(extractor, group, exclude_token)
        count = 0
        for key, value in out.items():
            if key not in arrays:
                arrays[key] = _open_rows(cache_dir / f".{shard_file(entry, 0, key)}.tmp", rows, value.shape[-1], cache_dtype)
            _check_finite(value, cache_dtype, key, stem)
            arrays[key][row : row + len(value)] = _to_numpy(value, cache_dtype)
            count = len(value)
        row += count
        on_batch(group.numel())
    widths = {key: array.shape[1] for key, array in arrays.items()}
    for key, array in arrays.items():
        if isinstance(array, np.memmap):
            array.flush()
    del arrays  # closes the memory maps before the renames
    for key in widths:
        os.replace(cache_dir / f".{shard_file(entry, 0, key)}.tmp", cache_dir / shard_file(entry, 0, key))
    _write_atomic(cache_dir / shard_file(entry, 0, "tokens"), lambda p: _save_npy(p, tokens.to(torch.int32).numpy()))
    return rows, widths


def _progress_name(writer: int, writers: int) -> str:
    return MANIFEST if writers == 1 else f"manifest.writer{writer}.json"


def _check_no_other_writers(cache_dir: Path, writers: int) -> None:
    """An unfinished cache resumes only with the world size that started it: the contexts each
    writer owns depend on it."""
    started = [p.name for p in cache_dir.glob("manifest.writer*.json")]
    other = [name for name in started if json.loads((cache_dir / name).read_text()).get("writers") != writers]
    single = writers > 1 and (manifest := read_manifest(cache_dir)) is not None and not manifest.get("complete") and manifest.get("shards")
    if other or (writers == 1 and started) or single:
        raise DataError(
            f"the unfinished activation cache at {cache_dir} was started by another number of ranks than the "
            f"{writers} now writing it: resume with that number of ranks, or delete the directory"
        )


def build_cache(
    cache_dir: str | os.PathLike,
    settings: dict,
    load_model: Callable[[], nn.Module],
    contexts: Iterator[Tensor],
    *,
    roles: dict[str, str],
    gradients: dict[str, str],
    plan: list[tuple[str, int]],
    context_size: int,
    cache_dtype: str,
    exclude_token: int | None,
    model_batch_size: int,
    info: dict | None = None,
    progress: bool = True,
    writer: int = 0,
    writers: int = 1,
) -> dict:
    """Writes (or finishes) writer `writer`'s part of the cache and returns its manifest (the
    whole cache's when there is one writer; call `merge_writers` once all of several are done).

    `contexts` yields the writer's token contexts in order, from the very first; those of shards
    already complete are skipped (re-tokenising is cheap next to the model). `roles` maps batch
    keys to hook point names, `gradients` gradient keys to roles (see Extractor). `settings`
    must equal the settings of an existing manifest. `info` is manifest metadata outside the
    cache's identity. The model is loaded (by `load_model`) only if there is something to write.
    """
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    progress_file = _progress_name(writer, writers)
    merged = read_manifest(cache_dir)
    if merged is not None:
        check_settings(merged, settings, cache_dir)
        if merged["complete"]:
            return merged
    _check_no_other_writers(cache_dir, writers)
    manifest = read_manifest(cache_dir, progress_file)
    if manifest is not None:
        check_settings(manifest, settings, cache_dir)
        if manifest["complete"]:
            return manifest
    else:
        manifest = {"format": FORMAT_VERSION, "settings": settings, "complete": False, "shards": [], "widths": {}}
        if writers > 1:
            manifest["writers"] = writers
    manifest.update(info or {})
    own = ".shard_[0-9]*.tmp" if writer == 0 else f".shard_w{writer}_*.tmp"
    for leftover in cache_dir.glob(own):  # pieces of a shard an interrupted run of this writer left behind
        leftover.unlink()

    done = len(manifest["shards"])
    for _ in range(sum(shard["contexts"] for shard in manifest["shards"])):
        next(contexts, None)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        total = sum(n for _, n in plan[done:]) * context_size
        label = "caching activations" + (f" (rank {writer} of {writers})" if writers > 1 else "")
        bar = tqdm(total=total, unit="tok", unit_scale=True, desc=label, dynamic_ncols=True, position=writer)
    extractor: Extractor | None = None
    started, written = time.perf_counter(), 0
    try:
        for index in range(done, len(plan)):
            split, wanted = plan[index]
            block = [context for _, context in zip(range(wanted), contexts)]
            if len(block) < wanted and (split == "val" or not block):
                if split == "val":
                    had = sum(shard["contexts"] for shard in manifest["shards"]) + len(block)
                    needed = sum(n for s, n in plan if s == "val")
                    raise DataError(
                        f"the dataset ran out after {had} contexts of {context_size} tokens, before the {needed} "
                        "validation contexts (taken first) were complete: use a larger dataset, or lower "
                        "num_tokens or validation_fraction"
                    )
                break
            if extractor is None:
                extractor = Extractor(load_model(), None, roles, gradients)
            tokens = torch.stack(block)
            stem = shard_stem(writer, index)
            rows, widths = _write_shard(
                cache_dir, stem, tokens, extractor, cache_dtype, exclude_token, model_batch_size,
                bar.update if bar is not None else lambda n: None,
            )
            manifest["widths"].update(widths)
            manifest["shards"].append({"split": split, "contexts": len(block), "rows": rows, "file": stem})
            _write_manifest(cache_dir, manifest, progress_file)
            written += tokens.numel()
            if len(block) < wanted:
                print(f"lightning-sae: the dataset ran out; the cache has {len(block)} of {wanted} contexts in its last shard")
                break
    finally:
        if bar is not None:
            bar.close()
    if not manifest["shards"] and writers == 1:
        raise DataError(f"the dataset yielded no complete context of {context_size} tokens; nothing was cached")
    manifest["complete"] = True
    _totals(manifest)
    _write_manifest(cache_dir, manifest, progress_file)
    if progress:
        seconds = time.perf_counter() - started
        where = f" (rank {writer} of {writers})" if writers > 1 else ""
        print(
            f"lightning-sae: cached {written:,} tokens{where} in {seconds:.1f} s ({written / max(seconds, 1e-9):,.0f} tok/s): "
            f"{manifest['rows']['train']:,} train + {manifest['rows']['val']:,} validation rows of "
            f"{sorted(manifest['widths'])} -> {cache_dir}"
        )
    return manifest


def _totals(manifest: dict) -> None:
    manifest["tokens"] = sum(shard["contexts"] for shard in manifest["shards"]) * manifest["settings"]["context_size"]
    manifest["rows"] = {s: sum(x["rows"] for x in manifest["shards"] if x["split"] == s) for s in ("train", "val")}


def merge_writers(cache_dir: str | os.PathLike, writers: int) -> dict:
    """manifest.json of a cache that `writers` ranks wrote, once every one of them is done
    (validation shards first, then each writer's training shards)."""
    cache_dir = Path(cache_dir)
    merged = read_manifest(cache_dir)
    if merged is not None and merged["complete"]:
        return merged
    parts = [read_manifest(cache_dir, _progress_name(writer, writers)) for writer in range(writers)]
    unfinished = [writer for writer, part in enumerate(parts) if part is None or not part["complete"]]
    if unfinished:
        raise DataError(f"the activation cache at {cache_dir} is missing the parts of ranks {unfinished}; run again to finish it")
    shards = [s for part in parts for s in part["shards"] if s["split"] == "val"]
    shards += [s for part in parts for s in part["shards"] if s["split"] == "train"]
    if not shards:
        raise DataError(f"the dataset yielded no complete context; nothing was cached in {cache_dir}")
    widths = {key: width for part in parts for key, width in part["widths"].items()}
    merged = {**parts[0], "shards": shards, "widths": widths, "complete": True, "writers": writers}
    _totals(merged)
    _write_manifest(cache_dir, merged)
    for writer in range(writers):
        (cache_dir / _progress_name(writer, writers)).unlink()
    return merged


def open_cache(cache_dir: str | os.PathLike, settings: dict) -> dict:
    """The manifest of a finished cache made with `settings`; clear errors otherwise."""
    manifest = read_manifest(Path(cache_dir))
    if manifest is None:
        raise FileNotFoundError(f"no activation cache at {cache_dir}: run prepare_data() first (Trainer.fit does)")
    check_settings(manifest, settings, Path(cache_dir))
    if not manifest["complete"]:
        raise RuntimeError(
            f"the activation cache at {cache_dir} is incomplete ({len(manifest['shards'])} shards written); "
            "run prepare_data() again to finish it"
        )
    verify_shards(Path(cache_dir), manifest)
    return manifest


class ShardReader:
    """fetch(row_indices) -> {key: float32 [N, width]} over the memory-mapped shards of one split.

    Only the rows asked for are read; at most `max_open` shard files are mapped at once, so
    memory and file handles stay bounded however large the cache. Picklable for loader workers
    (maps are reopened in each process).
    """

    def __init__(self, cache_dir: str | os.PathLike, manifest: dict, split: str, keys: list[str], max_open: int = 64):
        self.cache_dir, self.keys, self.max_open = Path(cache_dir), list(keys), max_open
        self.dtype = manifest["settings"]["cache_dtype"]
        self.widths = {key: manifest["widths"][key] for key in self.keys}
        entries = [(i, shard) for i, shard in enumerate(manifest["shards"]) if shard["split"] == split]
        self.shards = [(i, shard) for i, shard in entries]
        self.offsets = np.cumsum([0] + [shard["rows"] for _, shard in entries])
        self.num_rows = int(self.offsets[-1])
        self._open: OrderedDict[tuple[int, str], np.ndarray] = OrderedDict()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_open": OrderedDict()}

    def _array(self, position: int, key: str) -> np.ndarray:
        handle = (position, key)
        if handle in self._open:
            self._open.move_to_end(handle)
        else:
            self._open[handle] = np.load(self.cache_dir / shard_file(self.shards[position][1], self.shards[position][0], key), mmap_mode="r")
            if len(self._open) > self.max_open:
                self._open.popitem(last=False)
        return self._open[handle]

    def __call__(self, rows: Tensor) -> dict[str, Tensor]:
        index = rows.numpy().astype(np.int64)
        which = np.searchsorted(self.offsets, index, side="right") - 1
        out = {key: np.empty((len(index), self.widths[key]), _NUMPY_DTYPES[self.dtype]) for key in self.keys}
        for position in np.unique(which):
            selected = which == position
            local = index[selected] - self.offsets[position]
            for key in self.keys:
                out[key][selected] = self._array(position, key)[local]
        return {key: _to_float(value, self.dtype) for key, value in out.items()}

    def contexts(self, limit: int) -> Tensor:
        """Up to `limit` token contexts [B, T] of this split, in cache order."""
        blocks, count = [], 0
        for index, shard in self.shards:
            if count >= limit:
                break
            block = np.load(self.cache_dir / shard_file(shard, index, "tokens"))[: limit - count]
            blocks.append(torch.from_numpy(block.astype(np.int64)))
            count += len(block)
        return torch.cat(blocks) if blocks else torch.empty(0, 0, dtype=torch.long)


def _to_float(values: np.ndarray, dtype: str) -> Tensor:
    tensor = torch.from_numpy(values)
    return (tensor.view(torch.bfloat16) if dtype == "bfloat16" else tensor).float()
