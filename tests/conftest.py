import os

# Keep every test offline and quiet about hub lookups.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


import pytest


@pytest.fixture(autouse=True)
def _run_in_a_fresh_directory(tmp_path, monkeypatch):
    """Fits without a logger save their SAE under the working directory; each test gets its own,
    so no test sees another's files (or the repository's)."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(autouse=True)
def _language_models_in_float32(monkeypatch):
    """model_dtype "auto" (the default) means bfloat16 on CPUs with fast bf16 matmuls; the tests
    compare activations and metrics with float32 references, so here "auto" resolves to float32
    on every machine. Only the model's dtype is pinned: the g-SAE and JSAE precision choices still
    see the real hardware. tests/test_model_dtype.py checks the resolution itself; scripts the
    tests run in subprocesses pin model_dtype: float32 themselves."""
    monkeypatch.setattr("lightning_sae.data.models.has_fast_bf16_matmul", lambda device: False)
