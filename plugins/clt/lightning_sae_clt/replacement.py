"""The replacement model's loss: every listed MLP's output replaced at once by a transcoder's
prediction, read from that MLP's input in the same (replaced) forward.

This is the model circuit-tracer attributes through: the features of layer l see the residual
stream that the replacements of layers < l produced, so errors compound across layers, unlike the
one-site splice of the core (`lightning_sae.spliced`), which replaces one activation in an
otherwise clean forward. SAELens's conventions otherwise (as in `lightning_sae.spliced`): BOS
positions keep the MLPs' own outputs and are left out of every mean; the zero-ablated forward
zeroes every listed MLP's output at every position.

    ce_loss_score = (CE_zero_ablated - CE_replaced) / (CE_zero_ablated - CE_clean)
    kl_div_score  = (KL_zero_ablated - KL_replaced) / KL_zero_ablated

A `Replacement` is called once per listed layer, in layer order, during each forward:
`replacement(position, rows)` gets the rows [n, d_in] of the MLP input at the `position`-th listed
layer (non-BOS positions) and returns that MLP's output rows [n, d_out]. `reset()` (if it has one)
runs before each forward: a cross-layer transcoder keeps what earlier layers' features write to
later outputs between calls.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import ExitStack

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_sae.data.hooks import mlp_module

Replacement = Callable[[int, Tensor], Tensor]


class CLTReplacement:
    """A CrossLayerTranscoder as a `Replacement`: at layer position j it encodes the rows, adds what
    they write to outputs j..L-1 to the running sums, and returns output j."""

    def __init__(self, clt: nn.Module):
        self.clt = clt
        self.reset()

    def reset(self) -> None:
        self.written: list[Tensor | None] = [None] * self.clt.n_layers

    @torch.no_grad()
    def __call__(self, position: int, rows: Tensor) -> Tensor:
        layer = self.clt.layers[position]
        code = layer.encode(rows.to(layer.W_enc.dtype))
        out = layer.decode_latents(code).view(rows.shape[0], self.clt.n_layers - position, self.clt.d_out)
        for offset in range(out.shape[1]):
            target = position + offset
            self.written[target] = out[:, offset] if self.written[target] is None else self.written[target] + out[:, offset]
        return self.written[position] + self.clt.b_dec[position]


@torch.no_grad()
def replacement_scores(
    model: nn.Module,
    contexts: Tensor,
    layers: Sequence[int],
    replacement: Replacement,
    *,
    bos_token_id: int | None = None,
    batch_size: int = 4,
) -> dict[str, float]:
    """CE and KL of the clean model, of the replacement model (every MLP in `layers` replaced at
    once) and of the model with those MLPs zero-ablated, over `contexts` [B, T]; and the scores."""
    if contexts.ndim != 2:
        raise ValueError(f"contexts must be [B, T] token ids, got shape {list(contexts.shape)}")
    if bos_token_id is None:
        bos_token_id = getattr(getattr(model, "config", None), "bos_token_id", None)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    sums = torch.zeros(7, dtype=torch.float64)  # ce_tokens, kl_tokens, ce clean / replaced / zero, kl replaced / zero
    try:
        for start in range(0, contexts.shape[0], batch_size):
            tokens = contexts[start : start + batch_size].to(device)
            spliced = tokens != bos_token_id if bos_token_id is not None else torch.ones_like(tokens, dtype=torch.bool)
            clean = _log_probs(model, tokens)
            replaced = _log_probs(model, tokens, _replacing_hooks(layers, replacement, spliced))
            zeroed = _log_probs(model, tokens, _replacing_hooks(layers, None, None))
            counted_ce = spliced[:, :-1]
            targets = tokens[:, 1:][counted_ce]
            ce = [F.nll_loss(lp[:, :-1][counted_ce], targets, reduction="sum").double() for lp in (clean, replaced, zeroed)]
            kl = [F.kl_div(lp[spliced], clean[spliced], log_target=True, reduction="sum").double() for lp in (replaced, zeroed)]
            sums += torch.stack([torch.tensor(float(counted_ce.sum())), torch.tensor(float(spliced.sum())), *ce, *kl]).cpu()
    finally:
        model.train(was_training)
    ce_tokens, kl_tokens = sums[0].item(), sums[1].item()
    ce_clean, ce_replaced, ce_zero = (sums[2:5] / ce_tokens).tolist()
    kl_replaced, kl_zero = (sums[5:7] / kl_tokens).tolist()
    return {
        "ce_loss_score": (ce_zero - ce_replaced) / (ce_zero - ce_clean) if ce_zero != ce_clean else float("nan"),
        "kl_div_score": (kl_zero - kl_replaced) / kl_zero if kl_zero != 0 else float("nan"),
        "ce_loss_without_sae": ce_clean,
        "ce_loss_with_sae": ce_replaced,
        "ce_loss_with_ablation": ce_zero,
        "kl_div_with_sae": kl_replaced,
        "kl_div_with_ablation": kl_zero,
        "total_tokens_eval_reconstruction": kl_tokens,
    }


def _log_probs(model: nn.Module, tokens: Tensor, hooks: Callable[[nn.Module, ExitStack], None] | None = None) -> Tensor:
    with ExitStack() as stack:
        if hooks is not None:
            hooks(model, stack)
        logits = model(input_ids=tokens, use_cache=False).logits
    return F.log_softmax(logits.float(), dim=-1)


def _replacing_hooks(layers: Sequence[int], replacement: Replacement | None, spliced: Tensor | None) -> Callable[[nn.Module, ExitStack], None]:
    """Forward hooks on the listed MLP modules: their output replaced by `replacement` at the
    `spliced` positions (None: zeroed everywhere)."""

    def install(model: nn.Module, stack: ExitStack) -> None:
        if replacement is not None and hasattr(replacement, "reset"):
            replacement.reset()
        for position, layer in enumerate(layers):
            def hook(module, args, output, position=position):
                if replacement is None:
                    return torch.zeros_like(output)
                new = output.clone()
                rows = replacement(position, args[0][spliced].float())
                new[spliced] = rows.to(output.dtype)
                return new

            stack.callback(mlp_module(model, layer).register_forward_hook(hook).remove)

    return install
