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

Integrity (format 3): every shard entry records the content hash (xxh3-128) of each of its files,
taken when the shard is complete. The manifest is checked against its schema whenever it is read
(`validate_manifest`), and `open_cache` checks the shards before anything is served: "header"
(each file's npy header and exact length, token ids within the vocabulary) or "full" (also every
byte against its hash). "background" (the DataModule's default) does the header checks at once and
hashes every byte in a background thread (`ShardVerifier`); a reader serves a shard's rows only
once its hash matched, so nothing is trained on damaged data and the step rarely waits. The hashes
are recorded per shard position and file in this cache's manifest, so a shard copied in from
another cache, or two shards swapped, fail them too. Damage is reported as one line naming the
shards, which `rebuild_shards` can recompute alone. Format-2 caches (no hashes) stay readable with
"header" (and "background", which then only checks headers).

Writing is guarded (`writer_lock`): one process per writer slot holds an advisory lock
(fcntl.flock on `.lock`, or `.lock.w<r>` for writer r) while it writes, so a second fit writing
the same cache fails with one line naming the holder's PID; readers take no lock. Each shard's
space is reserved (posix_fallocate) before the model pass fills its memory maps, so a full disk is
one line (`CacheSpaceError`: the cache_dir, bytes needed and free) instead of a SIGBUS, and the
complete shards stay as they were for a rerun to resume from.

Gradients follow the convention stated in lightning_sae.data.extract.
"""

from __future__ import annotations

import errno
import itertools
import json
import math
import mmap
import os
import re
import shutil
import signal
import threading
import time
from collections import OrderedDict
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch import Tensor, nn

from lightning_sae.atomic import LockHeld, atomic_write, atomic_write_text, exclusive_lock
from lightning_sae.data.extract import Extractor, extract_rows, keep_mask
from lightning_sae.errors import DataError
from lightning_sae.progress import progress_bar

__all__ = [
    "CacheLockedError", "CacheSpaceError", "CachingStopped", "DamagedCacheError", "Extractor", "ManifestError",
    "ShardReader", "ShardVerifier", "build_cache", "check_shards", "keep_mask", "merge_writers", "open_cache",
    "read_manifest", "rebuild_shards", "validate_manifest", "writer_lock",
]

FORMAT_VERSION = 3
READABLE_FORMATS = (2, 3)  # 2: written before content hashes; readable with verify "header" or "off"
MANIFEST = "manifest.json"
HASH = "xxh3_128"
VERIFY_MODES = ("background", "full", "header", "off")
DEFAULT_VERIFY = "background"
_NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}
_STEM = re.compile(r"shard_(?:w([1-9][0-9]*)_)?([0-9]{5,})")


class CacheMismatchError(ValueError):
    """A cache directory holds activations made with other settings."""


class ManifestError(DataError):
    """A manifest that is not valid JSON or breaks the manifest schema."""


class DamagedCacheError(DataError):
    """Shards whose files are missing, truncated, changed since they were written, or hold token
    ids outside the model's vocabulary. `problems` maps each damaged shard's position in the
    manifest's shard list to what is wrong with it."""

    def __init__(self, cache_dir: Path, manifest: dict, problems: dict[int, str]):
        self.cache_dir, self.manifest, self.problems = Path(cache_dir), manifest, dict(problems)
        shown = [problems[p] for p in sorted(problems)][:3]
        more = f" (and {len(problems) - len(shown)} more damaged shards)" if len(problems) > len(shown) else ""
        count = len(problems)
        super().__init__(
            f"the activation cache at {cache_dir} is damaged: {'; '.join(shown)}{more}. Set data.rebuild_damaged=true "
            f"to recompute only the {count} damaged shard{'s' if count > 1 else ''} of {len(manifest['shards'])}, "
            "or delete the cache directory and run again to rebuild it"
        )


class CacheSpaceError(DataError):
    """The filesystem of a cache has no room for the next shard; nothing complete was touched."""


class CacheLockedError(DataError):
    """Another process is writing the same cache (it holds the writer lock)."""


class CachingStopped(DataError):
    """Caching was stopped by a signal; the complete shards are kept and a rerun resumes."""

    def __init__(self, message: str, signal_number: int):
        super().__init__(message)
        self.signal_number = signal_number
        self.exit_status = 128 + signal_number  # the status a process killed by it would have had


def settings_mismatch(expected: dict, found: dict) -> list[str]:
    return sorted(key for key in expected.keys() | found.keys() if expected.get(key) != found.get(key))


def read_manifest(cache_dir: str | os.PathLike, name: str = MANIFEST) -> dict | None:
    """The manifest (or writer progress file) `name` of a cache, checked against the manifest
    schema; None when there is none. Garbage or a schema violation is one ManifestError line."""
    path = Path(cache_dir) / name
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ManifestError(f"{path} is not valid JSON ({error}); {_REBUILD}") from None
    validate_manifest(manifest, path, part=name != MANIFEST)
    return manifest


_REBUILD = "delete the cache directory (or only its manifest) and run again to rebuild it"


def context_counts(num_tokens: int, context_size: int, validation_fraction: float) -> tuple[int, int]:
    """(validation contexts, training contexts) that num_tokens and validation_fraction give."""
    contexts = math.ceil(num_tokens / context_size)
    val = math.ceil(contexts * validation_fraction) if validation_fraction > 0 else 0
    return val, contexts - val


def shard_writer_and_index(stem: str) -> tuple[int, int]:
    """(writer, index in that writer's shard plan) of a shard file stem (see `shard_stem`)."""
    match = _STEM.fullmatch(stem)
    if match is None:
        raise ValueError(f"{stem!r} is not a shard name (shard_NNNNN or shard_w<r>_NNNNN)")
    return int(match.group(1) or 0), int(match.group(2))


def _is(value: object, kind: type | tuple[type, ...]) -> bool:
    # JSON has no separate boolean-free integers: true would pass as 1 otherwise.
    return isinstance(value, kind) and not (isinstance(value, bool) and kind is not bool)


def validate_manifest(manifest: object, where: str | os.PathLike, part: bool = False) -> None:
    """Raises ManifestError (one line, naming the field) unless `manifest` is a well-formed
    manifest: required keys of the right types, shard entries whose names, sizes and hashes
    are possible, totals that add up to the shard list, and a validation split of exactly the
    size the settings give, taken first. `part`: one writer's progress file of a cache that
    several ranks write (it holds only that writer's shards)."""

    def fail(what: str) -> None:
        raise ManifestError(f"the activation cache manifest {where} is invalid: {what}; {_REBUILD}")

    def need(mapping: dict, key: str, kind: type | tuple[type, ...], name: str, label: str) -> object:
        if key not in mapping:
            fail(f"it has no '{label}{key}'")
        if not _is(mapping[key], kind):
            fail(f"'{label}{key}' is {mapping[key]!r}, expected {name}")
        return mapping[key]

    if not isinstance(manifest, dict):
        fail(f"it holds a JSON {type(manifest).__name__}, not an object")
    version = need(manifest, "format", int, "an integer", "")
    if version not in READABLE_FORMATS:
        raise CacheMismatchError(
            f"{Path(where).parent} holds cache format {version}, this library reads {list(READABLE_FORMATS)} and writes "
            f"{FORMAT_VERSION}: delete it (or use another cache_dir) and run again"
        )
    settings = need(manifest, "settings", dict, "an object", "")
    complete = need(manifest, "complete", bool, "true or false", "")
    shards = need(manifest, "shards", list, "a list", "")
    widths = need(manifest, "widths", dict, "an object", "")
    writers = manifest.get("writers", 1)
    if not _is(writers, int) or writers < 1:
        fail(f"'writers' is {writers!r}, expected a positive integer")
    for key in ("context_size", "num_tokens", "shard_tokens"):
        if need(settings, key, int, "a positive integer", "settings.") < 1:
            fail(f"'settings.{key}' is {settings[key]!r}, expected a positive integer")
    fraction = need(settings, "validation_fraction", (int, float), "a number", "settings.")
    if not 0 <= fraction < 1:
        fail(f"'settings.validation_fraction' is {fraction!r}, expected a number in [0, 1)")
    if need(settings, "cache_dtype", str, "a string", "settings.") not in _NUMPY_DTYPES:
        fail(f"'settings.cache_dtype' is {settings['cache_dtype']!r}, expected one of {sorted(_NUMPY_DTYPES)}")
    roles = need(settings, "roles", dict, "an object", "settings.")
    gradients = need(settings, "gradients", dict, "an object", "settings.")
    for key, width in widths.items():
        if not _is(width, int) or width < 1:
            fail(f"'widths.{key}' is {width!r}, expected a positive integer")
    if shards and set(widths) != set(roles) | set(gradients):
        fail(f"'widths' has keys {sorted(widths)}, but the settings ask for {sorted(set(roles) | set(gradients))}")
    hashed = version >= 3
    if hashed and need(manifest, "hash", str, "a string", "") != HASH:
        fail(f"'hash' is {manifest['hash']!r}; this library hashes with {HASH!r}")
    for key, kind, name in (("library_version", str, "a string"), ("model_name", str, "a string"),
                            ("dataset_path", str, "a string"), ("sites", list, "a list"),
                            ("vocab_size", int, "an integer")):
        if key in manifest and not _is(manifest[key], kind):
            fail(f"'{key}' is {manifest[key]!r}, expected {name}")

    context_size = settings["context_size"]
    per_shard = max(1, settings["shard_tokens"] // context_size)
    files: set[str] = set()
    seen_train = False
    for position, shard in enumerate(shards):
        label = f"shards[{position}]."
        if not isinstance(shard, dict):
            fail(f"'shards[{position}]' is {shard!r}, expected an object")
        split = need(shard, "split", str, "'train' or 'val'", label)
        if split not in ("train", "val"):
            fail(f"'{label}split' is {split!r}, expected 'train' or 'val'")
        if split == "val" and seen_train:
            fail(f"'{label}split' is 'val' after training shards (validation shards come first)")
        seen_train |= split == "train"
        contexts = need(shard, "contexts", int, "a positive integer", label)
        if not 1 <= contexts <= per_shard:
            fail(f"'{label}contexts' is {contexts}, expected 1 to {per_shard} (shard_tokens // context_size)")
        rows = need(shard, "rows", int, "an integer", label)
        if not 0 <= rows <= contexts * context_size:
            fail(f"'{label}rows' is {rows}, but {contexts} contexts of {context_size} tokens hold 0 to {contexts * context_size}")
        stem = need(shard, "file", str, "a shard name", label)
        try:
            writer, _ = shard_writer_and_index(stem)
        except ValueError as error:
            fail(f"'{label}file': {error}")
        if writer >= writers:
            fail(f"'{label}file' is {stem!r}, a shard of writer {writer}, but the cache had {writers} writers")
        if stem in files:
            fail(f"'{label}file' is {stem!r}, which another shard entry names too")
        files.add(stem)
        if hashed:
            hashes = need(shard, "hashes", dict, "an object", label)
            if set(hashes) != {*widths, "tokens"}:
                fail(f"'{label}hashes' has keys {sorted(hashes)}, expected {sorted({*widths, 'tokens'})}")
            bad = sorted(k for k, v in hashes.items() if not _is(v, str) or not re.fullmatch(r"[0-9a-f]{32}", v))
            if bad:
                fail(f"'{label}hashes.{bad[0]}' is {hashes[bad[0]]!r}, expected 32 hexadecimal digits")

    val, train = context_counts(settings["num_tokens"], context_size, fraction)
    held_out = sum(shard["contexts"] for shard in shards if shard["split"] == "val")
    trained = sum(shard["contexts"] for shard in shards if shard["split"] == "train")
    # Only a whole cache must hold the whole validation split; one writer's part may hold none.
    if held_out > val or (complete and not part and held_out != val):
        fail(f"its validation shards hold {held_out} contexts, but the settings (num_tokens {settings['num_tokens']}, "
             f"context_size {context_size}, validation_fraction {fraction}) hold out {val}")
    if trained > train:
        fail(f"its training shards hold {trained} contexts, more than the {train} the settings give")
    if complete:
        if not shards and not part:
            fail("it is complete but lists no shard")
        tokens = need(manifest, "tokens", int, "an integer", "")
        if tokens != (held_out + trained) * context_size:
            fail(f"'tokens' is {tokens}, but its shards hold {held_out + trained} contexts of {context_size} tokens")
        totals = need(manifest, "rows", dict, "an object", "")
        for split in ("train", "val"):
            found = sum(shard["rows"] for shard in shards if shard["split"] == split)
            if need(totals, split, int, "an integer", "rows.") != found:
                fail(f"'rows.{split}' is {totals[split]}, but its {split} shards hold {found} rows")


def _write_manifest(cache_dir: Path, manifest: dict, name: str = MANIFEST) -> None:
    atomic_write_text(cache_dir / name, json.dumps(manifest, indent=1, sort_keys=True))


def check_settings(manifest: dict, settings: dict, cache_dir: Path) -> None:
    """`manifest` (already validated) was made with `settings`, and can be finished if unfinished."""
    if manifest["format"] != FORMAT_VERSION and not manifest["complete"]:
        raise CacheMismatchError(
            f"{cache_dir} holds an unfinished cache of format {manifest['format']}, this library writes {FORMAT_VERSION}: "
            "delete it (or use another cache_dir) and run again"
        )
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


def _check_finite(values: Tensor, dtype: str, key: str, shard: str, first_row: int) -> None:
    """NaN/inf activations would poison every SAE trained on them; refuse to cache them."""
    stored = torch.isfinite(values.to(getattr(torch, dtype))).all(dim=-1)
    if bool(stored.all()):
        return
    row = first_row + int((~stored).nonzero()[0])
    if bool(torch.isfinite(values).all()):
        cause = f"values beyond the range of cache_dtype={dtype} (float16 ends at 65504; use bfloat16 or float32)"
    else:
        cause = "NaN/inf from the model itself (a float16 overflow? use model_dtype bfloat16 or float32)"
    raise DataError(f"the activations '{key}' of {shard} (row {row} first) hold {cause}; nothing of that shard was kept")


def file_hash(path: str | os.PathLike) -> str:
    """The xxh3-128 hex digest of a file's bytes. xxh3 hashes at memory speed (10.8 GB/s measured
    by tools/bench_verify.py, against 0.64 for BLAKE2b, 1.1 for SHA-256, 1.2 for SHA-1 and 2.6
    for zlib's CRC-32), which is what makes checking every byte affordable (full verification
    with BLAKE2b would cost more than two bare epoch reads); it detects accidental damage (bit
    rot, truncation, partial copies, edits), not deliberate forgery."""
    import xxhash  # a dependency of `datasets`, itself a dependency of this library

    digest = xxhash.xxh3_128()
    with open(path, "rb") as handle:
        if os.fstat(handle.fileno()).st_size == 0:
            return digest.hexdigest()
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data, memoryview(data) as view:
            # In pieces: xxhash holds the GIL while it hashes, and a background verifier must not
            # keep the training thread from running for a whole shard (~15 ms per 150 MB).
            for start in range(0, len(view), _HASH_CHUNK):
                digest.update(view[start : start + _HASH_CHUNK])
    return digest.hexdigest()


_HASH_CHUNK = 2 << 20


def _npy_layout(path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, offset of the data) from an .npy file's header, reading nothing else."""
    with open(path, "rb") as handle:
        version = np.lib.format.read_magic(handle)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(handle)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(handle)
        else:
            raise ValueError(f"npy format version {version}, which this library never writes")
        if fortran:
            raise ValueError("stored in Fortran order, which this library never writes")
        return tuple(shape), dtype, handle.tell()


def _check_file(path: Path, want: tuple[tuple[int, ...], np.dtype]) -> str | None:
    """What is wrong with one shard file's header and length, or None."""
    if not path.is_file():
        return f"{path.name} is missing"
    try:
        shape, dtype, offset = _npy_layout(path)
    except (OSError, ValueError, EOFError, SyntaxError) as error:
        return f"{path.name} is missing, truncated or corrupt (unreadable header: {error})"
    if (shape, dtype) != want:
        return f"{path.name} holds {dtype} {list(shape)}, the manifest says {want[1]} {list(want[0])}"
    size, expected = path.stat().st_size, offset + int(np.prod(shape)) * dtype.itemsize
    if size < expected:
        return f"{path.name} is missing, truncated or corrupt ({size} of its {expected} bytes)"
    if size > expected:
        return f"{path.name} has {size - expected} bytes after its data (appended to?)"
    return None


def _first_bad_token(tokens: np.ndarray, vocab_size: int | None) -> str | None:
    high = vocab_size if vocab_size is not None else np.iinfo(np.int32).max
    bad = np.flatnonzero((tokens < 0) | (tokens >= high))
    if not len(bad):
        return None
    context, position = divmod(int(bad[0]), tokens.shape[1])
    limit = f"the model's vocabulary of {vocab_size}" if vocab_size is not None else "the valid range"
    return (f"token id {int(tokens[context, position])} at context {context}, position {position} "
            f"({len(bad)} ids in all) lies outside {limit}")


def _first_non_finite_row(path: Path, dtype: str) -> int | None:
    """Only on the way to an error (a damaged file): which row, if any, holds NaN/inf."""
    try:
        values = _to_float(np.load(path, mmap_mode="r"), dtype)
    except (OSError, ValueError, EOFError):
        return None
    bad = (~torch.isfinite(values)).any(dim=1).nonzero()
    return int(bad[0]) if len(bad) else None


def check_shard(cache_dir: Path, manifest: dict, position: int, verify: str = "full", vocab_size: int | None = None) -> str | None:
    """What is wrong with shard `position` of the manifest (one clause naming its file), or None.

    "header": every file exists, its npy header says the manifest's shape and dtype, its length
    is exactly header + data, and the token ids lie in [0, vocab_size). "full": also every
    file's bytes match the content hash recorded when the shard was written. "off": nothing."""
    if verify == "off":
        return None
    shard, settings = manifest["shards"][position], manifest["settings"]
    dtype = np.dtype(_NUMPY_DTYPES[settings["cache_dtype"]])
    expected = {key: ((shard["rows"], width), dtype) for key, width in manifest["widths"].items()}
    expected["tokens"] = ((shard["contexts"], settings["context_size"]), np.dtype(np.int32))
    for key, want in expected.items():
        path = Path(cache_dir) / shard_file(shard, position, key)
        problem = _check_file(path, want)
        if problem is None and verify == "full":
            problem = _hash_problem(path, shard, key, settings["cache_dtype"])
        if problem is None and key == "tokens":
            bad = _first_bad_token(np.load(path), vocab_size)
            problem = None if bad is None else f"{path.name} holds {bad}"
        if problem is not None:
            return problem
    return None


def _hash_problem(path: Path, shard: dict, key: str, cache_dtype: str) -> str | None:
    """What is wrong with one file's bytes against the hash its manifest entry recorded, or None."""
    if file_hash(path) == shard["hashes"][key]:
        return None
    problem = f"{path.name} does not match its recorded content hash (its bytes changed after it was written)"
    row = _first_non_finite_row(path, cache_dtype) if key != "tokens" else None
    return problem + (f"; row {row} now holds NaN/inf" if row is not None else "")


def check_shard_hashes(cache_dir: Path, manifest: dict, position: int) -> str | None:
    """What is wrong with the bytes of shard `position` (its headers already checked), or None."""
    shard = manifest["shards"][position]
    for key in [*manifest["widths"], "tokens"]:
        path = Path(cache_dir) / shard_file(shard, position, key)
        try:
            problem = _hash_problem(path, shard, key, manifest["settings"]["cache_dtype"])
        except OSError as error:  # removed or cut after the header checks
            problem = f"{path.name} could not be read ({error.strerror or error})"
        if problem is not None:
            return problem
    return None


def check_shards(
    cache_dir: str | os.PathLike, manifest: dict, verify: str = "full", vocab_size: int | None = None
) -> dict[int, str]:
    """{position in manifest["shards"]: what is wrong} for every damaged shard (see check_shard).
    "background" checks the headers here; its hashes are ShardVerifier's."""
    if verify not in VERIFY_MODES:
        raise ValueError(f"verify must be one of {list(VERIFY_MODES)}, got {verify!r}")
    if verify == "background":
        verify = "header"
    if verify == "full" and manifest["format"] < 3:
        raise DataError(
            f"the activation cache at {cache_dir} was written before content hashes (format {manifest['format']}), so "
            "verify=full cannot check it: set data.verify=header to read it with header checks only, or delete "
            "it and run again to rebuild it with hashes"
        )
    problems = {}
    for position in range(len(manifest["shards"])):
        problem = check_shard(Path(cache_dir), manifest, position, verify, vocab_size)
        if problem is not None:
            problems[position] = problem
    return problems


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
) -> tuple[int, dict[str, int], dict[str, str]]:
    """Runs the model over one shard's contexts; returns (rows, widths, content hash of each
    file). Files land under temporary names and are renamed only after every batch is written
    and flushed."""
    rows = int(keep_mask(tokens, exclude_token).sum())
    entry = {"file": stem}
    arrays: dict[str, np.ndarray] = {}
    row = 0
    try:
        for start in range(0, tokens.shape[0], model_batch_size):
            group = tokens[start : start + model_batch_size]
            out = extract_rows(extractor, group, exclude_token)
            if not arrays:
                # Room for the whole shard before the memory maps are written: a write into a
                # map whose blocks the filesystem cannot supply is a SIGBUS, not an error.
                temporaries = {key: cache_dir / f".{shard_file(entry, 0, key)}.tmp" for key in out}
                itemsize = np.dtype(_NUMPY_DTYPES[cache_dtype]).itemsize
                sizes = {key: rows * value.shape[-1] * itemsize for key, value in out.items()}
                _check_free_space(cache_dir, stem, sum(sizes.values()) + tokens.numel() * 4 + 1024)
                for key, value in out.items():
                    arrays[key] = _open_rows(temporaries[key], rows, value.shape[-1], cache_dtype)
                _reserve(cache_dir, stem, {temporaries[key]: sizes[key] for key in out})
            count = 0
            for key, value in out.items():
                _check_finite(value, cache_dtype, key, stem, row)
                arrays[key][row : row + len(value)] = _to_numpy(value, cache_dtype)
                count = len(value)
            row += count
            on_batch(group.numel())
        widths = {key: array.shape[1] for key, array in arrays.items()}
        for key, array in arrays.items():
            if isinstance(array, np.memmap):
                array.flush()
        if row < rows:  # positions left out by activation norm (an Exclusion): `rows` was an upper bound
            arrays = _shrink_rows(cache_dir, entry, arrays, row)
            rows = row
    except BaseException:
        arrays.clear()
        for leftover in cache_dir.glob(f".{stem}.*.tmp"):  # the space goes back at once
            leftover.unlink(missing_ok=True)
        raise
    del arrays  # closes the memory maps before the renames
    for key in widths:
        os.replace(cache_dir / f".{shard_file(entry, 0, key)}.tmp", cache_dir / shard_file(entry, 0, key))
    atomic_write(cache_dir / shard_file(entry, 0, "tokens"), lambda handle: np.save(handle, tokens.to(torch.int32).numpy()))
    # Hashed as they lie on disk (read back from the page cache: next to the model pass, free).
    hashes = {key: file_hash(cache_dir / shard_file(entry, 0, key)) for key in [*widths, "tokens"]}
    return rows, widths, hashes


def _size(count: float) -> str:
    for unit in ("bytes", "kB", "MB", "GB", "TB"):
        if count < 1000 or unit == "TB":
            return f"{count:.0f} {unit}" if unit == "bytes" else f"{count:.1f} {unit}"
        count /= 1000
    raise AssertionError("unreachable")


class _NoSpace(Exception):
    def __init__(self, stem: str, needed: int | None, free: int):
        super().__init__(stem)
        self.stem, self.needed, self.free = stem, needed, free


def _free_bytes(cache_dir: Path) -> int:
    return shutil.disk_usage(cache_dir).free


def _check_free_space(cache_dir: Path, stem: str, needed: int) -> None:
    free = _free_bytes(cache_dir)
    if free < needed:
        raise _NoSpace(stem, needed, free)


def _reserve(cache_dir: Path, stem: str, files: dict[Path, int]) -> None:
    """Allocates every byte of each file now (posix_fallocate: the filesystem commits the blocks
    or says ENOSPC), so the memory-mapped writes that follow cannot run out of space."""
    if not hasattr(os, "posix_fallocate"):  # macOS, Windows: the free-space check must do
        return
    for path, size in files.items():
        if size == 0:
            continue
        fd = os.open(path, os.O_RDWR)
        try:
            os.posix_fallocate(fd, 0, size + _npy_header_bytes(path))
        except OSError as error:
            if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise _NoSpace(stem, sum(files.values()), _free_bytes(cache_dir)) from None
            if error.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise
        finally:
            os.close(fd)


def _npy_header_bytes(path: Path) -> int:
    return _npy_layout(path)[2]


def _space_error(cache_dir: Path, manifest: dict, stem: str, needed: int | None, free: int) -> CacheSpaceError:
    done = len(manifest["shards"])
    need = f"needs {_size(needed)}" if needed is not None else "needs more"
    return CacheSpaceError(
        f"no space left for the activation cache at {cache_dir}: shard {stem} {need} and its filesystem has "
        f"{_size(free)} free. Free some space (or set data.cache_dir on a larger disk, or lower num_tokens) and run "
        f"again: the {done} complete shard{'s' if done != 1 else ''} are kept and caching resumes at {stem}"
    )


@contextmanager
def writer_lock(cache_dir: str | os.PathLike, writer: int = 0) -> Iterator[Path]:
    """Holds writer slot `writer`'s advisory lock on the cache while the block writes it; a second
    process asking for the same slot gets CacheLockedError naming the holder's PID at once (a holder
    that dies releases it: `atomic.exclusive_lock`). Readers take no lock."""
    path = Path(cache_dir) / (".lock" if writer == 0 else f".lock.w{writer}")
    with ExitStack() as held_while_writing:
        try:
            held_while_writing.enter_context(exclusive_lock(path))
        except LockHeld as held:
            raise CacheLockedError(
                f"the activation cache at {cache_dir} is being written by another process (PID {held.holder}, holding "
                f"{path.name}): let it finish and run again (this run then reads what it wrote), or use another cache_dir"
            ) from None
        yield path


@contextmanager
def _stopped_by_signals(where: dict) -> Iterator[None]:
    """SIGTERM while caching ends with a CachingStopped that says where it stopped, instead of a
    silent death: the complete shards are listed in the manifest and a rerun resumes after them."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(number: int, frame: object) -> None:
        try:  # what the manifest on disk says is complete, whatever line the signal interrupted
            done = len(read_manifest(where["cache_dir"], where["progress_file"])["shards"])
            where.update(done=done, stem=shard_stem(where["writer"], done))
        except (OSError, ValueError, TypeError):
            pass
        raise CachingStopped(
            f"caching stopped by {signal.Signals(number).name} at shard {where['stem']} of the activation cache at "
            f"{where['cache_dir']} ({where['done']} of {where['total']} shards{where['rank']} complete and kept): run the "
            f"same command again to resume at {where['stem']}",
            number,
        )

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _shrink_rows(cache_dir: Path, entry: dict, arrays: dict[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
    """Rewrites each temporary shard file with only its first `rows` rows."""
    for key, array in arrays.items():
        path = cache_dir / f".{shard_file(entry, 0, key)}.tmp"
        _save_npy(path.with_suffix(".shrunk.tmp"), np.asarray(array[:rows]))
        os.replace(path.with_suffix(".shrunk.tmp"), path)
    return {}


def _progress_name(writer: int, writers: int) -> str:
    return MANIFEST if writers == 1 else f"manifest.writer{writer}.json"


def _check_no_other_writers(cache_dir: Path, writers: int) -> None:
    """An unfinished cache resumes only with the world size that started it: the contexts each
    writer owns depend on it."""
    started = [p.name for p in cache_dir.glob("manifest.writer*.json")]
    other = [name for name in started if read_manifest(cache_dir, name).get("writers") != writers]
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
    with writer_lock(cache_dir, writer):
        return _build_cache(
            cache_dir, settings, load_model, contexts, roles=roles, gradients=gradients, plan=plan,
            context_size=context_size, cache_dtype=cache_dtype, exclude_token=exclude_token,
            model_batch_size=model_batch_size, info=info, progress=progress, writer=writer, writers=writers,
        )


def _build_cache(cache_dir: Path, settings: dict, load_model: Callable[[], nn.Module], contexts: Iterator[Tensor], *,
                 roles: dict[str, str], gradients: dict[str, str], plan: list[tuple[str, int]], context_size: int,
                 cache_dtype: str, exclude_token: int | None, model_batch_size: int, info: dict | None, progress: bool,
                 writer: int, writers: int) -> dict:
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
        manifest = {"format": FORMAT_VERSION, "hash": HASH, "settings": settings, "complete": False, "shards": [], "widths": {}}
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
        total = sum(n for _, n in plan[done:]) * context_size
        label = "caching activations" + (f" (rank {writer} of {writers})" if writers > 1 else "")
        bar = progress_bar(total, label, "tok", position=writer)
    started = time.perf_counter()
    where = {"stem": shard_stem(writer, done), "cache_dir": cache_dir, "done": done, "total": len(plan),
             "rank": f" of rank {writer}'s {writers}" if writers > 1 else "", "writer": writer, "progress_file": progress_file}
    try:
        with _stopped_by_signals(where):
            _write_shards(cache_dir, manifest, progress_file, load_model, contexts, where, bar, roles=roles,
                          gradients=gradients, plan=plan, context_size=context_size, cache_dtype=cache_dtype,
                          exclude_token=exclude_token, model_batch_size=model_batch_size, writer=writer)
    finally:
        if bar is not None:
            bar.close()
    written = sum(shard["contexts"] for shard in manifest["shards"][done:]) * context_size
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


def _write_shards(cache_dir: Path, manifest: dict, progress_file: str, load_model: Callable[[], nn.Module],
                  contexts: Iterator[Tensor], where: dict, bar, *, roles: dict[str, str], gradients: dict[str, str],
                  plan: list[tuple[str, int]], context_size: int, cache_dtype: str, exclude_token: int | None,
                  model_batch_size: int, writer: int) -> None:
    """The shards of `plan` the manifest lacks, each recorded in it (and its manifest written) once complete."""
    extractor: Extractor | None = None
    for index in range(len(manifest["shards"]), len(plan)):
        split, wanted = plan[index]
        stem = shard_stem(writer, index)
        where.update(stem=stem, done=len(manifest["shards"]))
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
        try:
            rows, widths, hashes = _write_shard(
                cache_dir, stem, tokens, extractor, cache_dtype, exclude_token, model_batch_size,
                bar.update if bar is not None else lambda n: None,
            )
            entry = {"split": split, "contexts": len(block), "rows": rows, "file": stem, "hashes": hashes}
            _write_manifest(cache_dir, {**manifest, "widths": {**manifest["widths"], **widths},
                                        "shards": [*manifest["shards"], entry]}, progress_file)
        except _NoSpace as full:
            raise _space_error(cache_dir, manifest, stem, full.needed, full.free) from None
        except OSError as error:  # the tokens file or the manifest: plain writes, which say ENOSPC
            if error.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            raise _space_error(cache_dir, manifest, stem, None, _free_bytes(cache_dir)) from None
        manifest["widths"].update(widths)
        manifest["shards"].append(entry)
        if len(block) < wanted:
            print(f"lightning-sae: the dataset ran out; the cache has {len(block)} of {wanted} contexts in its last shard")
            break


def _totals(manifest: dict) -> None:
    manifest["tokens"] = sum(shard["contexts"] for shard in manifest["shards"]) * manifest["settings"]["context_size"]
    manifest["rows"] = {s: sum(x["rows"] for x in manifest["shards"] if x["split"] == s) for s in ("train", "val")}


def merge_writers(cache_dir: str | os.PathLike, writers: int) -> dict:
    """manifest.json of a cache that `writers` ranks wrote, once every one of them is done
    (validation shards first, then each writer's training shards)."""
    with writer_lock(cache_dir, 0):
        return _merge_writers(Path(cache_dir), writers)


def _merge_writers(cache_dir: Path, writers: int) -> dict:
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


def open_cache(cache_dir: str | os.PathLike, settings: dict, verify: str = "full", vocab_size: int | None = None) -> dict:
    """The manifest of a finished cache made with `settings`, once its shards pass `verify`
    (see check_shard); clear one-line errors otherwise (DamagedCacheError names the shards)."""
    manifest = read_manifest(Path(cache_dir))
    if manifest is None:
        raise FileNotFoundError(f"no activation cache at {cache_dir}: run prepare_data() first (Trainer.fit does)")
    check_settings(manifest, settings, Path(cache_dir))
    if not manifest["complete"]:
        raise RuntimeError(
            f"the activation cache at {cache_dir} is incomplete ({len(manifest['shards'])} shards written); "
            "run prepare_data() again to finish it"
        )
    problems = check_shards(cache_dir, manifest, verify, vocab_size)
    if problems:
        raise DamagedCacheError(Path(cache_dir), manifest, problems)
    return manifest


def rebuild_shards(
    cache_dir: str | os.PathLike,
    manifest: dict,
    positions: list[int],
    load_model: Callable[[], nn.Module],
    writer_contexts: Callable[[int], Iterator[Tensor]],
    *,
    exclude_token: int | None,
    model_batch_size: int,
) -> dict:
    """Recomputes only the shards at `positions` of a finished cache's manifest and records their
    new hashes; returns the manifest. `writer_contexts(w)` yields writer w's contexts from its
    first (writer 0: the validation contexts, then its training ones; see ContextPlan), so a
    shard's contexts are found from its writer and index alone. A recomputed shard must have the
    rows and widths the manifest lists: anything else means the text or the model changed."""
    with writer_lock(cache_dir, 0):
        return _rebuild_shards(Path(cache_dir), manifest, positions, load_model, writer_contexts,
                               exclude_token=exclude_token, model_batch_size=model_batch_size)


def _rebuild_shards(cache_dir: Path, manifest: dict, positions: list[int], load_model: Callable[[], nn.Module],
                    writer_contexts: Callable[[int], Iterator[Tensor]], *, exclude_token: int | None,
                    model_batch_size: int) -> dict:
    settings = manifest["settings"]
    if manifest["format"] != FORMAT_VERSION:
        raise DataError(f"the activation cache at {cache_dir} has format {manifest['format']}: only format "
                        f"{FORMAT_VERSION} caches can be repaired shard by shard; delete it and run again")
    placed = [shard_writer_and_index(shard["file"]) for shard in manifest["shards"]]
    extractor = Extractor(load_model(), None, settings["roles"], settings["gradients"])
    for position in sorted(positions):
        entry = manifest["shards"][position]
        writer, index = placed[position]
        start = sum(s["contexts"] for s, (w, i) in zip(manifest["shards"], placed) if w == writer and i < index)
        block = list(itertools.islice(writer_contexts(writer), start, start + entry["contexts"]))
        if len(block) < entry["contexts"]:
            raise DataError(f"cannot rebuild {entry['file']} of {cache_dir}: the text now ends before its contexts; "
                            "delete the cache directory and run again")
        for leftover in cache_dir.glob(f".{entry['file']}.*.tmp"):
            leftover.unlink()
        print(f"lightning-sae: recomputing the damaged shard {entry['file']} of {cache_dir}")
        try:
            rows, widths, hashes = _write_shard(cache_dir, entry["file"], torch.stack(block), extractor,
                                                settings["cache_dtype"], exclude_token, model_batch_size, lambda n: None)
        except _NoSpace as full:
            raise CacheSpaceError(f"no space left to rebuild {entry['file']} of the activation cache at {cache_dir}: it needs "
                                  f"{_size(full.needed)} and its filesystem has {_size(full.free)} free") from None
        if rows != entry["rows"] or widths != manifest["widths"]:
            raise DataError(f"cannot rebuild {entry['file']} of {cache_dir}: recomputed it has {rows} rows of {widths}, "
                            f"the manifest says {entry['rows']} of {manifest['widths']} (the text or the model changed); "
                            "delete the cache directory and run again")
        entry["hashes"] = hashes
        _write_manifest(cache_dir, manifest)
    return manifest


class ShardVerifier:
    """Checks every byte of a finished cache against its manifest's hashes in a background
    thread, validation shards first, and holds a reader back until the shards it is about to
    serve are verified: `wait(positions)` returns at once for verified shards, blocks for pending
    ones, and raises DamagedCacheError (every damaged shard found so far) for a damaged one.

    Hashing reads each file once at memory or disk speed (xxh3, tools/bench_verify.py), which
    overlaps the Trainer's start, the sanity check and the first steps. A shuffled batch draws
    rows from every shard, so the first training batch waits for whatever is still pending.
    A process forked from this one (a DataLoader worker) has no thread: it hashes the shards it
    needs itself. `waited` is the time readers spent blocked, `seconds` the hashing time."""

    def __init__(self, cache_dir: str | os.PathLike, manifest: dict):
        self.cache_dir, self.manifest = Path(cache_dir), manifest
        shards = manifest["shards"]
        order = [p for p, s in enumerate(shards) if s["split"] == "val"] + [p for p, s in enumerate(shards) if s["split"] != "val"]
        self.results: dict[int, str | None] = {}
        self.waited, self.seconds = 0.0, None
        self._condition = threading.Condition()
        self._pid = os.getpid()
        self._thread = threading.Thread(target=self._run, args=(order,), name="lightning-sae-verify-cache", daemon=True)
        self._thread.start()

    def _check(self, position: int) -> str | None:
        try:
            return check_shard_hashes(self.cache_dir, self.manifest, position)
        except (OSError, ValueError, KeyError) as error:  # reported like damage, by the reader that needs the shard
            return f"{self.manifest['shards'][position]['file']} could not be verified ({type(error).__name__}: {error})"

    def _run(self, order: list[int]) -> None:
        started = time.perf_counter()
        for position in order:
            problem = self._check(position)
            with self._condition:
                self.results[position] = problem
                self._condition.notify_all()
        self.seconds = time.perf_counter() - started

    @property
    def done(self) -> bool:
        return len(self.results) == len(self.manifest["shards"])

    def wait(self, positions) -> None:
        positions = [int(p) for p in positions]
        pending = [p for p in positions if p not in self.results]
        if pending:
            started = time.perf_counter()
            if os.getpid() != self._pid or not self._thread.is_alive():
                for position in pending:  # a forked worker: no verifying thread came along
                    self.results.setdefault(position, self._check(position))
            else:
                with self._condition:
                    self._condition.wait_for(lambda: all(p in self.results for p in pending))
            self.waited += time.perf_counter() - started
        if any(self.results[p] is not None for p in positions):
            problems = {p: problem for p, problem in self.results.items() if problem is not None}
            raise DamagedCacheError(self.cache_dir, self.manifest, problems)

    def wait_all(self) -> None:
        self.wait(range(len(self.manifest["shards"])))


class ShardReader:
    """fetch(row_indices) -> {key: float32 [N, width]} over the memory-mapped shards of one split.

    Only the rows asked for are read; at most `max_open` shard files are mapped at once, so
    memory and file handles stay bounded however large the cache. Picklable for loader workers
    (maps are reopened in each process). It checks no headers: open_cache does that first. With
    a `verifier`, rows of a shard are served only once its bytes matched their hashes; with
    `check_finite`, a NaN or inf row (a cache damaged after it was written: caching refuses them)
    stops the read with its shard and row.
    """

    def __init__(self, cache_dir: str | os.PathLike, manifest: dict, split: str, keys: list[str], max_open: int = 64,
                 verifier: ShardVerifier | None = None, check_finite: bool = False):
        self.verifier, self.check_finite = verifier, check_finite
        self.cache_dir, self.keys, self.max_open = Path(cache_dir), list(keys), max_open
        self.dtype = manifest["settings"]["cache_dtype"]
        self.widths = {key: manifest["widths"][key] for key in self.keys}
        entries = [(i, shard) for i, shard in enumerate(manifest["shards"]) if shard["split"] == split]
        self.shards = [(i, shard) for i, shard in entries]
        self.offsets = np.cumsum([0] + [shard["rows"] for _, shard in entries])
        self.num_rows = int(self.offsets[-1])
        self._open: OrderedDict[tuple[int, str], np.ndarray] = OrderedDict()

    def __getstate__(self) -> dict:
        if self.verifier is not None:  # a spawned worker gets no thread: it is handed verified shards
            self.verifier.wait_all()
        return {**self.__dict__, "_open": OrderedDict(), "verifier": None}

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
        touched = np.unique(which)
        if self.verifier is not None:
            self.verifier.wait(self.shards[position][0] for position in touched)
        out = {key: np.empty((len(index), self.widths[key]), _NUMPY_DTYPES[self.dtype]) for key in self.keys}
        for position in touched:
            selected = which == position
            local = index[selected] - self.offsets[position]
            for key in self.keys:
                out[key][selected] = self._array(position, key)[local]
        batch = {key: _to_float(value, self.dtype) for key, value in out.items()}
        if self.check_finite:
            self._check_finite_rows(batch, index, which)
        return batch

    def _check_finite_rows(self, batch: dict[str, Tensor], index: np.ndarray, which: np.ndarray) -> None:
        for key, values in batch.items():
            if bool(torch.isfinite(values).all()):
                continue
            first = int((~torch.isfinite(values)).any(dim=1).nonzero()[0])
            position, shard = which[first], self.shards[which[first]][1]
            row = int(index[first] - self.offsets[position])
            raise DataError(
                f"the activation cache at {self.cache_dir} holds NaN/inf in row {row} of "
                f"{shard_file(shard, self.shards[position][0], key)}, which caching never writes: the file was damaged "
                "after it was written. Set data.rebuild_damaged=true to recompute the damaged shards, or delete the "
                "cache directory and run again"
            )

    def contexts(self, limit: int) -> Tensor:
        """Up to `limit` token contexts [B, T] of this split, in cache order."""
        blocks, count = [], 0
        for index, shard in self.shards:
            if count >= limit:
                break
            if self.verifier is not None:
                self.verifier.wait([index])
            block = np.load(self.cache_dir / shard_file(shard, index, "tokens"))[: limit - count]
            blocks.append(torch.from_numpy(block.astype(np.int64)))
            count += len(block)
        return torch.cat(blocks) if blocks else torch.empty(0, 0, dtype=torch.long)


def _to_float(values: np.ndarray, dtype: str) -> Tensor:
    tensor = torch.from_numpy(values)
    return (tensor.view(torch.bfloat16) if dtype == "bfloat16" else tensor).float()
