"""The one data path from text to activation rows, shared by the disk cache and the stream.

    documents -> packed token contexts -> ContextPlan (validation first; training context j
    belongs to rank j % world) -> the model in groups of `model_batch_size` contexts
    (Extractor) -> rows of every requested tensor at the kept (non-BOS) positions

The cache writes those rows to shards; the stream feeds them to a shuffle buffer. Both group
a rank's contexts the same way (group g = its contexts g*B .. g*B+B-1), so a group can be
recomputed on its own to exactly the same values, which is how a resumed stream refills.

Gradient convention: "grad" is d L / d x where L = sum over every predicted position of a context
of the next-token cross-entropy (a sum, not a mean, so values do not depend on how many contexts
share a forward pass). Only its direction and relative scale should matter to its users.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from lightning_sae.data.hooks import ActivationRecorder
from lightning_sae.errors import DataError


_KEPT_HELD_OUT_CONTEXTS = 16384


class Extractor:
    """Runs the model on token contexts [B, T] and returns {key: [B, T, D]} for every role, plus
    gradient keys: d(summed next-token CE)/d(activation) at their hook points.

    `roles` maps batch keys to hook kinds of `layer`, or to hook point names when `layer` is None.
    `gradients` is True (key "grad", with respect to role "x") or {gradient key: role}. Without
    gradients the forward stops after the last hook; with them one backward pass serves every
    gradient key and reaches no parameter.
    """

    def __init__(self, model: nn.Module, layer: int | None, roles: dict[str, str], gradients: bool | dict[str, str] = False):
        if gradients is True:
            gradients = {"grad": "x"}
        self.model, self.roles, self.gradients = model, dict(roles), dict(gradients or {})
        unknown = sorted(set(self.gradients.values()) - set(self.roles))
        if unknown:
            raise ValueError(f"gradients asked for roles {unknown} that are not among {sorted(self.roles)}")
        leaves = [self.roles[role] for role in self.gradients.values()]
        self.recorder = ActivationRecorder(model, layer, list(self.roles.values()), leaves=leaves, stop=not leaves)

    def __call__(self, tokens: Tensor) -> dict[str, Tensor]:
        if not self.gradients:
            # no_grad, not inference_mode: streamed rows go straight into training, and
            # inference tensors could not be saved for its backward pass.
            with torch.no_grad(), self.recorder as recorder:
                self.model(input_ids=tokens, use_cache=False)
            return {key: recorder.values[hook] for key, hook in self.roles.items()}
        with torch.inference_mode(False), torch.enable_grad(), self.recorder as recorder:
            logits = self.model(input_ids=tokens, use_cache=False).logits
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten(), reduction="sum")
            del logits
            hooks = [self.roles[role] for role in self.gradients.values()]
            grads = torch.autograd.grad(loss, [recorder.values[hook] for hook in hooks])
        out = {key: recorder.values[hook].detach() for key, hook in self.roles.items()}
        out.update(zip(self.gradients, grads))
        return out


@dataclass(frozen=True)
class Exclusion:
    """Positions left out of the rows (training and validation alike) and out of the spliced-in
    evaluation, beyond BOS: by token id, by position in the context, and by the norm of the SAE's
    input above `norm_above` times the median norm (the lower middle value) over its context's
    positions kept by the token and position rules (the massive activations of attention-sink
    positions). sparsify's `exclude_tokens` and SAELens's special
    tokens are the token-id form; the norm rule is per context, so it does not depend on how many
    contexts share a forward pass.

    `norm_keys`: the batch keys whose row norms are checked ("x" of every site); a position is
    left out when any of them is an outlier.
    """

    token_ids: tuple[int, ...] = ()
    positions: tuple[int, ...] = ()
    norm_above: float | None = None
    norm_keys: tuple[str, ...] = ("x",)

    @property
    def needs_activations(self) -> bool:
        """Whether which positions are kept depends on the model's activations, not only tokens."""
        return self.norm_above is not None

    def token_mask(self, tokens: Tensor) -> Tensor:
        """[B, T] True where a position survives the token-id and position rules."""
        keep = ~torch.isin(tokens, torch.tensor(self.token_ids, dtype=tokens.dtype, device=tokens.device))
        if self.positions:
            length = tokens.shape[-1]
            dropped = sorted({p % length for p in self.positions if -length <= p < length})
            keep[..., dropped] = False
        return keep

    def norm_mask(self, activations: dict[str, Tensor], keep: Tensor) -> Tensor:
        """[B, T] True where no checked activation's norm exceeds norm_above x the median norm of
        its context's positions in `keep`."""
        result = keep.clone()
        for key, value in activations.items():
            if key.rsplit("/", 1)[-1] not in self.norm_keys:
                continue
            norms = value.float().norm(dim=-1)
            median = norms.masked_fill(~keep, float("nan")).nanmedian(dim=-1, keepdim=True).values
            # A context with no kept position has a NaN median: nothing of it is kept anyway.
            result &= ~(norms > self.norm_above * median)
        return result


def keep_mask(tokens: Tensor, exclude_token: "int | Exclusion | None") -> Tensor:
    """Which positions become rows as far as tokens tell: all but those holding `exclude_token`
    (the BOS), or an Exclusion's token-id and position rules (its norm rule needs the
    activations: `kept_positions`)."""
    if isinstance(exclude_token, Exclusion):
        return exclude_token.token_mask(tokens)
    return torch.ones_like(tokens, dtype=torch.bool) if exclude_token is None else tokens != exclude_token


