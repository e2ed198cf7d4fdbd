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
    """SAEBench's core reconstruction, shrinkage and sparsity metrics (and fvu, mse_per_element)
    over every token seen since the last reset; docs/metrics.md has each formula.

    Everything is a sum over tokens, so the result does not depend on how the tokens were
    batched, except `explained_variance_legacy`, whose per-token denominator centres each token
    on the mean of the batch it came in (SAEBench's definition, kept for comparison with
    published numbers).
    """

    full_state_update = False

    def __init__(self, d_in: int):
        super().__init__()
        scalars = (
            "squared_error", "sum_x_squared", "sum_cosine", "active", "tokens", "sum_l1", "sum_norm_in",
            "sum_norm_out", "sum_norm_ratio", "sum_xhat_squared", "sum_x_dot_xhat", "sum_legacy", "legacy_tokens",
        )
        for name in scalars:
            self.add_state(name, torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("sum_x", torch.zeros(d_in, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, x: Tensor, xhat: Tensor, values: Tensor) -> None:
        x, xhat, values = x.double(), xhat.detach().double(), values.detach().double()
        # Per-token sums of squares and products: every statistic below is built from these,
        # so the [N, d] tensors are read a few times, not once per metric.
        error = (x - xhat).pow_(2).sum(1)
        squared_in, squared_out = x.pow(2).sum(1), xhat.pow(2).sum(1)
        dot = torch.einsum("nd,nd->n", x, xhat)
        norm_in, norm_out = squared_in.sqrt(), squared_out.sqrt()
        mean = x.mean(0)
        self.squared_error += error.sum()
        self.sum_x += x.sum(0)
        self.sum_x_squared += squared_in.sum()
        # cos = <x, xhat> / (|x| |xhat|), 0 for a zero vector (as torch's cosine_similarity).
        self.sum_cosine += (dot / (norm_in.clamp_min(1e-8) * norm_out.clamp_min(1e-8))).sum()
        self.active += (values > 0).sum()
        self.sum_l1 += values.abs().sum()
        self.tokens += x.shape[0]
        self.sum_norm_in += norm_in.sum()
        self.sum_norm_out += norm_out.sum()
        # SAELens's guard: an input norm below 1e-4 divides as 1.
        self.sum_norm_ratio += (norm_out / torch.where(norm_in < 1e-4, 1.0, norm_in)).sum()
        self.sum_xhat_squared += squared_out.sum()
        self.sum_x_dot_xhat += dot.sum()
        # ||x - m||^2 with m the batch mean, expanded (float64 keeps the cancellation harmless).
        centred = (squared_in - 2 * (x @ mean) + mean.dot(mean)).clamp_min(0)
        # A token equal to its batch's mean (a one-row batch) has no defined legacy value.
        defined = centred > 1e-12 * squared_in.clamp_min(1e-300)
        self.sum_legacy += (1 - error[defined] / centred[defined]).sum()
        self.legacy_tokens += defined.sum()

    def compute(self) -> dict[str, Tensor]:
        total_variance = self.sum_x_squared - self.sum_x.pow(2).sum() / self.tokens
        fvu = self.squared_error / total_variance
        return {
            "explained_variance": 1 - fvu,
            "explained_variance_legacy": self.sum_legacy / self.legacy_tokens,
            "fvu": fvu,
            # SAELens's mse: ||x - xhat||^2 summed over the dimensions, averaged over tokens.
            "mse": self.squared_error / self.tokens,
            "mse_per_element": self.squared_error / (self.tokens * self.sum_x.numel()),
            "cossim": self.sum_cosine / self.tokens,
            "l2_norm_in": self.sum_norm_in / self.tokens,
            "l2_norm_out": self.sum_norm_out / self.tokens,
            "l2_ratio": self.sum_norm_ratio / self.tokens,
            # Eq. 10 of Rajamanoharan et al. 2024 over all tokens at once (SAEBench averages
            # per-batch ratios instead).
            "relative_reconstruction_bias": self.sum_xhat_squared / self.sum_x_dot_xhat,
            "l0": self.active / self.tokens,
            "l1": self.sum_l1 / self.tokens,
            "tokens": self.tokens,
        }


class FeatureDensity(Metric):
    """Fraction of tokens on which each latent fired."""

    full_state_update = False

    def __init__(self, d_sae: int):
        super().__init__()
        self.add_state("fired", torch.zeros(d_sae, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("tokens", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, indices: Tensor, values: Tensor, num_tokens: int | None = None) -> None:
        """`indices`/`values` [N, k], or flat with `num_tokens` (a variable-width selection)."""
        live = indices[values.detach() > 0]
        self.fired += torch.bincount(live, minlength=self.fired.numel()).to(self.fired.dtype)
        self.tokens += indices.shape[0] if num_tokens is None else num_tokens

    def compute(self) -> Tensor:
        return self.fired / self.tokens


def density_metrics(density: Tensor) -> dict[str, Tensor]:
    """SAEBench's "misc" metrics of a per-latent firing frequency: the share of latents alive
    (fired at least once), firing on more than 1% / 10% of tokens, and the share of all firings
    that those frequent latents account for (normalized_freq_over_*; 0 when nothing fired)."""
    density = density.double()
    total = density.sum()
    out = {"frac_alive": (density > 0).double().mean()}
    for name, threshold in (("1_percent", 0.01), ("10_percent", 0.1)):
        frequent = density > threshold
        out[f"freq_over_{name}"] = frequent.double().mean()
        out[f"normalized_freq_over_{name}"] = density[frequent].sum() / total if total > 0 else total.new_zeros(())
    return out


@torch.no_grad()
def max_cosine_similarity(directions: Tensor, max_elements: int = 1 << 26) -> Tensor:
    """For each row of `directions` [M, D], its largest cosine similarity with any other row.

    Rows are compared in blocks of at most `max_elements` similarities, so the [M, M] matrix is
    never held; NaN where M = 1 (no other row)."""
    unit = torch.nn.functional.normalize(directions.float(), dim=1)
    rows = unit.shape[0]
    block = max(1, max_elements // max(1, rows))
    out = torch.empty(rows, dtype=unit.dtype, device=unit.device)
    for start in range(0, rows, block):
        sims = unit[start : start + block] @ unit.T
        own = torch.arange(start, start + sims.shape[0], device=unit.device)
        sims[torch.arange(sims.shape[0], device=unit.device), own] = float("-inf")
        out[start : start + block] = sims.max(1).values if rows > 1 else float("nan")
    return out


@torch.no_grad()
def latent_weight_metrics(W_enc: Tensor, b_enc: Tensor, W_dec: Tensor) -> dict[str, Tensor]:
    """SAEBench's per-latent weight statistics (W_enc and W_dec as [d_sae, d_in] rows): encoder
    norm and bias, the cosine between a latent's encoder and decoder directions, and its largest
    cosine with any other latent's encoder (decoder) direction."""
    return {
        "encoder_norm": W_enc.float().norm(dim=1),
        "encoder_bias": b_enc.float(),
        "encoder_decoder_cosine_sim": torch.nn.functional.cosine_similarity(W_enc.float(), W_dec.float(), dim=1),
        "max_encoder_cosine_sim": max_cosine_similarity(W_enc),
        "max_decoder_cosine_sim": max_cosine_similarity(W_dec),
    }


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
    def update(self, indices: Tensor, values: Tensor, num_tokens: int | None = None) -> None:
        """`indices`/`values` [N, k], or flat with `num_tokens` (a variable-width selection)."""
        # index_add_ rather than bincount(indices[values > 0]): boolean indexing and bincount both
        # read the device to size their outputs, a host sync on every training step.
        fired = torch.zeros_like(self.tokens_since_fired)
        fired.index_add_(0, indices.reshape(-1), (values > 0).reshape(-1).long())
        world = 1
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(fired)
            world = dist.get_world_size()  # every rank's batch has the same size
        tokens = (indices.shape[0] if num_tokens is None else num_tokens) * world
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
