"""Spliced-in evaluation (SPEC section 4): the language model's loss with an SAE's reconstruction
in place of the activation it reconstructs.

For token contexts [B, T], a read hook and a write hook (the same one for an autoencoder; a
transcoder reads mlp_in and writes mlp_out) three forwards are compared:

    clean          the model as it is
    spliced        the activation at the write hook replaced by reconstruct(activation at the read hook)
    zero-ablated   the activation at the write hook replaced by zeros, at every position

The read activations (and, if asked, their gradients) come from the clean forward, so the read
hook may lie anywhere relative to the write hook; where they coincide this is the usual splice.

    ce_loss_score = (ce_loss_with_ablation - ce_loss_with_sae) / (ce_loss_with_ablation - ce_loss_without_sae)
    kl_div_score  = (kl_div_with_ablation - kl_div_with_sae) / kl_div_with_ablation

These are SAELens's conventions (`sae_lens.evals.get_downstream_reconstruction_metrics`, with
the BOS token as its ignored token), which tests/test_saelens_conventions.py checks by running
SAELens's own functions:

- With `exclude_bos`, positions holding BOS are *ignored*: the spliced forward leaves their
  activation clean (the SAEs never see BOS rows in training: the activation cache leaves them
  out), and predictions made at them are left out of every mean. The zero-ablated forward zeroes
  every position, BOS included.
- CE is the mean next-token cross-entropy over the predictions at positions 0..T-2 that are not
  ignored; KL is KL(clean || other) of the next-token distributions, averaged over positions
  0..T-1 that are not ignored (the last position has no target but does have a distribution).

Memory. A forward's logits are [contexts, T, V]; with a 262k-token vocabulary that is gigabytes
for a handful of contexts. Each forward therefore takes only as many contexts as fit
`max_logits_bytes` as float32 (at least one), and the float32 softmax arithmetic runs over chunks
of positions whose temporaries together fit it too: at most the clean logits, one forward's
logits and the chunk's temporaries are alive, about 3 x max_logits_bytes, whatever the batch, the
vocabulary (beyond one context's logits) or the number of reconstructions compared.
docs/performance.md has the measured peak.

Everything is accumulated as sums (`TOTAL_FIELDS`), so ranks of a distributed run can each take a
share of the contexts, sum their totals, and compute identical scores.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from lightning_sae.data.hooks import ActivationRecorder, replace_hook

if TYPE_CHECKING:
    from lightning_sae.data.extract import Exclusion

Reconstruct = Callable[[Tensor, "Tensor | None"], Tensor]
"""(read-hook activation rows [N, D] float32, their dL/dx [N, D] float32 or None) -> the rows
[N, D_out] that replace the write hook's activation."""

TOTAL_FIELDS = (
    "ce_tokens",
    "kl_tokens",
    "ce_loss_without_sae",
    "ce_loss_with_sae",
    "ce_loss_with_ablation",
    "kl_div_with_sae",
    "kl_div_with_ablation",
)
"""Summed per-prediction values and how many predictions each mean divides by (CE has one
prediction fewer per context than KL: the last position has no target)."""
METRICS = (
    "ce_loss_score",
    "kl_div_score",
    "ce_loss_without_sae",
    "ce_loss_with_sae",
    "ce_loss_with_ablation",
    "kl_div_with_sae",
    "kl_div_with_ablation",
)
"""SAEBench's / SAELens's names: CE of the clean model (`without_sae`), with the reconstruction
spliced in (`with_sae`) and with the activation zero-ablated (`with_ablation`); KL(clean || other)
likewise. Before issue 15 these were ce_clean, ce_spliced, ce_zero_ablated, kl_div_spliced and
kl_div_zero_ablated."""
DEFAULT_MAX_LOGITS_BYTES = 256 << 20
"""Float32 logits held at once per forward (and per chunk of the softmax arithmetic)."""


