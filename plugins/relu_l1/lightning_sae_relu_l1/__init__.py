"""ReLU + L1 selection plugin for lightning-sae (registered as the selector `relu_l1`)."""

from lightning_sae_relu_l1.selector import ReLUL1

__all__ = ["ReLUL1"]
