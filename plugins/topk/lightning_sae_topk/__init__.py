"""Plain TopK: the k latents with the largest encoder pre-activations fire."""

from __future__ import annotations

from torch import Tensor

from lightning_sae import Selector, TopKSAE


class TopKSelector(Selector):
    """score = pre: the k-sparse autoencoder of OpenAI and EleutherAI sparsify."""

    def score(self, pre: Tensor, sae: TopKSAE, grad: Tensor | None) -> Tensor:
        return pre
