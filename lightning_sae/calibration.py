"""The JumpReLU threshold that stands in for TopK where a reader has no TopK rule.

SAELens's transcoders and circuit-tracer's readers run ReLU or JumpReLU (`pre > t`), not TopK. A
TopK encoder exported to them becomes the JumpReLU whose threshold keeps exactly k latents per row
on average over rows it is calibrated on, as BatchTopK's inference threshold stands in for its
batch rule. Both the transcoder and the cross-layer transcoder exports use this one function.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from lightning_sae.sae import TopKSAE

# Rows of pre-activations computed at once while calibrating: bounds the [rows, d_sae] temporary.
CALIBRATION_CHUNK = 2048


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
