"""g-SAE selection plugin for lightning-sae (registered as the selector `gradient_topk`)."""

from lightning_sae_gsae.selector import NORMALIZATIONS, GradientTopKSelector, normalize_gradient

__all__ = ["NORMALIZATIONS", "GradientTopKSelector", "normalize_gradient"]
