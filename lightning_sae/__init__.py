"""lightning-sae: sparse autoencoders on language-model activations, trained with Lightning."""

from lightning_sae.data_request import DataRequest
from lightning_sae.module import SAEModule, SAETrainingModule
from lightning_sae.sae import SparseCode, TopKSAE
from lightning_sae.selection import Coefficient, Encoding, SAELensExport, Selection, Selector, heaviside, jump_relu
from lightning_sae.version import __version__

__all__ = ["Coefficient", "DataRequest", "Encoding", "SAEModule", "SAELensExport", "SAETrainingModule", "Selection", "Selector", "SparseCode", "TopKSAE", "__version__", "heaviside", "jump_relu"]
