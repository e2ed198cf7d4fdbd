"""A TopK transcoder as SAELens can run it: JumpReLU with a threshold calibrated on training rows.

SAELens has no TopK transcoder: its `(skip_)transcoder` applies ReLU to every latent, which is
another function. Its `jumprelu_(skip_)transcoder` keeps latent i where pre_i > threshold_i. A
TopK transcoder is therefore exported as a JumpReLU one whose threshold t (one value, repeated for
every latent) is the one at which the rule keeps exactly k latents per row on average over the
training rows it is calibrated on, as BatchTopK's inference threshold stands in for its batch
rule. The exported file then runs the threshold rule, not TopK: `ThresholdRule` is that rule on our
side, so an exported transcoder read back here computes what SAELens computes. The threshold
itself is core's `lightning_sae.calibration.calibrate_threshold`, shared with the CLT's export.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from lightning_sae.selection import SAELensExport, Selection, Selector

if TYPE_CHECKING:
    from lightning_sae.sae import TopKSAE



class ThresholdRule(Selector):
    """JumpReLU's rule with fixed thresholds: latent i fires on a row where pre_i > threshold[i]
    (pre is already relu'd, so only positive values fire). Training does not move them.

    Buffer: `threshold` [d_sae] (empty until `setup` sizes it; a loaded one is kept)."""

    threshold: Tensor

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("threshold", torch.zeros(0))

    def setup(self, sae: "TopKSAE") -> None:
        if self.threshold.numel() != sae.d_sae:
            self.threshold = torch.zeros(sae.d_sae, device=sae.b_enc.device)

    @torch.no_grad()
    def select(self, pre: Tensor, sae: "TopKSAE", grad: Tensor | None) -> Selection:
        tokens, latents = (pre > self.threshold.to(pre.dtype).clamp_min(0)).nonzero(as_tuple=True)
        offsets = torch.zeros(pre.shape[0] + 1, dtype=torch.long, device=pre.device)
        offsets[1:] = torch.bincount(tokens, minlength=pre.shape[0]).cumsum(0)
        return Selection(latents, offsets)

    def saelens_export(self, sae: "TopKSAE") -> SAELensExport:
        return SAELensExport("jumprelu", {}, {"threshold": self.threshold.detach().clone()}, {})


def rows_of(batches: Iterable[Any], key: str, limit: int) -> Tensor:
    """Up to `limit` rows of `key` from a DataLoader's batches (dicts of [B, d] tensors)."""
    taken, count = [], 0
    for batch in batches:
        rows = batch[key]
        taken.append(rows[: limit - count].detach().cpu())
        count += taken[-1].shape[0]
        if count >= limit:
            break
    return torch.cat(taken) if taken else torch.zeros(0)
