"""Training behaviour end to end: recovery of known features, AuxK, the CLI, plugins, precision."""

from __future__ import annotations

import importlib
import shutil
import textwrap
from pathlib import Path

import lightning as L
import pytest
import torch

import lightning_sae.registry as registry
from lightning_sae.cli import main
from lightning_sae.module import SAEModule
from lightning_sae.tensor_data import SyntheticActivations, TensorDataModule
from tests.helpers import checkpointed_fit_args

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
    shutil.copytree(REPO / "tests/third_party_plugin/firing_balance_selector", site / "firing_balance_selector")
    shutil.copy(REPO / "tests/third_party_plugin/broken_plugin.py", site / "broken_plugin.py")
    info = site / "half_dictionary_selector-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: half-dictionary-selector\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(textwrap.dedent("""
        [lightning_sae.selectors]
        half_dictionary = half_dictionary_selector:HalfDictionarySelector
        firing_balance = firing_balance_selector:FiringBalanceSelector
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


def _stateful_fit_args(data: Path, root: Path, *extra: str) -> list[str]:
    return checkpointed_fit_args(data, root, "--model.selector=firing_balance", "--model.selector.boost=2.0", *extra)


def test_third_party_selector_state_is_checkpointed_resumed_and_recorded(tmp_path, monkeypatch):
    """The stateful contract from outside the repository: a plugin's buffers (per-latent firing
    counts, sized by the SAE in `setup`) train, reach checkpoints, resume exactly, and its
    arguments are in the hyper-parameters."""
    from safetensors.torch import save_file

    _install_third_party(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    monkeypatch.setattr(registry, "_loaded", {})
    data = tmp_path / "x.safetensors"
    save_file({"x": torch.randn(520, 16, generator=torch.Generator().manual_seed(0))}, str(data))
    with pytest.warns(UserWarning, match="broken_plugin"):
        cli = main(_stateful_fit_args(data, tmp_path / "run"))
    selector = cli.model.sae.selector
    assert "FiringBalanceSelector" in [cls.__name__ for cls in type(selector).__mro__]
    assert cli.model.hparams["selector"] == {"class_path": "firing_balance_selector.FiringBalanceSelector", "init_args": {"boost": 2.0}}
    # 3 epochs of 7 full batches of 64: every training token fired k latents; validation
    # (and the sanity check before training) did not count.
    assert cli.trainer.global_step == 21
    assert float(selector.tokens) == 21 * 64 and float(selector.fired.sum()) == 4 * 21 * 64

    # The state is used: the selection is TopK of the balanced score, not of pre.
    x = torch.randn(32, 16)
    sae = cli.model.sae.eval()
    pre = sae.pre_activations(x)
    rate = selector.fired / selector.tokens
    expected = (pre / (1 + 2.0 * rate).float()).topk(4, dim=1).indices.sort(1).values
    assert torch.equal(sae.encode(x).indices.sort(1).values, expected)
    assert not torch.equal(expected, pre.topk(4, dim=1).indices.sort(1).values)

    checkpoint = tmp_path / "run" / "ckpt" / "epoch=1-step=10.ckpt"
    saved = torch.load(checkpoint, weights_only=True)
    assert float(saved["state_dict"]["sae.selector.tokens"]) == 10 * 64
    reloaded = SAEModule.load_from_checkpoint(checkpoint)
    assert type(reloaded.sae.selector).__name__ == "FiringBalanceSelector"
    assert torch.equal(reloaded.sae.selector.fired, saved["state_dict"]["sae.selector.fired"])
    assert reloaded.sae.selector.boost == 2.0

    resumed = main(_stateful_fit_args(data, tmp_path / "resumed", f"--ckpt_path={checkpoint}"))
    for name in ("fired", "tokens"):
        assert torch.equal(getattr(resumed.model.sae.selector, name), getattr(selector, name)), name
    assert torch.equal(resumed.model.sae.W_enc, cli.model.sae.W_enc)


def test_bf16_mixed_precision_trains(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = TensorDataModule(synthetic=SyntheticActivations(num_tokens=20_000, d_in=32, num_features=128, active=4), batch_size=512)
    module = SAEModule(k=4, d_sae=128, lr=1e-3)
    trainer = fit(module, data, epochs=2, precision="bf16-mixed")
    assert module.sae.W_enc.dtype == torch.float32  # master weights stay fp32
    assert float(trainer.callback_metrics["val/explained_variance"]) > 0.5
