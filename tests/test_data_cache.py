"""The activation cache on disk: resume after interruption, settings checks, dtypes, efficiency."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from data_fixtures import _isolated_caches, datamodule, save_model, tiny_root, write_text  # noqa: F401

import lightning_sae
from lightning_sae.data import cache
from lightning_sae.data.cache import CacheMismatchError, read_manifest
from lightning_sae.data.hooks import decoder_layers
from lightning_sae.data_request import DataRequest

PAIR_WITH_GRAD = DataRequest(reads={"x": "mlp_in", "y": "mlp_out"}, gradients=True)


def _files(folder):
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def test_interrupted_run_resumes_to_the_same_bytes(tiny_root, tmp_path, monkeypatch):
    model, text = save_model("llama", tiny_root), write_text(tiny_root)
    clean = datamodule(model, text, tmp_path / "clean", PAIR_WITH_GRAD)
    clean.prepare_data()
    # 40 contexts: 4 validation, then 36 training in shards of 8; 4 contexts per forward pass.
    assert [s["contexts"] for s in read_manifest(tmp_path / "clean")["shards"]] == [4, 8, 8, 8, 8, 4]

    forward = cache.Extractor.__call__
    calls = {"n": 0, "die_at": 7}  # call 7 is the second forward of shard 3: it dies half-written

    def counted(self, tokens):
        calls["n"] += 1
        if calls["n"] == calls["die_at"]:
            raise KeyboardInterrupt
        return forward(self, tokens)

    monkeypatch.setattr(cache.Extractor, "__call__", counted)
    broken = datamodule(model, text, tmp_path / "resumed", PAIR_WITH_GRAD)
    with pytest.raises(KeyboardInterrupt):
        broken.prepare_data()
    manifest = read_manifest(tmp_path / "resumed")
    assert not manifest["complete"] and len(manifest["shards"]) == 3
    # An interrupted write gives the half shard's space back at once; what a SIGKILL leaves
    # (played here by a stray temporary) is removed by the next run.
    assert not any(path.name.endswith(".tmp") for path in (tmp_path / "resumed").iterdir())
    (tmp_path / "resumed" / ".shard_00003.x.npy.tmp").write_bytes(b"\x93NUMPY half a shard")
    with pytest.raises(RuntimeError, match="incomplete"):
        broken.setup("fit")

    calls.update(n=0, die_at=-1)
    datamodule(model, text, tmp_path / "resumed", PAIR_WITH_GRAD).prepare_data()
    assert calls["n"] == 5  # only shards 3, 4 and 5 were computed again
    assert _files(tmp_path / "resumed") == _files(tmp_path / "clean")
    assert not list((tmp_path / "resumed").glob(".*.tmp"))


def test_other_settings_are_never_silently_reused(tiny_root, tmp_path):
    model, text = save_model("gpt2", tiny_root), write_text(tiny_root)
    datamodule(model, text, tmp_path / "c", DataRequest()).prepare_data()
    with pytest.raises(CacheMismatchError, match="context_size: cache has 16, wanted 8"):
        datamodule(model, text, tmp_path / "c", DataRequest(), context_size=8).prepare_data()
    with pytest.raises(CacheMismatchError, match="gradients"):
        datamodule(model, text, tmp_path / "c", DataRequest(gradients=True)).prepare_data()
    with pytest.raises(CacheMismatchError, match=r"\(roles:"):
        datamodule(model, text, tmp_path / "c", DataRequest(), hook="mlp_out").setup("fit")
    with pytest.raises(CacheMismatchError, match="model"):
        datamodule(save_model("neox", tiny_root), text, tmp_path / "c", DataRequest()).prepare_data()
    # Left unset, the cache directory is keyed by the settings, so both coexist.
    first = datamodule(model, text, None, DataRequest())
    second = datamodule(model, text, None, DataRequest(), cache_dtype="float16")
    for dm in (first, second):
        dm.prepare_data()
        dm.setup("fit")
    assert first.metadata["cache_dir"] != second.metadata["cache_dir"]


def test_manifest_describes_the_cache(tiny_root, tmp_path):
    dm = datamodule(save_model("neox", tiny_root), write_text(tiny_root), tmp_path / "c", PAIR_WITH_GRAD, cache_dtype="bfloat16")
    dm.prepare_data()
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    settings = manifest["settings"]
    assert manifest["complete"] and manifest["library_version"] == lightning_sae.__version__
    assert settings["model"]["fingerprint"] and settings["roles"] == {"x": "layers.1.mlp_in", "y": "layers.1.mlp_out"}
    assert settings["gradients"] == {"grad": "x"}
    assert settings["dataset"]["files"] and settings["context_size"] == 16 and settings["cache_dtype"] == "bfloat16"
    assert manifest["tokens"] == 640 and manifest["widths"] == {"x": 32, "y": 32, "grad": 32}
    assert sum(s["rows"] for s in manifest["shards"]) == manifest["rows"]["train"] + manifest["rows"]["val"]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_caches_read_back_as_float32(dtype, tiny_root, tmp_path):
    model, text = save_model("llama", tiny_root), write_text(tiny_root)
    full = datamodule(model, text, tmp_path / "full", PAIR_WITH_GRAD)
    half = datamodule(model, text, tmp_path / "half", PAIR_WITH_GRAD, cache_dtype=dtype)
    batches = []
    for dm in (full, half):
        dm.prepare_data()
        dm.setup("fit")
        batches.append(next(iter(dm.train_dataloader())))
    assert np.load(tmp_path / "half" / "shard_00001.x.npy", mmap_mode="r").itemsize == 2
    for key in ("x", "y", "grad"):
        assert batches[1][key].dtype == torch.float32
        tolerance = 1e-2 if dtype == "bfloat16" else 2e-3
        torch.testing.assert_close(batches[1][key], batches[0][key], rtol=tolerance, atol=tolerance * batches[0][key].abs().max().item())


def test_bos_positions_are_excluded_unless_asked(tiny_root, tmp_path):
    model, text = save_model("gpt2", tiny_root), write_text(tiny_root)
    kept = datamodule(model, text, tmp_path / "a", DataRequest())
    every = datamodule(model, text, tmp_path / "b", DataRequest(), exclude_bos=False)
    for dm in (kept, every):
        dm.prepare_data()
    tokens = np.concatenate([np.load(p) for p in sorted((tmp_path / "a").glob("*.tokens.npy"))])
    assert (tokens[:, 0] == 1).all()  # every context starts with BOS
    rows = [read_manifest(tmp_path / name)["rows"] for name in ("a", "b")]
    assert rows[0]["train"] + rows[0]["val"] == (tokens != 1).sum()
    assert rows[1]["train"] + rows[1]["val"] == tokens.size == 640


def test_without_gradients_the_forward_stops_at_the_hooked_layer(tiny_root, tmp_path, monkeypatch):
    model, text = save_model("llama", tiny_root), write_text(tiny_root)
    later_calls = {"n": 0}
    loaded = []

    def counting_model(self):
        net = real(self)
        loaded.append(net)
        decoder_layers(net)[2].register_forward_hook(lambda *a: later_calls.__setitem__("n", later_calls["n"] + 1))
        return net

    from lightning_sae.data.datamodule import ActivationDataModule

    real = ActivationDataModule._fresh_model
    monkeypatch.setattr(ActivationDataModule, "_fresh_model", counting_model)
    datamodule(model, text, tmp_path / "a", DataRequest(reads={"x": "resid_post"}), layer=1).prepare_data()
    assert later_calls["n"] == 0
    datamodule(model, text, tmp_path / "b", DataRequest(reads={"x": "resid_post"}, gradients=True), layer=1).prepare_data()
    assert later_calls["n"] > 0  # the loss needs the whole model
    # Parameters stay frozen: only the hooked activation ever took a gradient.
    assert all(not p.requires_grad and p.grad is None for net in loaded for p in net.parameters())


def test_a_short_dataset_shortens_training_only(tiny_root, tmp_path):
    model, text = save_model("gpt2", tiny_root), write_text(tmp_path, count=30, name="short.txt")
    dm = datamodule(model, text, tmp_path / "c", DataRequest(), num_tokens=16 * 400, validation_fraction=0.01)
    dm.prepare_data()
    manifest = read_manifest(tmp_path / "c")
    assert manifest["complete"] and manifest["tokens"] < 16 * 400
    with pytest.raises(ValueError, match="validation"):
        datamodule(model, text, tmp_path / "d", DataRequest(), num_tokens=16 * 400, validation_fraction=0.5).prepare_data()
