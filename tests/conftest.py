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
