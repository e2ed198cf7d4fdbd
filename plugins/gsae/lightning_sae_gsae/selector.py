"""Gradient-augmented TopK selection (g-SAE, SPEC section 2).

    score_i = pre_i * (1 + beta * |d_i . g|)        d_i = decoder row i (unit norm)

pre_i * (d_i . g) is the first-order change of the language model's loss if latent i were
ablated, so a latent with a small activation but a large effect on the output can win a slot
that plain TopK would give to a larger but inconsequential one. Only *which* latents fire
changes: the kept values are the encoder's, and no gradient flows through the score.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_sae import Selector, TopKSAE

Normalization = Literal["rms", "token", "none"]
NORMALIZATIONS: tuple[str, ...] = get_args(Normalization)


def normalize_gradient(grad: Tensor, normalize: str) -> Tensor:
    """Rescale dL/dx so that |d_i . g| is O(1) for a decoder row d_i unrelated to g.

    rms:   divide by the RMS over every element of the batch. Removes the layer's and model's
           gradient scale (and the loss reduction's) with one scalar, but keeps the relative
           size between tokens, so tokens where the loss is more sensitive weigh more.
    token: divide each token's gradient by its own RMS. Every token gets the same gradient
           emphasis, however confident the model was there.
    none:  raw gradient; beta then has to absorb the gradient's scale.
    """
    grad = grad.float()  # the RMS of a bf16/fp16 gradient is computed in fp32
    if normalize == "none":
        return grad
    if normalize == "rms":
        scale = grad.pow(2).mean().sqrt()
    elif normalize == "token":
        scale = grad.pow(2).mean(dim=1, keepdim=True).sqrt()
    else:
        raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
    # An all-zero gradient stays zero (score = pre, plain TopK) instead of becoming NaN.
    return grad / scale.clamp_min(torch.finfo(torch.float32).tiny)


class GradientTopKSelector(Selector):
    """g-SAE: the k latents with the largest pre * (1 + beta * |W_dec g|) fire.

    Args:
        beta: weight of the gradient term; 0 is exactly plain TopK. Must be >= 0. The default 1
            puts the gradient term on the scale of the activation term (with "rms"); it is not a
            tuned value: see docs/gsae.md for a sweep.
        normalize: "rms" (default), "token" or "none"; see `normalize_gradient`. With "rms" a
            decoder row unrelated to g gets |d_i . g| ~ 0.8 on average and a row aligned with g
            up to sqrt(d_in), so beta means the same thing at every layer and model.

    Without a gradient (grad is None, e.g. at inference) the score is the pre-activation
    itself: plain TopK on the same weights.
    """

    needs_gradients = True

    def __init__(self, beta: float = 1.0, normalize: Normalization = "rms"):
        if not (beta >= 0 and beta != float("inf")):  # also rejects NaN
            raise ValueError(f"beta must be a finite number >= 0, got {beta}")
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
        self.beta = float(beta)
        self.normalize = normalize

    @torch.no_grad()
    def score(self, pre: Tensor, sae: TopKSAE, grad: Tensor | None) -> Tensor:
        if grad is None:
            return pre
        if grad.shape != (pre.shape[0], sae.d_in):
            raise ValueError(f"grad must be [N, d_in] = [{pre.shape[0]}, {sae.d_in}], got {list(grad.shape)}")
        # beta >= 0 is folded into the [N, D] gradient, not applied to the [N, M] product, which
        # saves one pass over the large tensor: |beta * x| = beta * |x|.
        g = (normalize_gradient(grad, self.normalize) * self.beta).to(pre.dtype)
        effect = F.linear(g, sae.W_dec.detach().to(pre.dtype))  # [N, M] = beta * (d_i . g): the one extra matmul
        effect.abs_()
        # pre + pre * effect, written into `effect`: the only [N, M] tensor this method allocates.
        # With beta = 0 this is pre + pre * 0 = pre bit for bit, so selection is plain TopK's.
        return torch.addcmul(pre, pre, effect, out=effect)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(beta={self.beta}, normalize={self.normalize!r})"
