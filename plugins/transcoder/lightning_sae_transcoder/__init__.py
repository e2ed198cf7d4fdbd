"""lightning-sae transcoder variant: encode an MLP's input, predict its output (`--model=transcoder`)."""

from lightning_sae_transcoder.formats import (
    load_saelens_transcoder,
    load_sparsify_transcoder,
    save_saelens_transcoder,
    save_sparsify_transcoder,
)
from lightning_sae_transcoder.module import TranscoderModule
from lightning_sae_transcoder.sae import Transcoder

__all__ = [
    "Transcoder",
    "TranscoderModule",
    "load_saelens_transcoder",
    "load_sparsify_transcoder",
    "save_saelens_transcoder",
    "save_sparsify_transcoder",
]
