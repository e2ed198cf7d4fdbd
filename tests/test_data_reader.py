"""Reading the cache: seeded shuffling, DDP rank sharding, loader workers, the validation split."""

from __future__ import annotations

import torch
from data_fixtures import TWO_KEYS, _isolated_caches, datamodule, save_model, tiny_root, two_key_cache, write_text  # noqa: F401

import lightning_sae.batching as batching
from lightning_sae.data.cache import ShardReader, read_manifest



def _opened(two_key_cache, tiny_root, **kwargs):
    dm = datamodule(save_model("llama", tiny_root), write_text(tiny_root), two_key_cache, TWO_KEYS, **kwargs)
    dm.setup("fit")
    return dm


def _recording(loader):
    """Makes the loader's dataset remember which rows each batch fetched."""
    seen: list[torch.Tensor] = []
    fetch = loader.dataset.fetch
    loader.dataset.fetch = lambda rows: (seen.append(rows.clone()), fetch(rows))[1]
    return seen


def test_batches_are_float32_dicts_deterministic_by_seed(two_key_cache, tiny_root):
    first = list(_opened(two_key_cache, tiny_root, seed=3).train_dataloader())
    again = list(_opened(two_key_cache, tiny_root, seed=3).train_dataloader())
    other = list(_opened(two_key_cache, tiny_root, seed=4).train_dataloader())
    assert len(first) == 517 // 32 and set(first[0]) == {"x", "y", "grad"}
    assert all(v.dtype == torch.float32 and v.shape == (32, 32) for v in first[0].values())
    for a, b in zip(first, again):
        assert all(torch.equal(a[key], b[key]) for key in a)
    assert not torch.equal(first[0]["x"], other[0]["x"])


def test_every_row_comes_from_the_right_place(two_key_cache, tiny_root):
    dm = _opened(two_key_cache, tiny_root)
    loader = dm.train_dataloader()
    seen = _recording(loader)
    batch = next(iter(loader))
    reader = ShardReader(two_key_cache, read_manifest(two_key_cache), "train", ["x", "y", "grad"])
    direct = reader(seen[0])
    assert all(torch.equal(batch[key], direct[key]) for key in batch)
    # Rows of several shards, read one at a time, agree with the same rows read together.
    one_by_one = torch.cat([reader(row.view(1))["x"] for row in seen[0]])
    assert torch.equal(one_by_one, batch["x"])


def test_ranks_read_disjoint_parts(two_key_cache, tiny_root, monkeypatch):
    parts = []
    for rank in range(3):
        monkeypatch.setattr(batching, "_rank_and_world", lambda rank=rank: (rank, 3))
        loader = _opened(two_key_cache, tiny_root).train_dataloader()
        seen = _recording(loader)
        batches = list(loader)
        assert len(batches) == len(loader) == 517 // (32 * 3)
        parts.append(torch.cat(seen))
    everything = torch.cat(parts)
    assert everything.unique().numel() == everything.numel() == 3 * (517 // 96) * 32


def test_validation_uses_every_row_once_with_equal_batch_counts_on_every_rank(two_key_cache, tiny_root, monkeypatch):
    num_rows = read_manifest(two_key_cache)["rows"]["val"]
    for world in (1, 2, 3):
        parts, counts = [], set()
        for rank in range(world):
            monkeypatch.setattr(batching, "_rank_and_world", lambda rank=rank, world=world: (rank, world))
            loader = _opened(two_key_cache, tiny_root, batch_size=16).val_dataloader()
            seen = _recording(loader)
            batches = list(loader)
            counts.add(len(batches))
            assert len(batches) == len(loader)
            assert all(0 < batch["x"].shape[0] <= 16 for batch in batches)
            parts.append(torch.cat(seen))
        everything = torch.cat(parts)
        assert len(counts) == 1, f"ranks disagree on the number of validation batches: {counts}"
        assert torch.equal(everything.sort().values, torch.arange(num_rows)), f"world {world}: not every row exactly once"


def test_two_workers_give_the_same_batches_in_the_same_order(two_key_cache, tiny_root):
    single = list(_opened(two_key_cache, tiny_root).train_dataloader())
    workers = list(_opened(two_key_cache, tiny_root, num_workers=2).train_dataloader())
    assert len(single) == len(workers)
    for a, b in zip(single, workers):
        assert all(torch.equal(a[key], b[key]) for key in a)


def test_epochs_reshuffle_and_resume_mid_epoch(two_key_cache, tiny_root):
    loader = _opened(two_key_cache, tiny_root).train_dataloader()
    epoch0, epoch1 = list(loader), list(loader)
    assert not torch.equal(epoch0[0]["x"], epoch1[0]["x"])
    resumed = _opened(two_key_cache, tiny_root).train_dataloader()
    resumed.load_state_dict({"epoch": 1, "batches_done": 5})
    assert torch.equal(next(iter(resumed))["x"], epoch1[5]["x"])


def test_validation_is_held_out_and_unshuffled(two_key_cache, tiny_root):
    dm = _opened(two_key_cache, tiny_root)
    val = list(dm.val_dataloader())
    assert torch.equal(val[0]["x"], list(_opened(two_key_cache, tiny_root, seed=9).val_dataloader())[0]["x"])
    manifest = read_manifest(two_key_cache)
    reader = ShardReader(two_key_cache, manifest, "val", ["x"])
    # Cache order, every held-out row once, none dropped.
    assert torch.equal(torch.cat([batch["x"] for batch in val]), reader(torch.arange(manifest["rows"]["val"]))["x"])
    contexts = dm.validation_contexts(100)
    assert contexts.shape == (4, 16) and contexts.dtype == torch.long
    train = ShardReader(two_key_cache, manifest, "train", ["x"]).contexts(10**6)
    assert not {tuple(c) for c in contexts.tolist()} & {tuple(c) for c in train.tolist()}
    assert dm.validation_contexts(2).shape == (2, 16)


def test_open_maps_stay_bounded(two_key_cache):
    reader = ShardReader(two_key_cache, read_manifest(two_key_cache), "train", ["x", "y", "grad"], max_open=2)
    reader(torch.arange(reader.num_rows))
    assert len(reader._open) == 2
