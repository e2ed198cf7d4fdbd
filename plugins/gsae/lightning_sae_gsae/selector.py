"""Gradient-augmented TopK selection (g-SAE, SPEC section 2).

    score_i = pre_i * (1 + beta * |d_i . g|)        d_i = decoder row i (unit norm)

pre_i * (d_i . g) is the first-order change of the language model's loss if latent i were
ablated, so a latent with a small activation but a large effect on the output can win a slot
that plain TopK would give to a larger but inconsequential one. Only *which* latents fire
changes: the kept values are the encoder's, and no gradient flows through the score.

Speed. The score needs W_dec g for every latent: a second [N, D] x [D, M] matmul as large as the
encoder's. `select` therefore works in blocks of tokens, so the score never exists as one fresh
[N, M] tensor (its page faults and memory passes cost as much as the matmul on a CPU), and, for
fp32 inputs on hardware with fast bf16 matmuls, it runs that matmul in bf16 only to *shortlist*
k + k/4 candidates per token; the k that fire are then chosen among the candidates by their
exact scores, whose |d_i . g| is recomputed in the input's precision at the candidates only (an
SDDMM, N (k + k/4) D multiply-adds). The selection differs from the exact one only if bf16's
rounding (relative error ~2^-8 on d_i . g) moves a latent of the true top k below rank k + k/4.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_sae import Selector, TopKSAE
from lightning_sae.hardware import has_fast_bf16_matmul
from lightning_sae.sparse_ops import selected_dots

Normalization = Literal["rms", "token", "none"]
NORMALIZATIONS: tuple[str, ...] = get_args(Normalization)
Shortlist = Literal["auto", "bf16", "off"]
SHORTLISTS: tuple[str, ...] = get_args(Shortlist)


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


def shortlist_margin(k: int) -> int:
    """Candidates kept beyond k by the bf16 shortlist: k/4, rounded up (8 at k = 32)."""
    return -(-k // 4)


class GradientTopKSelector(Selector):
    """g-SAE: the k latents with the largest pre * (1 + beta * |W_dec g|) fire.

    Args:
        beta: weight of the gradient term; 0 is exactly plain TopK. Must be >= 0. The default 1
            puts the gradient term on the scale of the activation term (with "rms"); it is not a
            tuned value: see docs/gsae.md for a sweep.
        normalize: "rms" (default), "token" or "none"; see `normalize_gradient`. With "rms" a
            decoder row unrelated to g gets |d_i . g| ~ 0.8 on average and a row aligned with g
            up to sqrt(d_in), so beta means the same thing at every layer and model.
        shortlist: "bf16" shortlists candidates with a bf16 matmul and picks the k among them by
            exact scores (module docstring); "off" scores every latent in the input's precision;
            "auto" (default) is "bf16" for fp32/fp64 inputs where bf16 matmuls are fast, else "off".
        block_tokens: tokens scored per block (bounds the score buffer to block_tokens x d_sae).

    Without a gradient (grad is None, e.g. at inference) the score is the pre-activation
    itself: plain TopK on the same weights.
    """

    needs_gradients = True

    def __init__(self, beta: float = 1.0, normalize: Normalization = "rms", shortlist: Shortlist = "auto", block_tokens: int = 512):
        if not (beta >= 0 and beta != float("inf")):  # also rejects NaN
            raise ValueError(f"beta must be a finite number >= 0, got {beta}")
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
        if shortlist not in SHORTLISTS:
            raise ValueError(f"shortlist must be one of {SHORTLISTS}, got {shortlist!r}")
        if block_tokens < 1:
            raise ValueError(f"block_tokens must be >= 1, got {block_tokens}")
        super().__init__()
        self.beta = float(beta)
        self.normalize = normalize
        self.shortlist = shortlist
        self.block_tokens = int(block_tokens)

    def _scaled_gradient(self, pre: Tensor, sae: TopKSAE, grad: Tensor) -> Tensor:
        if grad.shape != (pre.shape[0], sae.d_in):
            raise ValueError(f"grad must be [N, d_in] = [{pre.shape[0]}, {sae.d_in}], got {list(grad.shape)}")
        # beta >= 0 is folded into the [N, D] gradient, not applied to the [N, M] product, which
        # saves one pass over the large tensor: |beta * x| = beta * |x|.
        return normalize_gradient(grad, self.normalize) * self.beta

    @torch.no_grad()
    def score(self, pre: Tensor, sae: TopKSAE, grad: Tensor | None) -> Tensor:
        """The exact score of every latent, [N, M] (SPEC's formula; `select` does not build it)."""
        if grad is None:
            return pre
        g = self._scaled_gradient(pre, sae, grad).to(pre.dtype)
        effect = F.linear(g, sae.W_dec.detach().to(pre.dtype)).abs_()  # beta * |d_i . g|
        # pre + pre * effect: with beta = 0 this is pre + pre * 0 = pre bit for bit.
        return torch.addcmul(pre, pre, effect, out=effect)

    def _uses_shortlist(self, pre: Tensor) -> bool:
        if self.shortlist == "off" or pre.dtype not in (torch.float32, torch.float64):
            return False
        return self.shortlist == "bf16" or has_fast_bf16_matmul(pre.device)

    @torch.no_grad()
    def select(self, pre: Tensor, sae: TopKSAE, grad: Tensor | None) -> Tensor:
        if grad is None or self.beta == 0.0:
            return pre.topk(sae.k, dim=1, sorted=False).indices  # the exact plain TopK
        g = self._scaled_gradient(pre, sae, grad).to(pre.dtype)
        if not self._uses_shortlist(pre):
            return self._blockwise_topk(pre, g, sae.W_dec.detach().to(pre.dtype), sae.k)
        candidates = self._blockwise_topk(pre, g.bfloat16(), sae.W_dec.detach().bfloat16(), min(sae.d_sae, sae.k + shortlist_margin(sae.k)))
        if candidates.shape[1] == sae.k:
            return candidates
        effect = selected_dots(candidates, g, sae.W_dec.detach().to(pre.dtype)).abs_()
        kept = pre.gather(1, candidates)
        exact_score = torch.addcmul(kept, kept, effect, out=effect)
        return candidates.gather(1, exact_score.topk(sae.k, dim=1, sorted=False).indices)

    def _blockwise_topk(self, pre: Tensor, g: Tensor, W_dec: Tensor, count: int) -> Tensor:
        """Top-`count` latents of pre * (1 + |W_dec g|), with W_dec g computed in g's dtype, one
        block of tokens at a time through reused [block, M] buffers."""
        n, m = pre.shape
        block = min(n, self.block_tokens)
        product = torch.empty(block, m, dtype=g.dtype, device=pre.device)
        # A bf16 product is scored in pre's dtype: ranking in bf16 was measured no faster here.
        converts = g.dtype != pre.dtype
        score = torch.empty(block, m, dtype=pre.dtype, device=pre.device) if converts else product
        indices = torch.empty(n, count, dtype=torch.long, device=pre.device)
        values = torch.empty(n, count, dtype=pre.dtype, device=pre.device)
        for start in range(0, n, block):
            end = min(n, start + block)
            rows = end - start
            torch.mm(g[start:end], W_dec.t(), out=product[:rows])
            block_score = score[:rows].copy_(product[:rows]) if converts else score[:rows]
            block_score.abs_()
            block_pre = pre[start:end]
            torch.addcmul(block_pre, block_pre, block_score, out=block_score)
            torch.topk(block_score, count, dim=1, sorted=False, out=(values[start:end], indices[start:end]))
        return indices