def kept_positions(tokens: Tensor, exclude_token: "int | Exclusion | None", out: dict[str, Tensor]) -> Tensor:
    """[B, T] positions that become rows, given the model's outputs `out` for `tokens`: the one
    filter the cache and the stream (and so training and validation) both apply."""
    keep = keep_mask(tokens, exclude_token).to(next(iter(out.values())).device)
    if isinstance(exclude_token, Exclusion) and exclude_token.needs_activations:
        keep = exclude_token.norm_mask(out, keep)
    return keep


def extract_rows(extractor: Extractor, tokens: Tensor, exclude_token: "int | Exclusion | None") -> dict[str, Tensor]:
    """{key: [kept positions, D] float32} of one group of contexts, rows in (context, position)
    order, on the model's device. Float32 whatever the model's dtype: a stream serves these rows
    to the SAE as they are, and the cache stores them in its own cache_dtype."""
    device = next(extractor.model.parameters()).device
    out = extractor(tokens.to(device))
    keep = kept_positions(tokens, exclude_token, out)
    return {key: value[keep].float() for key, value in out.items()}


@dataclass
class ContextPlan:
    """Which token contexts are held out and which rank trains on which.

    `make_contexts()` packs the text from its start into [context_size] LongTensors. The first
    `validation_contexts` are held out; training context j (counted after them) belongs to
    rank j % world, so ranks read disjoint contexts and together all of them. The same plan
    serves the cache (where each rank writes its own contexts) and the stream.
    """

    make_contexts: Callable[[], Iterator[Tensor]]
    validation_contexts: int
    training_contexts: int | None = None  # None: as many as the text has
    _held_out: Tensor | None = field(default=None, repr=False)

    def validation(self, rank: int = 0, world: int = 1, equal_shares: bool = False) -> Iterator[Tensor]:
        """The held-out contexts of `rank`. With `equal_shares` every rank gets exactly
        validation_contexts // world of them (the last validation_contexts % world are unused),
        so that every rank runs the same number of validation batches. Up to 16384 held-out
        contexts are kept in memory (int32) after the first pass, since every validation reads them."""
        limit = self.validation_contexts - (self.validation_contexts % world if equal_shares else 0)
        if self._held_out is not None:
            contexts: Iterator[Tensor] = (row.long() for row in self._held_out[:limit])
        elif self.validation_contexts <= _KEPT_HELD_OUT_CONTEXTS:
            block = list(itertools.islice(self.make_contexts(), self.validation_contexts))
            if block:
                self._held_out = torch.stack(block).to(torch.int32)
            contexts = iter(block[:limit])
        else:
            contexts = itertools.islice(self.make_contexts(), limit)
        return itertools.islice(contexts, rank, None, world)

    def training(self, rank: int = 0, world: int = 1, cycle: bool = False) -> Iterator[Tensor]:
        """The training contexts of `rank`, in order. With `cycle` the text starts again when it
        ends (said once in a warning, since tokens then repeat); otherwise the iterator ends."""
        for passes in itertools.count():
            contexts = itertools.islice(self.make_contexts(), self.validation_contexts, None)
            if self.training_contexts is not None:
                contexts = itertools.islice(contexts, self.training_contexts)
            yielded = False
            for context in itertools.islice(contexts, rank, None, world):
                yielded = True
                yield context
            if not cycle:
                return
            if not yielded:
                raise DataError(
                    f"rank {rank} of {world} got no training context: the text has too few contexts after "
                    f"the {self.validation_contexts} held out; use a larger dataset or fewer ranks"
                )
            if passes == 0:
                rank_zero_warn("lightning-sae: the dataset ended; the stream reads it again from the start, so tokens repeat")


def groups(contexts: Iterator[Tensor], size: int) -> Iterator[Tensor]:
    """[<=size, T] stacks of consecutive contexts; the last may be smaller."""
    while True:
        block = list(itertools.islice(contexts, size))
        if not block:
            return
        yield torch.stack(block)


def rows_from(
    contexts: Iterator[Tensor],
    extractor: Extractor,
    exclude_token: "int | Exclusion | None",
    group_size: int,
    start_row: int = 0,
) -> Iterator[dict[str, Tensor]]:
    """Chunks of rows (see `extract_rows`) of the contexts in order, starting at row `start_row`.
    Groups wholly before it are only counted (from their tokens), never run through the model."""
    seen = 0
    # Rows left out by activation norms are known only after the model pass: then every group
    # before `start_row` is run to count its rows.
    by_tokens = not (isinstance(exclude_token, Exclusion) and exclude_token.needs_activations)
    for tokens in groups(contexts, group_size):
        rows = None if by_tokens else extract_rows(extractor, tokens, exclude_token)
        count = int(keep_mask(tokens, exclude_token).sum()) if rows is None else len(next(iter(rows.values())))
        if seen + count <= start_row:
            seen += count
            continue
        if rows is None:
            rows = extract_rows(extractor, tokens, exclude_token)
        skip = max(0, start_row - seen)
        seen += count
        yield {key: value[skip:] for key, value in rows.items()} if skip else rows
