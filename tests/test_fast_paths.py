"""The sparse fast paths (sparse_ops, TopKSAE, SAEModule.sae_step) against dense autograd.

Each reference below builds the dense [N, M] latent tensor and lets autograd differentiate it;
the library never does. Selection is taken from the library's own indices where it is not the
thing under test, so that near-ties cannot make a comparison flaky.
"""

from __future__ import annotations

import pytest
import torch

from lightning_sae.metrics import fraction_of_variance_unexplained
from lightning_sae.sae import SparseCode, TopKSAE
from lightning_sae.sparse_ops import (
    _latent_major,
    _latent_major_numpy,
    _latent_major_torch,
    _scatter_outer,
    selected_dots,
    _selected_dots_embedding_bag,
    _selected_dots_sddmm,
    selected_encoder_values,
    selected_encoder_values_centering,
    sparse_decode,
)
from tests import helpers
from tests.helpers import module_with_width

SHAPES = [(1, 8, 16, 1), (5, 8, 32, 3), (33, 16, 64, 4), (64, 24, 200, 12), (128, 32, 512, 32)]


def random_sae(d_in: int, d_sae: int, k: int, dtype=torch.float64, seed: int = 0) -> TopKSAE:
    return helpers.random_sae(d_in, d_sae, k, seed=seed, dtype=dtype, perturb_decoder=True)


