"""JumpReLU (Rajamanoharan et al. 2024, "Jumping Ahead"; the rule of Gemma Scope), written as a
third party would: only the public contract of `lightning_sae.selection` is used.

    pre = W_enc (x - b_dec) + b_enc          (raw: `relu_pre = False`)
    z_i = pre_i * H(pre_i - theta_i)         theta: one learned threshold per latent
    loss = reconstruction + lambda_t * mean_tokens sum_i H(pre_i - theta_i)

The thresholds are an `nn.Parameter` of the selector, trained by the SAE's optimizer through the
straight-through pseudo-derivative the contract's `jump_relu` / `heaviside` implement (rectangle
kernel, `bandwidth`). The convention is SAELens's `JumpReLUTrainingSAE` (sae_lens 6.5x): the
threshold itself is the parameter (init 0.01, projected onto >= 0 before every training step),
bandwidth 0.05, the L0 term "step" (or Anthropic's "tanh"), coefficient `l0_coefficient` warmed
up over `l0_warm_up_steps`. `parameterization="log"` trains log(theta) instead, as DeepMind's
paper and SPEC section 6 write it.

Training selects every entry with pre > theta - bandwidth / 2: those in the kernel's lower
half-window are gated to 0 by `jump_relu` (they fire nowhere) but the decoder's backward gives
them dL/dz, which the threshold's pseudo-derivative needs. Evaluation selects pre > theta.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from lightning_sae.selection import Coefficient, Encoding, SAELensExport, Selection, Selector, heaviside, jump_relu

if TYPE_CHECKING:
    from lightning_sae.sae import TopKSAE

KERNEL_HALF_WIDTH = 0.5  # the rectangle kernel is nonzero for |u| < 1/2
SPARSITY_LOSSES = ("step", "tanh")


class JumpReLU(Selector):
    """Per-latent learned thresholds with an L0 (or tanh) sparsity penalty.

    Args:
        init_threshold: every latent's threshold at the start (SAELens's jumprelu_init_threshold).
        bandwidth: width eps of the rectangle kernel of the pseudo-derivatives.
        l0_coefficient: weight of the sparsity term `l0_loss` (relative to the module's
            reconstruction loss: FVU by default, SAELens's summed MSE with reconstruction_objective=mse).
        l0_warm_up_steps: optimizer steps over which that weight rises linearly from 0.
        sparsity_loss: "step" (DeepMind's L0) or "tanh" (Anthropic's: sum tanh(c z ||W_dec||)).
        tanh_scale: c of the "tanh" penalty.
        straight_through_to_input: the pseudo-derivative also reaches the pre-activations (and so
            the encoder), as Anthropic's setup; False is DeepMind's (threshold only).
        parameterization: "direct" (theta is the parameter, SAELens) or "log" (log theta).
    """

    relu_pre = False
    saelens_architectures = ("jumprelu",)
    saelens_training_architectures = ("jumprelu",)

    def __init__(
        self,
        init_threshold: float = 0.01,
        bandwidth: float = 0.05,
        l0_coefficient: float = 1.0,
        l0_warm_up_steps: int = 0,
        sparsity_loss: str = "step",
        tanh_scale: float = 4.0,
        straight_through_to_input: bool = False,
        parameterization: str = "direct",
    ):
        super().__init__()
        if init_threshold < 0 or (parameterization == "log" and init_threshold <= 0):
            raise ValueError(f"init_threshold must be >= 0 (> 0 for the log parameterization), got {init_threshold}")
        if bandwidth <= 0:
            raise ValueError(f"bandwidth must be > 0, got {bandwidth}")
        if l0_coefficient < 0 or l0_warm_up_steps < 0:
            raise ValueError(f"l0_coefficient and l0_warm_up_steps must be >= 0, got {l0_coefficient}, {l0_warm_up_steps}")
        if sparsity_loss not in SPARSITY_LOSSES:
            raise ValueError(f"sparsity_loss must be one of {SPARSITY_LOSSES}, got {sparsity_loss!r}")
        if parameterization not in ("direct", "log"):
            raise ValueError(f"parameterization must be 'direct' or 'log', got {parameterization!r}")
        self.init_threshold, self.bandwidth = float(init_threshold), float(bandwidth)
        self.l0_coefficient, self.l0_warm_up_steps = float(l0_coefficient), int(l0_warm_up_steps)
        self.sparsity_loss, self.tanh_scale = sparsity_loss, float(tanh_scale)
        self.straight_through_to_input, self.parameterization = bool(straight_through_to_input), parameterization
        # [d_sae] once an SAE takes the selector (`setup`); empty in the prototype.
        setattr(self, self._parameter_name(), nn.Parameter(torch.zeros(0)))

    def _parameter_name(self) -> str:
        return "threshold" if self.parameterization == "direct" else "log_threshold"

    def setup(self, sae: "TopKSAE") -> None:
        parameter = getattr(self, self._parameter_name())
        if parameter.numel() != sae.d_sae:  # keep a loaded or copied one
            start = self.init_threshold if self.parameterization == "direct" else math.log(self.init_threshold)
            setattr(self, self._parameter_name(), nn.Parameter(torch.full((sae.d_sae,), start, device=sae.W_dec.device)))

    def thresholds(self) -> Tensor:
        """theta [d_sae], carrying the graph to the parameter."""
        return self.threshold if self.parameterization == "direct" else self.log_threshold.exp()

    # ---- the rule -----------------------------------------------------------------------------
    def select(self, pre: Tensor, sae: "TopKSAE", grad: Tensor | None) -> Selection:
        learning = self.training and torch.is_grad_enabled()
        with torch.no_grad():
            if learning and self.parameterization == "direct":
                # SAELens's projection: below 0 the gate would pass negative pre-activations.
                self.threshold.clamp_(min=0.0)
            # clamp: inference is relu(pre) * H(pre - theta), as SAELens's JumpReLUSAE computes it
            cutoff = self.thresholds().detach().to(pre.dtype).clamp_min(0)
            if learning:  # also the kernel's lower half-window, for the threshold's gradient
                cutoff = cutoff - KERNEL_HALF_WIDTH * self.bandwidth
            return Selection.from_mask(pre > cutoff)

    def activate(self, values: Tensor, latents: Tensor, sae: "TopKSAE") -> Tensor:
        theta = self.thresholds().to(values.dtype)[latents]
        return jump_relu(values, theta, self.bandwidth, straight_through_to_input=self.straight_through_to_input)

    def loss_terms(self, encoding: Encoding, sae: "TopKSAE") -> dict[str, Tensor]:
        if self.sparsity_loss == "step":
            theta = self.thresholds().to(encoding.pre_values.dtype)[encoding.latents]
            fired = heaviside(encoding.pre_values, theta, self.bandwidth, straight_through_to_input=self.straight_through_to_input)
            return {"l0_loss": fired.sum() / encoding.num_tokens}
        norms = sae.decoder_norms().to(encoding.values.dtype)[encoding.latents]
        return {"l0_loss": torch.tanh(self.tanh_scale * encoding.values * norms).sum() / encoding.num_tokens}

    def coefficients(self) -> dict[str, Coefficient]:
        return {"l0_loss": Coefficient(self.l0_coefficient, self.l0_warm_up_steps)}

    # ---- SAELens's jumprelu format --------------------------------------------------------------
    @torch.no_grad()
    def rescale_latents(self, factor: float) -> None:
        if self.parameterization == "direct":
            self.threshold.mul_(factor)
        else:
            self.log_threshold.add_(math.log(factor))

    def saelens_export(self, sae: "TopKSAE") -> SAELensExport:
        """SAELens's JumpReLU inference SAE: a [d_sae] `threshold` tensor, and the training
        settings under metadata (as JumpReLUTrainingSAE.save_inference_model records them)."""
        details = {
            "jumprelu_init_threshold": self.init_threshold,
            "jumprelu_bandwidth": self.bandwidth,
            "jumprelu_sparsity_loss_mode": self.sparsity_loss,
            "l0_coefficient": self.l0_coefficient,
            "l0_warm_up_steps": self.l0_warm_up_steps,
            "jumprelu_tanh_scale": self.tanh_scale,
            "jumprelu_ste_to_input": self.straight_through_to_input,
            "parameterization": self.parameterization,
        }
        metadata = {"training_architecture": "jumprelu", "training_architecture_details": details, "selector": self.config()["class_path"]}
        threshold = self.thresholds().detach().to(sae.b_enc.dtype).clone()
        return SAELensExport("jumprelu", {}, {"threshold": threshold}, metadata)

    @classmethod
    def from_saelens(cls, cfg: dict[str, Any], tensors: dict[str, Tensor]) -> tuple["JumpReLU", int]:
        """Any SAELens "jumprelu" SAE (trained as JumpReLU, or a BatchTopK/Matryoshka export whose
        thresholds are all equal): the same function, pre > max(theta, 0)."""
        if set(tensors) != {"threshold"}:
            raise ValueError(f"a jumprelu SAE holds a 'threshold' tensor besides the four weights; found {sorted(tensors)}")
        threshold = tensors["threshold"].float()
        d_sae = cfg.get("d_sae")
        if threshold.shape != (d_sae,):
            raise ValueError(f"threshold has shape {list(threshold.shape)}, expected [d_sae] = [{d_sae}]")
        details = (cfg.get("metadata") or {}).get("training_architecture_details") or {}
        names = {"jumprelu_init_threshold": "init_threshold", "jumprelu_bandwidth": "bandwidth", "l0_coefficient": "l0_coefficient",
                 "l0_warm_up_steps": "l0_warm_up_steps", "jumprelu_sparsity_loss_mode": "sparsity_loss",
                 "jumprelu_tanh_scale": "tanh_scale", "jumprelu_ste_to_input": "straight_through_to_input"}
        settings = {ours: details[theirs] for theirs, ours in names.items() if theirs in details}
        if settings.get("sparsity_loss") not in (None, *SPARSITY_LOSSES):
            settings.pop("sparsity_loss")  # e.g. "quadratic": not trained here, the inference rule is the same
        selector = cls(**settings)
        selector.setup_from(threshold)
        k = details.get("k")
        k = int(k) if isinstance(k, (int, float)) and not isinstance(k, bool) and 1 <= k <= d_sae else min(32, d_sae)
        return selector, k

    def setup_from(self, threshold: Tensor) -> None:
        """Hold `threshold` [d_sae] as theta (a file's, or any)."""
        value = threshold.detach().float().clone()
        if self.parameterization == "log":
            value = value.clamp_min(torch.finfo(value.dtype).tiny).log()
        setattr(self, self._parameter_name(), nn.Parameter(value))
