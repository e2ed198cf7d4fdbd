"""The k_out x k_in Jacobian of f_s = encoder_out o MLP o decoder_in on the active latents.

For a token with input latents I_in, output latents I_out and MLP slopes c (see FrozenMLP.slopes):

    J[b, a] = relu'(pre_out[I_out[b]]) * sum_r (unfold(A) * c)[b, r] * B[a, r]
    A = W_enc_out[I_out] @ W_out         [k_out, d_mlp]        (encoder rows pulled back through W_out)
    B = W_dec_in[I_in] @ W_in^T          [k_in, R = rows of W_in] (decoder rows pushed through W_in)

(plain MLP: unfold(A) = A and c = act'(u), so J = A diag(act'(u)) B^T; gated: unfold(A) = [A, A]
and c = [act'(g) v, act(g)], so J = A diag(act'(g) v) B_gate^T + A diag(act(g)) B_up^T.)

Cost. The products with W_in and W_out dominate (D * d_mlp per row). Tokens of a batch share
most of their active latents, so the rows are multiplied once per distinct latent of the batch
(U <= min(M, N k) rows) and each token then gathers its k rows of those two tables. Only rows of
active latents are ever multiplied by the MLP weights; the [M, d_mlp] products of every latent,
which the reference implementation forms before gathering [N, k, d_mlp] per token, are not.

Memory and speed. The per-token part runs in chunks of tokens through buffers allocated once per
call (fresh [chunk, k, R] allocations cost more in page faults than the products themselves), so
no [N, k, d_mlp] tensor is ever kept. Training needs only sum |J|, whose gradient sign(J) is known
as soon as J is: `active_jacobian_l1` runs the backward's two products in the same pass, while the
chunk's gathered rows are still in cache, and keeps two table-sized gradients instead of
recomputing the gathers in a backward pass.

Precision. `precision="bf16"` runs every product of the penalty (the slopes' W_in x, the two table
products and the per-token blocks) on bf16 operands, while the table gradients are accumulated in
fp32 and the penalty is summed in fp32. On CPUs with AVX512-BF16 / AMX (and on GPUs) a bf16 matmul
is several times cheaper than an fp32 one; the error this adds to J and to the penalty is measured
by tools/bench.py and reported in docs/jsae.md (relative error of J ~5e-3, of the penalty
~1e-5 on a 4096-token batch), and tested against float64 autograd. "auto" picks bf16 for fp32 weights where bf16 matmuls are fast.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from lightning_sae.hardware import has_fast_bf16_matmul
from lightning_sae_jsae.mlp import FrozenMLP

Precision = Literal["auto", "exact", "bf16"]
_LOW_PRECISION = (torch.bfloat16, torch.float16)


def product_dtype(precision: Precision, weights: Tensor) -> torch.dtype:
    """The dtype the penalty's products run in: bf16 for "bf16" (and for "auto" with fp32 weights
    where bf16 matmuls are fast), the weights' own dtype for "exact"."""
    if precision not in ("auto", "exact", "bf16"):
        raise ValueError(f"precision must be 'auto', 'exact' or 'bf16', got {precision!r}")
    if precision == "bf16" or (precision == "auto" and weights.dtype == torch.float32 and has_fast_bf16_matmul(weights.device)):
        return torch.bfloat16
    return weights.dtype


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Sums over tokens (table gradients, the penalty) never run in bf16/fp16."""
    return torch.float32 if dtype in _LOW_PRECISION else dtype


class _ChunkBuffers:
    """Reused per-chunk storage for the gathered rows, the weighted rows and the k x k blocks.

    With bf16 tables the products write bf16; the `*_rows` buffers take their fp32 copies, which
    is what the fp32 table gradients accumulate (index_add_ needs one dtype).
    """

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
            accumulate = _accumulation_dtype(A_table.dtype)
            if accumulate != A_table.dtype:
                self.grad_A_rows = torch.empty(chunk, k_out, R, dtype=accumulate, device=A_table.device)
                self.grad_B_rows = torch.empty(chunk, k_in, R, dtype=accumulate, device=A_table.device)


def _chunk_block(A_table: Tensor, B_table: Tensor, coef: Tensor, rows_out: Tensor, rows_in: Tensor, buffers: _ChunkBuffers) -> tuple[Tensor, Tensor, Tensor]:
    """J, unfold(A) * c and B for one chunk of tokens (views into `buffers`).

    The slopes go on the output side so that the input rows [n, k_in, R] enter the matmul as
    gathered, with no weighted or folded copy of the wider side. For gated MLPs the A rows
    (d_mlp wide) meet the slopes (2 d_mlp wide) in one broadcast multiply: [A c_gate, A c_up].
    The slopes stay in the accumulation dtype: with bf16 rows the product is taken in fp32 and
    rounded once, into the bf16 buffer.
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
        accumulate = _accumulation_dtype(A_table.dtype)
        grad_A = torch.zeros(A_table.shape, dtype=accumulate, device=A_table.device) if need_A else None
        grad_B = torch.zeros(B_table.shape, dtype=accumulate, device=B_table.device) if need_B else None
        buffers = _ChunkBuffers(A_table, B_table, coef, rows_out.shape[1], rows_in.shape[1], min(chunk, coef.shape[0]), with_gradients=False)
        for start in range(0, coef.shape[0], chunk):
            end = min(coef.shape[0], start + chunk)
            _, A_weighted, B = _chunk_block(A_table, B_table, coef[start:end], rows_out[start:end], rows_in[start:end], buffers)
            G = grad_J[start:end].to(A_table.dtype)  # [n, k_out, k_in]
            if need_A:
                grad_weighted = torch.bmm(G, B).to(accumulate) * coef[start:end].unsqueeze(1)  # [n, k_out, R]
                _add_rows(grad_A, rows_out[start:end], mlp.fold(grad_weighted))
            if need_B:
                _add_rows(grad_B, rows_in[start:end], torch.bmm(G.transpose(1, 2), A_weighted).to(accumulate))
        return (
            grad_A.to(A_table.dtype) if need_A else None,
            grad_B.to(B_table.dtype) if need_B else None,
            None, None, None, None, None,
        )


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

    def __init__(self, keep: int = 4):
        self.keep = keep
        self._free: list[Tensor] = []

    def empty(self, rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        if device.type != "cpu":
            return torch.empty(rows, cols, dtype=dtype, device=device)
        needed = rows * cols
        for i, flat in enumerate(self._free):
            if flat.dtype == dtype and flat.numel() >= needed:
                return self._free.pop(i)[:needed].view(rows, cols)
        return torch.empty(needed, dtype=dtype).view(rows, cols)

    def zeros(self, rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        return self.empty(rows, cols, dtype, device).zero_()

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
    gradient. No recomputation, no second pass over the gathers. With bf16 tables the products
    run in bf16 and the table gradients and the sum accumulate in fp32.
    """

    @staticmethod
    def forward(ctx, A_table: Tensor, B_table: Tensor, coef: Tensor, rows_out: Tensor, rows_in: Tensor, out_active: Tensor | None, mlp: FrozenMLP, chunk: int) -> Tensor:
        n_tokens, k_out = rows_out.shape
        need_A, need_B = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        accumulate, device = _accumulation_dtype(A_table.dtype), A_table.device
        low_precision = accumulate != A_table.dtype
        grad_A = _WORKSPACE.zeros(*A_table.shape, dtype=accumulate, device=device) if need_A else None
        grad_B = _WORKSPACE.zeros(*B_table.shape, dtype=accumulate, device=device) if need_B else None
        buffers = _ChunkBuffers(A_table, B_table, coef, k_out, rows_in.shape[1], min(chunk, n_tokens), with_gradients=need_A or need_B)
        total = torch.zeros((), dtype=accumulate, device=device)
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
            c = coef[start:end].unsqueeze(1)
            if need_A:
                grad_weighted = torch.bmm(G, B, out=buffers.grad_A_weighted[:n])
                if low_precision:  # the slope multiply also widens to fp32 for the sum
                    grad_weighted = torch.mul(grad_weighted, c, out=buffers.grad_A_rows[:n])
                else:
                    grad_weighted.mul_(c)
                _add_rows(grad_A, rows_out[start:end], mlp.fold(grad_weighted))
            if need_B:
                grad_rows = torch.bmm(G.transpose(1, 2), A_weighted, out=buffers.grad_B[:n])
                if low_precision:
                    grad_rows = buffers.grad_B_rows[:n].copy_(grad_rows)
                _add_rows(grad_B, rows_in[start:end], grad_rows)
        ctx.save_for_backward(grad_A, grad_B)
        ctx.table_dtype = A_table.dtype
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_total: Tensor):
        grad_A, grad_B = ctx.saved_tensors
        grads = []
        for table_grad in (grad_A, grad_B):
            if table_grad is None:
                grads.append(None)
                continue
            scale = grad_total.to(table_grad.dtype)
            if table_grad.dtype == ctx.table_dtype:
                grads.append(table_grad.mul_(scale))
                continue
            # Rounded once, here, to the bf16 table it flows back through; the buffer is lent like
            # the fp32 one (a fresh [U, R] tensor per step costs its page faults).
            rounded = _WORKSPACE.empty(*table_grad.shape, dtype=ctx.table_dtype, device=table_grad.device)
            grads.append(torch.mul(table_grad, scale, out=rounded))
            _WORKSPACE.give_back(table_grad)
        # The engine hands these to the table products' backward before it returns to the caller,
        # so by the next forward (the next step) they are free to be lent again.
        for grad in grads:
            _WORKSPACE.give_back(grad)
        return (*grads, None, None, None, None, None, None)


def _block_inputs(
    mlp: FrozenMLP, x: Tensor, W_dec_in: Tensor, in_indices: Tensor, W_enc_out: Tensor, out_indices: Tensor, precision: Precision
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The A and B rows of the batch's distinct active latents, the MLP slopes at x, and each
    selection's row in the tables: what both the Jacobian and its L1 penalty are built from.
    The tables come out in the products' dtype; the slopes stay in the accumulation dtype."""
    dtype = product_dtype(precision, W_dec_in)
    coef = mlp.slopes(x.to(_accumulation_dtype(dtype)), product_dtype=dtype)
    latents_in, rows_in = torch.unique(in_indices, return_inverse=True)
    latents_out, rows_out = torch.unique(out_indices, return_inverse=True)
    B_table = W_dec_in[latents_in].to(dtype) @ mlp.W_in.T.to(dtype)
    A_table = W_enc_out[latents_out].to(dtype) @ mlp.W_out.to(dtype)
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
    precision: Precision = "exact",
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
        precision: "exact" (products in the weights' dtype, the default here: validation and
            analyses count entries against thresholds), "bf16" or "auto" (see the module docstring).
            J is returned in the weights' dtype either way.
    """
    A_table, B_table, coef, rows_out, rows_in = _block_inputs(mlp, x, W_dec_in, in_indices, W_enc_out, out_indices, precision)
    J = _ActiveBlock.apply(A_table, B_table, coef, rows_out, rows_in, mlp, max(1, chunk_tokens)).to(W_dec_in.dtype)
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
    precision: Precision = "exact",
) -> Tensor:
    """mean |J| over tokens and the k_out x k_in block: `active_jacobian(...).abs().mean()`, with
    the same arguments, in one pass over the gathered rows (the training loss's penalty).
    With bf16 products the value is summed in fp32 and returned in the weights' dtype."""
    A_table, B_table, coef, rows_out, rows_in = _block_inputs(mlp, x, W_dec_in, in_indices, W_enc_out, out_indices, precision)
    total = _ActiveBlockL1.apply(A_table, B_table, coef, rows_out, rows_in, out_active, mlp, max(1, chunk_tokens)).to(W_dec_in.dtype)
    return total / (out_indices.shape[0] * out_indices.shape[1] * in_indices.shape[1])


def jacobian_counts(J: Tensor, thresholds: tuple[float, ...] | list[float]) -> dict[float, Tensor]:
    """Mean count per token of |J| entries above each threshold."""
    magnitude = J.detach().abs().flatten(1)
    return {t: (magnitude > t).sum(1).float().mean() for t in thresholds}