def spliced_metrics(
    model: nn.Module,
    contexts: Tensor,
    layer: int,
    hook: str,
    reconstruct: Reconstruct,
    *,
    write: str | None = None,
    needs_gradients: bool = False,
    exclude_bos: bool = True,
    bos_token_id: int | None = None,
    batch_size: int = 8,
    max_logits_bytes: int = DEFAULT_MAX_LOGITS_BYTES,
    progress: bool | None = None,
) -> dict[str, float]:
    """Scores of one reconstruction of the activation at (layer, hook), spliced in at (layer,
    write) (default: the same hook), over `contexts` [B, T]; see `METRICS`."""
    totals = spliced_totals(
        model, contexts, layer, hook, {"": reconstruct},
        write=write, needs_gradients=needs_gradients, exclude_bos=exclude_bos, bos_token_id=bos_token_id, batch_size=batch_size,
        max_logits_bytes=max_logits_bytes, progress=progress,
    )
    return scores_from_totals(totals[""])


def spliced_totals(
    model: nn.Module,
    contexts: Tensor,
    layer: int,
    hook: str,
    reconstructions: Mapping[str, Reconstruct],
    *,
    write: str | None = None,
    needs_gradients: bool = False,
    exclude_bos: bool = True,
    bos_token_id: int | None = None,
    batch_size: int = 8,
    max_logits_bytes: int = DEFAULT_MAX_LOGITS_BYTES,
    progress: bool | None = None,
    exclusion: Exclusion | None = None,
) -> dict[str, Tensor]:
    """Float64 sums [len(TOTAL_FIELDS)] per named reconstruction, all reading the activation at
    (layer, hook) and replacing the one at (layer, write) (default: the same hook). With `layer`
    None, `hook` and `write` are hook point names.

    The clean and zero-ablated forwards are shared by every reconstruction (e.g. an SAE's
    validation modes). With `needs_gradients`, each reconstruction also receives dL/dx at its
    rows, L being the summed next-token cross-entropy of the clean forward (the activation
    cache's convention), computed through the layers after the hook only; parameters get no
    gradient. Works inside torch.inference_mode (e.g. a Lightning validation epoch).

    Args:
        batch_size: most contexts per forward; fewer when their logits would exceed `max_logits_bytes`.
        max_logits_bytes: float32 logits held at once (see the module docstring); one context's
            logits are always allowed.
        progress: show a progress bar over the contexts; None shows one only on a terminal.
        exclusion: positions ignored like BOS (lightning_sae.data.extract.Exclusion, the data's
            own rules, its norm rule applied to the read activation); replaces `exclude_bos`.
    """
    if contexts.ndim != 2:
        raise ValueError(f"contexts must be [B, T] token ids, got shape {list(contexts.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_logits_bytes < 1:
        raise ValueError(f"max_logits_bytes must be >= 1, got {max_logits_bytes}")
    if exclude_bos and bos_token_id is None:
        bos_token_id = getattr(getattr(model, "config", None), "bos_token_id", None)
    vocab = _vocabulary_size(model)
    row_bytes = 4 * vocab  # one position's float32 logits
    per_forward = max(1, min(batch_size, max_logits_bytes // (row_bytes * max(1, contexts.shape[1]))))
    # About four float32 [rows, V] temporaries live at once in the CE/KL arithmetic.
    chunk_rows = max(1, max_logits_bytes // (4 * row_bytes))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    # Lightning validates under inference_mode, in which no gradient can be taken and whose
    # tensors cannot enter autograd or be updated outside it; leave it, and copy the ids out.
    with torch.inference_mode(False):
        contexts = contexts.clone()
        totals = {name: torch.zeros(len(TOTAL_FIELDS), dtype=torch.float64) for name in reconstructions}
        bar = tqdm(total=contexts.shape[0], desc="spliced CE/KL", unit="ctx", leave=False,
                   disable=None if progress is None else not progress)
        try:
            for start in range(0, contexts.shape[0], per_forward):
                tokens = contexts[start : start + per_forward].to(device)
                if exclusion is not None:
                    ignored = ~exclusion.token_mask(tokens)
                elif exclude_bos and bos_token_id is not None:
                    ignored = tokens == bos_token_id
                else:
                    ignored = torch.zeros_like(tokens, dtype=torch.bool)
                batch = _batch_totals(
                    model, tokens, layer, hook, hook if write is None else write, reconstructions, needs_gradients, ignored, chunk_rows,
                    exclusion,
                )
                for name, values in batch.items():
                    totals[name] += values
                bar.update(tokens.shape[0])
        finally:
            bar.close()
            model.train(was_training)
    return totals


def scores_from_totals(totals: Tensor) -> dict[str, float]:
    """Means and scores from summed totals (possibly summed over ranks). A score whose
    denominator is zero (zero ablation changing nothing) is NaN, not a made-up number."""
    values = dict(zip(TOTAL_FIELDS, totals.double().cpu().tolist()))
    ce_tokens, kl_tokens = values.pop("ce_tokens"), values.pop("kl_tokens")
    if ce_tokens == 0 or kl_tokens == 0:
        return {metric: float("nan") for metric in METRICS}
    means = {field: value / (kl_tokens if field.startswith("kl") else ce_tokens) for field, value in values.items()}
    ce_gap = means["ce_loss_with_ablation"] - means["ce_loss_without_sae"]
    kl_zero = means["kl_div_with_ablation"]
    return {
        "ce_loss_score": (means["ce_loss_with_ablation"] - means["ce_loss_with_sae"]) / ce_gap if ce_gap != 0 else float("nan"),
        "kl_div_score": (kl_zero - means["kl_div_with_sae"]) / kl_zero if kl_zero != 0 else float("nan"),
        **means,
    }


def _vocabulary_size(model: nn.Module) -> int:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if isinstance(weight, Tensor) and weight.ndim == 2:
        return weight.shape[0]
    return int(getattr(getattr(model, "config", None), "vocab_size", 1) or 1)


def _batch_totals(
    model: nn.Module,
    tokens: Tensor,
    layer: int | None,
    read: str,
    write: str,
    reconstructions: Mapping[str, Reconstruct],
    needs_gradients: bool,
    ignored: Tensor,
    chunk_rows: int,
    exclusion: Exclusion | None = None,
) -> dict[str, Tensor]:
    clean_logits, activation, grad = _clean_forward(model, tokens, layer, read, needs_gradients, chunk_rows)
    splice = ~ignored
    if exclusion is not None and exclusion.needs_activations:
        splice = exclusion.norm_mask({"x": activation}, splice)
    # Flattened [B * T] positions: which count in the CE mean (a target follows and the position
    # is not ignored) and which in the KL mean (not ignored).
    targets, has_target = _next_tokens(tokens)
    counted_kl = splice.flatten()
    counted_ce = counted_kl & has_target
    clean_logits = clean_logits.flatten(0, 1)
    rows = activation[splice].float()
    grad_rows = grad[splice].float() if grad is not None else None
    del activation, grad

    def replaced_by(new_rows: Tensor) -> Callable[[Tensor], Tensor]:
        def hook_fn(hidden: Tensor) -> Tensor:
            if new_rows.shape != (int(splice.sum()), hidden.shape[-1]):
                raise ValueError(f"the reconstruction has shape {list(new_rows.shape)}, but the activation it replaces at "
                                 f"'{write}' has {int(splice.sum())} spliced rows of width {hidden.shape[-1]}")
            out = hidden.clone()
            out[splice] = new_rows.to(hidden.dtype)
            return out

        return hook_fn

    def losses(hook_fn: Callable[[Tensor], Tensor]) -> tuple[float, float]:
        """Summed CE and summed KL(clean || this) with hook_fn replacing the write hook's activation."""
        with torch.no_grad(), replace_hook(model, layer, write, hook_fn):
            logits = model(input_ids=tokens, use_cache=False).logits.flatten(0, 1)
        ce, kl = _chunked_ce_kl(logits, clean_logits, targets, counted_ce, counted_kl, chunk_rows)
        return ce, kl

    ce_clean = _chunked_ce_kl(clean_logits, None, targets, counted_ce, counted_kl, chunk_rows)[0]
    ce_zero, kl_zero = losses(torch.zeros_like)
    counts = [float(counted_ce.sum()), float(counted_kl.sum())]
    out = {}
    for name, reconstruct in reconstructions.items():
        ce, kl = losses(replaced_by(reconstruct(rows, grad_rows)))
        out[name] = torch.tensor(counts + [ce_clean, ce, ce_zero, kl, kl_zero], dtype=torch.float64)
    return out


def _next_tokens(tokens: Tensor) -> tuple[Tensor, Tensor]:
    """For the flattened [B * T] positions: the token each predicts, and whether it has one (the
    last position of a context has none; its target is a placeholder never counted)."""
    targets = torch.cat([tokens[:, 1:], tokens[:, :1]], dim=1).flatten()
    has_target = torch.ones_like(tokens, dtype=torch.bool)
    has_target[:, -1] = False
    return targets, has_target.flatten()


def _chunked_ce_kl(
    logits: Tensor,
    clean_logits: Tensor | None,
    targets: Tensor,
    counted_ce: Tensor,
    counted_kl: Tensor,
    chunk_rows: int,
) -> tuple[float, float]:
    """Summed CE at the `counted_ce` rows and summed KL(clean || logits) at the `counted_kl` rows
    of [N, V] logits, chunk_rows rows at a time so the float32 copies stay small."""
    ce = torch.zeros((), dtype=torch.float64, device=logits.device)
    kl = torch.zeros((), dtype=torch.float64, device=logits.device)
    for start in range(0, logits.shape[0], chunk_rows):
        rows = slice(start, start + chunk_rows)
        logp = F.log_softmax(logits[rows].float(), dim=-1)
        # Per-token values in float32, summed over tokens in float64: the scores divide small
        # differences of these sums.
        token_ce = -logp.gather(-1, targets[rows].unsqueeze(-1)).squeeze(-1)
        ce += token_ce[counted_ce[rows]].double().sum()
        if clean_logits is not None:
            clean = F.log_softmax(clean_logits[rows].float(), dim=-1)
            token_kl = F.kl_div(logp, clean, log_target=True, reduction="none").sum(-1)
            kl += token_kl[counted_kl[rows]].double().sum()
    return ce.item(), kl.item()


def _clean_forward(
    model: nn.Module, tokens: Tensor, layer: int | None, read: str, needs_gradients: bool, chunk_rows: int
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Clean logits [B, T, V], the activation at the read hook [B, T, D] and, if asked,
    dL/d(that activation) [B, T, D]."""
    if not needs_gradients:
        with torch.no_grad(), ActivationRecorder(model, layer, [read]) as recorder:
            logits = model(input_ids=tokens, use_cache=False).logits
        return logits, recorder.values[read], None
    # The recorder makes the hook's activation a fresh leaf: backward runs only through the
    # layers after it and no parameter receives a gradient, even if some are not frozen.
    with torch.enable_grad(), ActivationRecorder(model, layer, [read], leaf=read) as recorder:
        logits = model(input_ids=tokens, use_cache=False).logits
        # dL/dlogits of the summed cross-entropy is softmax - onehot(target) at every position
        # with a target; built chunk by chunk instead of through a float32 copy of all logits.
        flat = logits.detach().flatten(0, 1)
        grad_logits = torch.zeros_like(flat)
        targets, has_target = _next_tokens(tokens)
        for start in range(0, flat.shape[0], chunk_rows):
            rows = slice(start, start + chunk_rows)
            probs = F.softmax(flat[rows].float(), dim=-1)
            probs.scatter_add_(-1, targets[rows].unsqueeze(-1), probs.new_full((probs.shape[0], 1), -1.0))
            grad_logits[rows] = probs.mul_(has_target[rows].unsqueeze(-1)).to(flat.dtype)
        (grad,) = torch.autograd.grad(logits, recorder.values[read], grad_outputs=grad_logits.view_as(logits))
    return logits.detach(), recorder.values[read].detach(), grad
