"""normalize_activations="expected_average_only_in": the scale factor, the fold on export (against
the training SAE run on scaled inputs, and against sae_lens loading the export), and a fit that is
scale-free (the same SAE, up to the scale, from activations 100x larger)."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from safetensors.torch import save_file

from lightning_sae.formats import save_saelens
from lightning_sae.module import SAEModule
from lightning_sae.normalization import activation_scale, fold_activation_scales
from lightning_sae.registry import create_selector
from lightning_sae.sae import TopKSAE
from lightning_sae.tensor_data import TensorDataModule

D, M, K = 16, 64, 4


def activations(n: int = 2048, scale: float = 37.0, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    basis = torch.randn(M, D, generator=generator)
    codes = torch.rand(n, M, generator=generator) * (torch.rand(n, M, generator=generator) < 0.06)
    return scale * (codes @ basis + 0.5)  # an offset, so b_dec matters


def random_sae(selector=None) -> TopKSAE:
    sae = TopKSAE(D, M, K, seed=3, selector=selector)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1, generator=torch.Generator().manual_seed(4))
        sae.b_dec.normal_(0, 0.3, generator=torch.Generator().manual_seed(5))
    return sae


def test_the_scale_makes_the_mean_row_norm_sqrt_width():
    x = activations()
    scaled = activation_scale(x) * x
    assert torch.linalg.vector_norm(scaled, dim=1).mean().item() == pytest.approx(D**0.5, rel=1e-5)


@pytest.mark.parametrize("selector", ["topk", "gradient_topk"])
def test_the_folded_sae_on_raw_x_is_the_trained_sae_on_scaled_x(selector):
    sae = random_sae(create_selector(selector, **({"beta": 1.0} if selector == "gradient_topk" else {})))
    x, s = activations(), 0.0123
    grad = torch.randn_like(x)
    folded = fold_activation_scales(sae, s, s)
    trained = sae(s * x, grad=grad / s)  # dL/d(s x) = g / s
    exported = folded(x, grad=grad)
    assert torch.equal(exported.code.indices.sort(1).values, trained.code.indices.sort(1).values)
    torch.testing.assert_close(exported.xhat, trained.xhat / s, rtol=1e-5, atol=1e-5 * x.abs().max().item())
    torch.testing.assert_close(torch.linalg.vector_norm(folded.W_dec, dim=1), torch.ones(M))
    assert torch.equal(sae.W_enc, random_sae().W_enc)  # the original is untouched


@pytest.mark.parametrize("selector, init", [("batch_topk", {}), ("jumprelu", {}), ("jumprelu", {"parameterization": "log"})])
def test_a_threshold_rule_folds_its_threshold_with_the_latents(selector, init):
    """Evaluation (a threshold on latent values) of the folded SAE on raw x keeps the trained
    SAE's latents on s x, with every value divided by s."""
    sae = random_sae(create_selector(selector, **init))
    x, s = activations(512), 0.0123
    with torch.no_grad():
        if selector == "batch_topk":
            sae.selector.threshold.fill_(0.4)
        sae.train()(s * x)  # JumpReLU's threshold is sized in setup; BatchTopK's is now set
        folded = fold_activation_scales(sae.eval(), s, s).eval()
        trained, exported = sae(s * x), folded(x)
    dense_trained, dense_exported = sae.dense_latents(trained.code), folded.dense_latents(exported.code)
    assert torch.equal(dense_exported > 0, dense_trained > 0) and (dense_trained > 0).any()
    torch.testing.assert_close(dense_exported, dense_trained / s, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(exported.xhat, trained.xhat / s, rtol=1e-4, atol=1e-4 * x.abs().max().item())


def test_a_stateful_rule_that_cannot_rescale_is_refused():
    from lightning_sae.selection import TopK

    class Counting(TopK):
        def setup(self, sae):
            if not hasattr(self, "counts"):
                self.register_buffer("counts", torch.zeros(sae.d_sae))

    with pytest.raises(ValueError, match="rescale_latents"):
        fold_activation_scales(random_sae(Counting()), 0.5, 0.5)


def test_sae_lens_loads_the_folded_sae_with_identical_outputs(tmp_path):
    from sae_lens import SAE

    sae, x, s = random_sae(), activations(256), 0.0123
    theirs = SAE.load_from_disk(str(save_saelens(fold_activation_scales(sae, s, s), tmp_path / "sae")), device="cpu")
    assert theirs.cfg.normalize_activations == "none"
    with torch.no_grad():
        torch.testing.assert_close(theirs.decode(theirs.encode(x)), sae(s * x).xhat / s, rtol=1e-5, atol=1e-5 * x.abs().max().item())


def test_a_fold_refuses_what_it_cannot_fold():
    with pytest.raises(ValueError, match="one scale"):
        fold_activation_scales(random_sae(), 1.0, 2.0)
    with pytest.raises(ValueError, match="positive"):
        fold_activation_scales(random_sae(), 0.0, 0.0)


def fit(tmp_path, scale: float, normalize: str = "expected_average_only_in") -> tuple[SAEModule, L.Trainer, TensorDataModule]:
    path = tmp_path / f"x{scale:g}.safetensors"
    save_file({"x": activations(scale=scale)}, str(path))
    L.seed_everything(0, verbose=False)
    module = SAEModule(k=K, d_sae=M, lr=1e-3, seed=0, spliced_eval_contexts=0, normalize_activations=normalize)
    trainer = L.Trainer(max_steps=12, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path / f"run{scale:g}", limit_val_batches=1)
    data = TensorDataModule(str(path), batch_size=128)
    trainer.fit(module, data)
    return module, trainer, data


def test_a_normalised_fit_is_scale_free_and_exports_an_sae_on_raw_activations(tmp_path):
    small, _, _ = fit(tmp_path, 1.0)
    large, trainer, data = fit(tmp_path, 100.0)
    s_small, s_large = small.activation_scale("x"), large.activation_scale("x")
    assert s_small == pytest.approx(100 * s_large, rel=1e-5)
    assert "activation_scale__x" in large.state_dict()  # checkpointed, so a resumed fit keeps it
    # The same training trajectory in normalised units: identical SAEs.
    torch.testing.assert_close(large.get_sae("sae").W_dec, small.get_sae("sae").W_dec, rtol=1e-4, atol=1e-5)
    x = activations(256, scale=100.0, seed=1)
    exported = large.exported_sae("sae")
    torch.testing.assert_close(exported(x).xhat, large.get_sae("sae")(s_large * x).xhat / s_large, rtol=1e-5, atol=1e-3)
    # Validation runs in normalised units; explained variance is scale-free, so it is the raw SAE's.
    ev = trainer.validate(large, data, verbose=False)[0]["val/explained_variance"]
    rows = torch.cat([batch["x"] for batch in data.val_dataloader()])
    residual = rows - exported(rows).xhat
    assert ev == pytest.approx(1 - residual.pow(2).sum().item() / (rows - rows.mean(0)).pow(2).sum().item(), rel=1e-4)
    out = large.save_saes(tmp_path / "export")["sae"]
    from sae_lens import SAE

    theirs = SAE.load_from_disk(str(out), device="cpu")
    with torch.no_grad():
        torch.testing.assert_close(theirs.decode(theirs.encode(x)), exported(x).xhat, rtol=1e-5, atol=1e-3)


def test_normalisation_is_off_by_default_and_checked():
    module = SAEModule(k=K, d_sae=M, widths={"x": D})
    assert not module.normalizes_activations and module.activation_scale("x") == 1.0
    assert not any(name.startswith("activation_scale") for name in module.state_dict())
    with pytest.raises(ValueError, match="normalize_activations"):
        SAEModule(k=K, d_sae=M, normalize_activations="layer_norm")
    from lightning_sae_transcoder import TranscoderModule

    with pytest.raises(ValueError, match="does not support"):
        TranscoderModule(k=K, d_sae=M, normalize_activations="expected_average_only_in")


def jsae_fit(tmp_path, name: str, mlp, x: torch.Tensor, normalize: str) -> tuple:
    from lightning_sae_jsae import JSAEModule

    path = tmp_path / f"{name}.safetensors"
    with torch.no_grad():
        save_file({"x": x, "y": mlp(x)}, str(path))
    L.seed_everything(0, verbose=False)
    module = JSAEModule(k=K, d_sae=32, jacobian_coefficient=1.0, jacobian_warmup_fraction=0.0, reconstruction_loss="fvu",
                        jacobian_precision="exact", mlp=mlp, lr=1e-3, spliced_eval_contexts=0, example_jacobians=0,
                        normalize_activations=normalize)
    trainer = L.Trainer(max_steps=10, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=2, num_sanity_val_steps=0)
    data = TensorDataModule(str(path), batch_size=128)
    trainer.fit(module, data)
    return module, trainer.validate(module, data, verbose=False)[0]


@pytest.mark.parametrize("normalize", ["expected_average_only_in", "none"])
def test_a_normalised_jsae_pair_is_the_same_on_a_rescaled_model(tmp_path, normalize):
    """Model B is model A with its MLP's input 50x larger and output 50x smaller (u -> MLP(u / 50) / 50,
    fed 50 x): with normalisation both train the same pair and measure the same Jacobian; without it
    they do not (so the test can fail)."""
    from lightning_sae_jsae import FrozenMLP

    generator = torch.Generator().manual_seed(0)
    mlp = FrozenMLP(torch.randn(48, D, generator=generator) / D**0.5, torch.randn(D, 24, generator=generator) / 24**0.5,
                    b_out=torch.randn(D, generator=generator) * 0.1, family="swiglu")
    a, c = 50.0, 1 / 50
    rescaled = FrozenMLP(mlp.W_in / a, mlp.W_out * c, mlp.b_in, mlp.b_out * c, family="swiglu")
    x = activations(scale=0.05)
    pair_a, metrics_a = jsae_fit(tmp_path, "a", mlp, x, normalize)
    pair_b, metrics_b = jsae_fit(tmp_path, "b", rescaled, a * x, normalize)
    same = torch.allclose(pair_a.get_sae("sae_in").W_dec, pair_b.get_sae("sae_in").W_dec, rtol=1e-3, atol=1e-5)
    jacobian = metrics_a["val/jacobian_at_x/l1"], metrics_b["val/jacobian_at_x/l1"]
    if normalize == "none":
        assert not same and jacobian[0] != pytest.approx(jacobian[1], rel=0.1)
        return
    assert same and jacobian[0] == pytest.approx(jacobian[1], rel=1e-3)
    torch.testing.assert_close(pair_a.get_sae("sae_out").W_enc, pair_b.get_sae("sae_out").W_enc, rtol=1e-3, atol=1e-5)
    # The MLP the pair trains through is u -> s_y MLP(u / s_x); the exported MLP is the raw one.
    s_x, s_y = pair_b.activation_scale("x"), pair_b.activation_scale("y")
    with torch.no_grad():
        torch.testing.assert_close(pair_b.current_mlp()(s_x * a * x[:64]), s_y * rescaled(a * x[:64]), rtol=1e-4, atol=1e-5)
    exported = pair_b.save_saes(tmp_path / "pair_b")
    assert torch.equal(FrozenMLP.load(tmp_path / "pair_b" / "mlp.safetensors").W_in, rescaled.W_in)
    sae_in = pair_b.exported_sae("sae_in")
    torch.testing.assert_close(sae_in(a * x[:64]).xhat, pair_b.get_sae("sae_in")(s_x * a * x[:64]).xhat / s_x, rtol=1e-4, atol=1e-4)
    assert set(exported) == {"sae_in", "sae_out"}
