"""Autograd for the sparse half of a TopK SAE: gradients only where latents were selected.

The dense encoder matmul runs once, without autograd, to score all latents. The selected
values are then re-attached to the graph through `SelectedEncoderValues`, whose backward costs
N*k*D (an embedding-bag reduction) instead of the N*M*D of a dense backward, and never builds an
[N, M] gradient. The decoder is an embedding bag, whose own backward is already sparse.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _rows_weighted_sum(indices: Tensor, table: Tensor, weights: Tensor) -> Tensor:
    """out[n] = sum_j weights[n, j] * table[indices[n, j]]."""
    return F.embedding_bag(indices, table, per_sample_weights=weights.to(table.dtype), mode="sum")


def _scatter_outer(indices: Tensor, weights: Tensor, rows: Tensor, num_latents: int) -> Tensor:
    """G[m] = sum over (n, j) with indices[n, j] == m of weights[n, j] * rows[n]: a [M, D] gradient.

    This is the weight-gradient of an embedding bag, which ATen computes with a sorted segment
    reduction; asking autograd for it reuses that kernel on CPU and GPU alike.
    """
    table = torch.zeros(num_latents, rows.shape[1], dtype=rows.dtype, device=rows.device, requires_grad=True)
    with torch.enable_grad():
        out = _rows_weighted_sum(indices, table, weights.to(rows.dtype))
        (grad,) = torch.autograd.grad(out, table, rows)
    return grad


class SelectedEncoderValues(torch.autograd.Function):
    """values[n, j] = relu(W_enc[i] . x_centered[n] + b_enc[i]) at i = indices[n, j].

    The forward receives those values already computed by the dense pass (no work is repeated);
    the backward differentiates the formula above with respect to x_centered, W_enc and b_enc.
    """

    @staticmethod
    def forward(ctx, x_centered: Tensor, W_enc: Tensor, b_enc: Tensor, indices: Tensor, values: Tensor) -> Tensor:
        ctx.save_for_backward(x_centered, W_enc, indices, values)
        return values.clone()

    @staticmethod
    def backward(ctx, grad_values: Tensor):
        x_centered, W_enc, indices, values = ctx.saved_tensors
        grad_pre = torch.where(values > 0, grad_values, torch.zeros_like(grad_values)).to(W_enc.dtype)
        grad_x = grad_W = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _rows_weighted_sum(indices, W_enc, grad_pre).to(x_centered.dtype)
        if ctx.needs_input_grad[1]:
            grad_W = _scatter_outer(indices, grad_pre, x_centered.to(W_enc.dtype), W_enc.shape[0])
        if ctx.needs_input_grad[2]:
            grad_b = torch.zeros(W_enc.shape[0], dtype=W_enc.dtype, device=W_enc.device)
            grad_b.index_add_(0, indices.flatten(), grad_pre.flatten())
        return grad_x, grad_W, grad_b, None, None


def selected_encoder_values(x_centered: Tensor, W_enc: Tensor, b_enc: Tensor, indices: Tensor, values: Tensor) -> Tensor:
    return SelectedEncoderValues.apply(x_centered, W_enc, b_enc, indices, values)


def sparse_decode(indices: Tensor, values: Tensor, W_dec: Tensor) -> Tensor:
    """sum_j values[n, j] * W_dec[indices[n, j]], without the decoder bias."""
    return _rows_weighted_sum(indices, W_dec, values)
