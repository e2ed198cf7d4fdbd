"""Small builders shared by the core tests."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_sae.module import SAEModule


def dense_reference(params: dict[str, Tensor], x: Tensor, k: int) -> Tensor:
    """The SPEC's TopK SAE written densely, for autograd to differentiate."""
    pre = torch.relu((x - params["b_dec"]) @ params["W_enc"].T + params["b_enc"])
    indices = pre.topk(k, dim=1).indices
    z = torch.zeros_like(pre).scatter(1, indices, pre.gather(1, indices))
    return z @ params["W_dec"] + params["b_dec"]


def module_with_width(d_in: int, **kwargs) -> SAEModule:
    return SAEModule(widths={"x": d_in}, **kwargs)
