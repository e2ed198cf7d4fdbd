"""A third-party selection plugin used by the tests: it lives outside lightning-sae and is
discovered only through its distribution's entry point."""

from torch import Tensor

from lightning_sae import Selector, TopKSAE


class HalfDictionarySelector(Selector):
    """TopK restricted to the first `fraction` of the latents, so its use is visible in metrics."""

    def __init__(self, fraction: float = 0.5):
        self.fraction = fraction

    def score(self, pre: Tensor, sae: TopKSAE, grad: Tensor | None) -> Tensor:
        allowed = int(sae.d_sae * self.fraction)
        return pre.clone().index_fill_(1, pre.new_tensor(range(allowed, sae.d_sae), dtype=int), -1.0)
