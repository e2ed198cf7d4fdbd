"""A third-party learned selection rule used by the tests: it lives outside lightning-sae, is
discovered only through its distribution's entry point, and uses only the public contract.

TopK picks k latents per token; a learned per-latent gate then keeps latent i only where its
value exceeds theta_i (z = v H(v - theta)), with a penalty on the number of kept latents. The
gate's parameter trains through the contract's `jump_relu` / `heaviside` (their rectangle-kernel
pseudo-derivative); the penalty is a named loss term with a warmed-up coefficient. Unlike
JumpReLU this stays on the fixed-width [N, k] path.
"""

import torch
from torch import Tensor, nn

from lightning_sae import Coefficient, Encoding, Selector, TopKSAE, heaviside, jump_relu


class GatedTopK(Selector):
    def __init__(self, init_gate: float = 0.05, bandwidth: float = 0.5, gate_coefficient: float = 0.01, warm_up_steps: int = 4):
        super().__init__()
        self.init_gate, self.bandwidth = init_gate, bandwidth
        self.gate_coefficient, self.warm_up_steps = gate_coefficient, warm_up_steps
        self.gate = nn.Parameter(torch.zeros(0))

    def setup(self, sae: TopKSAE) -> None:
        if self.gate.numel() != sae.d_sae:
            self.gate = nn.Parameter(torch.full((sae.d_sae,), self.init_gate, device=sae.W_dec.device))

    def select(self, pre: Tensor, sae: TopKSAE, grad: Tensor | None) -> Tensor:
        return pre.topk(sae.k, dim=1, sorted=False).indices

    def activate(self, values: Tensor, latents: Tensor, sae: TopKSAE) -> Tensor:
        return jump_relu(values, self.gate[latents], self.bandwidth)

    def loss_terms(self, encoding: Encoding, sae: TopKSAE) -> dict[str, Tensor]:
        kept = heaviside(encoding.pre_values, self.gate[encoding.latents], self.bandwidth)
        return {"gate_l0": kept.sum() / encoding.num_tokens}

    def coefficients(self) -> dict[str, Coefficient]:
        return {"gate_l0": Coefficient(self.gate_coefficient, self.warm_up_steps)}
