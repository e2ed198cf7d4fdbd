"""The k_out x k_in Jacobian of f_s = encoder_out o MLP o decoder_in on the active latents.

For a token with input latents I_in, output latents I_out and MLP slopes c (see FrozenMLP.slopes):

    J[b, a] = relu'(pre_out[I_out[b]]) * sum_r (unfold(A) * c)[b, r] * B[a, r]
    A = W_enc_out[I_out] @ W_out         [k_out, d_mlp]        (encoder rows pulled back through W_out)
    B = W_dec_in[I_in] @ W_in^T          [k_in, R = rows of W_in] (decoder rows pushed through W_in)

(plain MLP: unfold(A) = A and c = act'(u), so J = A diag(act'(u)) B^T; gated: unfold(A) = [A, A]
and c = [act'(g) v, act(g)], so J = A diag(act'(g) v) B_gate^T + A diag(act(g)) B_up^T.)

Cost. The products with W_in and W_out dominate (D * d_mlp per row). Tokens of a batch share
most of their active latents, so the rows are gathered once per distinct latent of the batch
(U <= min(M, N k) rows) and each token then gathers its k rows of those two small tables: the
reference's per-token products cost N k D d_mlp instead of U D d_mlp. Only decoder/encoder rows of
active latents are ever multiplied by the MLP weights; the [M, d_mlp] product is never formed.

Memory. The per-token part runs in chunks of tokens inside one autograd Function whose backward
recomputes the gathers, so no [N, k, d_mlp] tensor is kept for backward.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_sae_jsae.mlp import FrozenMLP


def _weighted_rows(rows_out: Tensor, coef: Tensor) -> Tensor:
    """unfold(A) * c for gathered A rows [n, k_out, d_mlp] and slopes [n, R] -> [n, k_out, R].

    The slopes go on the output side so that the input rows [n, k_in, R] enter the matmul as
    gathered, with no weighted or folded copy of the wider side.
    """
    n, k, d_mlp = rows_out.shape
    halves = coef.shape[1] // d_mlp  # 2 for gated MLPs: [A c_gate, A c_up] in one broadcast multiply
    return (rows_out.unsqueeze(2) * coef.view(n, 1, halves, d_mlp)).view(n, k, halves * d_mlp)


def _add_rows(table_grad: Tensor, index: Tensor, rows: Tensor) -> None:
    """table_grad[index[i]] += rows[i], repeats summed.

    Summed into a local table over the chunk's distinct rows first: a multi-threaded CPU
    index_add_ into the whole [U, R] table costs time in proportion to the table, per call.
    """
    distinct, position = torch.unique(index, return_inverse=True)
    local = rows.new_zeros(distinct.shape[0], rows.shape[1]).index_add_(0, position, rows)
    table_grad[distinct] += local  # distinct indices: a plain read-modify-write is exact


class _ActiveBlock(torch.autograd.Function):
    """J[n] = (unfold(A_table[rows_out[n]]) * coef[n]) @ B_table[rows_in[n]]^T, chunked over tokens."""

    @staticmethod
    def forward(ctx, A_table: Tensor, B_table: Tensor, coef: Tensor, rows_out: Tensor, rows_in: Tensor, mlp: FrozenMLP, chunk: int) -> Tensor:
        n = coef.shape[0]
        J = A_table.new_empty(n, rows_out.shape[1], rows_in.shape[1])
        for start in range(0, n, chunk):
            end = min(n, start + chunk)
            A = _weighted_rows(A_table[rows_out[start:end]], coef[start:end])
            torch.bmm(A, B_table[rows_in[start:end]].transpose(1, 2), out=J[start:end])
        ctx.save_for_backward(A_table, B_table, coef, rows_out, rows_in)
        ctx.mlp, ctx.chunk = mlp, chunk
        return J

    @staticmethod
    def backward(ctx, grad_J: Tensor):
        A_table, B_table, coef, rows_out, rows_in = ctx.saved_tensors
        mlp, chunk = ctx.mlp, ctx.chunk
        need_A, need_B = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_A = torch.zeros_like(A_table) if need_A else None
        grad_B = torch.zeros_like(B_table) if need_B else None
        for start in range(0, coef.shape[0], chunk):
            end = min(coef.shape[0], start + chunk)
            G = grad_J[start:end].to(A_table.dtype)  # [n, k_out, k_in]
            B = B_table[rows_in[start:end]]  # [n, k_in, R]
            if need_A:
                grad_weighted = torch.bmm(G, B) * coef[start:end].unsqueeze(1)  # [n, k_out, R]
                _add_rows(grad_A, rows_out[start:end].flatten(), mlp.fold(grad_weighted).flatten(0, 1))
            if need_B:
                A = _weighted_rows(A_table[rows_out[start:end]], coef[start:end])
                _add_rows(grad_B, rows_in[start:end].flatten(), torch.bmm(G.transpose(1, 2), A).flatten(0, 1))
        return grad_A, grad_B, None, None, None, None, None


def active_jacobian(
    mlp: FrozenMLP,
    x: Tensor,
    W_dec_in: Tensor,
    in_indices: Tensor,
    W_enc_out: Tensor,
    out_indices: Tensor,
    out_active: Tensor | None = None,
    chunk_tokens: int = 32,
) -> Tensor:
    """J [N, k_out, k_in] of f_s at MLP input x, differentiable w.r.t. W_dec_in and W_enc_out.

    Args:
        mlp: the frozen MLP; its slopes are taken at `x` (training uses the true MLP input).
        x: [N, D] MLP inputs where the MLP is linearised.
        W_dec_in: [M_in, D] input-SAE decoder rows; in_indices: [N, k_in] active input latents.
        W_enc_out: [M_out, D] output-SAE encoder rows; out_indices: [N, k_out] active output latents.
        out_active: [N, k_out] bool, whether each output latent's pre-activation is > 0 (relu' of
            the output encoder); None treats all as active (TopK's selected latents nearly always are).
        chunk_tokens: tokens per batched matmul; bounds the [chunk, k, d_mlp] temporaries.
    """
    coef = mlp.slopes(x.to(W_dec_in.dtype))
    latents_in, rows_in = torch.unique(in_indices, return_inverse=True)
    latents_out, rows_out = torch.unique(out_indices, return_inverse=True)
    B_table = W_dec_in[latents_in] @ mlp.W_in.T.to(W_dec_in.dtype)
    A_table = W_enc_out[latents_out] @ mlp.W_out.to(W_enc_out.dtype)
    J = _ActiveBlock.apply(A_table, B_table, coef, rows_out, rows_in, mlp, max(1, chunk_tokens))
    if out_active is not None:
        J = J * out_active.unsqueeze(-1).to(J.dtype)
    return J


def jacobian_counts(J: Tensor, thresholds: tuple[float, ...] | list[float]) -> dict[float, Tensor]:
    """Mean count per token of |J| entries above each threshold."""
    magnitude = J.detach().abs().flatten(1)
    return {t: (magnitude > t).sum(1).float().mean() for t in thresholds}
