"""Spliced-in evaluation (SPEC section 4): the language model's loss with an SAE's reconstruction
in place of the activation it reconstructs.

For token contexts [B, T] and a hook (layer, kind) three forwards are compared:

    clean          the model as it is
    spliced        the activation at the hook replaced by reconstruct(activation)
    zero-ablated   the activation at the hook replaced by zeros

    ce_loss_score = (CE_zero_ablated - CE_spliced) / (CE_zero_ablated - CE_clean)
    kl_div_score  = (KL_zero_ablated - KL_spliced) / KL_zero_ablated

(SAELens / SAEBench definitions), KL being KL(clean || other) of the next-token distributions.
CE and KL are means over every next-token prediction of the contexts (positions 0..T-2).

With `exclude_bos`, positions holding the BOS token keep their clean activation in both the
spliced and the zero-ablated forward: the SAEs never see BOS rows in training (the activation
cache leaves them out), and BOS activations are outliers that would dominate the loss change.

Everything is accumulated as sums (`TOTAL_FIELDS`), so ranks of a distributed run can each take a
share of the contexts, sum their totals, and compute identical scores.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_sae.data.hooks import ActivationRecorder, replace_hook

Reconstruct = Callable[[Tensor, "Tensor | None"], Tensor]
"""(activation rows [N, D] float32, dL/dx rows [N, D] float32 or None) -> reconstruction [N, D]."""

TOTAL_FIELDS = ("tokens", "ce_clean", "ce_spliced", "ce_zero_ablated", "kl_div_spliced", "kl_div_zero_ablated")
METRICS = (
    "ce_loss_score",
    "kl_div_score",
    "ce_clean",
    "ce_spliced",
    "ce_zero_ablated",
    "kl_div_spliced",
    "kl_div_zero_ablated",
)


def spliced_metrics(
    model: nn.Module,
    contexts: Tensor,
    layer: int,
    hook: str,
    reconstruct: Reconstruct,
    *,
    needs_gradients: bool = False,
    exclude_bos: bool = True,
    bos_token_id: int | None = None,
    batch_size: int = 8,
) -> dict[str, float]:
    """Scores of one reconstruction spliced in at (layer, hook) over `contexts` [B, T]; see `METRICS`."""
    totals = spliced_totals(
        model, contexts, layer, hook, {"": reconstruct},
        needs_gradients=needs_gradients, exclude_bos=exclude_bos, bos_token_id=bos_token_id, batch_size=batch_size,
    )
    return scores_from_totals(totals[""])


def spliced_totals(
    model: nn.Module,
    contexts: Tensor,
    layer: int,
    hook: str,
    reconstructions: Mapping[str, Reconstruct],
    *,
    needs_gradients: bool = False,
    exclude_bos: bool = True,
    bos_token_id: int | None = None,
    batch_size: int = 8,
) -> dict[str, Tensor]:
    """Float64 sums [len(TOTAL_FIELDS)] per named reconstruction, all spliced at the same hook.

    The clean and zero-ablated forwards are shared by every reconstruction (e.g. an SAE's
    validation modes). With `needs_gradients`, each reconstruction also receives dL/dx at its
    rows, L being the summed next-token cross-entropy of the clean forward (the activation
    cache's convention), computed through the layers after the hook only; parameters get no
    gradient. Works inside torch.inference_mode (e.g. a Lightning validation epoch).
    """
    if contexts.ndim != 2:
        raise ValueError(f"contexts must be [B, T] token ids, got shape {list(contexts.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if exclude_bos and bos_token_id is None:
        bos_token_id = getattr(getattr(model, "config", None), "bos_token_id", None)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    # Lightning validates under inference_mode, in which no gradient can be taken and whose
    # tensors cannot enter autograd or be updated outside it; leave it, and copy the ids out.
    with torch.inference_mode(False):
        contexts = contexts.clone()
        totals = {name: torch.zeros(len(TOTAL_FIELDS), dtype=torch.float64) for name in reconstructions}
        try:
            for start in range(0, contexts.shape[0], batch_size):
                tokens = contexts[start : start + batch_size].to(device)
                if exclude_bos and bos_token_id is not None:
                    splice = tokens != bos_token_id
                else:
                    splice = torch.ones_like(tokens, dtype=torch.bool)
                batch = _batch_totals(model, tokens, layer, hook, reconstructions, needs_gradients, splice)
                for name, values in batch.items():
                    totals[name] += values
        finally:
            model.train(was_training)
    return totals


def scores_from_totals(totals: Tensor) -> dict[str, float]:
    """Means and scores from summed totals (possibly summed over ranks). A score whose
    denominator is zero (zero ablation changing nothing) is NaN, not a made-up number."""
    values = dict(zip(TOTAL_FIELDS, totals.double().cpu().tolist()))
    tokens = values.pop("tokens")
    if tokens == 0:
        return {metric: float("nan") for metric in METRICS}
    means = {field: value / tokens for field, value in values.items()}
    ce_gap = means["ce_zero_ablated"] - means["ce_clean"]
    kl_zero = means["kl_div_zero_ablated"]
    return {
        "ce_loss_score": (means["ce_zero_ablated"] - means["ce_spliced"]) / ce_gap if ce_gap != 0 else float("nan"),
        "kl_div_score": (kl_zero - means["kl_div_spliced"]) / kl_zero if kl_zero != 0 else float("nan"),
        **means,
    }


def _batch_totals(
    model: nn.Module,
    tokens: Tensor,
    layer: int,
    hook: str,
    reconstructions: Mapping[str, Reconstruct],
    needs_gradients: bool,
    splice: Tensor,
) -> dict[str, Tensor]:
    targets = tokens[:, 1:]
    clean_logits, grad = _clean_forward(model, tokens, layer, hook, needs_gradients)
    clean = F.log_softmax(clean_logits[:, :-1].float(), dim=-1)
    del clean_logits
    grad_rows = grad[splice].float() if grad is not None else None

    def replaced(fn: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
        def hook_fn(hidden: Tensor) -> Tensor:
            out = hidden.clone()
            out[splice] = fn(hidden[splice]).to(hidden.dtype)
            return out

        return hook_fn

    def losses(fn: Callable[[Tensor], Tensor]) -> tuple[float, float]:
        """Summed CE and summed KL(clean || this) with fn's output spliced in."""
        with torch.no_grad(), replace_hook(model, layer, hook, replaced(fn)):
            logp = F.log_softmax(model(input_ids=tokens, use_cache=False).logits[:, :-1].float(), dim=-1)
        # Per-token values in float32, summed over tokens in float64: the scores divide small
        # differences of these sums.
        ce = -logp.gather(-1, targets.unsqueeze(-1)).double().sum()
        kl = (clean.exp() * (clean - logp)).sum(-1).double().sum()
        return ce.item(), kl.item()

    ce_clean = -clean.gather(-1, targets.unsqueeze(-1)).double().sum().item()
    ce_zero, kl_zero = losses(torch.zeros_like)
    out = {}
    for name, reconstruct in reconstructions.items():
        ce, kl = losses(lambda rows, r=reconstruct: r(rows.float(), grad_rows))
        out[name] = torch.tensor([targets.numel(), ce_clean, ce, ce_zero, kl, kl_zero], dtype=torch.float64)
    return out


def _clean_forward(
    model: nn.Module, tokens: Tensor, layer: int, hook: str, needs_gradients: bool
) -> tuple[Tensor, Tensor | None]:
    """Clean logits [B, T, V] and, if asked, dL/d(activation at the hook) [B, T, D]."""
    if not needs_gradients:
        with torch.no_grad():
            return model(input_ids=tokens, use_cache=False).logits, None
    # The recorder makes the hook's activation a fresh leaf: backward runs only through the
    # layers after it and no parameter receives a gradient, even if some are not frozen.
    with torch.enable_grad(), ActivationRecorder(model, layer, [hook], leaf=hook) as recorder:
        logits = model(input_ids=tokens, use_cache=False).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten(), reduction="sum")
        (grad,) = torch.autograd.grad(loss, recorder.values[hook])
    return logits.detach(), grad
