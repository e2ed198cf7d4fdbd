"""The on-disk activation cache: writing it in one model pass per batch, resumably, and reading rows.

Layout of a cache directory:

    manifest.json            settings, widths, completed shards (rewritten atomically after each)
    shard_00000.tokens.npy   int32 [contexts, context_size]: the token contexts of the shard
    shard_00000.x.npy        [rows, width] per batch key (x, y, ..., grad), one row per kept token

Shards are written under temporary names and renamed only when complete, and a shard counts
only once the manifest lists it, so a half-written shard is never read and an interrupted run
resumes at the first shard the manifest lacks. bfloat16 is stored as raw uint16 (numpy has no
bfloat16); the manifest's dtype says how to read it back.

Gradient convention: "grad" is d L / d x where L = sum over every predicted position of a context
of the next-token cross-entropy (a sum, not a mean, so values do not depend on how many contexts
share a forward pass). Only its direction and relative scale should matter to its users.
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
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_sae.data.hooks import ActivationRecorder
from lightning_sae.errors import DataError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}


class CacheMismatchError(ValueError):
    """A cache directory holds activations made with other settings."""


def settings_mismatch(expected: dict, found: dict) -> list[str]:
    return sorted(key for key in expected.keys() | found.keys() if expected.get(key) != found.get(key))


def read_manifest(cache_dir: Path) -> dict | None:
    path = Path(cache_dir) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def _write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    write(temporary)
    os.replace(temporary, path)


def _write_manifest(cache_dir: Path, manifest: dict) -> None:
    _write_atomic(cache_dir / MANIFEST, lambda p: p.write_text(json.dumps(manifest, indent=1, sort_keys=True)))


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


class Extractor:
    """Runs the model on token contexts [B, T] and returns {key: [B, T, D]} for every role, plus
    "grad" (w.r.t. role "x") when asked. Without gradients the forward stops after the last hook."""

    def __init__(self, model: nn.Module, layer: int, roles: dict[str, str], gradients: bool):
        self.model, self.roles, self.gradients = model, roles, gradients
        self.recorder = ActivationRecorder(
            model, layer, list(roles.values()), leaf=roles["x"] if gradients else None, stop=not gradients
        )

    def __call__(self, tokens: Tensor) -> dict[str, Tensor]:
        if not self.gradients:
            with torch.inference_mode(), self.recorder as recorder:
                self.model(input_ids=tokens, use_cache=False)
            return {key: recorder.values[kind] for key, kind in self.roles.items()}
        with torch.enable_grad(), self.recorder as recorder:
            logits = self.model(input_ids=tokens, use_cache=False).logits
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten(), reduction="sum")
            (grad,) = torch.autograd.grad(loss, recorder.values[self.roles["x"]])
        out = {key: recorder.values[kind].detach() for key, kind in self.roles.items()}
        out["grad"] = grad
        return out


def keep_mask(tokens: Tensor, exclude_token: int | None) -> Tensor:
    """Which positions become cache rows: all but those holding `exclude_token` (the BOS)."""
    return torch.ones_like(tokens, dtype=torch.bool) if exclude_token is None else tokens != exclude_token


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


def _check_finite(values: Tensor, dtype: str, key: str, shard: int) -> None:
    """NaN/inf activations would poison every SAE trained on them; refuse to cache them."""
    if bool(torch.isfinite(values.to(getattr(torch, dtype))).all()):
        return
    if bool(torch.isfinite(values).all()):
        cause = f"values beyond the range of cache_dtype={dtype} (float16 ends at 65504; use bfloat16 or float32)"
    else:
        cause = "NaN/inf from the model itself (a float16 overflow? use model_dtype bfloat16 or float32)"
    raise DataError(f"the activations '{key}' of shard {shard} hold {cause}; nothing of that shard was kept")


def verify_shards(cache_dir: Path, manifest: dict) -> None:
    """Every shard file the manifest lists exists with its header's shape and dtype, and is as long
    as that header says. A truncated or damaged file would otherwise fail mid-training."""
    dtype = np.dtype(_NUMPY_DTYPES[manifest["settings"]["cache_dtype"]])
    for index, shard in enumerate(manifest["shards"]):
        expected = {key: ((shard["rows"], width), dtype) for key, width in manifest["widths"].items()}
        expected["tokens"] = None  # shape [contexts, context_size], int32
        for key, want in expected.items():
            path = Path(cache_dir) / _shard_name(index, key)
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


def _shard_name(index: int, key: str) -> str:
    return f"shard_{index:05d}.{key}.npy"


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
    index: int,
    tokens: Tensor,
    extractor: Extractor,
    cache_dtype: str,
    exclude_token: int | None,
    model_batch_size: int,
    on_batch: Callable[[int], None],
) -> tuple[int, dict[str, int]]:
    """Runs the model over one shard's contexts; returns (rows, widths). Files land under
    temporary names and are renamed only after every batch is written and flushed."""
    keep = keep_mask(tokens, exclude_token)
    rows = int(keep.sum())
    device = next(extractor.model.parameters()).device
    arrays: dict[str, np.ndarray] = {}
    row = 0
    for start in range(0, tokens.shape[0], model_batch_size):
        mask = keep[start : start + model_batch_size]
        out = extractor(tokens[start : start + model_batch_size].to(device))
        mask_device, count = mask.to(device), int(mask.sum())
        for key, value in out.items():
            if key not in arrays:
                arrays[key] = _open_rows(cache_dir / f".{_shard_name(index, key)}.tmp", rows, value.shape[-1], cache_dtype)
            selected = value[mask_device]
            _check_finite(selected, cache_dtype, key, index)
            arrays[key][row : row + count] = _to_numpy(selected, cache_dtype)
        row += count
        on_batch(mask.numel())
    widths = {key: array.shape[1] for key, array in arrays.items()}
    for key, array in arrays.items():
        if isinstance(array, np.memmap):
            array.flush()
    del arrays  # closes the memory maps before the renames
    for key in widths:
        os.replace(cache_dir / f".{_shard_name(index, key)}.tmp", cache_dir / _shard_name(index, key))
    _write_atomic(cache_dir / _shard_name(index, "tokens"), lambda p: _save_npy(p, tokens.to(torch.int32).numpy()))
    return rows, widths


def build_cache(
    cache_dir: str | os.PathLike,
    settings: dict,
    load_model: Callable[[], nn.Module],
    contexts: Iterator[Tensor],
    *,
    layer: int,
    roles: dict[str, str],
    gradients: bool,
    plan: list[tuple[str, int]],
    context_size: int,
    cache_dtype: str,
    exclude_token: int | None,
    model_batch_size: int,
    info: dict | None = None,
    progress: bool = True,
) -> dict:
    """Writes (or finishes) the cache and returns its manifest.

    `contexts` yields the token contexts in order, from the very first; those of shards already
    complete are skipped (re-tokenising is cheap next to the model). `settings` must equal the
    settings of an existing manifest. `info` is manifest metadata outside the cache's identity.
    The model is loaded (by `load_model`) only if there is something left to write.
    """
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(cache_dir)
    if manifest is not None:
        check_settings(manifest, settings, cache_dir)
        if manifest["complete"]:
            return manifest
    else:
        manifest = {"format": FORMAT_VERSION, "settings": settings, "complete": False, "shards": [], "widths": {}}
    manifest.update(info or {})
    for leftover in cache_dir.glob(".*.tmp"):  # pieces of a shard an interrupted run left behind
        leftover.unlink()

    done = len(manifest["shards"])
    for _ in range(sum(shard["contexts"] for shard in manifest["shards"])):
        next(contexts, None)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        total = sum(n for _, n in plan[done:]) * context_size
        bar = tqdm(total=total, unit="tok", unit_scale=True, desc="caching activations", dynamic_ncols=True)
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
                extractor = Extractor(load_model(), layer, roles, gradients)
            tokens = torch.stack(block)
            rows, widths = _write_shard(
                cache_dir, index, tokens, extractor, cache_dtype, exclude_token, model_batch_size,
                bar.update if bar is not None else lambda n: None,
            )
            manifest["widths"].update(widths)
            manifest["shards"].append({"split": split, "contexts": len(block), "rows": rows})
            _write_manifest(cache_dir, manifest)
            written += tokens.numel()
            if len(block) < wanted:
                print(f"lightning-sae: the dataset ran out; the cache has {len(block)} of {wanted} contexts in its last shard")
                break
    finally:
        if bar is not None:
            bar.close()
    if not manifest["shards"]:
        raise DataError(f"the dataset yielded no complete context of {context_size} tokens; nothing was cached")
    manifest["complete"] = True
    manifest["tokens"] = sum(shard["contexts"] for shard in manifest["shards"]) * context_size
    manifest["rows"] = {s: sum(x["rows"] for x in manifest["shards"] if x["split"] == s) for s in ("train", "val")}
    _write_manifest(cache_dir, manifest)
    if progress:
        seconds = time.perf_counter() - started
        print(
            f"lightning-sae: cached {written:,} tokens in {seconds:.1f} s ({written / max(seconds, 1e-9):,.0f} tok/s): "
            f"{manifest['rows']['train']:,} train + {manifest['rows']['val']:,} validation rows of "
            f"{sorted(manifest['widths'])} -> {cache_dir}"
        )
    return manifest


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
        self.shards = [i for i, shard in enumerate(manifest["shards"]) if shard["split"] == split]
        self.offsets = np.cumsum([0] + [manifest["shards"][i]["rows"] for i in self.shards])
        self.num_rows = int(self.offsets[-1])
        self._open: OrderedDict[tuple[int, str], np.ndarray] = OrderedDict()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_open": OrderedDict()}

    def _array(self, shard: int, key: str) -> np.ndarray:
        handle = (shard, key)
        if handle in self._open:
            self._open.move_to_end(handle)
        else:
            self._open[handle] = np.load(self.cache_dir / _shard_name(shard, key), mmap_mode="r")
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
                out[key][selected] = self._array(self.shards[position], key)[local]
        return {key: _to_float(value, self.dtype) for key, value in out.items()}

    def contexts(self, limit: int) -> Tensor:
        """Up to `limit` token contexts [B, T] of this split, in cache order."""
        blocks, count = [], 0
        for shard in self.shards:
            if count >= limit:
                break
            block = np.load(self.cache_dir / _shard_name(shard, "tokens"))[: limit - count]
            blocks.append(torch.from_numpy(block.astype(np.int64)))
            count += len(block)
        return torch.cat(blocks) if blocks else torch.empty(0, 0, dtype=torch.long)


def _to_float(values: np.ndarray, dtype: str) -> Tensor:
    tensor = torch.from_numpy(values)
    return (tensor.view(torch.bfloat16) if dtype == "bfloat16" else tensor).float()
