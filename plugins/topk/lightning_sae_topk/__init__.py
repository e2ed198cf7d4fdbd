"""Plain TopK: the k latents with the largest encoder pre-activations fire.

The rule itself is the core's `lightning_sae.selection.TopK` (the default selector, which AuxK
and plain-TopK validation also use); this distribution registers it under the name `topk`, the
way any selection plugin is registered.
"""

from lightning_sae.selection import TopK


class TopKSelector(TopK):
    """score = pre: the k-sparse autoencoder of OpenAI and EleutherAI sparsify."""


__all__ = ["TopKSelector"]
