"""JSAE penalty: the bf16-product path against float64 autograd, and the benchmark's reference
formulation (tools/bench.py) against the plugin's exact penalty, so that the two rows the
benchmark compares compute the same quantity."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from test_jsae import block_problem, hf_mlp, naive_jacobian

from lightning_sae_jsae import FrozenMLP, JSAEModule, active_jacobian, active_jacobian_l1
from lightning_sae.hardware import has_fast_bf16_matmul
from lightning_sae_jsae.jacobian import product_dtype

# bf16 keeps 8 significant bits (relative rounding <= 2^-9 ~ 2e-3 per rounding). The operands of J
# are rounded (the weight rows, W_in / W_out, the slopes product), then the two table products and
# the per-token product round once each; measured on these problems 4.6e-3 to 5.6e-3 relative
# error of J and 2e-5 to 8e-4 of the penalty. The bounds below leave about 4x (6x) that, and a lower
# bound on J's error checks that the products did run in bf16 (an fp32 path would be ~1e-7).
J_TOLERANCE = 2e-2
PENALTY_TOLERANCE = 5e-3
GRADIENT_TOLERANCE = 2e-2


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).norm() / want.double().norm())


def float32_problem(family: str, tokens: int = 24, seed: int = 0):
    """block_problem's shapes, but more tokens and the weights in fp32 (bf16 applies to fp32 weights)."""
    module, family = hf_mlp(family)
    mlp64 = FrozenMLP.from_module(module, family).double()
    generator = torch.Generator().manual_seed(seed)
    W_dec = torch.randn(30, mlp64.d_in, dtype=torch.float64, generator=generator)
    W_enc = torch.randn(25, mlp64.d_out, dtype=torch.float64, generator=generator)
    x = torch.randn(tokens, mlp64.d_in, dtype=torch.float64, generator=generator)
    I_in = torch.stack([torch.randperm(30, generator=generator)[:4] for _ in range(tokens)])
    I_out = torch.stack([torch.randperm(25, generator=generator)[:5] for _ in range(tokens)])
    return mlp64, W_dec, W_enc, x, I_in, I_out


@pytest.mark.parametrize("family", ["gelu", "gelu_new", "swiglu"])
@pytest.mark.parametrize("chunk", [1, 5, 1000])
def test_bf16_jacobian_and_its_gradient_match_float64_autograd(family, chunk):
    mlp64, W_dec64, W_enc64, x64, I_in, I_out = float32_problem(family)
    mlp = FrozenMLP(mlp64.W_in.float(), mlp64.W_out.float(), mlp64.b_in.float(), mlp64.b_out.float(), mlp64.family)
    W_dec, W_enc = W_dec64.float().requires_grad_(True), W_enc64.float().requires_grad_(True)
    W_dec64.requires_grad_(True)
    W_enc64.requires_grad_(True)
    weights = torch.randn(I_out.shape[0], 5, 4, dtype=torch.float64)

    J = active_jacobian(mlp, x64.float(), W_dec, I_in, W_enc, I_out, chunk_tokens=chunk, precision="bf16")
    J64 = naive_jacobian(mlp64, x64, W_dec64, I_in, W_enc64, I_out)
    assert J.dtype == torch.float32
    error = relative(J.detach(), J64.detach())
    assert 1e-5 < error < J_TOLERANCE, error
    grads = torch.autograd.grad((J.double() * weights).sum(), (W_dec, W_enc))
    expected = torch.autograd.grad((J64 * weights).sum(), (W_dec64, W_enc64))
    for got, want in zip(grads, expected):
        assert relative(got, want) < GRADIENT_TOLERANCE


@pytest.mark.parametrize("family", ["gelu", "swiglu"])
@pytest.mark.parametrize("chunk", [1, 5, 1000])
def test_bf16_penalty_and_its_gradient_match_float64_autograd(family, chunk):
    """The fused penalty with bf16 products: its value against float64, and its gradient against
    float64 autograd of sum(sign * J) with the signs the bf16 pass saw (an L1 subgradient flips
    where |J| is within rounding of 0; that is a choice of subgradient, not an error)."""
    mlp64, W_dec64, W_enc64, x64, I_in, I_out = float32_problem(family, seed=3)
    mlp = FrozenMLP(mlp64.W_in.float(), mlp64.W_out.float(), mlp64.b_in.float(), mlp64.b_out.float(), mlp64.family)
    W_dec, W_enc = W_dec64.float().requires_grad_(True), W_enc64.float().requires_grad_(True)
    W_dec64.requires_grad_(True)
    W_enc64.requires_grad_(True)
    active = torch.rand(I_out.shape, generator=torch.Generator().manual_seed(4)) > 0.2

    penalty = active_jacobian_l1(mlp, x64.float(), W_dec, I_in, W_enc, I_out, active, chunk_tokens=chunk, precision="bf16")
    assert penalty.dtype == torch.float32
    (3.0 * penalty).backward()
    J64 = naive_jacobian(mlp64, x64, W_dec64, I_in, W_enc64, I_out) * active.unsqueeze(-1)
    exact = J64.abs().mean()
    assert abs(float(penalty.detach()) - float(exact.detach())) / float(exact.detach()) < PENALTY_TOLERANCE
    with torch.no_grad():
        signs = torch.sign(active_jacobian(mlp, x64.float(), W_dec, I_in, W_enc, I_out, active, chunk_tokens=chunk, precision="bf16")).double()
    expected = torch.autograd.grad(3.0 * (signs * J64).sum() / J64.numel(), (W_dec64, W_enc64))
    for got, want in zip((W_dec.grad, W_enc.grad), expected):
        assert relative(got, want) < GRADIENT_TOLERANCE