def dense_step(params: dict[str, torch.Tensor], x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """xhat with the dense latent z = relu(pre) kept only at `indices`."""
    pre = torch.relu((x - params["b_dec"]) @ params["W_enc"].T + params["b_enc"])
    mask = torch.zeros_like(pre, dtype=torch.bool).scatter(1, indices, True)
    z = torch.where(mask, pre, torch.zeros_like(pre))
    return z @ params["W_dec"] + params["b_dec"]


def grads_of(loss: torch.Tensor, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    found = torch.autograd.grad(loss, list(tensors.values()), allow_unused=True)
    return {name: (g if g is not None else torch.zeros_like(t)) for (name, t), g in zip(tensors.items(), found)}


@pytest.mark.parametrize("n,d_in,d_sae,k", SHAPES)
@pytest.mark.parametrize("x_requires_grad", [False, True])
def test_topk_sae_values_and_gradients_match_dense(n, d_in, d_sae, k, x_requires_grad):
    sae = random_sae(d_in, d_sae, k)
    x = torch.randn(n, d_in, dtype=torch.float64, requires_grad=x_requires_grad)
    upstream = torch.randn(n, d_in, dtype=torch.float64)

    code = sae.encode(x)
    out = sae.decode(code)
    tensors = dict(sae.named_parameters()) | ({"x": x} if x_requires_grad else {})
    sparse = grads_of((out * upstream).sum(), tensors)

    params = {name: p.detach().clone().requires_grad_() for name, p in sae.named_parameters()}
    x_ref = x.detach().clone().requires_grad_(x_requires_grad)
    # the library's selection must be the true top-k of the dense pre-activations
    pre_ref = torch.relu((x_ref - params["b_dec"]) @ params["W_enc"].T + params["b_enc"])
    torch.testing.assert_close(pre_ref.gather(1, code.indices), code.values.detach())
    assert (pre_ref.detach().topk(k, dim=1).values[:, -1:] <= code.values.detach().min(1, keepdim=True).values + 1e-12).all()
    reference = dense_step(params, x_ref, code.indices)
    dense = grads_of((reference * upstream).sum(), params | ({"x": x_ref} if x_requires_grad else {}))

    torch.testing.assert_close(out, reference)
    for name in dense:
        torch.testing.assert_close(sparse[name], dense[name], msg=f"gradient of {name}")


@pytest.mark.parametrize("n,d_sae,k", [(7, 20, 3), (50, 300, 16)])
def test_primitives_with_repeated_indices_match_dense(n, d_sae, k):
    """The primitives themselves, also where one token selects a latent twice (allowed there)."""
    torch.manual_seed(1)
    d = 12
    indices = torch.randint(0, d_sae, (n, k))
    indices[:, -1] = indices[:, 0]
    weights = torch.randn(n, k, dtype=torch.float64)
    rows = torch.randn(n, d, dtype=torch.float64)
    table = torch.randn(d_sae, d, dtype=torch.float64)
    dense = torch.zeros(n, d_sae, dtype=torch.float64).index_put_((torch.arange(n)[:, None].expand(n, k), indices), weights, accumulate=True)
    torch.testing.assert_close(_scatter_outer(indices, weights, rows, d_sae), dense.T @ rows)
    dots = (rows @ table.T).gather(1, indices)
    torch.testing.assert_close(selected_dots(indices, rows, table), dots)
    torch.testing.assert_close(_selected_dots_sddmm(indices, rows, table), dots)  # the CPU path
    torch.testing.assert_close(_selected_dots_embedding_bag(indices, rows, table), dots)  # the others'

    values = weights.clone().requires_grad_()
    W = table.clone().requires_grad_()
    out = sparse_decode(indices, values, W)
    upstream = torch.randn_like(out)
    g_values, g_W = torch.autograd.grad((out * upstream).sum(), [values, W])
    values_ref = weights.clone().requires_grad_()
    W_ref = table.clone().requires_grad_()
    dense_ref = torch.zeros(n, d_sae, dtype=torch.float64).index_put((torch.arange(n)[:, None].expand(n, k), indices), values_ref, accumulate=True)
    ref = dense_ref @ W_ref
    r_values, r_W = torch.autograd.grad((ref * upstream).sum(), [values_ref, W_ref])
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(g_values, r_values)
    torch.testing.assert_close(g_W, r_W)


def test_centred_and_uncentred_encoder_paths_agree():
    sae = random_sae(16, 64, 5)
    x = torch.randn(40, 16, dtype=torch.float64, requires_grad=True)
    pre = sae.pre_activations(x)
    indices = pre.topk(5, dim=1).indices
    values = pre.gather(1, indices)
    upstream = torch.randn(40, 5, dtype=torch.float64)
    tensors = {"x": x, "b_dec": sae.b_dec, "W_enc": sae.W_enc, "b_enc": sae.b_enc}
    fused = grads_of((selected_encoder_values_centering(x, sae.b_dec, sae.W_enc, sae.b_enc, indices, values) * upstream).sum(), tensors)
    plain = grads_of((selected_encoder_values(x - sae.b_dec, sae.W_enc, sae.b_enc, indices, values) * upstream).sum(), tensors)
    for name in tensors:
        torch.testing.assert_close(fused[name], plain[name], msg=name)


def test_relu_boundary_gets_no_gradient():
    """A selected latent whose pre-activation is exactly 0 gets relu's derivative 0, as in dense."""
    sae = random_sae(4, 8, 3)
    with torch.no_grad():
        sae.b_enc.fill_(-100.0)  # every pre-activation is 0, yet 3 latents are "selected"
    x = torch.randn(6, 4, dtype=torch.float64)
    code = sae.encode(x)
    assert (code.values == 0).all()
    sae.decode(code).sum().backward()
    assert sae.W_enc.grad.abs().sum() == 0 and sae.b_enc.grad.abs().sum() == 0


def test_latent_major_pattern_is_cached_and_invalidated_by_in_place_changes():
    indices = torch.tensor([[3, 1], [1, 0], [2, 3]])
    first = _latent_major(indices, 5)
    assert _latent_major(indices, 5) is first
    torch.testing.assert_close(first.crow.long(), torch.tensor([0, 1, 3, 4, 6, 6]))
    indices[0, 0] = 4  # bumps the version counter
    second = _latent_major(indices, 5)
    assert second is not first
    torch.testing.assert_close(second.crow.long(), torch.tensor([0, 1, 3, 4, 5, 6]))
    weights = torch.ones(3, 2, dtype=torch.float64)
    rows = torch.eye(3, dtype=torch.float64)
    expected = torch.zeros(5, 3, dtype=torch.float64)
    for n in range(3):
        for j in range(2):
            expected[indices[n, j], n] += 1
    torch.testing.assert_close(_scatter_outer(indices, weights, rows, 5), expected)


@pytest.mark.parametrize("n,k,d_sae", [(1, 1, 1), (9, 4, 7), (300, 32, 2000), (64, 8, 2**16)])
def test_numpy_and_torch_latent_sorts_agree(n, k, d_sae):
    torch.manual_seed(2)
    indices = torch.randint(0, d_sae, (n, k))
    indices[0, 0] = d_sae - 1  # the largest key survives the 16-bit path
    from_numpy, from_torch = _latent_major_numpy(indices, d_sae), _latent_major_torch(indices, d_sae)
    for a, b, field in zip(from_numpy, from_torch, from_numpy._fields):
        assert torch.equal(a.long(), b.long()), field


def test_decoder_maintenance_matches_the_plain_formulas():
    sae = random_sae(16, 64, 4, dtype=torch.float32)
    sae.W_dec.grad = torch.randn_like(sae.W_dec)
    grad, W = sae.W_dec.grad.clone(), sae.W_dec.detach().clone()
    sae.remove_gradient_parallel_to_decoder()
    torch.testing.assert_close(sae.W_dec.grad, grad - (grad * W).sum(1, keepdim=True) * W)
    sae.normalize_decoder()
    torch.testing.assert_close(sae.W_dec.detach(), W / W.norm(dim=1, keepdim=True))


def dense_auxk_step(module, x: torch.Tensor, dead: torch.Tensor, k_aux: int):
    """Loss and parameter gradients of sae_step's FVU + coef * AuxK, written densely."""
    sae = module.sae
    params = {name: p.detach().clone().requires_grad_() for name, p in sae.named_parameters()}
    pre = torch.relu((x - params["b_dec"]) @ params["W_enc"].T + params["b_enc"])
    top = pre.detach().topk(sae.k, dim=1).indices
    z = torch.zeros_like(pre).scatter(1, top, pre.gather(1, top))
    xhat = z @ params["W_dec"] + params["b_dec"]
    fvu = fraction_of_variance_unexplained(x, xhat)
    dead_pre = torch.where(dead, pre, torch.full_like(pre, -1.0))
    aux_idx = dead_pre.detach().topk(k_aux, dim=1).indices
    z_aux = torch.zeros_like(pre).scatter(1, aux_idx, pre.gather(1, aux_idx) * dead[aux_idx])
    aux = fraction_of_variance_unexplained((x - xhat).detach(), z_aux @ params["W_dec"])
    scale = min(int(dead.sum()) / k_aux, 1.0)
    loss = fvu + module.hparams.aux_coefficient * scale * aux
    return loss, scale * aux, grads_of(loss, params)


@pytest.mark.parametrize("dead_every", [3, 40])  # many dead (scale 1), few dead (scale < 1, live fill-ins)
def test_sae_step_with_auxk_matches_dense(dead_every):
    d_in, d_sae, k, k_aux, n = 16, 96, 4, 8, 64
    module = module_with_width(d_in, d_sae=d_sae, k=k, dead_tokens=100, aux_k=k_aux).double()
    sae, tracker = module.sae, module.sae_activity
    with torch.no_grad():
        sae.W_enc.normal_(0, d_in**-0.5)
        sae.b_enc.normal_(0, 0.2)
        sae.b_dec.normal_(0, 0.3)
    dead = torch.zeros(d_sae, dtype=torch.bool)
    dead[::dead_every] = True
    tracker.tokens_seen = 1000
    tracker.tokens_since_fired.copy_(torch.where(dead, 1000, 0))
    x = torch.randn(n, d_in, dtype=torch.float64)

    loss_ref, aux_ref, grads_ref = dense_auxk_step(module, x, dead, k_aux)
    step = module.sae_step("sae", x)
    grads = grads_of(step.loss, dict(sae.named_parameters()))
    # sae_step computes its losses in fp32 (x.float()), so fp32 tolerances even for a double module
    close = dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(step.aux_loss, aux_ref.to(step.aux_loss.dtype), **close)
    torch.testing.assert_close(step.loss, loss_ref.to(step.loss.dtype), **close)
    for name in grads_ref:
        torch.testing.assert_close(grads[name], grads_ref[name], **close, msg=f"gradient of {name}")


def test_sae_step_keeps_no_dense_tensor_for_backward():
    n, d_in, d_sae, k = 64, 16, 256, 4
    module = module_with_width(d_in, d_sae=d_sae, k=k, dead_tokens=10, aux_k=8)
    module.sae_activity.tokens_seen = 100
    module.sae_activity.tokens_since_fired[::2] = 100  # AuxK active too
    saved: list[torch.Size] = []

    def pack(tensor):
        saved.append(tensor.shape)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step = module.sae_step("sae", torch.randn(n, d_in))
    assert saved and all(shape.numel() < n * d_sae for shape in saved), saved
    step.loss.backward()
    assert all(p.grad is not None for p in module.sae.parameters())


def test_bf16_autocast_step_matches_dense_on_the_same_selection():
    n, d_in, d_sae, k = 96, 32, 256, 8
    sae = random_sae(d_in, d_sae, k, dtype=torch.float32)
    x = torch.randn(n, d_in)
    upstream = torch.randn(n, d_in)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        code = sae.encode(x)
        out = sae.decode(code)
    assert out.dtype == torch.float32 and code.values.dtype == torch.bfloat16
    params = dict(sae.named_parameters())
    sparse = grads_of((out * upstream).sum(), params)
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in sparse.values())

    # fp32 dense reference on the same selection; bf16 rounding of pre bounds the difference
    ref_params = {name: p.detach().clone().requires_grad_() for name, p in params.items()}
    reference = dense_step(ref_params, x, code.indices)
    dense = grads_of((reference * upstream).sum(), ref_params)
    def relative_error(a, b):
        return float((a.float() - b.float()).norm() / b.float().norm())

    assert relative_error(out, reference) < 1e-2
    for name in dense:  # bf16 keeps 8 bits of mantissa: about 0.2 % here
        assert relative_error(sparse[name], dense[name]) < 1e-2, name


def test_sparse_code_round_trip_through_dense_latents():
    sae = random_sae(8, 40, 6, dtype=torch.float32)
    x = torch.randn(20, 8)
    code = sae.encode(x)
    z = sae.dense_latents(code)
    torch.testing.assert_close(sae.decode(code), z @ sae.W_dec + sae.b_dec)
    torch.testing.assert_close(sae.decode(SparseCode(code.indices, code.values)), sae(x).xhat)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host-device synchronisation only exists with a GPU")
def test_sparse_forward_and_backward_never_synchronise_with_the_host():
    sae = random_sae(64, 1024, 16, dtype=torch.float32).cuda()
    x = torch.randn(512, 64, device="cuda")
    sae(x).xhat.sum().backward()  # warm-up: lazy CUDA initialisation may synchronise once
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = sae(x).xhat
        out.float().pow(2).sum().backward()
        sae.remove_gradient_parallel_to_decoder()
        sae.normalize_decoder()
    finally:
        torch.cuda.set_sync_debug_mode("default")
