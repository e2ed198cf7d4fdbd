"""The transcoder: a TopK sparse coder that encodes one tensor and predicts another.

    pre  = relu(W_enc x + b_enc)                       x: an MLP's input (mlp_in)
    z    = the selector's latents of pre (TopK by default)
    yhat = sum_i z_i W_dec[i] + b_dec (+ W_skip x)     predicts the MLP's output (mlp_out)

As sparsify's SparseCoder with `transcode=True`: the input is not centred by b_dec (b_dec lives
in the output's space), the decoder starts at zero and is not kept at unit norm (its rows carry
the output's scale), and the optional skip connection is a [d_out, d_in] matrix starting at zero.
Everything else (sparse encoder and decoder, AuxK against the target, selectors) is TopKSAE's.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_sae.sae import SparseCode, TopKSAE
from lightning_sae.selection import Selector


class Transcoder(TopKSAE):
    """`TopKSAE` with its target in another space. `skip_connection` adds W_skip x to the output;
    `normalize_decoder` keeps the decoder rows at unit norm as an SAE's are (default: free, as
    sparsify's transcoders are)."""

    centers_input = False

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        k: int,
        seed: int | None = None,
        selector: Selector | None = None,
        d_out: int | None = None,
        skip_connection: bool = False,
        normalize_decoder: bool = False,
    ):
        super().__init__(d_in, d_sae, k, seed=seed, selector=selector, d_out=d_out)
        self.skip_connection, self.unit_decoder = skip_connection, normalize_decoder
        with torch.no_grad():
            # The encoder is not tied to the decoder: they live in different spaces.
            generator = torch.Generator().manual_seed(seed + 1) if seed is not None else None
            W_enc = torch.randn(d_sae, d_in, generator=generator)
            self.W_enc.copy_(W_enc / W_enc.norm(dim=1, keepdim=True))
            if not normalize_decoder:
                self.W_dec.zero_()  # sparsify's transcoder initialisation
        self.W_skip = nn.Parameter(torch.zeros(self.d_out, d_in)) if skip_connection else None

    def saelens_architecture(self) -> str:
        # SAELens runs a transcoder with JumpReLU (lightning_sae_transcoder.formats says why).
        return "jumprelu_skip_transcoder" if self.skip_connection else "jumprelu_transcoder"

    def decode(self, code: SparseCode, x: Tensor | None = None) -> Tensor:
        out = self.decode_latents(code) + self.b_dec
        if self.W_skip is not None:
            if x is None:
                raise ValueError("a transcoder with a skip connection decodes from its input: pass x")
            out = out + x.to(self.W_skip.dtype) @ self.W_skip.T
        return out

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        if self.unit_decoder:
            super().normalize_decoder()

    @torch.no_grad()
    def remove_gradient_parallel_to_decoder(self) -> None:
        if self.unit_decoder:
            super().remove_gradient_parallel_to_decoder()
