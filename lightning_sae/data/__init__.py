"""Language-model activations for SAE training: model loading, hook points, text, the on-disk cache
and the ActivationDataModule that ties them together. `read_cache(path)` is the public, read-only
way to look into a cache (lightning_sae.data.cache_view)."""

from lightning_sae.data.cache_view import CacheView, ShardInfo, read_cache
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
    "CacheView",
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
    "read_cache",
    "replace_hook",
    "ShardInfo",
    "transformer_lens_name",
    "zero_ablate_hook",
]
