"""Activation normalisation (`normalize_activations: expected_average_only_in`, as SAELens names it).

Each batch key is multiplied by one constant s = sqrt(width) / E||row||, estimated once from the
first training batch, so that the rows the SAE trains on have an average norm of sqrt(width)
(mean squared element about 1) whatever the model's activation scale. Learning rate, AuxK, a
g-SAE's beta and a penalty weight then mean the same on a model whose residual stream is 100x
larger. A gradient key (dL/dx) is divided by its activation's s, which is dL/d(s x).

The SAE trained on s_in x predicting s_out y is exported as the SAE on raw activations that
computes the same function (`fold_activation_scales`): raw x in, raw y out. Decoder rows stay
unit norm (the latent values become the trained ones divided by s_out), so the exported SAE
looks exactly like one trained without normalisation and loads anywhere (SAELens reads it with
`normalize_activations: none`). SAELens folds the same factor into the weights at the end of its
training (`fold_activation_norm_scaling_factor`), there leaving decoder rows of norm 1/s.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor

from lightning_sae.sae import TopKSAE

MODES = ("none", "expected_average_only_in")


def activation_scale(rows: Tensor) -> Tensor:
    """sqrt(width) / mean row norm of `rows` [N, width] (float32 scalar)."""
    rows = rows.detach().float()
    return rows.shape[-1] ** 0.5 / torch.linalg.vector_norm(rows, dim=-1).mean().clamp_min(torch.finfo(torch.float32).tiny)


def is_gradient_key(key: str) -> bool:
    return key.rsplit("/", 1)[-1] == "grad"


def gradient_source(key: str) -> str:
    """The activation key whose gradient `key` is ("grad" -> "x", "layers.9/grad" -> "layers.9/x")."""
    return key[: -len("grad")] + "x"


@torch.no_grad()
def fold_activation_scales(sae: TopKSAE, input_scale: float, output_scale: float) -> TopKSAE:
    """A copy of `sae` (trained on input_scale * x, predicting output_scale * y) that takes raw x
    and returns raw y, with unit-norm decoder rows:

        W_enc' = W_enc * s_in / s_out,  b_enc' = b_enc / s_out,  b_dec' = b_dec / s_out,  W_dec' = W_dec

    so every pre-activation is the trained one divided by s_out: TopK (or a g-SAE's score, whose
    gradient term is scale-free) keeps the same latents, and the reconstruction is divided by
    s_out. A selector's state on the latents' scale (a threshold) is rescaled with them
    (`Selector.rescale_latents`); a selector that cannot say how is refused."""
    if input_scale <= 0 or output_scale <= 0:
        raise ValueError(f"activation scales must be positive, got {input_scale} and {output_scale}")
    if sae.centers_input and input_scale != output_scale:
        raise ValueError("an SAE that subtracts b_dec from its input needs one scale for input and output")
    folded = copy.deepcopy(sae)
    folded.selector.rescale_latents(1.0 / output_scale)
    folded.W_enc.mul_(input_scale / output_scale)
    folded.b_enc.div_(output_scale)
    folded.b_dec.div_(output_scale)
    return folded
