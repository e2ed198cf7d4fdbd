"""Reconstruction metrics (SAELens / SAEBench "core" names) and dead-latent bookkeeping.

All metrics accumulate sums over tokens, so a validation epoch gives the exact corpus value
(not a mean of batch means) and torchmetrics reduces the sums across DDP ranks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torchmetrics import Metric


def fraction_of_variance_unexplained(x: Tensor, xhat: Tensor) -> Tensor:
    """sum ||x - xhat||^2 / sum ||x - mean_batch(x)||^2: the normalized-MSE training loss."""
    residual = (x - xhat).pow(2).sum()
    total = (x - x.mean(0)).pow(2).sum()
    return residual / total.clamp_min(torch.finfo(total.dtype).tiny)


class ReconstructionStats(Metric):
    """explained_variance, fvu, mse, mse_per_element, cossim and l0 over every token seen since
    the last reset.

    mse is SAELens's (squared error summed over the d_in dimensions, averaged over tokens);
    mse_per_element divides it by d_in as well (the per-element mean, the JSAE loss's scale).
    """

    full_state_update = False

    def __init__(self, d_in: int):
        super().__init__()
        self.add_state("squared_error", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("sum_x", torch.zeros(d_in, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("sum_x_squared", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("sum_cosine", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("active", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("tokens", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, x: Tensor, xhat: Tensor, values: Tensor) -> None:
        x, xhat = x.double(), xhat.detach().double()
        self.squared_error += (x - xhat).pow(2).sum()
        self.sum_x += x.sum(0)
        self.sum_x_squared += x.pow(2).sum()
        self.sum_cosine += torch.nn.functional.cosine_similarity(x, xhat, dim=1).sum()
        self.active += (values.detach() > 0).sum()
        self.tokens += x.shape[0]

    def compute(self) -> dict[str, Tensor]:
        total_variance = self.sum_x_squared - self.sum_x.pow(2).sum() / self.tokens
        fvu = self.squared_error / total_variance
        return {
            "explained_variance": 1 - fvu,
            "fvu": fvu,
            # SAELens's mse: ||x - xhat||^2 summed over the dimensions, averaged over tokens.
            "mse": self.squared_error / self.tokens,
            "mse_per_element": self.squared_error / (self.tokens * self.sum_x.numel()),
            "cossim": self.sum_cosine / self.tokens,
            "l0": self.active / self.tokens,
        }


class FeatureDensity(Metric):
    """Fraction of tokens on which each latent fired."""

    full_state_update = False

    def __init__(self, d_sae: int):
        super().__init__()
        self.add_state("fired", torch.zeros(d_sae, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("tokens", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, indices: Tensor, values: Tensor) -> None:
        live = indices[values.detach() > 0]
        self.fired += torch.bincount(live, minlength=self.fired.numel()).to(self.fired.dtype)
        self.tokens += indices.shape[0]

    def compute(self) -> Tensor:
        return self.fired / self.tokens


class DeadLatentTracker(nn.Module):
    """Counts, per latent, the training tokens since it last fired (summed over all ranks).

    A latent is dead once that count reaches `dead_tokens`. The counter is a buffer, so it is
    checkpointed and restored with the model.
    """

    def __init__(self, d_sae: int, dead_tokens: int):
        super().__init__()
        self.dead_tokens = dead_tokens
        self.register_buffer("tokens_since_fired", torch.zeros(d_sae, dtype=torch.long))
        # Host-side count of training tokens, so callers can know no latent is dead yet
        # without reading the device.
        self.tokens_seen = 0

    @torch.no_grad()
    def update(self, indices: Tensor, values: Tensor) -> None:
        # index_add_ rather than bincount(indices[values > 0]): boolean indexing and bincount both
        # read the device to size their outputs, a host sync on every training step.
        fired = torch.zeros_like(self.tokens_since_fired)
        fired.index_add_(0, indices.reshape(-1), (values > 0).reshape(-1).long())
        world = 1
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(fired)
            world = dist.get_world_size()  # every rank's batch has the same size
        tokens = indices.shape[0] * world
        self.tokens_seen += tokens
        self.tokens_since_fired += tokens
        self.tokens_since_fired.masked_fill_(fired > 0, 0)

    def get_extra_state(self) -> dict[str, int]:
        return {"tokens_seen": self.tokens_seen}

    def set_extra_state(self, state: dict[str, int]) -> None:
        self.tokens_seen = int(state["tokens_seen"])

    def dead_mask(self) -> Tensor:
        return self.tokens_since_fired >= self.dead_tokens

    def dead_fraction(self) -> Tensor:
        return self.dead_mask().float().mean()
