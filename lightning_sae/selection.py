"""The selection plugin interface: which k latents fire for each token.

A selector scores every latent from the encoder's relu pre-activations (and, if it asks for
them, the gradient of the language model's loss with respect to the SAE input). The k best
scores are kept; the kept latents always take the encoder's values, never the scores.
Plugins register a subclass under the entry-point group `lightning_sae.selectors`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from torch import Tensor

if TYPE_CHECKING:
    from lightning_sae.sae import TopKSAE


class Selector:
    """Base class of selection plugins. Override `score`; override `select` only for rules that
    are not "top-k of a score"."""

    needs_gradients: ClassVar[bool] = False
    """True makes the DataModule cache dL/dx beside the activations and pass it as `grad`."""

    def score(self, pre: Tensor, sae: "TopKSAE", grad: Tensor | None) -> Tensor:
        raise NotImplementedError

    def select(self, pre: Tensor, sae: "TopKSAE", grad: Tensor | None) -> Tensor:
        """Indices [N, k] of the latents that fire. `grad` is None when gradients are unavailable
        (e.g. at inference); selectors must then fall back to a rule that needs none."""
        return self.score(pre, sae, grad).topk(sae.k, dim=1, sorted=False).indices

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