def test_bf16_penalty_buffers_are_reused_safely_across_steps_and_within_one_graph():
    """The bf16 path lends fp32 accumulation and bf16 gradient buffers: consecutive steps give the
    same gradients as fresh calls, and two penalties in one graph do not share a buffer."""
    mlp64, W_dec64, W_enc64, x64, I_in, I_out = float32_problem("gelu", tokens=12, seed=7)
    mlp = FrozenMLP(mlp64.W_in.float(), mlp64.W_out.float(), mlp64.b_in.float(), mlp64.b_out.float(), mlp64.family)
    W_dec, W_enc = W_dec64.float().requires_grad_(True), W_enc64.float().requires_grad_(True)
    first = (x64[:6].float(), I_in[:6], I_out[:6])
    second = (x64[6:].float(), I_in[6:], I_out[6:])

    def penalty(batch):
        return active_jacobian_l1(mlp, batch[0], W_dec, batch[1], W_enc, batch[2], precision="bf16")

    alone = [torch.autograd.grad(penalty(batch), (W_dec, W_enc)) for batch in (first, second)]
    for _ in range(2):  # again, now from reused buffers
        again = [torch.autograd.grad(penalty(batch), (W_dec, W_enc)) for batch in (first, second)]
        for got, want in zip(again, alone):
            for g, w in zip(got, want):
                torch.testing.assert_close(g, w, rtol=0, atol=0)
    both = torch.autograd.grad(penalty(first) + 2 * penalty(second), (W_dec, W_enc))
    for got, a, b in zip(both, alone[0], alone[1]):
        torch.testing.assert_close(got, a + 2 * b, rtol=1e-6, atol=1e-6)


def test_precision_choice():
    fp32, fp64 = torch.zeros(1), torch.zeros(1, dtype=torch.float64)
    assert product_dtype("exact", fp32) == torch.float32
    assert product_dtype("exact", fp64) == torch.float64
    assert product_dtype("bf16", fp32) == torch.bfloat16
    assert product_dtype("auto", fp64) == torch.float64  # auto never lowers float64 (tests, analyses)
    assert product_dtype("auto", fp32) == (torch.bfloat16 if has_fast_bf16_matmul(torch.device("cpu")) else torch.float32)
    with pytest.raises(ValueError):
        product_dtype("fp8", fp32)
    with pytest.raises(ValueError, match="jacobian_precision"):
        JSAEModule(k=2, d_sae=8, widths={"x": 4, "y": 4}, jacobian_precision="half")


# ---- the benchmark's reference formulation ---------------------------------------------------------
def load_bench():
    path = Path(__file__).resolve().parents[1] / "tools" / "bench.py"
    spec = importlib.util.spec_from_file_location("lsae_bench_for_tests", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve the module by name
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("family", ["gelu", "gelu_new"])
def test_reference_formulation_computes_the_same_penalty_and_gradients(family):
    """tools/bench.py's reference formulation (full [M, d_mlp] products, per-token gathers, one
    einsum, autograd) and the plugin's exact penalty agree in float64, value and gradients, and
    its J equals the plugin's: the benchmark times two ways of computing one quantity."""
    bench = load_bench()
    mlp, W_dec, W_enc, x, I_in, I_out = block_problem(family)
    ours = active_jacobian_l1(mlp, x, W_dec, I_in, W_enc, I_out, chunk_tokens=3)
    ours_grads = torch.autograd.grad(ours, (W_dec, W_enc))
    theirs = bench.reference_jacobian_l1(mlp, x, W_dec, I_in, W_enc, I_out)
    theirs_grads = torch.autograd.grad(theirs, (W_dec, W_enc))
    torch.testing.assert_close(theirs, ours, rtol=1e-12, atol=1e-12)
    for got, want in zip(theirs_grads, ours_grads):
        torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-12)
    J = bench.reference_jacobian(mlp, x, W_dec, I_in, W_enc, I_out)
    torch.testing.assert_close(J, active_jacobian(mlp, x, W_dec, I_in, W_enc, I_out).detach(), rtol=1e-12, atol=1e-12)


def test_multiply_add_count_matches_what_the_penalty_runs():
    """The floor's work count against torch's own FLOP counter over the plugin's exact penalty,
    forward and backward (slopes, both tables and their gradients, the per-token products)."""
    from torch.utils.flop_counter import FlopCounterMode

    bench = load_bench()
    mlp, W_dec, W_enc, x, I_in, I_out = block_problem("gelu")
    counter = FlopCounterMode(display=False)
    with counter:
        active_jacobian_l1(mlp, x, W_dec, I_in, W_enc, I_out, chunk_tokens=3).backward()
    U_in, U_out = torch.unique(I_in).numel(), torch.unique(I_out).numel()
    N, k_in, k_out = I_in.shape[0], I_in.shape[1], I_out.shape[1]
    expected = bench.penalty_multiply_adds(N, k_in, k_out, mlp.d_in, mlp.d_mlp, U_in, U_out)
    assert counter.get_total_flops() == 2 * expected
