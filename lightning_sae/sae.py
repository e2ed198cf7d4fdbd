"""The TopK sparse autoencoder (SPEC section 1): weights, encode, decode, its own losses.

sparsify's SparseCoder is the model: the SAE computes its reconstruction, FVU and AuxK against
whatever target it is given, so a training module only composes SAEs, optimisers and logging.
Which latents fire is its `selector`'s decision (lightning_sae.selection); TopK by default.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from lightning_sae.metrics import fraction_of_variance_unexplained
from lightning_sae.selection import Encoding, Selection, Selector, TopK
from lightning_sae.sparse_ops import selected_encoder_values, selected_encoder_values_centering, sparse_decode


@dataclass
class SparseCode:
    """The latents that fire and their values. Fixed width: `indices` and `values` are [N, k].
    Variable width (`offsets` given): both are flat [nnz], token-major, token n's entries at
    offsets[n]:offsets[n + 1]."""

    indices: Tensor
    values: Tensor
    offsets: Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return self.indices.shape[0] if self.offsets is None else self.offsets.numel() - 1

    def token_ids(self) -> Tensor:
        """The token of every entry, flat [nnz]."""
        if self.offsets is None:
            n, k = self.indices.shape
            return torch.arange(n, device=self.indices.device).repeat_interleave(k)
        counts = self.offsets.diff()
        return torch.arange(self.num_tokens, device=self.indices.device).repeat_interleave(counts, output_size=self.indices.numel())

    def active_per_token(self) -> Tensor:
        """[N] number of latents with a value > 0 on each token (float)."""
        active = (self.values.detach() > 0).float()
        if self.offsets is None:
            return active.sum(1)
        return torch.zeros(self.num_tokens, device=active.device).index_add_(0, self.token_ids(), active)

    def to_dense(self, d_sae: int) -> Tensor:
        """The [N, d_sae] latent vector z (for analysis and checks, not for training)."""
        z = torch.zeros(self.num_tokens, d_sae, dtype=self.values.dtype, device=self.values.device)
        if self.offsets is None:
            return z.scatter(1, self.indices, self.values)
        return z.index_put((self.token_ids(), self.indices.reshape(-1)), self.values.reshape(-1))


@dataclass
class SAEOutput:
    """One forward of an SAE on a batch: what it reconstructed, how, and its losses (fp32)."""

    xhat: Tensor
    code: SparseCode
    fvu: Tensor  # ||target - xhat||^2 / ||target - mean(target)||^2 over the batch
    auxk_loss: Tensor  # OpenAI's AuxK: dead latents regressing the residual; 0 without dead ones
    loss_terms: dict[str, Tensor] = field(default_factory=dict)  # the selector's, unweighted


class TopKSAE(nn.Module):
    """pre = relu(W_enc (x - b_dec) + b_enc); the selector keeps some latents (k per token for
    TopK); xhat = sum_i z_i W_dec[i] + b_dec.

    W_enc is [d_sae, d_in] (nn.Linear orientation) and W_dec is [d_sae, d_out] with unit-norm
    rows; d_out = d_in for an autoencoder. Subclasses (e.g. a transcoder, whose target is another
    tensor) set `centers_input = False` when b_dec is not in the input's space, and may override
    `decode` to add terms.
    """

    centers_input: bool = True

    def __init__(self, d_in: int, d_sae: int, k: int, seed: int | None = None, selector: Selector | None = None, d_out: int | None = None):
        super().__init__()
        d_out = d_in if d_out is None else d_out
        if d_in < 1 or d_sae < 1 or d_out < 1:
            raise ValueError(f"d_in, d_out and d_sae must be positive, got d_in={d_in}, d_out={d_out}, d_sae={d_sae}")
        if not 1 <= k <= d_sae:
            raise ValueError(f"k must satisfy 1 <= k <= d_sae ({d_sae}), got k={k}")
        self.d_in, self.d_out, self.d_sae, self.k = d_in, d_out, d_sae, k
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        W_dec = torch.randn(d_sae, d_out, generator=generator)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(W_dec)
        if d_out == d_in:  # the encoder starts as the decoder's transpose (OpenAI, sparsify)
            W_enc = W_dec.clone()
        else:
            W_enc = torch.randn(d_sae, d_in, generator=generator)
            W_enc /= W_enc.norm(dim=1, keepdim=True)
        self.W_enc = nn.Parameter(W_enc)
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.b_dec = nn.Parameter(torch.zeros(d_out))
        self.selector = TopK() if selector is None else selector
        self.selector.setup(self)

    # ---- encode -------------------------------------------------------------------------------
    def _input_bias(self, dtype: torch.dtype) -> Tensor | None:
        return self.b_dec.to(dtype) if self.centers_input else None

    @torch.no_grad()
    def pre_activations(self, x: Tensor, relu: bool = True) -> Tensor:
        """Dense relu pre-activations [N, d_sae] for scoring (raw ones with `relu=False`, for a
        selector that asks: `Selector.relu_pre`); carries no autograd graph.

        The only dense matmul of the step. addmm writes its [N, d_sae] result once and relu runs
        in place on it, so the step allocates one [N, d_sae] tensor, not two.
        """
        dtype = x.dtype
        bias = self._input_bias(dtype)
        centred = x - bias if bias is not None else x
        pre = torch.addmm(self.b_enc.to(dtype), centred, self.W_enc.to(dtype).t())
        return pre.relu_() if relu else pre

    def encode_selected(self, x: Tensor, indices: Tensor | Selection, pre: Tensor, relu: bool = True) -> Tensor:
        """Differentiable encoder values of the selected latents ([N, k], or flat [nnz] for a
        `Selection`), reusing the dense `pre` of the same x (raw, not relu'd, with `relu=False`)."""
        if isinstance(indices, Selection):
            tokens = torch.arange(x.shape[0], device=x.device).repeat_interleave(indices.offsets.diff(), output_size=indices.indices.numel())
            return self._differentiable_values(x, indices.indices, pre[tokens, indices.indices], indices.offsets, relu)
        return self._differentiable_values(x, indices, pre.gather(1, indices), relu=relu)

    def code(self, x: Tensor, selection: Tensor | Selection, pre: Tensor) -> SparseCode:
        """The SparseCode of a selection (what `select` returned) on x."""
        values = self.encode_selected(x, selection, pre)
        if isinstance(selection, Selection):
            return SparseCode(selection.indices, values, selection.offsets)
        return SparseCode(selection, values)

    def _differentiable_values(self, x: Tensor, indices: Tensor, values: Tensor, offsets: Tensor | None = None, relu: bool = True) -> Tensor:
        """`values` (the dense pass's, at `indices`) re-attached to the encoder's autograd graph."""
        bias = self._input_bias(x.dtype)
        if bias is None:
            return selected_encoder_values(x, self.W_enc, self.b_enc, indices, values, offsets, relu)
        return selected_encoder_values_centering(x, bias, self.W_enc, self.b_enc, indices, values, offsets, relu)

    def select(self, pre: Tensor, grad: Tensor | None = None, selector: Selector | None = None) -> Tensor | Selection:
        """Which latents fire: `selector` (default: this SAE's own) on the pre-activations."""
        return (self.selector if selector is None else selector).select(pre, self, grad)

    def encode_with_pre(self, x: Tensor, grad: Tensor | None = None, selector: Selector | None = None) -> tuple[SparseCode, Tensor]:
        encoding = self.encoding(x, grad, selector)
        return self.code_of(encoding), encoding.pre

    def encoding(self, x: Tensor, grad: Tensor | None = None, selector: Selector | None = None) -> Encoding:
        """The selector's rule on x (`Selector.encode`): selection, encoder values, activation."""
        selector = self.selector if selector is None else selector
        pre = self.pre_activations(x, relu=selector.relu_pre)
        relu = selector.relu_pre
        return selector.encode(pre, self, grad, lambda selection: self.encode_selected(x, selection, pre, relu))

    @staticmethod
    def code_of(encoding: Encoding) -> SparseCode:
        return SparseCode(encoding.latents, encoding.values, encoding.offsets)

    def decoder_norms(self) -> Tensor:
        """[d_sae] decoder row norms, graph-carrying (what norm-weighted penalties multiply by)."""
        return torch.linalg.vector_norm(self.W_dec, dim=1)

    def encode(self, x: Tensor, grad: Tensor | None = None, selector: Selector | None = None) -> SparseCode:
        return self.encode_with_pre(x, grad, selector)[0]

    # ---- decode -------------------------------------------------------------------------------
    def saelens_architecture(self) -> str:
        """The SAELens architecture this SAE is exported as (and named in SAEBench output): the
        selector's inference rule ("topk", "jumprelu" for a threshold); subclasses that are another
        kind of SAE (a transcoder) override it."""
        return self.selector.saelens_export(self).architecture

    def decode_latents(self, code: SparseCode) -> Tensor:
        """sum_i z_i W_dec[i]: the decoder without its bias (what AuxK's residual model uses)."""
        return sparse_decode(code.indices, code.values, self.W_dec, code.offsets)

    def decode(self, code: SparseCode, x: Tensor | None = None) -> Tensor:
        """The reconstruction. `x` is the input the code came from, for subclasses whose output
        depends on it directly (a transcoder's skip connection); the SAE ignores it."""
        return self.decode_latents(code) + self.b_dec

    def dense_latents(self, code: SparseCode) -> Tensor:
        return code.to_dense(self.d_sae)

    # ---- the losses ---------------------------------------------------------------------------
    def forward(
        self,
        x: Tensor,
        target: Tensor | None = None,
        *,
        grad: Tensor | None = None,
        dead_mask: Tensor | None = None,
        aux_k: int | None = None,
        selector: Selector | None = None,
    ) -> SAEOutput:
        """Encode x, decode, and score against `target` (default x): FVU, and AuxK when
        `dead_mask` [d_sae] marks dead latents (None: no latent is known dead, AuxK = 0).

        aux_k: latents AuxK uses per token; None gives d_out / 2 (OpenAI's k_aux = d_model / 2).
        """
        target = x if target is None else target
        selector = self.selector if selector is None else selector
        encoding = self.encoding(x, grad, selector)
        code, pre = self.code_of(encoding), encoding.pre
        xhat = self.decode(code, x)
        terms = selector.loss_terms(encoding, self) if selector.has_loss_terms() else {}
        del encoding
        # AuxK is the last use of the dense [N, M] `pre`: it overwrites it, and it is freed
        # before the loss's [N, D] temporaries are made. Nothing dense is kept for backward.
        # (The selector's `loss_terms` ran before: the one contract on `pre` is not to keep it.)
        auxk = self.auxk_loss(x, target, xhat, pre, dead_mask, aux_k, consume_pre=True)
        del pre
        fvu = fraction_of_variance_unexplained(target.float(), xhat.float())
        return SAEOutput(xhat, code, fvu, auxk, terms)

    def auxk_loss(
        self,
        x: Tensor,
        target: Tensor,
        xhat: Tensor,
        pre: Tensor,
        dead_mask: Tensor | None,
        aux_k: int | None = None,
        consume_pre: bool = False,
    ) -> Tensor:
        """Dead latents regress the main residual target - xhat (OpenAI's AuxK), scaled by
        min(n_dead / k_aux, 1); branch-free, zero when none is dead. With `consume_pre` the
        caller's `pre` is overwritten (live latents set to -1) instead of copied."""
        if dead_mask is None:
            return x.new_zeros((), dtype=torch.float32)
        k_aux = min(aux_k or self.d_out // 2, self.d_sae)
        masked = pre.masked_fill_(~dead_mask, -1.0) if consume_pre else pre.masked_fill(~dead_mask, -1.0)
        top = masked.topk(k_aux, dim=1, sorted=False)
        # A live latent picked because fewer than k_aux are dead has -1 here: clamped to 0 it adds
        # nothing and gets no gradient, the same as multiplying by dead[indices].
        values = self._differentiable_values(x, top.indices, top.values.clamp_min(0))
        residual = (target - xhat).detach().float()
        residual_hat = sparse_decode(top.indices, values, self.W_dec).float()
        aux = fraction_of_variance_unexplained(residual, residual_hat)
        scale = (dead_mask.sum() / k_aux).clamp(max=1.0)
        return torch.nan_to_num(scale * aux, nan=0.0)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        if not self.selector.unit_norm_decoder:  # a rule whose penalty uses the row norms (L1)
            return
        norms = torch.linalg.vector_norm(self.W_dec, dim=1, keepdim=True)
        self.W_dec.div_(norms.clamp_min_(torch.finfo(self.W_dec.dtype).tiny))

    @torch.no_grad()
    def remove_gradient_parallel_to_decoder(self) -> None:
        """Adam would otherwise spend its step on the radial component that renormalisation undoes."""
        if self.W_dec.grad is None or not self.selector.unit_norm_decoder:
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
