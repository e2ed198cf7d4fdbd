"""Jacobian sparsity over a validation epoch: L1 and counts of |J| above thresholds, per token."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

DEFAULT_THRESHOLDS = (0.005, 0.01, 0.015, 0.02)  # the paper's (SPEC section 4)


class JacobianStats(Metric):
    """Sums over tokens (reduced across ranks), so the epoch value is exact, not a mean of means.

    compute() gives jacobian_l1 (mean |J| over tokens and the k_out x k_in block), and for each
    threshold t: jacobian_count_above_t (mean count per token) and jacobian_fraction_above_t
    (that count / (k_out k_in)).
    """

    full_state_update = False

    def __init__(self, thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS):
        super().__init__()
        self.thresholds = tuple(float(t) for t in thresholds)
        self.add_state("abs_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("above", torch.zeros(len(self.thresholds), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("tokens", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("block", torch.zeros((), dtype=torch.float64), dist_reduce_fx="max")

    def update(self, J: Tensor) -> None:
        magnitude = J.detach().abs().flatten(1)
        self.abs_sum += magnitude.double().sum()
        levels = torch.tensor(self.thresholds, dtype=magnitude.dtype, device=magnitude.device)
        self.above += (magnitude.unsqueeze(-1) > levels).sum((0, 1)).double()
        self.tokens += magnitude.shape[0]
        self.block.fill_(max(float(self.block), magnitude.shape[1]))

    def compute(self) -> dict[str, Tensor]:
        out = {"jacobian_l1": self.abs_sum / (self.tokens * self.block)}
        for threshold, count in zip(self.thresholds, self.above):
            out[f"jacobian_count_above_{threshold:g}"] = count / self.tokens
            out[f"jacobian_fraction_above_{threshold:g}"] = count / (self.tokens * self.block)
        return out
