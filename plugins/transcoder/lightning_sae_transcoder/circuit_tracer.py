"""A fit's per-layer transcoders as circuit-tracer's `transcoder_set` (lightning_sae.circuit_tracer).

circuit-tracer needs one transcoder per layer 0..L-1, each from mlp_in to mlp_out of its layer
(a fit with `--data.layer=[0, ..., L-1]`, configs/transcoders_all_layers.yaml). Its loaders run
ReLU or JumpReLU, so a TopK set is written with per-layer JumpReLU thresholds calibrated on
held-out rows (`calibrate_threshold`: k features per token on average there), and
config.yaml says so; without rows to calibrate on (an export from a checkpoint alone) a TopK set
is refused with one line.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import Tensor

from lightning_sae.calibration import calibrate_threshold
from lightning_sae.circuit_tracer import save_transcoder_set
from lightning_sae.formats import FormatCannotRunSelector

CALIBRATION_ROWS = 8192
"""Held-out rows per layer the thresholds are calibrated on, at most."""


def layer_order(module) -> list[str]:
    """The module's SAE names by layer, checked to be one mlp_in -> mlp_out transcoder on every
    layer 0..L-1 (what circuit-tracer's transcoder_set is)."""
    if (module.hparams.input, module.hparams.output) != ("mlp_in", "mlp_out"):
        raise FormatCannotRunSelector(f"circuit-tracer's transcoders read mlp_in and write mlp_out; these map "
                                      f"{module.hparams.input} -> {module.hparams.output}")
    by_layer = {}
    for name in module.sae_names:
        match = re.fullmatch(r"layers\.(\d+)", module.sae_sites[name][0])
        if match is None:
            raise FormatCannotRunSelector(f"transcoder '{name}' is at no decoder layer (site {module.sae_sites[name][0]!r})")
        by_layer[int(match[1])] = name
    if sorted(by_layer) != list(range(len(by_layer))):
        raise FormatCannotRunSelector(f"circuit-tracer needs a transcoder on every layer 0..L-1; this fit has layers {sorted(by_layer)}")
    return [by_layer[layer] for layer in range(len(by_layer))]


@torch.no_grad()
def calibrated_thresholds(module, names: list[str], batches: Iterable[dict[str, Tensor]], max_rows: int = CALIBRATION_ROWS) -> list[float]:
    """Per transcoder, the threshold that keeps k of its latents per row on average over N held-out
    rows of its input (`calibrate_threshold`, as the SAELens export); the rows of every
    transcoder are gathered in one pass over `batches`."""
    rows: dict[str, list[Tensor]] = {name: [] for name in names}
    for batch in batches:
        for name in names:
            if sum(part.shape[0] for part in rows[name]) < max_rows:
                rows[name].append(batch[module.sae_inputs[name]].float())
        if all(sum(part.shape[0] for part in rows[name]) >= max_rows for name in names):
            break
    thresholds = []
    for name in names:
        if not rows[name]:
            raise FormatCannotRunSelector("no held-out rows to calibrate the TopK transcoders' JumpReLU thresholds on")
        sae = module.get_sae(name)
        thresholds.append(calibrate_threshold(sae, torch.cat(rows[name])[:max_rows], sae.k)["threshold"])
    return thresholds


def save_circuit_tracer_set(module, directory: str | Path, batches: Iterable[dict[str, Tensor]] | None = None) -> Path:
    """Write the module's transcoders (one per layer) in circuit-tracer's layout; a TopK set needs
    `batches` of held-out data to calibrate its thresholds on."""
    names = layer_order(module)
    saes = [module.get_sae(name) for name in names]
    layers = [{"W_enc": sae.W_enc, "W_dec": sae.W_dec, "b_enc": sae.b_enc, "b_dec": sae.b_dec, "W_skip": sae.W_skip} for sae in saes]
    metadata = {"selector": module.selector.config(), "d_sae": saes[0].d_sae}
    exports = [sae.selector.saelens_export(sae) for sae in saes]
    architectures = {export.architecture for export in exports}
    if architectures == {"jumprelu"} and all("threshold" in export.tensors for export in exports):
        # A JumpReLU at inference (JumpReLU, BatchTopK): pre > max(theta, 0), circuit-tracer's own rule.
        thresholds = [export.tensors["threshold"].detach().float().clamp_min(0) for export in exports]
        return save_transcoder_set(directory, layers, k=None, thresholds=thresholds, metadata=metadata)
    if architectures != {"topk"}:
        raise FormatCannotRunSelector(f"circuit-tracer 0.5.0 runs ReLU or JumpReLU; these transcoders' rule exports as {sorted(architectures)}")
    k = saes[0].k
    if batches is None:
        raise FormatCannotRunSelector(
            "a TopK transcoder set runs in circuit-tracer 0.5.0 only as a JumpReLU calibrated on held-out activations, "
            "which a checkpoint alone does not hold: use the fit's end-of-training export (<log dir>/circuit_tracer)")
    thresholds = calibrated_thresholds(module, names, batches)
    metadata["calibrated_thresholds"] = thresholds
    return save_transcoder_set(directory, layers, k=k, thresholds=thresholds, metadata=metadata)
