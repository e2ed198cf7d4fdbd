"""The cross-layer transcoder (Ameisen et al. 2025, "Circuit tracing").

For the layers 0..L-1 it covers (the listed layers, in order):

    pre_l  = relu(W_enc^l x_l + b_enc^l)                  x_l: layer l's MLP input
    a_l    = the selector's latents of pre_l             (TopK: k per layer and token)
    yhat_m = b_dec^m + sum_{l <= m} W_dec^{l->m} a_l      predicts layer m's MLP output y_m
    loss   = sum_m FVU(y_m, yhat_m) + aux_coefficient * sum_l AuxK_l

Layer l is a `CLTLayer`: a TopKSAE whose output is the concatenation of the L - l MLP outputs it
writes to, so its W_dec is [d_sae, (L - l) * d_out] and feature i's row is [W_dec^{l->l}_i,
W_dec^{l->l+1}_i, ...], circuit-tracer's `W_dec_l` [d_sae, L - l, d_out] flattened. Encoding, any
selector, the sparse decoder and its sparse backward (N * k * (L - l) * d_out work per layer) are
therefore the core's. The output biases b_dec^m live here, one per output layer.

The reconstruction term is the SPEC's sum over layers of squared errors with each layer divided by
its output's variance over the batch (its FVU): MLP outputs differ in scale by orders of magnitude
between layers, and an unweighted sum would train only the loudest. With one layer the loss is
exactly the per-layer transcoder's (FVU + AuxK).

AuxK for layer l: its dead latents (top aux_k of their pre-activations) regress the residual of
every output they write to, the concatenation of y_m - yhat_m for m >= l (detached), normalized as
the core's AuxK; with one layer it is the transcoder's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_sae.calibration import calibrate_threshold
from lightning_sae.metrics import fraction_of_variance_unexplained
from lightning_sae.sae import SparseCode, TopKSAE
from lightning_sae.selection import Encoding, Selector


class CLTLayer(TopKSAE):
    """The features of one layer: they encode that layer's MLP input and decode to the MLP outputs
    of `n_outputs` layers (this one and the later ones), concatenated. Initialised as the
    per-layer transcoder is (random unit encoder rows, zero decoder); no bias of its own."""

    centers_input = False

    def __init__(self, d_in: int, d_sae: int, k: int, n_outputs: int, d_out: int, seed: int | None = None, selector: Selector | None = None):
        super().__init__(d_in, d_sae, k, seed=seed, selector=selector, d_out=n_outputs * d_out)
        self.n_outputs, self.d_model_out = n_outputs, d_out
        with torch.no_grad():
            generator = torch.Generator().manual_seed(seed + 1) if seed is not None else None
            W_enc = torch.randn(d_sae, d_in, generator=generator)
            self.W_enc.copy_(W_enc / W_enc.norm(dim=1, keepdim=True))
            self.W_dec.zero_()
        self.b_dec = None  # the output biases are the CLT's (one per output layer, not per source)

    def decoder(self) -> Tensor:
        """W_dec as [d_sae, n_outputs, d_out] (circuit-tracer's W_dec_l)."""
        return self.W_dec.view(self.d_sae, self.n_outputs, self.d_model_out)

    def decoder_norms(self) -> Tensor:
        """||W_dec_i|| over all the outputs feature i writes to, concatenated [d_sae]."""
        return torch.linalg.vector_norm(self.W_dec, dim=1)

    def saelens_architecture(self) -> str:
        return "cross_layer_transcoder"

    def normalize_decoder(self) -> None:  # free decoder rows, as a transcoder's
        pass

    def remove_gradient_parallel_to_decoder(self) -> None:
        pass


@dataclass
class CLTOutput:
    """One CLT forward: per output layer the prediction, per source layer the code, and (with
    targets) per layer the FVU and AuxK terms."""

    yhats: list[Tensor]
    codes: list[SparseCode]
    fvu: Tensor | None  # [L]
    auxk: Tensor | None  # [L]; zeros where nothing is dead
    loss_terms: list[dict[str, Tensor]] | None = None  # per layer, its selector's (unweighted; training only)


class CrossLayerTranscoder(nn.Module):
    """L `CLTLayer`s and the output biases b_dec [L, d_out].

    `calibrated_threshold` [L] (NaN until set) is the JumpReLU threshold per layer that an export
    to a reader without TopK (circuit-tracer 0.5.0) uses; see `calibrate_thresholds`."""

    def __init__(self, n_layers: int, d_in: int, d_out: int, d_sae: int, k: int, seed: int = 0, selector: Selector | None = None):
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"a cross-layer transcoder needs at least one layer, got {n_layers}")
        import copy

        self.n_layers, self.d_in, self.d_out, self.d_sae, self.k = n_layers, d_in, d_out, d_sae, k
        self.layers = nn.ModuleList(
            CLTLayer(d_in, d_sae, k, n_layers - layer, d_out, seed=seed + layer, selector=copy.deepcopy(selector) if selector is not None else None)
            for layer in range(n_layers)
        )
        self.b_dec = nn.Parameter(torch.zeros(n_layers, d_out))
        self.register_buffer("calibrated_threshold", torch.full((n_layers,), float("nan"), dtype=torch.float64))

    # ---- the function ---------------------------------------------------------------------------------
    def encodings(self, xs: list[Tensor], grads: list[Tensor | None] | None = None, selector: Selector | None = None) -> list[Encoding]:
        """Every layer's selector rule on its input (`Selector.encode`: selection, encoder values,
        activation; a learned rule's threshold gets its gradient through the values)."""
        self._check_layers(xs)
        grads = grads if grads is not None else [None] * self.n_layers
        return [layer.encoding(x, grad, selector) for layer, x, grad in zip(self.layers, xs, grads)]

    def encode_with_pre(self, xs: list[Tensor], grads: list[Tensor | None] | None = None, selector: Selector | None = None) -> tuple[list[SparseCode], list[Tensor]]:
        encodings = self.encodings(xs, grads, selector)
        return [TopKSAE.code_of(encoding) for encoding in encodings], [encoding.pre for encoding in encodings]

    def encode(self, xs: list[Tensor], grads: list[Tensor | None] | None = None, selector: Selector | None = None) -> list[SparseCode]:
        return self.encode_with_pre(xs, grads, selector)[0]

    def decode(self, codes: list[SparseCode]) -> list[Tensor]:
        """yhat_m = b_dec^m + sum_{l <= m} W_dec^{l->m} a_l for every output layer m."""
        n = codes[0].num_tokens
        total = self.b_dec.unsqueeze(0).expand(n, self.n_layers, self.d_out)
        for source, (layer, code) in enumerate(zip(self.layers, codes)):
            written = layer.decode_latents(code).view(n, self.n_layers - source, self.d_out)
            # Only the outputs at or after the source layer receive its features.
            total = total + F.pad(written.to(total.dtype), (0, 0, source, 0))
        return list(total.unbind(1))

    def forward(
        self,
        xs: list[Tensor],
        ys: list[Tensor] | None = None,
        *,
        grads: list[Tensor | None] | None = None,
        dead_masks: list[Tensor | None] | None = None,
        aux_k: int | None = None,
        selector: Selector | None = None,
    ) -> CLTOutput:
        """Encode every layer's input, predict every layer's output and, given the targets `ys`,
        score them: FVU per layer and AuxK per source layer (with `dead_masks`)."""
        encodings = self.encodings(xs, grads, selector)
        codes = [TopKSAE.code_of(encoding) for encoding in encodings]
        yhats = self.decode(codes)
        if ys is None:
            return CLTOutput(yhats, codes, None, None)
        self._check_layers(ys)
        terms = []
        for layer, encoding in zip(self.layers, encodings):
            rule = layer.selector if selector is None else selector
            # A learned rule's sparsity penalty (JumpReLU's L0 or tanh(c ||W_dec,i|| a_i), with the
            # norm of feature i's decoders to every later layer concatenated: `decoder_norms`).
            terms.append(rule.loss_terms(encoding, layer) if self.training and rule.has_loss_terms() else {})
        pres = [encoding.pre for encoding in encodings]
        del encodings
        dead_masks = dead_masks if dead_masks is not None else [None] * self.n_layers
        auxk = []
        for source, (layer, pre, dead) in enumerate(zip(self.layers, pres, dead_masks)):
            if dead is None:
                auxk.append(xs[source].new_zeros((), dtype=torch.float32))
                continue
            # The residual of every output this layer writes to, in its decoder's concatenated layout.
            target = torch.cat([y.to(yhats[0].dtype) for y in ys[source:]], dim=1)
            predicted = torch.cat(yhats[source:], dim=1)
            auxk.append(layer.auxk_loss(xs[source], target, predicted, pre, dead, aux_k or self.d_out // 2, consume_pre=True))
        del pres
        fvu = torch.stack([fraction_of_variance_unexplained(y.float(), yhat.float()) for y, yhat in zip(ys, yhats)])
        return CLTOutput(yhats, codes, fvu, torch.stack(auxk), terms)

    def _check_layers(self, tensors: list[Tensor]) -> None:
        if len(tensors) != self.n_layers:
            raise ValueError(f"the cross-layer transcoder has {self.n_layers} layers, got {len(tensors)} tensors")

    # ---- export support --------------------------------------------------------------------------------
    @torch.no_grad()
    def calibrate_thresholds(self, xs: list[Tensor]) -> Tensor:
        """Sets `calibrated_threshold` from rows of every layer's input: per layer, the threshold
        at which a JumpReLU keeps k latents per token on average there (core's
        `calibrate_threshold`, the transcoder export's too). Returns it."""
        self._check_layers(xs)
        values = [calibrate_threshold(layer, x, layer.k)["threshold"] for layer, x in zip(self.layers, xs)]
        self.calibrated_threshold.copy_(torch.tensor(values, dtype=torch.float64))
        return self.calibrated_threshold
