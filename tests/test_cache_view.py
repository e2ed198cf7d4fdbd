"""lightning_sae.data.read_cache: the public, read-only view of an activation cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from data_fixtures import TWO_KEYS, _isolated_caches, datamodule, save_model, tiny_root, two_key_cache, write_text  # noqa: F401

from lightning_sae.data import CacheView, read_cache



def test_the_view_describes_what_the_files_hold(two_key_cache):
    cache = read_cache(two_key_cache)
    assert isinstance(cache, CacheView) and cache.complete and cache.has_gradients
    assert cache.keys == ["grad", "x", "y"] and cache.dtype == "float32"
    # Counted from the .npy files themselves, not from the manifest.
    for key, width in cache.widths.items():
        for shard in cache.shards:
            rows, columns = np.load(two_key_cache / f"{shard.file}.{key}.npy", mmap_mode="r").shape
            assert (rows, columns) == (shard.rows, width)
    for split in ("train", "val"):
        files = [s.file for s in cache.shards if s.split == split]
        assert cache.rows[split] == sum(np.load(two_key_cache / f"{f}.x.npy", mmap_mode="r").shape[0] for f in files) > 0
    val_tokens = np.concatenate([np.load(two_key_cache / f"{s.file}.tokens.npy") for s in cache.shards if s.split == "val"])
    assert torch.equal(cache.contexts("val"), torch.from_numpy(val_tokens.astype(np.int64)))
    assert cache.contexts("val").shape[1] == cache.context_size


def test_the_reader_serves_the_stored_rows(two_key_cache):
    cache = read_cache(two_key_cache)
    first = next(s for s in cache.shards if s.split == "train")
    stored = {key: np.load(two_key_cache / f"{first.file}.{key}.npy")[:5] for key in ("x", "grad")}
    rows = cache.reader("train", ["x", "grad"])(torch.arange(5))
    assert set(rows) == {"x", "grad"}
    for key in rows:
        assert torch.equal(rows[key], torch.from_numpy(stored[key]))
    with pytest.raises(KeyError, match="holds no"):
        cache.reader("train", ["z"])


def test_the_view_is_read_only_and_verify_names_damage(two_key_cache, tmp_path):
    cache = read_cache(two_key_cache)
    settings = cache.settings
    settings["context_size"] = -1
    cache.manifest["widths"]["x"] = 0
    assert cache.settings["context_size"] > 0 and cache.widths["x"] > 0
    assert cache.verify("full") == {}
    victim = cache.shards[-1].file
    path = two_key_cache / f"{victim}.y.npy"
    path.write_bytes(path.read_bytes()[:-4])  # cut short
    assert list(cache.verify("header")) == [victim] and list(cache.verify("full")) == [victim]
    with pytest.raises(FileNotFoundError, match="no activation cache"):
        read_cache(tmp_path)
