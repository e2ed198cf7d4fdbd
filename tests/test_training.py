"""Training behaviour end to end: recovery of known features, AuxK, the CLI, plugins, precision."""

from __future__ import annotations

import importlib
import shutil
import sys
import textwrap
from pathlib import Path

import lightning as L
import pytest
import torch

import lightning_sae.registry as registry
from lightning_sae.cli import main
from lightning_sae.module import SAEModule
from lightning_sae.tensor_data import SyntheticActivations, TensorDataModule

REPO = Path(__file__).resolve().parents[1]


def fit(module: SAEModule, data: TensorDataModule, epochs: int, **trainer_kwargs) -> L.Trainer:
    L.seed_everything(0)
    trainer = L.Trainer(
        max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=1.0, **trainer_kwargs,
    )
    trainer.fit(module, data)
    return trainer


def test_training_recovers_known_sparse_directions(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = TensorDataModule(
        synthetic=SyntheticActivations(num_tokens=100_000, d_in=128, num_features=256, active=4), batch_size=512
    )
    module = SAEModule(k=4, d_sae=512, lr=1e-3, dead_tokens=20_000)
    trainer = fit(module, data, epochs=3)
    assert float(trainer.callback_metrics["val/fvu"]) < 0.1
    best_cosine = (data.true_directions @ module.sae.W_dec.detach().T).max(dim=1).values
    assert (best_cosine > 0.9).float().mean() >= 0.9
    torch.testing.assert_close(module.sae.W_dec.norm(dim=1), torch.ones(512))


def _starved_module(aux_coefficient: float) -> SAEModule:
    module = SAEModule(k=4, d_sae=256, lr=1e-3, dead_tokens=2_000, aux_coefficient=aux_coefficient, widths={"x": 32})
    with torch.no_grad():
        module.sae.W_enc[:128] *= 0.05  # small but positive pre-activations: never in the top k
    return module


def test_auxk_revives_dead_latents(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    alive = {}
    for coefficient in (0.0, 1 / 32):
        data = TensorDataModule(synthetic=SyntheticActivations(num_tokens=40_000, d_in=32, num_features=256, active=4), batch_size=256)
        module = _starved_module(coefficient)
        fit(module, data, epochs=2)
        fired = module.sae_activity.tokens_since_fired[:128] < module.hparams.dead_tokens
        alive[coefficient] = int(fired.sum())
    assert alive[1 / 32] > alive[0.0] + 20, alive


def test_cli_fit_writes_tensorboard_events_and_an_saelens_sae(tmp_path):
    sae_lens = pytest.importorskip("sae_lens")
    cli = main([
        "fit", "--config", str(REPO / "configs/synthetic.yaml"),
        f"--trainer.default_root_dir={tmp_path}", "--trainer.max_epochs=1",
        "--data.init_args.synthetic.num_tokens=20000", "--trainer.enable_progress_bar=false",
    ])
    log_dir = Path(cli.trainer.log_dir)
    assert list(log_dir.glob("events.out.tfevents.*")), "no TensorBoard events written"
    sae_dir = log_dir / "sae"
    loaded = sae_lens.SAE.load_from_disk(str(sae_dir), device="cpu")
    x = torch.randn(64, 64)
    ours = cli.model.sae
    torch.testing.assert_close(loaded.decode(loaded.encode(x)), ours(x).xhat, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loaded.encode(x), ours.dense_latents(ours.encode(x)), atol=1e-5, rtol=1e-5)


def _install_third_party(site: Path) -> None:
    """Put the test plugin on a path with real distribution metadata, as pip would."""
    shutil.copytree(REPO / "tests/third_party_plugin/half_dictionary_selector", site / "half_dictionary_selector")
    shutil.copy(REPO / "tests/third_party_plugin/broken_plugin.py", site / "broken_plugin.py")
    info = site / "half_dictionary_selector-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: half-dictionary-selector\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(textwrap.dedent("""
        [lightning_sae.selectors]
        half_dictionary = half_dictionary_selector:HalfDictionarySelector
        broken = broken_plugin:Whatever
    """))


def test_third_party_selector_is_discovered_by_name_and_trains(tmp_path, monkeypatch):
    _install_third_party(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    monkeypatch.setattr(registry, "_loaded", {})
    with pytest.warns(UserWarning, match=r"broken = broken_plugin:Whatever"):
        cli = main([
            "fit", "--config", str(REPO / "configs/synthetic.yaml"),
            f"--trainer.default_root_dir={tmp_path}", "--trainer.max_epochs=1",
            "--data.init_args.synthetic.num_tokens=20000", "--trainer.enable_progress_bar=false",
            "--model.init_args.selector=half_dictionary", "--model.init_args.selector.init_args.fraction=0.25",
        ])
    assert type(cli.model.selector).__mro__[1].__name__ == "HalfDictionarySelector"
    assert cli.model.selector.fraction == 0.25
    assert float(cli.trainer.callback_metrics["val/frac_alive"]) <= 0.25
    assert float(cli.trainer.callback_metrics["val/explained_variance"]) > 0.3


def test_bf16_mixed_precision_trains(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = TensorDataModule(synthetic=SyntheticActivations(num_tokens=20_000, d_in=32, num_features=128, active=4), batch_size=512)
    module = SAEModule(k=4, d_sae=128, lr=1e-3)
    trainer = fit(module, data, epochs=2, precision="bf16-mixed")
    assert module.sae.W_enc.dtype == torch.float32  # master weights stay fp32
    assert float(trainer.callback_metrics["val/explained_variance"]) > 0.5
