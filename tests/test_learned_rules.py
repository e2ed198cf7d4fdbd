"""Learned selection rules through the public contract (issue 26): JumpReLU, relu_l1 and the
Matryoshka variant against SAELens's own training SAE classes on the same weights and batch
(loss, every loss term, every gradient), their exports loaded by `sae_lens.SAE.load_from_disk`,
the pseudo-derivatives against their formulas, and the contract's plumbing (coefficients and
warm-up, selector state restored after setup, architecture claims)."""

from __future__ import annotations

import json

import pytest
import torch

from lightning_sae import SAEModule
from lightning_sae.checkpoint_io import load_checkpoint
from lightning_sae.formats import SAEFormatError, load_sae, save_saelens
from lightning_sae.selection import Coefficient, heaviside, jump_relu

sae_lens = pytest.importorskip("sae_lens")
from sae_lens.saes.sae import TrainStepInput  # noqa: E402

D_IN, D_SAE, N = 16, 64, 96


def batch(seed: int = 0) -> torch.Tensor:
    return torch.randn(N, D_IN, generator=torch.Generator().manual_seed(seed)) * 2.0


def our_module(selector, **kwargs) -> SAEModule:
    kwargs = {"reconstruction_objective": "mse", "aux_coefficient": 0.0, "b_dec_init": "zeros", **kwargs}
    return SAEModule(k=8, d_sae=D_SAE, selector=selector, widths={"x": D_IN}, **kwargs)


def randomise(sae, seed: int = 1, unit_decoder: bool = True) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(D_SAE, D_IN, generator=generator) / 3)
        sae.b_enc.copy_(torch.randn(D_SAE, generator=generator) * 0.3)
        W_dec = torch.randn(D_SAE, D_IN, generator=generator)
        sae.W_dec.copy_(W_dec / W_dec.norm(dim=1, keepdim=True) if unit_decoder else W_dec * 0.7)
        sae.b_dec.copy_(torch.randn(D_IN, generator=generator) * 0.1)


def copy_into_saelens(ours, theirs) -> None:
    with torch.no_grad():
        theirs.W_enc.copy_(ours.W_enc.T)
        theirs.b_enc.copy_(ours.b_enc)
        theirs.W_dec.copy_(ours.W_dec)
        theirs.b_dec.copy_(ours.b_dec)


def our_step(module, x):
    module.train()
    step = module.sae_step("sae", x)
    step.loss.backward()
    return step


def assert_grads_match(ours, theirs, names=("W_dec", "b_enc", "b_dec")) -> None:
    torch.testing.assert_close(ours.W_enc.grad, theirs.W_enc.grad.T, rtol=1e-4, atol=1e-5)
    for name in names:
        torch.testing.assert_close(getattr(ours, name).grad, getattr(theirs, name).grad, rtol=1e-4, atol=1e-5, msg=name)


# ---- pseudo-derivatives --------------------------------------------------------------------------


def test_jump_relu_and_heaviside_pseudo_derivatives_match_their_formulas():
    v = torch.tensor([0.05, 0.28, 0.31, 0.5, -0.2], requires_grad=True)
    t = torch.tensor([0.3, 0.3, 0.3, 0.3, 0.3], requires_grad=True)
    eps = 0.1
    g = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    z = jump_relu(v, t, eps)
    assert torch.equal(z.detach(), torch.tensor([0.0, 0.0, 0.31, 0.5, 0.0]))
    dv, dt = torch.autograd.grad(z, (v, t), g)
    in_window = ((v - t).abs() < eps / 2).float().detach()
    torch.testing.assert_close(dt, -(t.detach() / eps) * in_window * g)
    torch.testing.assert_close(dv, (v > t).float().detach() * g)
    h = heaviside(v, t, eps, straight_through_to_input=True)
    dv, dt = torch.autograd.grad(h, (v, t), g)
    torch.testing.assert_close(dt, -(1 / eps) * in_window * g)
    torch.testing.assert_close(dv, (1 / eps) * in_window * g)


def test_coefficient_warm_up_is_saelens_scheduler():
    from sae_lens.training.optim import CoefficientScheduler

    scheduler = CoefficientScheduler(warm_up_steps=7, final_value=2.5)
    for step in range(12):
        assert Coefficient(2.5, 7).at(step) == pytest.approx(scheduler.value, rel=1e-12), step
        scheduler.step()
    assert Coefficient(2.5, 0).at(0) == 2.5


