"""The TopK sparse autoencoder (SPEC section 1): weights, encode, decode, decoder maintenance."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lightning_sae.sparse_ops import selected_encoder_values_centering, sparse_decode


@dataclass
class SparseCode:
    indices: Tensor  # [N, k] selected latents
    values: Tensor  # [N, k] their encoder activations (with sparse gradients)


class TopKSAE(nn.Module):
    """pre = relu(W_enc (x - b_dec) + b_enc); keep k latents; xhat = sum_i z_i W_dec[i] + b_dec.

    W_enc is [d_sae, d_in] (nn.Linear orientation) and W_dec is [d_sae, d_in] with unit-norm rows.
    Which k latents are kept is decided by the caller (a selection plugin); the kept values are
    always the encoder's.
    """

    def __init__(self, d_in: int, d_sae: int, k: int, seed: int | None = None):
        super().__init__()
        if d_in < 1 or d_sae < 1:
            raise ValueError(f"d_in and d_sae must be positive, got d_in={d_in}, d_sae={d_sae}")
        if not 1 <= k <= d_sae:
            raise ValueError(f"k must satisfy 1 <= k <= d_sae ({d_sae}), got k={k}")
        self.d_in, self.d_sae, self.k = d_in, d_sae, k
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        W_dec = torch.randn(d_sae, d_in, generator=generator)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(W_dec)
        self.W_enc = nn.Parameter(W_dec.clone())
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.b_dec = nn.Parameter(torch.zeros(d_in))

    @torch.no_grad()
    def pre_activations(self, x: Tensor) -> Tensor:
        """Dense relu pre-activations [N, d_sae] for scoring; carries no autograd graph.

        The only dense matmul of the step. addmm writes its [N, d_sae] result once and relu runs
        in place on it, so the step allocates one [N, d_sae] tensor, not two.
        """
        dtype = x.dtype
        centred = x - self.b_dec.to(dtype)
        return torch.addmm(self.b_enc.to(dtype), centred, self.W_enc.to(dtype).t()).relu_()

    def encode_selected(self, x: Tensor, indices: Tensor, pre: Tensor) -> Tensor:
        """Differentiable encoder values at `indices`, reusing the dense `pre` of the same x."""
        values = pre.gather(1, indices)
        return selected_encoder_values_centering(x, self.b_dec.to(x.dtype), self.W_enc, self.b_enc, indices, values)

    def topk_indices(self, score: Tensor) -> Tensor:
        return score.topk(self.k, dim=1, sorted=False).indices

    def encode(self, x: Tensor) -> SparseCode:
        """Plain TopK encoding (selection by the pre-activations themselves)."""
        pre = self.pre_activations(x)
        indices = self.topk_indices(pre)
        return SparseCode(indices, self.encode_selected(x, indices, pre))

    def decode(self, code: SparseCode) -> Tensor:
        return sparse_decode(code.indices, code.values, self.W_dec) + self.b_dec

    def dense_latents(self, code: SparseCode) -> Tensor:
        """The [N, d_sae] latent vector z (for analysis and export checks, not for training)."""
        z = torch.zeros(code.indices.shape[0], self.d_sae, dtype=code.values.dtype, device=code.values.device)
        return z.scatter(1, code.indices, code.values)

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        norms = torch.linalg.vector_norm(self.W_dec, dim=1, keepdim=True)
        self.W_dec.div_(norms.clamp_min_(torch.finfo(self.W_dec.dtype).tiny))

    @torch.no_grad()
    def remove_gradient_parallel_to_decoder(self) -> None:
        """Adam would otherwise spend its step on the radial component that renormalisation undoes."""
        if self.W_dec.grad is None:
            return
        # Row-wise dot products without an [M, D] temporary, then an in-place update.
        parallel = torch.linalg.vecdot(self.W_dec.grad, self.W_dec, dim=1).unsqueeze(1)
        self.W_dec.grad.addcmul_(parallel, self.W_dec, value=-1)

    @torch.no_grad()
    def initialize_decoder_bias(self, x: Tensor, method: str = "geometric_median") -> None:
        if method == "geometric_median":
            self.b_dec.copy_(geometric_median(x.float()))
        elif method == "mean":
            self.b_dec.copy_(x.float().mean(0))
        elif method != "zeros":
            raise ValueError(f"b_dec_init must be 'geometric_median', 'mean' or 'zeros', got {method!r}")


@torch.no_grad()
def geometric_median(points: Tensor, iterations: int = 50, tolerance: float = 1e-6) -> Tensor:
    """Weiszfeld's algorithm: the point minimising the sum of Euclidean distances."""
    median = points.mean(0)
    for _ in range(iterations):
        distances = (points - median).norm(dim=1).clamp_min(1e-8)
        weights = 1.0 / distances
        updated = (weights[:, None] * points).sum(0) / weights.sum()
        moved = (updated - median).norm()
        median = updated
        if moved <= tolerance * median.norm().clamp_min(1.0):
            break
    return median
