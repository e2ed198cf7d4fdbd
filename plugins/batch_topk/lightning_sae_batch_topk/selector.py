"""BatchTopK (Bussmann, Leask and Nanda 2024, arXiv 2412.06410), written as a third party would:
only the public contract of `lightning_sae.selection` is used.

Training: the N*k largest positive pre-activations of the whole batch fire, so tokens keep
different numbers of latents (k on average) and the selection is a variable-width `Selection`.
Inference (eval mode: validation, spliced scores, a loaded SAE): a batch-independent JumpReLU
rule, latent i fires where pre_i > threshold.

The threshold is the statistic SAELens's BatchTopKTrainingSAE keeps (`topk_threshold`): an
exponential moving average of the smallest activation kept in each training batch, with rate
`threshold_lr`, started at 0 and read bias-corrected (divided by 1 - (1 - lr)^t after t batches,
as Adam corrects its moments), so the start at 0 never pulls it down and no batch weighs more
than its place in the average says. Two departures from SAELens, both measured
(docs/plugins.md): the default rate is 0.1, not 0.01, because the average must follow the
cutoff while the SAE still learns (at 0.01 it lags ~100 batches: an independent trial measured
L0 15.7 at k = 32 after a short fit on the embedded default), and each batch's cutoff is
already an estimate over N*k values, so little averaging is needed; and under DDP every rank adds
the mean over ranks of their per-batch minima (see `_update_threshold`). It is a buffer:
checkpointed, resumed, moved with the SAE, and exported as SAELens exports BatchTopK, a
"jumprelu" SAE with a [d_sae] `threshold` tensor.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from lightning_sae.selection import SAELensExport, Selection, Selector

if TYPE_CHECKING:
    from lightning_sae.sae import TopKSAE

# Relative spread allowed between the per-latent thresholds of a SAELens file read back as one
# BatchTopK threshold: what float16/bfloat16 storage of a single value could not explain is a
# JumpReLU SAE with learned per-latent thresholds, which this selector cannot represent.
THRESHOLD_SPREAD_TOLERANCE = 1e-2
# Candidates per token for the batch's selection, in multiples of k (see `batch_topk`).
CANDIDATES_PER_K = 2


def _selection(tokens: Tensor, latents: Tensor, num_tokens: int) -> Selection:
    """A Selection from token-major (token, latent) pairs."""
    offsets = torch.zeros(num_tokens + 1, dtype=torch.long, device=tokens.device)
    offsets[1:] = torch.bincount(tokens, minlength=num_tokens).cumsum(0)
    return Selection(latents, offsets)


def batch_topk(pre: Tensor, k: int) -> tuple[Selection, Tensor]:
    """The N*k largest positive entries of pre [N, M] (ties at the cutoff all kept), and the
    smallest kept value (NaN when none is positive).

    One topk over the N*M flat values runs on one thread on a CPU, and reading every entry above a
    floor (`nonzero` over N*M) costs as much as TopK's whole selection; on language-model rows,
    whose scales differ by orders of magnitude between tokens (BOS), any global floor low enough
    to be safe lets millions of entries through. Instead, each token's own CANDIDATES_PER_K * k
    largest are the candidates (one per-token topk, TopK's own kind of work), and the cutoff is
    the N*k-th largest of them. That is exact for every token whose last candidate is below the
    cutoff: all its entries at or above the cutoff are candidates. A token whose last candidate
    reaches it (it may hold more) adds all its entries at or above that cutoff, and the cutoff is
    taken again among everything kept; it can only rise, so the other tokens stay exact.
    """
    num_tokens, width = pre.shape
    count = min(num_tokens * k, pre.numel())
    per_token = min(CANDIDATES_PER_K * k, width)
    candidates = pre.topk(per_token, dim=1, sorted=False)
    # At or below the batch's cutoff; only positive entries fire (pre is relu'd), so when fewer
    # than N*k candidates are positive the floor is the smallest positive value.
    cutoff = _largest(candidates.values.flatten(), count).clamp_min(torch.finfo(pre.dtype).tiny)
    saturated = candidates.values.min(dim=1).values >= cutoff
    any_saturated = per_token < width and bool(saturated.any())
    keep = candidates.values >= cutoff
    if any_saturated:
        keep &= ~saturated[:, None]
    tokens, slots = keep.nonzero(as_tuple=True)
    latents = candidates.indices[tokens, slots]
    if any_saturated:
        # Their entries at or above the candidates' cutoff join in (the batch's cutoff is no lower),
        # and the cutoff is taken again among all of them.
        values = candidates.values[tokens, slots]
        rows = saturated.nonzero().squeeze(1)
        block = pre.index_select(0, rows)
        row, more = (block >= cutoff).nonzero(as_tuple=True)
        tokens, latents = torch.cat([tokens, rows[row]]), torch.cat([latents, more])
        values = torch.cat([values, block[row, more]])
        cutoff = _largest(values, count) if values.numel() else cutoff
        kept = values >= cutoff
        tokens, latents = tokens[kept], latents[kept]
        order = torch.argsort(tokens, stable=True)  # token-major, as a Selection is
        tokens, latents = tokens[order], latents[order]
    smallest = pre[tokens, latents].min() if tokens.numel() else pre.new_full((), float("nan"))
    return _selection(tokens, latents, num_tokens), smallest


def _largest(values: Tensor, count: int) -> Tensor:
    """The count-th largest of a flat tensor (its smallest if it holds fewer)."""
    return values.topk(min(count, values.numel()), sorted=False).values.min()


def threshold_selection(pre: Tensor, threshold: Tensor) -> Selection:
    """JumpReLU's rule: latent i fires on a token where pre_i > threshold (and pre_i > 0)."""
    tokens, latents = (pre > threshold.to(pre.dtype).clamp_min(0)).nonzero(as_tuple=True)
    return _selection(tokens, latents, pre.shape[0])


class BatchTopK(Selector):
    """The N*k largest pre-activations of the batch fire in training; pre > threshold at inference.

    Args:
        threshold_lr: rate of the moving average of the smallest kept activation (SAELens's
            `topk_threshold_lr`; default 0.1: the threshold follows the last ~10 batches).

    Buffers: `threshold` (float64 scalar, the bias-corrected average; 0 before the first
    training batch, which makes the inference rule plain ReLU) and `threshold_updates` (training
    batches it has seen).
    """

    saelens_architectures = ("jumprelu",)

    threshold: Tensor
    threshold_updates: Tensor

    def __init__(self, threshold_lr: float = 0.1):
        if not 0 < threshold_lr <= 1:
            raise ValueError(f"threshold_lr must be in (0, 1], got {threshold_lr}")
        super().__init__()
        self.threshold_lr = float(threshold_lr)
        self.register_buffer("threshold", torch.zeros((), dtype=torch.float64))
        self.register_buffer("threshold_updates", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def select(self, pre: Tensor, sae: "TopKSAE", grad: Tensor | None) -> Selection:
        if not self.training:
            return threshold_selection(pre, self.threshold)
        selection, smallest = batch_topk(pre, sae.k)
        self._update_threshold(smallest)
        return selection

    def _update_threshold(self, smallest: Tensor) -> None:
        """average <- (1 - lr) average + lr * m (from 0), m the smallest kept activation;
        threshold = average / (1 - (1 - lr)^t) after t batches. The average is not stored: it is
        the threshold times that same factor, so checkpoints hold what they always held.

        Under DDP each rank picks the top N*k of its own batch, so each rank's minimum is a
        sample of the same quantity; the ranks add the mean of theirs ("sum"-reduced (value,
        count) pairs, so a rank whose batch kept nothing positive does not count). "min" would
        instead estimate the cutoff of a batch world_size times larger, a lower threshold than
        the one training used. Every rank then holds the same threshold, which DDP's buffer
        broadcast would otherwise impose from rank 0 alone. The update itself stays on the device.
        """
        present = torch.isfinite(smallest)
        pair = torch.stack([torch.where(present, smallest, 0).to(torch.float64), present.to(torch.float64)])
        total, count = Selector.all_reduce(pair, "sum").unbind()
        statistic = total / count.clamp_min(1)
        keep = 1.0 - self.threshold_lr
        seen = self.threshold_updates.double()
        average = self.threshold * (1.0 - keep**seen)  # 0 before the first batch
        corrected = torch.lerp(average, statistic, self.threshold_lr) / (1.0 - keep ** (seen + 1))
        self.threshold.copy_(torch.where(count > 0, corrected, self.threshold))
        self.threshold_updates.add_((count > 0).long())

    # ---- export: SAELens's BatchTopK inference format -----------------------------------------
    def saelens_export(self, sae: "TopKSAE") -> SAELensExport:
        """What SAELens's BatchTopKTrainingSAE.save_inference_model writes: architecture
        "jumprelu", the threshold repeated for every latent, and the training settings under
        metadata["training_architecture_details"]."""
        threshold = self.threshold.detach().to(sae.b_enc.dtype).expand(sae.d_sae).clone()
        details = {"k": sae.k, "topk_threshold_lr": self.threshold_lr, "rescale_acts_by_decoder_norm": False}
        metadata = {"training_architecture": "batchtopk", "training_architecture_details": details}
        return SAELensExport("jumprelu", {}, {"threshold": threshold}, metadata)

    @classmethod
    def from_saelens(cls, cfg: dict[str, Any], tensors: dict[str, Tensor]) -> tuple["BatchTopK", int]:
        """A SAELens "jumprelu" SAE exported from BatchTopK training (by SAELens or by us)."""
        if set(tensors) != {"threshold"}:
            raise ValueError(f"a jumprelu SAE holds a 'threshold' tensor besides the four weights; found {sorted(tensors)}")
        threshold = tensors["threshold"].double()
        if threshold.shape != (cfg.get("d_sae"),):
            raise ValueError(f"threshold has shape {list(threshold.shape)}, expected [d_sae] = [{cfg.get('d_sae')}]")
        metadata = cfg.get("metadata") or {}
        details = metadata.get("training_architecture_details") or {}
        if metadata.get("training_architecture") != "batchtopk" or "k" not in details:
            raise ValueError(
                "this jumprelu SAE was not trained as BatchTopK (metadata.training_architecture is "
                f"{metadata.get('training_architecture')!r}); the batch_topk selector reads BatchTopK exports only"
            )
        k = details["k"]
        if isinstance(k, bool) or not isinstance(k, (int, float)) or k != int(k) or k < 1:
            raise ValueError(f"training_architecture_details.k must be a positive whole number, got {k!r}")
        spread = (threshold.max() - threshold.min()).item()
        if spread > THRESHOLD_SPREAD_TOLERANCE * max(threshold.abs().max().item(), 1e-12):
            raise ValueError(f"its per-latent thresholds differ (from {threshold.min().item():.4g} to {threshold.max().item():.4g}); "
                             "BatchTopK holds one threshold for all latents")
        selector = cls(threshold_lr=float(details.get("topk_threshold_lr", 0.01)))
        selector.threshold.fill_(threshold.mean().item())
        selector.threshold_updates.fill_(1)  # an estimate exists; further training averages into it
        return selector, int(k)
