"""lightning-sae cross-layer transcoder variant (`--model=clt`): every layer's features read that
layer's MLP input and write to the MLP outputs of that layer and all later ones."""

from lightning_sae_clt.clt import CLTLayer, CLTOutput, CrossLayerTranscoder
from lightning_sae_clt.module import CLTModule
from lightning_sae_clt.replacement import replacement_scores

__all__ = ["CLTLayer", "CLTModule", "CLTOutput", "CrossLayerTranscoder", "replacement_scores"]
