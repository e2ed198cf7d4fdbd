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

Memory and speed. The per-token part runs in chunks of tokens through buffers allocated once per
call (fresh [chunk, k, R] allocations cost more in page faults than the products themselves), so
no [N, k, d_mlp] tensor is ever kept. Training needs only sum |J|, whose gradient sign(J) is known
as soon as J is: `active_jacobian_l1` runs the backward's two products in the same pass, while the
chunk's gathered rows are still in cache, and keeps two table-sized gradients instead of
recomputing the gathers in a backward pass.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from lightning_sae_jsae.mlp import FrozenMLP


class _ChunkBuffers:
    """Reused per-chunk storage for the gathered rows, the weighted rows and the k x k blocks."""

    def __init__(self, A_table: Tensor, B_table: Tensor, coef: Tensor, k_out: int, k_in: int, chunk: int, with_gradients: bool):
        R, options = coef.shape[1], dict(dtype=A_table.dtype, device=A_table.device)
        self.A = torch.empty(chunk * k_out, A_table.shape[1], **options)
        self.A_weighted = torch.empty(chunk, k_out, R, **options)
        self.B = torch.empty(chunk * k_in, R, **options)
        self.J = torch.empty(chunk, k_out, k_in, **options)
        if with_gradients:
            self.sign = torch.empty(chunk, k_out, k_in, **options)
            self.grad_A_weighted = torch.empty(chunk, k_out, R, **options)
            self.grad_B = torch.empty(chunk, k_in, R, **options)


def _chunk_block(A_table: Tensor, B_table: Tensor, coef: Tensor, rows_out: Tensor, rows_in: Tensor, buffers: _ChunkBuffers) -> tuple[Tensor, Tensor, Tensor]:
    """J, unfold(A) * c and B for one chunk of tokens (views into `buffers`).

    The slopes go on the output side so that the input rows [n, k_in, R] enter the matmul as
    gathered, with no weighted or folded copy of the wider side. For gated MLPs the A rows
    (d_mlp wide) meet the slopes (2 d_mlp wide) in one broadcast multiply: [A c_gate, A c_up].
    """
    n, k_out = rows_out.shape
    k_in, d_mlp, R = rows_in.shape[1], A_table.shape[1], coef.shape[1]
    halves = R // d_mlp
    A = torch.index_select(A_table, 0, rows_out.flatten(), out=buffers.A[: n * k_out])
    A_weighted = buffers.A_weighted[:n]
    torch.mul(A.view(n, k_out, 1, d_mlp), coef.view(n, 1, halves, d_mlp), out=A_weighted.view(n, k_out, halves, d_mlp))
    B = torch.index_select(B_table, 0, rows_in.flatten(), out=buffers.B[: n * k_in]).view(n, k_in, R)
    J = torch.bmm(A_weighted, B.transpose(1, 2), out=buffers.J[:n])
    return J, A_weighted, B


def _add_rows(table_grad: Tensor, index: Tensor, rows: Tensor) -> None:
    """table_grad[index[i]] += rows[i], repeats summed."""
    table_grad.index_add_(0, index.flatten(), rows.flatten(0, 1))


class _ActiveBlock(torch.autograd.Function):
    """J[n] = (unfold(A_table[rows_out[n]]) * coef[n]) @ B_table[rows_in[n]]^T, chunked over tokens."""

    @staticmethod
    def forward(ctx, A_table: Tensor, B_table: Tensor, coef: Tensor, rows_out: Tensor, rows_in: Tensor, mlp: FrozenMLP, chunk: int) -> Tensor:
        n = coef.shape[0]
        J = A_table.new_empty(n, rows_out.shape[1], rows_in.shape[1])
        buffers = _ChunkBuffers(A_table, B_table, coef, rows_out.shape[1], rows_in.shape[1], min(chunk, n), with_gradients=False)
        for start in range(0, n, chunk):
            end = min(n, start + chunk)
            J[start:end] = _chunk_block(A_table, B_table, coef[start:end], rows_out[start:end], rows_in[start:end], buffers)[0]
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
        buffers = _ChunkBuffers(A_table, B_table, coef, rows_out.shape[1], rows_in.shape[1], min(chunk, coef.shape[0]), with_gradients=False)
        for start in range(0, coef.shape[0], chunk):
            end = min(coef.shape[0], start + chunk)
            _, A_weighted, B = _chunk_block(A_table, B_table, coef[start:end], rows_out[start:end], rows_in[start:end], buffers)
            G = grad_J[start:end].to(A_table.dtype)  # [n, k_out, k_in]
            if need_A:
                grad_weighted = torch.bmm(G, B) * coef[start:end].unsqueeze(1)  # [n, k_out, R]
                _add_rows(grad_A, rows_out[start:end], mlp.fold(grad_weighted))
            if need_B:
                _add_rows(grad_B, rows_in[start:end], torch.bmm(G.transpose(1, 2), A_weighted))
        return grad_A, grad_B, None, None, None, None, None


