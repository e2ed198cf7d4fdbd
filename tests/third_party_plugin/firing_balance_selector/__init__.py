"""A third-party selection plugin with state, used by the tests: it lives outside lightning-sae,
is discovered only through its distribution's entry point, and uses only the public contract."""

import torch
from torch import Tensor

from lightning_sae import Selector, TopKSAE


class FiringBalanceSelector(Selector):
    """TopK of pre / (1 + boost * firing rate): latents that have fired often in training yield
    to rarer ones. The per-latent firing counts are a buffer, so they are checkpointed, resumed
    and moved with the SAE; they grow in training only, and every mode selects with them."""

    fired: Tensor
    tokens: Tensor

    def __init__(self, boost: float = 4.0):
        super().__init__()
        self.boost = boost
        self.register_buffer("fired", torch.zeros(0, dtype=torch.float64))  # [d_sae] once set up
        self.register_buffer("tokens", torch.zeros((), dtype=torch.float64))

    def setup(self, sae: TopKSAE) -> None:
        # The number of latents is the SAE's, known only once the selector belongs to one.
        if self.fired.numel() != sae.d_sae:
            self.fired = torch.zeros(sae.d_sae, dtype=torch.float64, device=sae.W_dec.device)

    def firing_rate(self) -> Tensor:
        return self.fired / self.tokens.clamp_min(1)

    @torch.no_grad()
    def select(self, pre: Tensor, sae: TopKSAE, grad: Tensor | None) -> Tensor:
        score = pre / (1 + self.boost * self.firing_rate()).to(pre.dtype)
        indices = score.topk(sae.k, dim=1, sorted=False).indices
        if self.training:
            self.fired.index_add_(0, indices.reshape(-1), torch.ones(indices.numel(), dtype=self.fired.dtype, device=pre.device))
            self.tokens += pre.shape[0]
        return indices