# ---- JumpReLU -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode,to_input", [("step", False), ("step", True), ("tanh", False)])
def test_jumprelu_loss_terms_and_gradients_match_saelens(mode, to_input):
    from lightning_sae_jumprelu import JumpReLU
    from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig

    bandwidth, coefficient = 0.2, 0.37
    module = our_module(JumpReLU(bandwidth=bandwidth, l0_coefficient=coefficient, sparsity_loss=mode, straight_through_to_input=to_input))
    ours = module.get_sae("sae")
    randomise(ours)
    with torch.no_grad():  # thresholds spread so that many pre-activations fall in the kernel's window
        ours.selector.threshold.copy_(torch.rand(D_SAE, generator=torch.Generator().manual_seed(5)) * 0.6)
    cfg = JumpReLUTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, jumprelu_bandwidth=bandwidth, jumprelu_sparsity_loss_mode=mode,
                                    jumprelu_ste_to_input=to_input, l0_coefficient=coefficient)
    theirs = JumpReLUTrainingSAE(cfg)
    copy_into_saelens(ours, theirs)
    with torch.no_grad():
        theirs.threshold.copy_(ours.selector.threshold)
    x = batch()
    step = our_step(module, x)
    out = theirs.training_forward_pass(TrainStepInput(x, {"l0": coefficient}, None, 0, False))
    out.loss.backward()

    torch.testing.assert_close(step.loss, out.loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(coefficient * step.loss_terms["l0_loss"], out.losses["l0_loss"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(step.code.to_dense(D_SAE), out.feature_acts, rtol=1e-5, atol=1e-6)
    assert_grads_match(ours, theirs)
    assert ours.selector.threshold.grad.abs().sum() > 0  # the window is not empty
    torch.testing.assert_close(ours.selector.threshold.grad, theirs.threshold.grad, rtol=1e-4, atol=1e-5)


def test_jumprelu_log_parameterization_is_the_chain_rule_of_the_direct_one():
    from lightning_sae_jumprelu import JumpReLU

    grads = {}
    for parameterization in ("direct", "log"):
        module = our_module(JumpReLU(bandwidth=0.2, l0_coefficient=0.5, parameterization=parameterization))
        sae = module.get_sae("sae")
        randomise(sae)
        theta = torch.rand(D_SAE, generator=torch.Generator().manual_seed(5)) * 0.6 + 0.01
        with torch.no_grad():
            (sae.selector.threshold if parameterization == "direct" else sae.selector.log_threshold).copy_(
                theta if parameterization == "direct" else theta.log())
        our_step(module, batch())
        grads[parameterization] = (sae.selector.threshold if parameterization == "direct" else sae.selector.log_threshold).grad
    torch.testing.assert_close(grads["log"], grads["direct"] * theta, rtol=1e-4, atol=1e-6)


def test_jumprelu_export_loads_in_saelens_with_identical_outputs_and_round_trips(tmp_path):
    from lightning_sae_jumprelu import JumpReLU

    module = our_module(JumpReLU(bandwidth=0.2))
    sae = module.get_sae("sae")
    randomise(sae)
    with torch.no_grad():
        sae.selector.threshold.copy_(torch.rand(D_SAE, generator=torch.Generator().manual_seed(5)) * 0.6)
    sae.eval()
    save_saelens(sae, tmp_path / "jr")
    loaded_theirs = sae_lens.SAE.load_from_disk(str(tmp_path / "jr"), device="cpu")
    assert type(loaded_theirs).__name__ == "JumpReLUSAE"
    x = batch(3)
    with torch.no_grad():
        code = sae.encode(x)
        torch.testing.assert_close(code.to_dense(D_SAE), loaded_theirs.encode(x), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(sae.decode(code), loaded_theirs(x), rtol=1e-5, atol=1e-5)
    back, _ = load_sae(tmp_path / "jr")
    assert type(back.selector).__name__ == "JumpReLU"
    torch.testing.assert_close(back.selector.threshold, sae.selector.threshold)
    back.eval()
    with torch.no_grad():
        torch.testing.assert_close(back.decode(back.encode(x)), sae.decode(code))


def test_jumprelu_state_is_restored_after_setup_from_a_checkpoint(tmp_path):
    """load_checkpoint sizes the selector (setup) before loading its state: a per-latent
    threshold no longer fails with "size mismatch for threshold: [64] vs [0]"."""
    from lightning_sae_jumprelu import JumpReLU

    module = our_module(JumpReLU())
    sae = module.get_sae("sae")
    with torch.no_grad():
        sae.selector.threshold.copy_(torch.linspace(0, 1, D_SAE))
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, tmp_path / "m.ckpt")
    loaded, _ = load_checkpoint(tmp_path / "m.ckpt")
    torch.testing.assert_close(loaded.selector.threshold, torch.linspace(0, 1, D_SAE))


# ---- architecture claims ----------------------------------------------------------------------------


def test_two_selectors_claiming_jumprelu_are_resolved_by_metadata(tmp_path):
    from lightning_sae_batch_topk import BatchTopK
    from lightning_sae_jumprelu import JumpReLU

    module = our_module(BatchTopK())
    sae = module.get_sae("sae")
    with torch.no_grad():
        sae.selector.threshold.fill_(0.25)
        sae.selector.threshold_updates.fill_(3)
    save_saelens(sae, tmp_path / "btk")
    assert type(load_sae(tmp_path / "btk")[0].selector) is BatchTopK
    # A JumpReLU export (per-latent thresholds) goes to JumpReLU whatever the registration order.
    module = our_module(JumpReLU())
    save_saelens(module.get_sae("sae"), tmp_path / "jr")
    assert type(load_sae(tmp_path / "jr")[0].selector) is JumpReLU
    # Metadata naming neither: the candidates are tried; BatchTopK refuses, JumpReLU reads it.
    cfg = json.loads((tmp_path / "jr" / "cfg.json").read_text())
    cfg["metadata"].pop("selector")
    cfg["metadata"]["training_architecture"] = "something_else"
    (tmp_path / "jr" / "cfg.json").write_text(json.dumps(cfg))
    assert type(load_sae(tmp_path / "jr")[0].selector) is JumpReLU
    # A file no candidate reads names every candidate.
    from safetensors.torch import load_file, save_file

    tensors = load_file(tmp_path / "jr" / "sae_weights.safetensors")
    tensors["threshold"] = tensors["threshold"][:-1]
    save_file(tensors, tmp_path / "jr" / "sae_weights.safetensors")
    with pytest.raises(SAEFormatError, match="candidates.*BatchTopK.*JumpReLU|candidates.*JumpReLU.*BatchTopK"):
        load_sae(tmp_path / "jr")


# ---- relu_l1 (SAELens "standard") ----------------------------------------------------------------------


def test_relu_l1_loss_terms_and_gradients_match_saelens_standard():
    from lightning_sae_relu_l1 import ReLUL1
    from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig

    coefficient = 0.8
    module = our_module(ReLUL1(l1_coefficient=coefficient, l1_warm_up_fraction=0.0))
    ours = module.get_sae("sae")
    randomise(ours, unit_decoder=False)  # free row norms: the penalty weighs by them
    theirs = StandardTrainingSAE(StandardTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, l1_coefficient=coefficient))
    copy_into_saelens(ours, theirs)
    x = batch()
    step = our_step(module, x)
    out = theirs.training_forward_pass(TrainStepInput(x, {"l1": coefficient}, None, 0, False))
    out.loss.backward()
    torch.testing.assert_close(step.loss, out.loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(coefficient * step.loss_terms["l1_loss"], out.losses["l1_loss"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(step.code.to_dense(D_SAE), out.feature_acts, rtol=1e-5, atol=1e-6)
    assert_grads_match(ours, theirs)


def test_relu_l1_keeps_free_decoder_norms_through_an_optimizer_step():
    from lightning_sae_relu_l1 import ReLUL1

    module = our_module(ReLUL1())
    sae = module.get_sae("sae")
    randomise(sae, unit_decoder=False)
    before = sae.W_dec.detach().clone()
    our_step(module, batch())
    grad = sae.W_dec.grad.clone()
    module.on_before_optimizer_step(None)  # no parallel-gradient removal
    torch.testing.assert_close(sae.W_dec.grad, grad, rtol=0, atol=0)
    sae.normalize_decoder()  # no renormalisation
    torch.testing.assert_close(sae.W_dec.detach(), before, rtol=0, atol=0)


def test_relu_l1_export_loads_in_saelens_with_identical_outputs(tmp_path):
    from lightning_sae_relu_l1 import ReLUL1

    module = our_module(ReLUL1())
    sae = module.get_sae("sae")
    randomise(sae, unit_decoder=False)
    sae.eval()
    save_saelens(sae, tmp_path / "l1")
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path / "l1"), device="cpu")
    assert type(theirs).__name__ == "StandardSAE"
    x = batch(4)
    with torch.no_grad():
        code = sae.encode(x)
        torch.testing.assert_close(code.to_dense(D_SAE), theirs.encode(x), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(sae.decode(code), theirs(x), rtol=1e-5, atol=1e-5)
    back, _ = load_sae(tmp_path / "l1")
    assert type(back.selector) is ReLUL1
    torch.testing.assert_close(back.W_dec, sae.W_dec)


# ---- Matryoshka ------------------------------------------------------------------------------------------


def test_matryoshka_batch_topk_loss_and_gradients_match_saelens():
    from lightning_sae_batch_topk import BatchTopK
    from lightning_sae_matryoshka import MatryoshkaModule
    from sae_lens.saes.matryoshka_batchtopk_sae import MatryoshkaBatchTopKTrainingSAE, MatryoshkaBatchTopKTrainingSAEConfig

    widths = [8, 24, D_SAE]
    module = MatryoshkaModule(prefix_sizes=widths[:-1], k=6, d_sae=D_SAE, selector=BatchTopK(), widths={"x": D_IN},
                              reconstruction_objective="mse", aux_coefficient=0.0, b_dec_init="zeros")
    assert module.prefix_sizes() == widths
    ours = module.get_sae("sae")
    randomise(ours)
    theirs = MatryoshkaBatchTopKTrainingSAE(MatryoshkaBatchTopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=6, matryoshka_widths=list(widths)))
    copy_into_saelens(ours, theirs)
    x = batch()
    module.train()
    loss = module.training_loss({"x": x})
    loss.backward()
    out = theirs.training_forward_pass(TrainStepInput(x, {}, None, 0, False))
    out.loss.backward()
    torch.testing.assert_close(loss, out.loss, rtol=1e-5, atol=1e-5)
    # SAELens sums the inner levels' losses onto the outer one; so do we.
    inner = sum(value for name, value in out.losses.items() if name.startswith("inner_mse_loss_"))
    torch.testing.assert_close(loss - out.losses["mse_loss"], inner, rtol=1e-4, atol=1e-5)
    assert_grads_match(ours, theirs)


def test_matryoshka_export_is_saelens_matryoshka_batchtopk_and_loads_with_identical_outputs(tmp_path):
    from lightning_sae_batch_topk import BatchTopK
    from lightning_sae_matryoshka import MatryoshkaModule

    module = MatryoshkaModule(prefix_sizes=[16], k=6, d_sae=D_SAE, selector=BatchTopK(), widths={"x": D_IN}, b_dec_init="zeros")
    sae = module.get_sae("sae")
    randomise(sae)
    with torch.no_grad():
        sae.selector.threshold.fill_(0.3)
        sae.selector.threshold_updates.fill_(1)
    sae.eval()
    written = module.save_saes(tmp_path)
    cfg = json.loads((written["sae"] / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu"
    assert cfg["metadata"]["training_architecture"] == "matryoshka_batchtopk"
    assert cfg["metadata"]["training_architecture_details"]["matryoshka_widths"] == [16, D_SAE]
    theirs = sae_lens.SAE.load_from_disk(str(written["sae"]), device="cpu")
    x = batch(5)
    with torch.no_grad():
        torch.testing.assert_close(sae.decode(sae.encode(x)), theirs(x), rtol=1e-5, atol=1e-5)
        back, _ = load_sae(written["sae"])  # BatchTopK refuses a matryoshka file; JumpReLU reads it
        back.eval()
        torch.testing.assert_close(back.decode(back.encode(x)), theirs(x), rtol=1e-5, atol=1e-5)


def test_loss_terms_are_logged_and_parameters_trained_per_site(monkeypatch):
    """Several hook points: each site's SAE has its own thresholds, each gets a gradient, and each
    site's term is logged under the site (`train/<site>/l0_loss`)."""
    import lightning as L
    from lightning_sae_jumprelu import JumpReLU

    module = SAEModule(k=4, d_sae=32, selector=JumpReLU(bandwidth=0.5, l0_coefficient=0.1), widths={"l1/x": D_IN, "l2/x": D_IN},
                       sites=["l1", "l2"], b_dec_init="zeros")
    module.b_dec_initialized.fill_(True)
    logged = {}
    monkeypatch.setattr(L.LightningModule, "log", lambda self, name, value, *args, **kwargs: logged.__setitem__(name, float(value)))
    module.train()
    module.training_step({"l1/x": batch(1)[:, :D_IN], "l2/x": batch(2)[:, :D_IN]}, 0).backward()
    assert {"train/l1/l0_loss", "train/l2/l0_loss"} <= set(logged)
    thresholds = [p for name, p in module.named_parameters() if name.endswith("selector.threshold")]
    assert len(thresholds) == 2 and all(p.grad is not None and p.grad.abs().sum() > 0 for p in thresholds)
