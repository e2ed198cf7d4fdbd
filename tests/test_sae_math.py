"""The TopK SAE's math against independent references: dense autograd, the SPEC's formulas."""

import math

import pytest
import torch

from lightning_sae.metrics import fraction_of_variance_unexplained
from lightning_sae.module import warmup_then_linear_decay
from lightning_sae.sae import TopKSAE, geometric_median
from tests.helpers import dense_reference, module_with_width, random_sae


@pytest.mark.parametrize("d_in,d_sae,k,n", [(8, 32, 1, 5), (16, 64, 4, 33), (24, 96, 12, 7)])
def test_sparse_forward_and_backward_match_dense_autograd(d_in, d_sae, k, n):
    sae = random_sae(d_in, d_sae, k)
    x = torch.randn(n, d_in, dtype=torch.float64, requires_grad=True)
    sae = sae.double()
    upstream = torch.randn(n, d_in, dtype=torch.float64)

    out = sae(x).xhat
    (out * upstream).sum().backward()
    sparse_grads = {name: p.grad.clone() for name, p in sae.named_parameters()}
    sparse_x_grad = x.grad.clone()

    params = {name: p.detach().clone().requires_grad_() for name, p in sae.named_parameters()}
    x_ref = x.detach().clone().requires_grad_()
    reference = dense_reference(params, x_ref, k)
    (reference * upstream).sum().backward()

    torch.testing.assert_close(out, reference)
    for name, param in params.items():
        torch.testing.assert_close(sparse_grads[name], param.grad, msg=f"gradient of {name}")
    torch.testing.assert_close(sparse_x_grad, x_ref.grad)


def test_selected_values_are_the_encoders_not_the_scores():
    sae = random_sae(8, 32, 3)
    x = torch.randn(10, 8)
    pre = sae.pre_activations(x)
    indices = torch.randint(0, 32, (10, 3))
    values = sae.encode_selected(x, indices, pre)
    expected = torch.relu((x - sae.b_dec) @ sae.W_enc.T + sae.b_enc).gather(1, indices)
    torch.testing.assert_close(values, expected)


def test_decoder_maintenance_keeps_unit_rows_and_removes_the_radial_gradient():
    sae = random_sae(16, 64, 4)
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(64, 1) + 0.5)
    sae.normalize_decoder()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(64))
    sae(torch.randn(32, 16)).xhat.pow(2).sum().backward()
    sae.remove_gradient_parallel_to_decoder()
    radial = (sae.W_dec.grad * sae.W_dec).sum(dim=1)
    assert (radial.abs() <= 1e-6 * sae.W_dec.grad.norm(dim=1) + 1e-7).all()


def test_initialisation_follows_the_recipe():
    sae = TopKSAE(16, 64, 4, seed=3)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(64))
    torch.testing.assert_close(sae.W_enc, sae.W_dec)
    assert not sae.b_enc.any() and not sae.b_dec.any()


def test_geometric_median_minimises_the_sum_of_distances():
    torch.manual_seed(0)
    points = torch.randn(200, 5) + torch.tensor([3.0, 0, 0, 0, 0])
    points[:20] += 50  # outliers pull the mean, not the median
    median = geometric_median(points)
    cost = lambda c: (points - c).norm(dim=1).sum()
    for _ in range(20):
        assert cost(median) <= cost(median + 0.05 * torch.randn(5)) + 1e-3
    assert cost(median) < cost(points.mean(0))


def test_fvu_is_normalized_mse():
    x, xhat = torch.randn(50, 6), torch.randn(50, 6)
    expected = ((x - xhat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    torch.testing.assert_close(fraction_of_variance_unexplained(x, xhat), expected)


def test_learning_rate_schedule_warms_up_holds_and_decays():
    values = [warmup_then_linear_decay(step, 100, 10, 0.2) for step in range(100)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert all(v == 1.0 for v in values[10:80])
    assert values[80] == pytest.approx(1.0) and values[90] == pytest.approx(0.5) and values[99] == pytest.approx(0.05)


def test_default_learning_rate_scales_with_dictionary_size():
    module = module_with_width(16, d_sae=2**16, k=4)
    assert module.hparams.lr is None
    from lightning_sae.module import default_learning_rate

    assert default_learning_rate(2**16) == pytest.approx(2e-4 / math.sqrt(4))


def test_k_out_of_range_is_refused():
    with pytest.raises(ValueError, match="k must satisfy"):
        module_with_width(8, d_sae=16, k=17)
    with pytest.raises(ValueError, match="k must satisfy"):
        TopKSAE(8, 16, 0)


def test_auxk_is_zero_when_nothing_is_dead():
    module = module_with_width(16, d_sae=64, k=4, dead_tokens=100)
    x = torch.randn(256, 16)
    assert module.sae_step("sae", x).aux_loss == 0  # too few tokens seen for anything to be dead
    module.sae_activity.tokens_seen = 10_000  # long enough, but every latent fired recently
    assert module.sae_step("sae", x).aux_loss == 0


def test_auxk_matches_the_formula_on_dead_latents():
    module = module_with_width(16, d_sae=64, k=4, dead_tokens=100, aux_k=8)
    sae, tracker = module.sae, module.sae_activity
    with torch.no_grad():
        sae.W_enc.normal_()
    tracker.tokens_seen = 1000
    dead = torch.zeros(64, dtype=torch.bool)
    dead[::4] = True  # 16 dead latents, more than aux_k
    tracker.tokens_since_fired.copy_(torch.where(dead, 1000, 0))
    x = torch.randn(128, 16)
    step = module.sae_step("sae", x)  # the SAE's own forward: AuxK with the tracker's dead latents
    xhat, aux, pre = step.xhat, step.aux_loss, sae.pre_activations(x)

    dead_pre = torch.where(dead, pre, torch.zeros_like(pre))
    top = dead_pre.topk(8, dim=1)
    z = torch.zeros_like(pre).scatter(1, top.indices, top.values)
    residual = (x - xhat).detach()
    expected = fraction_of_variance_unexplained(residual, z @ sae.W_dec)  # min(16/8, 1) = 1
    torch.testing.assert_close(aux, expected)
    aux.backward()
    assert sae.W_enc.grad[dead].abs().sum() > 0 and sae.W_enc.grad[~dead].abs().sum() == 0
