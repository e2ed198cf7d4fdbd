"""Two DDP ranks (gloo, 2 processes): a stream gives each rank its own rows, together the
single-process stream's; a cache is written by both ranks at once and reads back whole."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import torch
from data_fixtures import _isolated_caches, datamodule, save_model, tiny_root, write_text  # noqa: F401

from lightning_sae.data.cache import ShardReader, read_manifest
from lightning_sae.data.extract import rows_from
from lightning_sae.data_request import DataRequest

SCRIPT = Path(__file__).with_name("ddp_stream.py")
REPO = SCRIPT.parents[1]


def _run(out_dir: Path, source: str, model: Path, text: Path) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(SCRIPT), str(out_dir), source, str(model), str(text)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return [torch.load(out_dir / f"rows_{rank}.pt", weights_only=True) for rank in range(2)]


def _sorted(rows: torch.Tensor) -> torch.Tensor:
    """Rows in a canonical order (lexicographic on the first columns), to compare multisets."""
    order = torch.arange(len(rows))
    for column in reversed(range(6)):
        order = order[torch.sort(rows[order, column], stable=True).indices]
    return rows[order]


def _same_rows(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape
    torch.testing.assert_close(_sorted(a), _sorted(b), rtol=1e-5, atol=1e-6)


def test_two_ranks_stream_their_own_shares_of_the_text(tiny_root, tmp_path):
    model, text = save_model("gpt2", tiny_root), write_text(tiny_root)
    ranks = _run(tmp_path, "stream", model, text)
    assert len(ranks[0]["train"]) == len(ranks[1]["train"]) > 0
    assert len(ranks[0]["val"]) == len(ranks[1]["val"]) > 0
    # Each rank trained on exactly the first rows of its own share of the training text (the
    # shares are disjoint and cover the text: test_stream.py checks the plan), and validated on
    # its share of the held-out contexts.
    dm = datamodule(model, text, None, DataRequest(), source="stream", batch_size=32)
    dm.setup("fit")
    plan, extractor = dm.context_plan(limit_training=False), dm._extractor()
    for rank, recorded in enumerate(ranks):
        trained = torch.cat(recorded["train"])
        expected = torch.cat([chunk["x"] for chunk in itertools.islice(
            rows_from(plan.training(rank, 2, cycle=True), extractor, 1, 4), 100)])[: len(trained)]
        _same_rows(trained, expected)
        held_out = torch.cat([chunk["x"] for chunk in rows_from(plan.validation(rank, 2, equal_shares=True), extractor, 1, 4)])
        _same_rows(torch.cat(recorded["val"]), held_out)
    other = torch.cat([chunk["x"] for chunk in itertools.islice(rows_from(plan.training(1, 2), extractor, 1, 4), 2)])
    assert not torch.equal(other[:32], torch.cat(ranks[0]["train"])[:32])


def test_two_ranks_write_one_cache_that_any_world_size_reads(tiny_root, tmp_path):
    model, text = save_model("gpt2", tiny_root), write_text(tiny_root)
    ranks = _run(tmp_path, "cache", model, text)
    manifest = read_manifest(tmp_path / "cache")
    assert manifest["complete"] and manifest["writers"] == 2
    assert {s["file"].startswith("shard_w1_") for s in manifest["shards"] if s["split"] == "train"} == {True, False}
    assert not list((tmp_path / "cache").glob("manifest.writer*.json"))
    single = datamodule(model, text, tmp_path / "single", DataRequest())
    single.prepare_data()
    rows = {}
    for name in ("cache", "single"):
        for split in ("train", "val"):
            reader = ShardReader(tmp_path / name, read_manifest(tmp_path / name), split, ["x"])
            rows[name, split] = reader(torch.arange(reader.num_rows))["x"]
    for split in ("train", "val"):
        _same_rows(rows["cache", split], rows["single", split])
    # Read back by one process, as a later fit would.
    reader = datamodule(model, text, tmp_path / "cache", DataRequest())
    reader.setup("fit")
    assert len(list(reader.train_dataloader())) == reader._readers["train"].num_rows // 32
    assert all(len(rank["train"]) == len(ranks[0]["train"]) > 0 for rank in ranks)