class _TableWorkspace:
    """Table-sized gradient buffers kept between training steps, on the CPU.

    A fresh zeroed [U, R] tensor costs its page faults on every step (~170 ms for the two tables of
    an 8192-latent SAE on a 2048-wide MLP, measured here, more than all the chunk gathers), while
    zeroing memory that is already mapped costs a few ms. A buffer is lent by `zeros` and comes
    back through `give_back` when the backward that used it returns its gradients (the backward
    is once-differentiable, so no forward can run before the engine has consumed them); a call
    that finds none free (e.g. two penalties in one graph) allocates its own. CUDA's caching
    allocator already reuses memory, so there `zeros` is plain `torch.zeros`.
    """

    def __init__(self, keep: int = 2):
        self.keep = keep
        self._free: list[Tensor] = []

    def zeros(self, rows: int, cols: int, like: Tensor) -> Tensor:
        if like.device.type != "cpu":
            return torch.zeros(rows, cols, dtype=like.dtype, device=like.device)
        needed = rows * cols
        for i, flat in enumerate(self._free):
            if flat.dtype == like.dtype and flat.numel() >= needed:
                return self._free.pop(i)[:needed].view(rows, cols).zero_()
        return torch.zeros(needed, dtype=like.dtype).view(rows, cols)

    def give_back(self, table: Tensor | None) -> None:
        if table is None or table.device.type != "cpu":
            return
        flat = table._base if table._base is not None else table
        self._free.append(flat.view(-1))
        self._free.sort(key=Tensor.numel, reverse=True)
        del self._free[self.keep :]


_WORKSPACE = _TableWorkspace()


class _ActiveBlockL1(torch.autograd.Function):
    """sum over tokens of sum |J[n] * out_active[n]|, with its gradient computed in the same pass.

    d|J|/dJ = sign(J) (0 at 0, as autograd's abs), so the two backward products of each chunk
    run right after its forward product, on the same gathered rows; the forward keeps only the
    [U_out, d_mlp] and [U_in, R] table gradients, which the backward scales by the incoming
    gradient. No recomputation, no second pass over the gathers.
    """

    @staticmethod
    def forward(ctx, A_table: Tensor, B_table: Tensor, coef: Tensor, rows_out: Tensor, rows_in: Tensor, out_active: Tensor | None, mlp: FrozenMLP, chunk: int) -> Tensor:
        n_tokens, k_out = rows_out.shape
        need_A, need_B = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_A = _WORKSPACE.zeros(*A_table.shape, like=A_table) if need_A else None
        grad_B = _WORKSPACE.zeros(*B_table.shape, like=B_table) if need_B else None
        buffers = _ChunkBuffers(A_table, B_table, coef, k_out, rows_in.shape[1], min(chunk, n_tokens), with_gradients=need_A or need_B)
        accumulate = torch.float64 if A_table.dtype == torch.float64 else torch.float32
        total = torch.zeros((), dtype=accumulate, device=A_table.device)
        for start in range(0, n_tokens, chunk):
            end = min(n_tokens, start + chunk)
            n = end - start
            J, A_weighted, B = _chunk_block(A_table, B_table, coef[start:end], rows_out[start:end], rows_in[start:end], buffers)
            if out_active is not None:
                J.mul_(out_active[start:end].unsqueeze(-1).to(J.dtype))
            total += J.abs().sum(dtype=accumulate)
            if not (need_A or need_B):
                continue
            G = torch.sign(J, out=buffers.sign[:n])
            if need_A:
                grad_weighted = torch.bmm(G, B, out=buffers.grad_A_weighted[:n])
                grad_weighted.mul_(coef[start:end].unsqueeze(1))
                _add_rows(grad_A, rows_out[start:end], mlp.fold(grad_weighted))
            if need_B:
                _add_rows(grad_B, rows_in[start:end], torch.bmm(G.transpose(1, 2), A_weighted, out=buffers.grad_B[:n]))
        ctx.save_for_backward(grad_A, grad_B)
        return total.to(A_table.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_total: Tensor):
        grad_A, grad_B = ctx.saved_tensors
        scale = grad_total.to(grad_A.dtype if grad_A is not None else grad_B.dtype)
        grads = (grad_A.mul_(scale) if grad_A is not None else None, grad_B.mul_(scale) if grad_B is not None else None)
        # The engine hands these to the table products' backward before it returns to the caller,
        # so by the next forward (the next step) they are free to be lent again.
        _WORKSPACE.give_back(grad_A)
        _WORKSPACE.give_back(grad_B)
        return (*grads, None, None, None, None, None, None)


