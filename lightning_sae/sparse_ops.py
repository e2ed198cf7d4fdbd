"""Autograd for the sparse half of a TopK SAE: gradients only where latents were selected.

The dense encoder matmul runs once, without autograd, to score all latents. The selected
values are then re-attached to the graph through `SelectedEncoderValues`, and the decoder is
`SparseDecode`; the backward of both costs O(N*k*D) and never builds an [N, M] tensor:

- weight gradients (W_enc, W_dec) are S^T @ rows, with S the [N, M] matrix holding the N*k
  selected (token, latent) weights. S^T is built in CSR form, latent-major, from one sort of the
  N*k indices, which both backwards share (`_latent_major`), and multiplied by the sparse-dense
  matmul kernel (MKL on CPU, cuSPARSE on CUDA);
- the gradient of the decoder's per-token weights is W_dec[i] . grad_xhat[n] at the selected
  (n, i) only: a sampled dense-dense matmul (SDDMM) over the same pattern;
- the gradient reaching the input is an embedding bag over the selected encoder rows, and the
  decoder bias's share through the centred input is -(grad b_enc) @ W_enc, a matvec.

Variable counts. A selection rule may pick a different number of latents per token (BatchTopK,
thresholds). Such a selection is passed flat, token-major, with `offsets` [N + 1] (token n's
entries are offsets[n]:offsets[n+1], CSR row pointers); every function here takes the same
`offsets` and then returns flat [nnz] values where the fixed-width form returns [N, k]. The
arithmetic is the same: the fixed-width form is the special case offsets = 0, k, 2k, ...

Nothing here reads a tensor's value on the host: no .item(), no data-dependent shapes.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def _rows_weighted_sum(indices: Tensor, table: Tensor, weights: Tensor, offsets: Tensor | None = None) -> Tensor:
    """out[n] = sum_j weights[n, j] * table[indices[n, j]] (with `offsets`: over token n's entries)."""
    if offsets is None:
        return F.embedding_bag(indices, table, per_sample_weights=weights.to(table.dtype), mode="sum")
    return F.embedding_bag(
        indices, table, offsets, per_sample_weights=weights.to(table.dtype), mode="sum", include_last_offset=True
    )


class _LatentMajor(NamedTuple):
    """The N*k selections of an [N, k] index tensor as CSR patterns: latent-major (S^T, [M, N])
    and token-major (S, [N, M])."""

    order: Tensor  # [N*k] positions in indices.flatten(), grouped by latent
    crow: Tensor  # [M + 1] where each latent's run starts in `order`
    tokens: Tensor  # [N*k] the token (row of indices) of each sorted entry
    columns: Tensor  # [N*k] indices.flatten() in the sparse kernels' index dtype
    token_crow: Tensor  # [N + 1] = 0, k, 2k, ...: S's row pointers


_CACHE_ATTRIBUTE = "_lightning_sae_latent_major"


def _latent_major(indices: Tensor, num_latents: int, offsets: Tensor | None = None) -> _LatentMajor:
    """Sort the selections by latent once per index tensor.

    The result is cached on the index tensor itself (keyed by its version counter), so the
    encoder's and decoder's backwards, which see the same `indices` object, sort only once.
    """
    cached = getattr(indices, _CACHE_ATTRIBUTE, None)
    if cached is not None and cached[0] == indices._version and cached[1] == num_latents:
        return cached[2]
    if offsets is not None:
        result = _latent_major_variable(indices, num_latents, offsets)
    elif indices.device.type == "cpu" and num_latents <= 2**16 and indices.numel() < 2**31 - 1:
        result = _latent_major_numpy(indices, num_latents)
    else:
        result = _latent_major_torch(indices, num_latents)
    try:
        setattr(indices, _CACHE_ATTRIBUTE, (indices._version, num_latents, result))
    except (AttributeError, RuntimeError):  # e.g. tensors that take no Python attributes
        pass
    return result


def _latent_major_torch(indices: Tensor, num_latents: int) -> _LatentMajor:
    n, k = indices.shape
    # int32 indices sort faster and are what the sparse kernels prefer; int64 only when needed.
    small = n * k < 2**31 - 1 and num_latents < 2**31 - 1
    index_dtype = torch.int32 if small else torch.int64
    keys = indices.reshape(-1).to(index_dtype)
    sorted_keys, order = torch.sort(keys, stable=True)
    # crow[m] = number of selections of latents < m, found by binary search: no bincount,
    # whose output size would need the host to read the largest index.
    boundaries = torch.arange(num_latents + 1, device=indices.device, dtype=index_dtype)
    crow = torch.searchsorted(sorted_keys, boundaries, out_int32=small)
    tokens = torch.div(order, k, rounding_mode="floor").to(index_dtype)
    token_crow = torch.arange(0, n * k + 1, k, device=indices.device, dtype=index_dtype)
    return _LatentMajor(order, crow, tokens, keys, token_crow)


def _latent_major_variable(indices: Tensor, num_latents: int, offsets: Tensor) -> _LatentMajor:
    """As `_latent_major_torch` for a flat selection whose tokens have different counts."""
    nnz = indices.numel()
    small = nnz < 2**31 - 1 and num_latents < 2**31 - 1
    index_dtype = torch.int32 if small else torch.int64
    keys = indices.reshape(-1).to(index_dtype)
    sorted_keys, order = torch.sort(keys, stable=True)
    boundaries = torch.arange(num_latents + 1, device=indices.device, dtype=index_dtype)
    crow = torch.searchsorted(sorted_keys, boundaries, out_int32=small)
    token_of_entry = torch.repeat_interleave(
        torch.arange(offsets.numel() - 1, device=indices.device, dtype=index_dtype), offsets.diff(), output_size=nnz
    )
    return _LatentMajor(order, crow, token_of_entry[order], keys, offsets.to(index_dtype))


def _latent_major_numpy(indices: Tensor, num_latents: int) -> _LatentMajor:
    """The CPU path for up to 2^16 latents: NumPy's stable sort of 16-bit keys is a single-threaded
    radix sort, as fast as ATen's parallel one on an idle machine (~1 ms for 131k keys) and
    without its OpenMP barriers, which cost 50-100x more when other processes share the cores."""
    n, k = indices.shape
    flat = indices.detach().reshape(-1).numpy()
    keys = flat.astype(np.uint16)  # values < 2^16 by the caller's check
    order = np.argsort(keys, kind="stable")
    crow = np.zeros(num_latents + 1, dtype=np.int32)
    np.cumsum(np.bincount(keys, minlength=num_latents), out=crow[1:])
    tokens = (order // k).astype(np.int32)
    columns = flat.astype(np.int32)
    token_crow = np.arange(0, n * k + 1, k, dtype=np.int32)
    return _LatentMajor(*(torch.from_numpy(a) for a in (order, crow, tokens, columns, token_crow)))


def _sparse_csr(crow: Tensor, col: Tensor, values: Tensor, size: tuple[int, int]) -> Tensor:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Ss]parse CSR tensor support is in beta.*")
        return torch.sparse_csr_tensor(crow, col, values, size=size, check_invariants=False)


def _scatter_outer(indices: Tensor, weights: Tensor, rows: Tensor, num_latents: int, offsets: Tensor | None = None) -> Tensor:
    """G[m] = sum over (n, j) with indices[n, j] == m of weights[n, j] * rows[n]: a [M, D] gradient.

    Computed as S^T @ rows with S^T in latent-major CSR form: N*k*D multiply-adds, no [N*k, D]
    intermediate (unlike an index_add of per-selection outer products).
    """
    pattern = _latent_major(indices, num_latents, offsets)
    sorted_weights = weights.reshape(-1).to(rows.dtype)[pattern.order]
    transposed = _sparse_csr(pattern.crow, pattern.tokens, sorted_weights, (num_latents, rows.shape[0]))
    # addmm with beta=0 into its own output writes the result once; `A @ rows` would zero-fill
    # a buffer and copy it (two more passes over [M, D]). The CPU kernel does not read an
    # output it is told to overwrite (beta=0); elsewhere start from zeros to be safe.
    empty = torch.empty if rows.device.type == "cpu" else torch.zeros
    out = empty(num_latents, rows.shape[1], dtype=rows.dtype, device=rows.device)
    return torch.addmm(out, transposed, rows, beta=0, out=out)


def selected_dots(indices: Tensor, rows: Tensor, table: Tensor, offsets: Tensor | None = None) -> Tensor:
    """out[n, j] = table[indices[n, j]] . rows[n]: an SDDMM on the selection pattern, [N, k]
    (flat [nnz] for a selection with `offsets`).

    On the CPU, torch.sparse.sampled_addmm (the fastest measured there); elsewhere the
    per-sample-weight gradient of an embedding bag, which is the same product and has native
    kernels on every backend (cuSPARSE's SDDMM wants sorted columns, topk's are not).
    """
    if table.device.type == "cpu":
        return _selected_dots_sddmm(indices, rows, table, offsets)
    return _selected_dots_embedding_bag(indices, rows, table, offsets)


def _selected_dots_embedding_bag(indices: Tensor, rows: Tensor, table: Tensor, offsets: Tensor | None = None) -> Tensor:
    with torch.enable_grad():
        weights = torch.ones(indices.shape, dtype=table.dtype, device=table.device, requires_grad=True)
        out = _rows_weighted_sum(indices, table.detach(), weights, offsets)
        (dots,) = torch.autograd.grad(out, weights, rows)
    return dots


def _selected_dots_sddmm(indices: Tensor, rows: Tensor, table: Tensor, offsets: Tensor | None = None) -> Tensor:
    n, nnz = rows.shape[0], indices.numel()
    cached = getattr(indices, _CACHE_ATTRIBUTE, None)
    if cached is not None and cached[0] == indices._version:
        token_crow, columns = cached[2].token_crow, cached[2].columns
    else:  # only the token-major pattern is needed: no sort
        index_dtype = torch.int32 if nnz < 2**31 - 1 and table.shape[0] < 2**31 - 1 else torch.int64
        if offsets is None:
            token_crow = torch.arange(0, nnz + 1, indices.shape[1], dtype=index_dtype)
        else:
            token_crow = offsets.to(index_dtype)
        columns = indices.reshape(-1).to(index_dtype)
    # sampled_addmm reads its input's values even with beta=0, so they must be zeros.
    if rows.dtype in (torch.float32, torch.float64):
        zeros = torch.from_numpy(np.zeros(nnz, dtype=np.float32 if rows.dtype == torch.float32 else np.float64))
    else:
        zeros = rows.new_zeros(nnz)
    sampled = _sparse_csr(token_crow, columns, zeros, (n, table.shape[0]))
    dots = torch.sparse.sampled_addmm(sampled, rows, table.t(), beta=0.0)
    return dots.values().view(indices.shape)


class SelectedEncoderValues(torch.autograd.Function):
    """values[n, j] = relu(W_enc[i] . (x[n] - b_dec) + b_enc[i]) at i = indices[n, j].

    The forward receives those values already computed by the dense pass (no work is repeated);
    the backward differentiates the formula above with respect to x, b_dec, W_enc and b_enc.
    `b_dec` may be None, in which case `x` is the already-centred input. `offsets` as in the
    module docstring (None: `indices` and `values` are [N, k]).
    """

    @staticmethod
    def forward(
        ctx, x: Tensor, b_dec: Tensor | None, W_enc: Tensor, b_enc: Tensor, indices: Tensor, values: Tensor, offsets: Tensor | None = None,
        relu: bool = True,
    ) -> Tensor:
        ctx.save_for_backward(x, b_dec, W_enc, indices, values, offsets)
        ctx.has_b_dec, ctx.relu = b_dec is not None, relu
        return values.clone()

    @staticmethod
    def backward(ctx, grad_values: Tensor):
        x, b_dec, W_enc, indices, values, offsets = ctx.saved_tensors
        need_x, need_b_dec, need_W, need_b = ctx.needs_input_grad[:4]
        # pre > 0 exactly where the kept value is > 0: relu's derivative at the selection
        # (raw pre-activations, `relu=False`, pass the gradient everywhere).
        grad_pre = (grad_values.masked_fill(values <= 0, 0) if ctx.relu else grad_values).to(W_enc.dtype)
        grad_x = grad_b_dec = grad_W = grad_b = None
        if need_b or need_b_dec:
            grad_b = torch.zeros(W_enc.shape[0], dtype=W_enc.dtype, device=W_enc.device)
            grad_b.index_add_(0, indices.reshape(-1), grad_pre.reshape(-1))
        if need_W:
            centred = x.to(W_enc.dtype)
            if ctx.has_b_dec:
                centred = centred - b_dec.to(W_enc.dtype)
            grad_W = _scatter_outer(indices, grad_pre, centred, W_enc.shape[0], offsets)
        if need_x:
            grad_x = _rows_weighted_sum(indices, W_enc, grad_pre, offsets).to(x.dtype)
        if ctx.has_b_dec and need_b_dec:
            # d/d b_dec of sum_n grad_pre . W_enc (x_n - b_dec) = -sum_m grad_b[m] W_enc[m].
            grad_b_dec = -(grad_b @ W_enc).to(b_dec.dtype)
        if not need_b:
            grad_b = None
        return grad_x, grad_b_dec, grad_W, grad_b, None, None, None, None


def selected_encoder_values(
    x_centered: Tensor, W_enc: Tensor, b_enc: Tensor, indices: Tensor, values: Tensor, offsets: Tensor | None = None, relu: bool = True
) -> Tensor:
    """Differentiable relu(W_enc[i] . x_centered[n] + b_enc[i]) at the selected (n, i), given
    their already computed `values` (without the relu when `relu` is False)."""
    return SelectedEncoderValues.apply(x_centered, None, W_enc, b_enc, indices, values, offsets, relu)


def selected_encoder_values_centering(
    x: Tensor, b_dec: Tensor, W_enc: Tensor, b_enc: Tensor, indices: Tensor, values: Tensor, offsets: Tensor | None = None, relu: bool = True
) -> Tensor:
    """As `selected_encoder_values(x - b_dec, ...)`, without the [N, D] gradient of the centred
    input when only b_dec needs it (x is data): b_dec's gradient is then one [M] x [M, D] matvec."""
    return SelectedEncoderValues.apply(x, b_dec, W_enc, b_enc, indices, values, offsets, relu)


class SparseDecode(torch.autograd.Function):
    """out[n] = sum_j values[n, j] * W_dec[indices[n, j]] (no bias)."""

    @staticmethod
    def forward(ctx, indices: Tensor, values: Tensor, W_dec: Tensor, offsets: Tensor | None = None) -> Tensor:
        ctx.save_for_backward(indices, values, W_dec, offsets)
        return _rows_weighted_sum(indices, W_dec, values, offsets)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        indices, values, W_dec, offsets = ctx.saved_tensors
        grad_out = grad_out.to(W_dec.dtype)
        grad_values = grad_W = None
        if ctx.needs_input_grad[1]:
            grad_values = selected_dots(indices, grad_out, W_dec, offsets).to(values.dtype)
        if ctx.needs_input_grad[2]:
            grad_W = _scatter_outer(indices, values, grad_out, W_dec.shape[0], offsets)
        return None, grad_values, grad_W, None


def sparse_decode(indices: Tensor, values: Tensor, W_dec: Tensor, offsets: Tensor | None = None) -> Tensor:
    """sum_j values[n, j] * W_dec[indices[n, j]] (over token n's entries with `offsets`), without
    the decoder bias."""
    return SparseDecode.apply(indices, values, W_dec, offsets)
