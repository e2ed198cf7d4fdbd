"""A tiny cache built once per test module, for the tests that damage copies of it
(test_cache_integrity, test_fault_matrix), and a record of which training steps ran."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from data_fixtures import datamodule, save_model, write_text

from lightning_sae.data_request import DataRequest
from lightning_sae.module import SAETrainingModule

SETTINGS = {"context_size": 16, "num_tokens": 640, "shard_tokens": 128, "validation_fraction": 0.05, "model_batch_size": 8}


REPO = Path(__file__).resolve().parents[1]
QUIET = ["--trainer.logger=false", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


def fit_args(model: Path, text: Path, cache_dir: Path, *extra: str) -> list[str]:
    """A one-step CLI fit of a tiny SAE on the cache at `cache_dir` (made with SETTINGS)."""
    return [
        "fit", "--model=sae", "--model.k=4", "--model.d_sae=64", "--model.spliced_eval_contexts=0",
        "--data=lightning_sae.data.ActivationDataModule", f"--data.model={model}", f"--data.dataset={text}",
        "--data.layer=1", "--data.context_size=16", "--data.num_tokens=640", "--data.shard_tokens=128",
        "--data.model_batch_size=8", "--data.batch_size=32", "--data.device=cpu", f"--data.cache_dir={cache_dir}",
        "--trainer.max_steps=1", "--trainer.limit_val_batches=0", "--trainer.enable_checkpointing=false",
        f"--trainer.default_root_dir={cache_dir.parent / 'run'}", *QUIET, *extra,
    ]


@pytest.fixture
def steps(monkeypatch) -> list[int]:
    """Records every training step that runs (its batch index)."""
    ran: list[int] = []
    step = SAETrainingModule.training_step

    def counted(self, batch, batch_idx):
        ran.append(batch_idx)
        return step(self, batch, batch_idx)

    monkeypatch.setattr(SAETrainingModule, "training_step", counted)
    return ran


@pytest.fixture(scope="module")
def built(tiny_root, tmp_path_factory) -> tuple[Path, Path, Path]:
    """(model folder, text, a finished cache made with SETTINGS: shard 0 (validation), 1-5 (training))."""
    model, text = save_model("llama", tiny_root), write_text(tiny_root)
    source = tmp_path_factory.mktemp("built") / "cache"
    datamodule(model, text, source, DataRequest(), **SETTINGS).prepare_data()
    return model, text, source


def data_offset(path: Path) -> int:
    """Where a .npy file's array data starts."""
    with open(path, "rb") as handle:
        np.lib.format.read_magic(handle)
        np.lib.format.read_array_header_1_0(handle)
        return handle.tell()
