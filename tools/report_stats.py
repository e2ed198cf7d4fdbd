"""Per-latent statistics for the latent browser (tools/report.py), gathered in one streaming pass
over a sample of token contexts: the top activations, a uniform sample of each latent's firings
(for quantile examples), an exact log-binned activation histogram and firing counts; plus what
the weights alone give: logit effects through the unembedding and nearest neighbours by decoder
cosine.

Every statistic is over the positions the SAE's data keeps (BOS and the DataModule's exclusion
rules left out), so the browser shows what the SAE was trained and validated on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

# Activation histogram: fixed log10 bins, so counts can be summed batch by batch.
HIST_LOG10_RANGE = (-3.0, 5.0)
HIST_BINS = 80


@dataclass
class Example:
    context: int  # index of the context in the sample
    position: int  # the peak position in that context
    activation: float


def flat_code(indices: Tensor, values: Tensor, offsets: Tensor | None, num_tokens: int) -> tuple[Tensor, Tensor, Tensor]:
    """(token, latent, value) triples of a SparseCode, fixed width ([N, k]) or variable (offsets)."""
    if offsets is None:
        tokens = torch.arange(num_tokens, device=indices.device).repeat_interleave(indices.shape[1])
        return tokens, indices.flatten(), values.flatten()
    counts = offsets[1:] - offsets[:-1]
    return torch.arange(num_tokens, device=indices.device).repeat_interleave(counts), indices, values


class LatentStats:
    """Accumulates, batch by batch, every statistic the browser shows per latent.

    `top` top activations per latent (with their global position: context * T + position), a
    uniform random sample of `reservoir` of its firings (random priorities, the smallest kept),
    histogram counts and the number of firings. Codes of every position are kept too (token
    major, CSR), so an example's whole window can be coloured by its latent afterwards.
    """

    def __init__(self, d_sae: int, context_size: int, top: int, reservoir: int, seed: int = 0):
        self.d_sae, self.context_size = d_sae, context_size
        self.top_values = torch.full((d_sae, top), -1.0)
        self.top_positions = torch.full((d_sae, top), -1, dtype=torch.long)
        self.sample_priority = torch.full((d_sae, reservoir), -1.0)
        self.sample_values = torch.zeros(d_sae, reservoir)
        self.sample_positions = torch.full((d_sae, reservoir), -1, dtype=torch.long)
        self.histogram = torch.zeros(d_sae, HIST_BINS, dtype=torch.long)
        self.fired = torch.zeros(d_sae, dtype=torch.long)
        self.positions_seen = 0  # kept positions
        self.generator = torch.Generator().manual_seed(seed)
        self._entries: list[tuple[Tensor, Tensor, Tensor]] = []  # per batch: (global position, latent, value)

    def add(self, first_position: int, num_positions: int, token: Tensor, latent: Tensor, value: Tensor, kept: Tensor) -> None:
        """One batch of `num_positions` consecutive global positions starting at `first_position`:
        triples (position within the batch, latent, value) and which positions are kept [num_positions]."""
        fired = (value > 0) & kept[token]
        token, latent, value = token[fired], latent[fired], value[fired].float()
        self.positions_seen += int(kept.sum())
        self._entries.append((token + first_position, latent.to(torch.int32), value.half()))
        self.fired += torch.bincount(latent, minlength=self.d_sae)
        log = value.clamp_min(1e-30).log10()
        lo, hi = HIST_LOG10_RANGE
        bins = ((log - lo) / (hi - lo) * HIST_BINS).long().clamp(0, HIST_BINS - 1)
        self.histogram.view(-1).index_add_(0, latent * HIST_BINS + bins, torch.ones_like(bins))

        dense = torch.zeros(self.d_sae, num_positions)
        dense[latent, token] = value
        positions = torch.arange(first_position, first_position + num_positions).expand(self.d_sae, -1)
        self.top_values, self.top_positions = _merge_top(self.top_values, self.top_positions, dense, positions, dense)
        priority = torch.where(dense > 0, torch.rand(dense.shape, generator=self.generator), torch.tensor(-1.0))
        # The reservoir keeps the largest priorities: a uniform sample of the firings seen so far.
        merged_priority = torch.cat([self.sample_priority, priority], 1)
        order = merged_priority.topk(self.sample_priority.shape[1], dim=1).indices
        self.sample_values = torch.cat([self.sample_values, dense], 1).gather(1, order)
        self.sample_positions = torch.cat([self.sample_positions, positions], 1).gather(1, order)
        self.sample_priority = merged_priority.gather(1, order)

    def finish(self) -> None:
        """Joins the per-batch codes into one token-major table (call once, after the last add)."""
        position = torch.cat([e[0] for e in self._entries]) if self._entries else torch.empty(0, dtype=torch.long)
        order = position.argsort(stable=True)
        self.code_position = position[order]
        self.code_latent = torch.cat([e[1] for e in self._entries])[order] if self._entries else torch.empty(0, dtype=torch.int32)
        self.code_value = torch.cat([e[2] for e in self._entries])[order] if self._entries else torch.empty(0, dtype=torch.half)
        self._entries = []

    def activations_in(self, latent: int, first: int, last: int) -> dict[int, float]:
        """{global position: activation} of `latent` at positions first..last (inclusive)."""
        lo = int(torch.searchsorted(self.code_position, first))
        hi = int(torch.searchsorted(self.code_position, last, right=True))
        mine = self.code_latent[lo:hi] == latent
        return dict(zip(self.code_position[lo:hi][mine].tolist(), self.code_value[lo:hi][mine].float().tolist()))

    def top_examples(self, latent: int) -> list[Example]:
        return [self._example(int(p), float(v)) for v, p in zip(self.top_values[latent], self.top_positions[latent]) if v > 0]

    def sampled_firings(self, latent: int) -> list[Example]:
        """The uniform sample of the latent's firings, by increasing activation."""
        kept = self.sample_priority[latent] >= 0
        values, positions = self.sample_values[latent][kept], self.sample_positions[latent][kept]
        order = values.argsort()
        return [self._example(int(positions[i]), float(values[i])) for i in order]

    def robust_scale(self, latent: int, quantile: float = 0.99) -> float:
        """The activation at `quantile` of the latent's sampled firings: the colour scale's top,
        so one outlier does not leave every other context pale. 0 for a latent that never fired."""
        kept = self.sample_priority[latent] >= 0
        if not bool(kept.any()):
            return 0.0
        return float(self.sample_values[latent][kept].quantile(quantile))

    def _example(self, position: int, value: float) -> Example:
        return Example(position // self.context_size, position % self.context_size, value)


def _merge_top(values: Tensor, positions: Tensor, new_values: Tensor, new_positions: Tensor, score: Tensor) -> tuple[Tensor, Tensor]:
    merged_values = torch.cat([values, new_values], 1)
    merged_positions = torch.cat([positions, new_positions], 1)
    order = torch.cat([values, score], 1).topk(values.shape[1], dim=1).indices
    return merged_values.gather(1, order), merged_positions.gather(1, order)


def quantile_bands(firings: list[Example], bands: int, per_band: int) -> list[tuple[float, float, list[Example]]]:
    """The sampled firings cut into `bands` groups of equal count by activation, lowest first;
    each (lowest, highest activation of the band, up to `per_band` examples spread across it)."""
    out = []
    for band in range(bands):
        members = firings[band * len(firings) // bands : (band + 1) * len(firings) // bands]
        if not members:
            continue
        step = max(1, len(members) // per_band)
        out.append((members[0].activation, members[-1].activation, members[::step][:per_band]))
    return out


def final_norm_weight(model: torch.nn.Module) -> Tensor | None:
    """The scale of the model's final norm (RMSNorm / LayerNorm before the unembedding), if found."""
    for path in ("model.norm", "transformer.ln_f", "gpt_neox.final_layer_norm", "model.final_layernorm"):
        module = model
        for part in path.split("."):
            module = getattr(module, part, None)
            if module is None:
                break
        weight = getattr(module, "weight", None) if module is not None else None
        if isinstance(weight, Tensor):
            return weight.detach().float()
    return None


@torch.no_grad()
def logit_effects(w_dec: Tensor, unembedding: Tensor, norm_weight: Tensor | None, count: int, chunk: int = 256) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(top values, top token ids, bottom values, bottom token ids), each [d_sae, count]: the
    logits each decoder direction adds through the final norm's scale and the unembedding,
    W_dec[l] * norm_weight @ W_U^T (the norm's division by the residual's scale is left out, as
    in SAE-Vis and Neuronpedia)."""
    w_u = unembedding.float()
    if norm_weight is not None:
        w_u = w_u * norm_weight
    tops, top_ids, bottoms, bottom_ids = [], [], [], []
    for start in range(0, w_dec.shape[0], chunk):
        logits = w_dec[start : start + chunk].float() @ w_u.T
        high, low = logits.topk(count, dim=1), logits.topk(count, dim=1, largest=False)
        tops.append(high.values), top_ids.append(high.indices), bottoms.append(low.values), bottom_ids.append(low.indices)
    return torch.cat(tops), torch.cat(top_ids), torch.cat(bottoms), torch.cat(bottom_ids)


@torch.no_grad()
def nearest_neighbours(w_dec: Tensor, count: int, chunk: int = 1024) -> tuple[Tensor, Tensor]:
    """(cosines, latent ids) [d_sae, count]: each latent's closest other latents by decoder direction."""
    unit = torch.nn.functional.normalize(w_dec.float(), dim=1)
    count = min(count, unit.shape[0] - 1)
    values, ids = [], []
    for start in range(0, unit.shape[0], chunk):
        cos = unit[start : start + chunk] @ unit.T
        cos[torch.arange(cos.shape[0]), torch.arange(start, start + cos.shape[0])] = -2.0  # not itself
        best = cos.topk(count, dim=1)
        values.append(best.values), ids.append(best.indices)
    return torch.cat(values), torch.cat(ids)
