"""The standard SAE with Anthropic's April-2024 L1 penalty (SAELens's "standard" architecture),
written as a third party would: only the public contract of `lightning_sae.selection` is used.

    z = relu(W_enc (x - b_dec) + b_enc)                 every positive latent fires
    loss = reconstruction + lambda_t * mean_tokens sum_i z_i ||W_dec[i]||_2

The decoder rows are NOT renormalised (`unit_norm_decoder = False`): the penalty weighs each
latent by its row norm instead, so shrinking a row does not buy sparsity. lambda rises linearly
over the first `l1_warm_up_steps` optimizer steps, or the first `l1_warm_up_fraction` of the
fit's (Anthropic: 5%). SAELens's StandardTrainingSAE (lp_norm 1) is the reference convention.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import Tensor

from lightning_sae.selection import Coefficient, Encoding, SAELensExport, Selection, Selector

if TYPE_CHECKING:
    from lightning_sae.sae import TopKSAE


class ReLUL1(Selector):
    """ReLU activation with a decoder-norm-weighted L1 penalty (`l1_loss`).

    Args:
        l1_coefficient: weight of `l1_loss`, relative to the module's reconstruction loss (FVU by
            default; SAELens's summed MSE with `reconstruction_objective: mse`).
        l1_warm_up_steps: optimizer steps over which the weight rises linearly from 0.
        l1_warm_up_fraction: the same as a fraction of the fit's optimizer steps (used when
            l1_warm_up_steps is 0).
    """

    unit_norm_decoder = False
    saelens_architectures = ("standard",)
    saelens_training_architectures = ("standard",)

    def __init__(self, l1_coefficient: float = 1.0, l1_warm_up_steps: int = 0, l1_warm_up_fraction: float = 0.05):
        super().__init__()
        if l1_coefficient < 0 or l1_warm_up_steps < 0 or not 0 <= l1_warm_up_fraction <= 1:
            raise ValueError("l1_coefficient and l1_warm_up_steps must be >= 0 and l1_warm_up_fraction in [0, 1], got "
                             f"{l1_coefficient}, {l1_warm_up_steps}, {l1_warm_up_fraction}")
        self.l1_coefficient, self.l1_warm_up_steps = float(l1_coefficient), int(l1_warm_up_steps)
        self.l1_warm_up_fraction = float(l1_warm_up_fraction)

    def select(self, pre: Tensor, sae: "TopKSAE", grad: Tensor | None) -> Selection:
        return Selection.from_mask(pre > 0)  # pre is relu'd: the positive latents are z's support

    def loss_terms(self, encoding: Encoding, sae: "TopKSAE") -> dict[str, Tensor]:
        norms = sae.decoder_norms().to(encoding.values.dtype)[encoding.latents]
        return {"l1_loss": (encoding.values * norms).sum() / encoding.num_tokens}

    def coefficients(self) -> dict[str, Coefficient]:
        return {"l1_loss": Coefficient(self.l1_coefficient, self.l1_warm_up_steps, self.l1_warm_up_fraction)}

    # ---- SAELens's "standard" format ----------------------------------------------------------------
    def saelens_export(self, sae: "TopKSAE") -> SAELensExport:
        details = {"l1_coefficient": self.l1_coefficient, "lp_norm": 1.0, "l1_warm_up_steps": self.l1_warm_up_steps,
                   "l1_warm_up_fraction": self.l1_warm_up_fraction}
        metadata = {"training_architecture": "standard", "training_architecture_details": details, "selector": self.config()["class_path"]}
        return SAELensExport("standard", {}, {}, metadata)

    @classmethod
    def from_saelens(cls, cfg: dict[str, Any], tensors: dict[str, Tensor]) -> tuple["ReLUL1", int]:
        if tensors:
            raise ValueError(f"a standard SAE holds only W_enc, b_enc, W_dec and b_dec; found also {sorted(tensors)}")
        details = (cfg.get("metadata") or {}).get("training_architecture_details") or {}
        if details.get("lp_norm", 1.0) != 1.0:
            raise ValueError(f"trained with lp_norm={details['lp_norm']}; relu_l1 trains the L1 penalty only")
        settings = {key: details[key] for key in ("l1_coefficient", "l1_warm_up_steps", "l1_warm_up_fraction") if key in details}
        return cls(**settings), min(32, int(cfg["d_sae"]))
