"""model_dtype "auto": bfloat16 where bf16 matmuls are fast, float32 elsewhere; the concrete dtype
is what a cache records, and bf16 activations stay within a stated distance of float32 ones."""

from __future__ import annotations

import inspect

import pytest
import torch
from data_fixtures import _isolated_caches, datamodule, save_model, tiny_root, write_text  # noqa: F401
from transformers import AutoModelForCausalLM

from lightning_sae.data import models
from lightning_sae.data.cache import CacheMismatchError, read_manifest
from lightning_sae.data_request import DataRequest

WITH_GRAD = DataRequest(gradients=True)
# bf16 keeps 8 significant bits (relative rounding 2^-9 ~ 0.2 % per operation); through two
# decoder layers of the tiny model that compounds to well under 2 % of the activations' norm.
ACTIVATION_TOLERANCE = 0.02
# dL/dx goes back through the LM head and the layer above it: a longer chain of bf16 roundings.
GRADIENT_TOLERANCE = 0.05


def fast_bf16(monkeypatch, fast: bool) -> None:
    monkeypatch.setattr("lightning_sae.data.models.has_fast_bf16_matmul", lambda device: fast)


@pytest.mark.parametrize("fast, expected", [(True, "bfloat16"), (False, "float32")])
def test_auto_resolves_by_the_hardware_and_explicit_dtypes_pass_through(monkeypatch, fast, expected):
    fast_bf16(monkeypatch, fast)
    assert models.resolve_model_dtype("auto", "cpu") == expected
    assert models.resolve_model_dtype("auto", torch.device("cpu")) == expected
    for name in ("float32", "float16", "bfloat16"):
        assert models.resolve_model_dtype(name, "cpu") == name
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        models.resolve_model_dtype("float8", "cpu")


def test_auto_asks_the_hardware_about_the_models_device(monkeypatch):
    asked = []
    monkeypatch.setattr("lightning_sae.data.models.has_fast_bf16_matmul", lambda device: asked.append(device) or False)
    models.resolve_model_dtype("auto", "cpu")
    assert asked == [torch.device("cpu")]


@pytest.mark.parametrize("fast, expected", [(True, torch.bfloat16), (False, torch.float32)])
def test_load_model_auto_loads_the_resolved_dtype(monkeypatch, tiny_root, fast, expected):
    fast_bf16(monkeypatch, fast)
    model = models.load_model(str(save_model("llama", tiny_root)), dtype="auto", device="cpu")
    assert {p.dtype for p in model.parameters()} == {expected}


def test_the_datamodule_default_is_auto_and_exposes_the_concrete_dtype(monkeypatch, tiny_root, tmp_path):
    dm = datamodule(save_model("llama", tiny_root), write_text(tiny_root), tmp_path / "c", model_dtype="auto")
    assert dm.hparams["model_dtype"] == "auto"
    fast_bf16(monkeypatch, True)
    assert dm.model_dtype == "bfloat16"
    fast_bf16(monkeypatch, False)
    assert dm.model_dtype == "float32"
    assert inspect.signature(type(dm).__init__).parameters["model_dtype"].default == "auto"


def test_a_cache_records_the_concrete_dtype_and_is_not_reused_for_another(monkeypatch, tiny_root, tmp_path):
    model, text = save_model("llama", tiny_root), write_text(tiny_root)
    fast_bf16(monkeypatch, True)
    made = _built(datamodule(model, text, tmp_path / "c", WITH_GRAD, model_dtype="auto"))
    assert made.model_dtype == read_manifest(tmp_path / "c")["settings"]["model_dtype"] == "bfloat16"
    mismatch = "model_dtype: cache has 'bfloat16', wanted 'float32'"
    with pytest.raises(CacheMismatchError, match=mismatch):
        _built(datamodule(model, text, tmp_path / "c", WITH_GRAD, model_dtype="float32"))
    fast_bf16(monkeypatch, False)  # the same config on a machine without fast bf16
    with pytest.raises(CacheMismatchError, match=mismatch):
        _built(datamodule(model, text, tmp_path / "c", WITH_GRAD, model_dtype="auto"))
    # Caches keyed by their settings (no cache_dir) land in different folders.
    keyed_fp32 = _built(datamodule(model, text, None, WITH_GRAD, model_dtype="auto"))
    fast_bf16(monkeypatch, True)
    keyed_bf16 = _built(datamodule(model, text, None, WITH_GRAD, model_dtype="auto"))
    assert keyed_fp32.metadata["cache_dir"] != keyed_bf16.metadata["cache_dir"]
    assert read_manifest(keyed_bf16.metadata["cache_dir"])["settings"]["model_dtype"] == "bfloat16"
    assert read_manifest(keyed_fp32.metadata["cache_dir"])["settings"]["model_dtype"] == "float32"


def _built(dm):
    """The DataModule with its cache built and opened, as a fit would do it."""
    dm.prepare_data()
    dm.setup()
    return dm


def _validation_rows(dm) -> dict[str, torch.Tensor]:
    batches = list(dm.val_dataloader())
    return {key: torch.cat([b[key] for b in batches]) for key in ("x", "grad")}


def _relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float((value.double() - reference.double()).norm() / reference.double().norm())


def test_bf16_activations_and_gradients_match_fp32_within_tolerance(tiny_root, tmp_path):
    model_dir, text = save_model("llama", tiny_root), write_text(tiny_root)
    rows = {}
    for dtype in ("float32", "bfloat16"):
        dm = _built(datamodule(model_dir, text, tmp_path / dtype, WITH_GRAD, model_dtype=dtype))
        rows[dtype] = _validation_rows(dm)
    # Independent float32 reference: a plain forward's hidden states after layer 1 (resid_post),
    # BOS positions left out as the cache leaves them out (one document: BOS at position 0 only).
    contexts = dm.validation_contexts(100)
    reference_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        hidden = reference_model(input_ids=contexts, output_hidden_states=True).hidden_states[2]
    reference = hidden[:, 1:].reshape(-1, hidden.shape[-1])
    torch.testing.assert_close(rows["float32"]["x"], reference, rtol=1e-5, atol=1e-5)
    activation_error = _relative_error(rows["bfloat16"]["x"], reference)
    gradient_error = _relative_error(rows["bfloat16"]["grad"], rows["float32"]["grad"])
    # Really computed in bf16 (not float32 relabelled), and still close to float32.
    assert 1e-4 < activation_error < ACTIVATION_TOLERANCE
    assert 1e-4 < gradient_error < GRADIENT_TOLERANCE


def test_a_stream_from_a_bf16_model_serves_float32_batches(tiny_root):
    dm = datamodule(save_model("llama", tiny_root), write_text(tiny_root), None, WITH_GRAD, model_dtype="bfloat16",
                    source="stream", buffer_tokens=64)
    dm.setup()
    train, val = next(iter(dm.train_dataloader())), next(iter(dm.val_dataloader()))
    for batch in (train, val):
        assert {key: value.dtype for key, value in batch.items()} == {"x": torch.float32, "grad": torch.float32}
        # the values are bf16 numbers (the model's), carried in float32 without change
        assert torch.equal(batch["x"], batch["x"].bfloat16().float())
