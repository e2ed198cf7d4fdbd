"""The learned-rule contract from outside the repository (issue 26): `GatedTopK`
(tests/third_party_plugin/gated_topk_selector) owns a per-latent parameter trained through a
declared pseudo-derivative and adds a named, warmed-up loss term, using only the public API.
Its gradients are checked against a dense autograd SAE with the pseudo-derivative written out;
then it is installed into a temporary site and fitted, checkpointed and resumed by the CLI."""

from __future__ import annotations

import gc
import importlib
import shutil
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lightning_sae import SAEModule, registry
from lightning_sae.cli import main

REPO = Path(__file__).resolve().parents[1]
D_IN, D_SAE, K, N = 12, 48, 6, 80


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    site = tmp_path / "site"
    shutil.copytree(REPO / "tests/third_party_plugin/gated_topk_selector", site / "gated_topk_selector")
    info = site / "gated_topk_selector-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: gated-topk-selector\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(textwrap.dedent("""
        [lightning_sae.selectors]
        gated_topk = gated_topk_selector:GatedTopK
    """))
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    monkeypatch.setattr(registry, "_loaded", {})
    # A previous test's copy of the plugin lives on in Selector.__subclasses__() until the cyclic
    # GC runs; jsonargparse's short-name lookup would find its GatedTopK first, at the same import
    # path, and skip this copy's subclasses (the CLI alias): collect it now, not whenever.
    gc.collect()
    yield importlib.import_module("gated_topk_selector")
    sys.modules.pop("gated_topk_selector", None)


def test_gradients_match_a_dense_sae_with_the_pseudo_derivative_written_out(plugin):
    eps, coefficient = 0.5, 0.3
    module = SAEModule(k=K, d_sae=D_SAE, selector=plugin.GatedTopK(bandwidth=eps, gate_coefficient=coefficient, warm_up_steps=0),
                       widths={"x": D_IN}, b_dec_init="zeros")
    sae = module.get_sae("sae")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(D_SAE, D_IN, generator=generator) / 2)
        sae.b_enc.copy_(torch.randn(D_SAE, generator=generator) * 0.2)
        sae.b_dec.copy_(torch.randn(D_IN, generator=generator) * 0.1)
        sae.selector.gate.copy_(torch.rand(D_SAE, generator=generator) * 1.2)
    x = torch.randn(N, D_IN, generator=generator)
    module.train()
    step = module.sae_step("sae", x)
    step.loss.backward()

    # Dense reference: every parameter a fresh leaf, TopK and the gate as masks.
    W_enc, b_enc, W_dec, b_dec = (getattr(sae, name).detach().clone().requires_grad_() for name in ("W_enc", "b_enc", "W_dec", "b_dec"))
    theta = sae.selector.gate.detach()
    pre = torch.relu((x - b_dec) @ W_enc.T + b_enc)
    chosen = torch.zeros_like(pre, dtype=torch.bool).scatter(1, pre.detach().topk(K, dim=1).indices, True)
    open_gate = chosen & (pre.detach() > theta)
    z = pre * open_gate

    def fvu_of(latents):
        xhat = latents @ W_dec + b_dec
        return (x - xhat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()

    fvu = fvu_of(z)
    fvu.backward()
    z_leaf = z.detach().requires_grad_()
    (dz,) = torch.autograd.grad(fvu_of(z_leaf), z_leaf)  # dL/dz, gated entries included
    l0 = open_gate.sum() / N
    assert step.loss_terms["gate_l0"].item() == pytest.approx(l0.item())
    torch.testing.assert_close(step.loss, fvu + coefficient * l0)
    window = (chosen & ((pre.detach() - theta).abs() < eps / 2)).float()
    # dz/dtheta = -(theta / eps) K, dH/dtheta = -(1 / eps) K, summed over the selected tokens.
    expected_gate = (-(theta / eps) * window * dz).sum(0) + coefficient * (-(1 / eps) * window).sum(0) / N
    torch.testing.assert_close(sae.selector.gate.grad, expected_gate, rtol=1e-4, atol=1e-6)
    # W_enc's, W_dec's and the biases' gradients: the gate's derivative to v is H (no STE term).
    for ours, reference in ((sae.W_enc, W_enc), (sae.b_enc, b_enc), (sae.W_dec, W_dec), (sae.b_dec, b_dec)):
        torch.testing.assert_close(ours.grad, reference.grad, rtol=1e-4, atol=1e-6)


def test_fitted_checkpointed_and_resumed_through_the_cli(plugin, tmp_path):
    data = tmp_path / "x.safetensors"
    save_file({"x": torch.randn(520, D_IN, generator=torch.Generator().manual_seed(0))}, str(data))

    def fit(root: Path, *extra: str):
        return main([
            "fit", "--seed_everything=0", "--model=sae", f"--model.k={K}", f"--model.d_sae={D_SAE}",
            "--model.selector=gated_topk", "--model.selector.init_gate=1.0", "--model.selector.gate_coefficient=0.05", "--model.selector.warm_up_steps=6",
            "--data=lightning_sae.tensor_data.TensorDataModule", f"--data.path={data}", "--data.batch_size=64",
            "--data.validation_fraction=0.1", "--data.num_workers=0", "--trainer.max_epochs=3", "--trainer.accelerator=cpu",
            "--trainer.logger=false", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
            f"--trainer.default_root_dir={root}", "--trainer.callbacks+=ModelCheckpoint", f"--trainer.callbacks.dirpath={root / 'ckpt'}",
            "--trainer.callbacks.every_n_train_steps=4", "--trainer.callbacks.save_top_k=-1", *extra,
        ])

    cli = fit(tmp_path / "run")
    gate = cli.model.sae.selector.gate
    assert gate.shape == (D_SAE,) and not torch.allclose(gate, torch.full_like(gate, 1.0))  # it trained
    assert "train/gate_l0" in cli.trainer.callback_metrics
    assert cli.model.hparams["selector"]["class_path"] == "gated_topk_selector.GatedTopK"
    checkpoint = tmp_path / "run" / "ckpt" / "epoch=0-step=4.ckpt"
    assert torch.load(checkpoint, weights_only=True)["state_dict"]["sae.selector.gate"].shape == (D_SAE,)
    resumed = fit(tmp_path / "resumed", f"--ckpt_path={checkpoint}")  # resumes inside the coefficient's warm-up
    for name, value in cli.model.state_dict().items():
        if torch.is_tensor(value):
            torch.testing.assert_close(resumed.model.state_dict()[name], value, rtol=0, atol=1e-6, msg=name)
