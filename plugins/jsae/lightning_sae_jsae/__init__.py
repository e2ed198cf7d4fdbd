"""Jacobian sparse autoencoders (Farnik et al., ICML 2025) for lightning-sae.

A TopK SAE on one layer's MLP input and another on its output, trained with an L1 penalty on the
Jacobian of encoder_out o MLP o decoder_in over the active latents (SPEC section 3).
"""

from lightning_sae_jsae.jacobian import active_jacobian, active_jacobian_l1, jacobian_counts
from lightning_sae_jsae.metrics import DEFAULT_THRESHOLDS, JacobianStats
from lightning_sae_jsae.mlp import FrozenMLP, mlp_from_model
from lightning_sae_jsae.module import JSAEModule

__all__ = [
    "DEFAULT_THRESHOLDS",
    "FrozenMLP",
    "JSAEModule",
    "JacobianStats",
    "active_jacobian",
    "active_jacobian_l1",
    "jacobian_counts",
    "mlp_from_model",
]
