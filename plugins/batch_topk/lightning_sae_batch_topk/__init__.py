"""BatchTopK selection plugin for lightning-sae (registered as the selector `batch_topk`)."""

from lightning_sae_batch_topk.selector import BatchTopK, batch_topk, threshold_selection

__all__ = ["BatchTopK", "batch_topk", "threshold_selection"]