def _block_inputs(mlp: FrozenMLP, x: Tensor, W_dec_in: Tensor, in_indices: Tensor, W_enc_out: Tensor, out_indices: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The A and B rows of the batch's distinct active latents, the MLP slopes at x, and each
    selection's row in the tables: what both the Jacobian and its L1 penalty are built from."""
    coef = mlp.slopes(x.to(W_dec_in.dtype))
    latents_in, rows_in = torch.unique(in_indices, return_inverse=True)
    latents_out, rows_out = torch.unique(out_indices, return_inverse=True)
    B_table = W_dec_in[latents_in] @ mlp.W_in.T.to(W_dec_in.dtype)
    A_table = W_enc_out[latents_out] @ mlp.W_out.to(W_enc_out.dtype)
    return A_table, B_table, coef, rows_out, rows_in


def active_jacobian(
    mlp: FrozenMLP,
    x: Tensor,
    W_dec_in: Tensor,
    in_indices: Tensor,
    W_enc_out: Tensor,
    out_indices: Tensor,
    out_active: Tensor | None = None,
    chunk_tokens: int = 16,
) -> Tensor:
    """J [N, k_out, k_in] of f_s at MLP input x, differentiable w.r.t. W_dec_in and W_enc_out.

    Args:
        mlp: the frozen MLP; its slopes are taken at `x` (training uses the true MLP input).
        x: [N, D] MLP inputs where the MLP is linearised.
        W_dec_in: [M_in, D] input-SAE decoder rows; in_indices: [N, k_in] active input latents.
        W_enc_out: [M_out, D] output-SAE encoder rows; out_indices: [N, k_out] active output latents.
        out_active: [N, k_out] bool, whether each output latent's pre-activation is > 0 (relu' of
            the output encoder); None treats all as active (TopK's selected latents nearly always are).
        chunk_tokens: tokens per batched matmul; bounds the [chunk, k, d_mlp] buffers.
    """
    A_table, B_table, coef, rows_out, rows_in = _block_inputs(mlp, x, W_dec_in, in_indices, W_enc_out, out_indices)
    J = _ActiveBlock.apply(A_table, B_table, coef, rows_out, rows_in, mlp, max(1, chunk_tokens))
    if out_active is not None:
        J = J * out_active.unsqueeze(-1).to(J.dtype)
    return J


def active_jacobian_l1(
    mlp: FrozenMLP,
    x: Tensor,
    W_dec_in: Tensor,
    in_indices: Tensor,
    W_enc_out: Tensor,
    out_indices: Tensor,
    out_active: Tensor | None = None,
    chunk_tokens: int = 16,
) -> Tensor:
    """mean |J| over tokens and the k_out x k_in block: `active_jacobian(...).abs().mean()`, with
    the same arguments, in one pass over the gathered rows (the training loss's penalty)."""
    A_table, B_table, coef, rows_out, rows_in = _block_inputs(mlp, x, W_dec_in, in_indices, W_enc_out, out_indices)
    total = _ActiveBlockL1.apply(A_table, B_table, coef, rows_out, rows_in, out_active, mlp, max(1, chunk_tokens))
    return total / (out_indices.shape[0] * out_indices.shape[1] * in_indices.shape[1])


def jacobian_counts(J: Tensor, thresholds: tuple[float, ...] | list[float]) -> dict[float, Tensor]:
    """Mean count per token of |J| entries above each threshold."""
    magnitude = J.detach().abs().flatten(1)
    return {t: (magnitude > t).sum(1).float().mean() for t in thresholds}
