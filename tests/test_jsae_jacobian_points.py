"""JSAE validation reports the Jacobian at the true x (training's) and at the pair's own latents
(x -> xhat -> MLP(xhat) -> output latents chosen on MLP(xhat)); the second must be the autograd
Jacobian of the function the trained pair computes."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP

from lightning_sae_jsae import FrozenMLP, JSAEModule

D, D_MLP, M, K = 12, 40, 48, 4


def pair() -> tuple[JSAEModule, torch.nn.Module]:
    torch.manual_seed(0)
    module = LlamaMLP(LlamaConfig(hidden_size=D, intermediate_size=D_MLP, hidden_act="silu", num_attention_heads=2)).eval()
    jsae = JSAEModule(k=K, d_sae=M, mlp=FrozenMLP.from_module(module, "swiglu"), widths={"x": D, "y": D})
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name in ("sae_in", "sae_out"):
            sae = jsae.get_sae(name)
            sae.W_enc.copy_(torch.randn(M, D, generator=generator) / D**0.5)
            sae.b_enc.copy_(0.2 * torch.randn(M, generator=generator))
            sae.b_dec.copy_(0.1 * torch.randn(D, generator=generator))
    return jsae, module


def test_jacobian_at_xhat_is_the_autograd_jacobian_of_the_running_pair():
    jsae, module = pair()
    sae_in, sae_out = jsae.get_sae("sae_in"), jsae.get_sae("sae_out")
    x = 1.5 * torch.randn(6, D, generator=torch.Generator().manual_seed(2))
    xhat, code_in, _ = jsae.encode_decode("sae_in", x)
    J, code_out = jsae.jacobian_at_xhat(xhat.detach(), code_in)
    for n in range(x.shape[0]):
        I_in = code_in.indices[n]
        # The output latents, chosen independently: TopK of the output encoder on MLP(xhat), by
        # transformers' own MLP module.
        with torch.no_grad():
            pre = torch.relu((module(xhat[n : n + 1]) - sae_out.b_dec) @ sae_out.W_enc.T + sae_out.b_enc)[0]
        I_out = pre.topk(K).indices
        assert set(I_out.tolist()) == set(code_out.indices[n].tolist())
        order = [code_out.indices[n].tolist().index(i) for i in I_out.tolist()]

        def f_s(z_active):
            x_rec = z_active @ sae_in.W_dec[I_in] + sae_in.b_dec
            return torch.relu((module(x_rec[None])[0] - sae_out.b_dec) @ sae_out.W_enc[I_out].T + sae_out.b_enc[I_out])

        expected = torch.autograd.functional.jacobian(f_s, code_in.values[n].detach())
        torch.testing.assert_close(J[n, order].detach(), expected, rtol=1e-4, atol=1e-5)


def test_the_two_points_differ():
    """Not the same number under two names: at an imperfect reconstruction the slopes and the
    chosen output latents differ."""
    jsae, module = pair()
    x = 1.5 * torch.randn(64, D, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        y = module(x)
    xhat, code_in, _ = jsae.encode_decode("sae_in", x)
    _, code_out, _ = jsae.encode_decode("sae_out", y)
    at_x = jsae.jacobian(x, code_in, code_out)
    at_xhat, own = jsae.jacobian_at_xhat(xhat.detach(), code_in)
    assert not torch.equal(own.indices.sort(1).values, code_out.indices.sort(1).values)
    assert at_x.abs().mean().item() != pytest.approx(at_xhat.abs().mean().item(), rel=1e-3)
