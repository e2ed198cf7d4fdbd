"""Matryoshka SAEs (Bussmann et al. 2025, arXiv 2503.17547; Nabeshima 2024), written as a third
party would: a variant of the public `SAEModule`, with any selector.

One selection over all M latents; for each prefix size m_1 < ... < m_n = M the SAE must also
reconstruct from its first m_j latents alone:

    loss = sum_j L(x, b_dec + sum_{i < m_j} z_i W_dec[i]) + AuxK + the selector's terms

L is the module's reconstruction loss (FVU, or SAELens's summed MSE with
`reconstruction_objective: mse`). The prefix losses are SUMMED, as SAELens's
MatryoshkaBatchTopKTrainingSAE does (its outer level is the base loss, each inner level adds
`inner_mse_loss_<m>`). The first latents are thereby pushed to be the coarsest features.

Export: the selector's own inference rule (BatchTopK: SAELens "jumprelu" with its threshold),
with metadata `training_architecture: matryoshka_<selector's>` ("matryoshka_batchtopk" for
BatchTopK, as SAELens writes it) and `matryoshka_widths` among the training details.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from lightning_sae import SAEModule, SparseCode


def prefix_code(code: SparseCode, width: int) -> SparseCode:
    """`code` restricted to latents < width: the other entries' values are zeroed (the selection
    pattern is kept, so the sparse decoder reuses its sort of the indices)."""
    return SparseCode(code.indices, code.values * (code.indices < width).to(code.values.dtype), code.offsets)


class MatryoshkaModule(SAEModule):
    """An `SAEModule` whose loss adds the reconstructions from nested latent prefixes.

    Args:
        prefix_sizes: the nested widths m_1 < m_2 < ...; d_sae is appended as the last one when
            missing (SAELens's `matryoshka_widths`). Each must lie in 1..d_sae.
        (everything else as SAEModule: k, d_sae / expansion_factor, selector, init_from, ...)
    """

    def __init__(self, prefix_sizes: list[int] | None = None, **kwargs: Any):
        super().__init__(**kwargs)  # prefix_sizes is recorded in hparams with the rest

    def prefix_sizes(self) -> list[int]:
        """The prefix widths, ending with d_sae."""
        d_sae = self.get_sae("sae").d_sae
        widths = [int(width) for width in self.hparams.prefix_sizes or []]
        if any(not 1 <= width <= d_sae for width in widths) or any(a >= b for a, b in zip(widths, widths[1:])):
            raise ValueError(f"prefix_sizes must increase strictly within 1..d_sae ({d_sae}), got {widths}")
        return widths if widths and widths[-1] == d_sae else [*widths, d_sae]

    def training_loss(self, batch: dict[str, Tensor]) -> Tensor:
        x = batch["x"]
        step = self.sae_step("sae", x, grad=batch.get("grad"))
        sae = self.get_sae("sae")
        loss = step.loss
        for width in self.prefix_sizes()[:-1]:  # the outer level is the base loss
            inner = self.reconstruction_error(x, sae.decode(prefix_code(step.code, width), x))
            self.log(f"train/inner_loss_{width}", inner, on_step=True, batch_size=x.shape[0])
            loss = loss + inner
        self.log("train/loss", loss, on_step=True, prog_bar=True, batch_size=x.shape[0])
        self.log_sae_training("sae", step)
        return loss

    def sae_metadata(self, name: str) -> dict[str, Any]:
        metadata = super().sae_metadata(name)
        sae = self.get_sae(name)
        selector_metadata = sae.selector.saelens_export(sae).metadata
        rule = selector_metadata.get("training_architecture") or sae.selector.class_name().lower()
        details = dict(selector_metadata.get("training_architecture_details") or {})
        details.setdefault("k", sae.k)
        details["matryoshka_widths"] = self.prefix_sizes()
        metadata["training_architecture"] = f"matryoshka_{rule}"
        metadata["training_architecture_details"] = details
        return metadata

