"""A TopK transcoder as SAELens can run it: JumpReLU with a threshold calibrated on training rows.

SAELens has no TopK transcoder: its `(skip_)transcoder` applies ReLU to every latent, which is
another function. Its `jumprelu_(skip_)transcoder` keeps latent i where pre_i > threshold_i. A
TopK transcoder is therefore exported as a JumpReLU one whose threshold t (one value, repeated for
every latent) is the one at which the rule keeps exactly k latents per row on average over the
training rows it is calibrated on, as BatchTopK's inference threshold stands in for its batch
rule. The exported file then runs the threshold rule, not TopK: `ThresholdRule` is that rule on our
side, so an exported transcoder read back here computes what SAELens computes.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from lightning_sae.selection import SAELensExport, Selection, Selector

if TYPE_CHECKING:
    from lightning_sae.sae import TopKSAE

# Rows of pre-activations computed at once while calibrating: bounds the [rows, d_sae] temporary.
CALIBRATION_CHUNK = 2048


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


@torch.no_grad()
def calibrate_threshold(sae: "TopKSAE", rows: Tensor, k: int) -> dict[str, Any]:
    """The threshold t at which `pre > t` keeps n*k entries of the n rows' pre-activations, i.e.
    exactly k per row on average (the n*k + 1-th largest value; ties at it may keep fewer).

    Two passes over the rows, so no [n, d_sae] tensor is ever held: each chunk's own cutoff
    (its c*k + 1-th largest) bounds the global one from both sides (every chunk keeps at most c*k
    values above the largest chunk cutoff and at least c*k + 1 at or above the smallest), so the
    second pass only keeps the values between the two. Returns {"threshold", "rows", "k"}."""
    n = rows.shape[0]
    if n == 0:
        raise ValueError("no rows to calibrate the threshold on")
    chunks = list(rows.split(CALIBRATION_CHUNK))
    cutoffs = []
    for chunk in chunks:
        flat = sae.pre_activations(chunk.to(sae.b_enc.device, sae.b_enc.dtype)).flatten()
        rank = min(chunk.shape[0] * k + 1, flat.numel())
        cutoffs.append(flat.topk(rank, sorted=False).values.min())
    low, high = torch.stack(cutoffs).min(), torch.stack(cutoffs).max()
    above, between = 0, []
    for chunk in chunks:
        flat = sae.pre_activations(chunk.to(sae.b_enc.device, sae.b_enc.dtype)).flatten()
        above += int((flat > high).sum())
        between.append(flat[(flat >= low) & (flat <= high)])
    band = torch.cat(between)
    rank = n * k + 1 - above  # the global n*k + 1-th largest is the band's rank-th largest
    if rank > band.numel():  # fewer positive values than n*k + 1: every positive one may fire
        threshold = 0.0
    else:
        threshold = float(band.topk(rank, sorted=False).values.min())
    return {"threshold": max(threshold, 0.0), "rows": n, "k": k}


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
