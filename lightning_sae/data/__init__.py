"""Language-model activations for SAE training: model loading, hook points, text, the on-disk cache
and the ActivationDataModule that ties them together."""

from lightning_sae.data.datamodule import ActivationDataModule
from lightning_sae.data.hooks import (
    HOOK_KINDS,
    decoder_layers,
    hook_point,
    mlp_family,
    mlp_module,
    num_layers,
    replace_hook,
    transformer_lens_name,
    zero_ablate_hook,
)
from lightning_sae.data.models import EMBEDDED_MODEL, load_model, load_tokenizer
from lightning_sae.data.text import EMBEDDED_CORPUS

__all__ = [
    "ActivationDataModule",
    "EMBEDDED_CORPUS",
    "EMBEDDED_MODEL",
    "HOOK_KINDS",
    "decoder_layers",
    "hook_point",
    "load_model",
    "load_tokenizer",
    "mlp_family",
    "mlp_module",
    "num_layers",
    "replace_hook",
    "transformer_lens_name",
    "zero_ablate_hook",
]
