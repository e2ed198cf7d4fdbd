"""Matryoshka variant for lightning-sae (registered as the variant `matryoshka`)."""

from lightning_sae_matryoshka.module import MatryoshkaModule, prefix_code

__all__ = ["MatryoshkaModule", "prefix_code"]
