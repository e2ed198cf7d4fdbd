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
# `select` tries this fraction of the running threshold as the floor of the batch's cutoff.
GUESS_FRACTION = 0.8


def _selection(tokens: Tensor, latents: Tensor, num_tokens: int) -> Selection:
    """A Selection from token-major (token, latent) pairs."""
    offsets = torch.zeros(num_tokens + 1, dtype=torch.long, device=tokens.device)
    offsets[1:] = torch.bincount(tokens, minlength=num_tokens).cumsum(0)
    return Selection(latents, offsets)


def batch_topk(pre: Tensor, k: int, guess: float | None = None) -> tuple[Selection, Tensor]:
    """The N*k largest positive entries of pre [N, M] (ties at the cutoff all kept), and the
    smallest kept value (NaN when none is positive).

    One topk over the N*M flat values runs on one thread on a CPU and its result must then be
    sorted token-major (measured 10x TopK's selection at N=2048, M=8192, k=32). Instead: pick a
    floor c at or below the cutoff, read the entries >= c token-major (`nonzero` of one
    comparison pass over pre), and take the N*k largest of those few. `guess` (the running
    threshold, a little lowered) is tried as c first; it is kept only if at least N*k entries
    clear it, which proves it is at or below the cutoff. Otherwise c is the smallest of the
    tokens' own k-th largest values: every token has k entries at or above it, so at least N*k
    entries do. The answer is exact either way; the guess only saves work.
    """
    num_tokens = pre.shape[0]
    count = min(num_tokens * k, pre.numel())
    tokens = latents = None
    if guess is not None and guess > 0:
        # nonzero counts as it goes (a bool tensor's sum() was measured slower than the nonzero).
        tokens, latents = (pre >= guess).nonzero(as_tuple=True)
        if tokens.numel() < count:
            tokens = latents = None
    if tokens is None:
        floor = pre.topk(min(k, pre.shape[1]), dim=1, sorted=False).values.min()
        mask = pre >= floor if floor > 0 else pre > 0  # pre is relu'd: a zero does not fire
        tokens, latents = mask.nonzero(as_tuple=True)
    values = pre[tokens, latents]
    if values.numel() > count:
        keep = values >= values.topk(count, sorted=False).values.min()
        tokens, latents, values = tokens[keep], latents[keep], values[keep]
    smallest = values.min() if values.numel() else pre.new_full((), float("nan"))
    return _selection(tokens, latents, num_tokens), smallest


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
    saelens_training_architectures = ("batchtopk",)  # asked first for BatchTopK exports (JumpReLU also reads "jumprelu")

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
        # The running threshold, lowered for the drift of one batch, as a first floor to try.
        guess = GUESS_FRACTION * float(self.threshold) if int(self.threshold_updates) > 0 else None
        selection, smallest = batch_topk(pre, sae.k, guess)
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
    @torch.no_grad()
    def rescale_latents(self, factor: float) -> None:
        self.threshold.mul_(factor)

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
