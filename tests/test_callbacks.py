"""The side effects of a fit, as callbacks: histograms, export, console summary (lightning_sae.callbacks)."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_sae.callbacks import ExportSAEs, FitSummary, LatentHistograms
from lightning_sae.formats import load_saelens
from lightning_sae.module import SAEModule
from lightning_sae.tensor_data import SyntheticActivations, TensorDataModule


def _fit(root: Path, callbacks: list[L.Callback] | None = None) -> tuple[SAEModule, L.Trainer]:
    L.seed_everything(0)
    data = TensorDataModule(synthetic=SyntheticActivations(num_tokens=4_000, d_in=16, num_features=64, active=3), batch_size=256)
    module = SAEModule(k=3, d_sae=64, lr=1e-3, spliced_eval_contexts=0)
    trainer = L.Trainer(
        max_epochs=1, accelerator="cpu", logger=TensorBoardLogger(str(root), name="tb", default_hp_metric=False),
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
    )
    trainer.fit(module, data)
    return module, trainer


def _histograms(log_dir: str) -> dict[str, list]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(log_dir, size_guidance={"histograms": 0}).Reload()
    return {tag: events.Histograms(tag) for tag in events.Tags()["histograms"]}


def test_a_fit_gets_histograms_export_and_summary_by_default(tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        module, trainer = _fit(tmp_path)
    log_dir = Path(trainer.log_dir)
    kinds = [type(c) for c in trainer.callbacks]
    assert kinds.count(LatentHistograms) == kinds.count(ExportSAEs) == kinds.count(FitSummary) == 1

    # Histograms of the last validation, computed here from the module's own state.
    histograms = _histograms(str(log_dir))
    norms = histograms["val/decoder_norms"][-1].histogram_value
    assert norms.num == module.sae.d_sae
    assert np.isclose(norms.min, 1.0, atol=1e-5) and np.isclose(norms.max, 1.0, atol=1e-5)  # unit decoder rows
    density = module.core_results["val/"].latents["feature_density"]
    fired = density[density > 0]
    logged = histograms["val/log10_feature_density"][-1].histogram_value
    assert logged.num == fired.numel()
    assert np.isclose(logged.min, float(fired.min().log10()), rtol=1e-5)
    assert np.isclose(logged.max, float(fired.max().log10()), rtol=1e-5)

    # Exported with the trained weights (sparsify's layout too where the data names a hook point:
    # tests/test_stream.py; TensorDataModule names none).
    saved, _ = load_saelens(log_dir / "sae")
    assert torch.equal(saved.W_enc, module.sae.W_enc.detach()) and torch.equal(saved.b_dec, module.sae.b_dec.detach())
    assert not (log_dir / "sparsify").exists()

    summary = caplog.text
    ev = float(trainer.callback_metrics["val/explained_variance"])
    assert "lightning-sae: training finished" in summary
    assert f"sae: validation explained variance {ev:.4f}" in summary
    assert f"sae saved (SAELens format) to {log_dir / 'sae'}" in summary


def test_a_trainers_own_callback_replaces_the_default(tmp_path):
    mine = ExportSAEs(sparsify=False)
    _, trainer = _fit(tmp_path, callbacks=[mine])
    exports = [c for c in trainer.callbacks if isinstance(c, ExportSAEs)]
    assert exports == [mine]  # not replaced by the module's default, nor doubled
    assert set(mine.written) == {"sae"} and mine.written_sparsify == {}
