"""JumpReLU selection plugin for lightning-sae (registered as the selector `jumprelu`)."""

from lightning_sae_jumprelu.selector import JumpReLU

__all__ = ["JumpReLU"]
