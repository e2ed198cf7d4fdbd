"""CLTModule: one cross-layer transcoder over every layer the DataModule serves, trained jointly.

The data request is the per-layer transcoder's (each site's MLP input `x` and output `y`); with
`--data.layer=[0, 1, ..., L-1]` one model pass serves every layer (cached or streamed). Unlike
the other variants, whose SAEs live at one site each, the CLT spans the sites: it reads every
site's batch at once, so this module builds one model over all sites and takes over the per-site
steps of the base (training and validation step, optimizer, validation metrics, export). The
base still provides the optimizer schedule, checkpoints, resumption, the data plumbing and the
callbacks.

Logged: train/loss, train/fvu (mean over layers), train/layers.N/{fvu, aux_loss, l0,
dead_fraction}; val/layers.N/{explained_variance, mse, cossim, l0, ...} against each MLP output;
val/explained_variance (mean over layers); and the replacement model's val/ce_loss_score,
val/kl_div_score (every MLP replaced at once, `replacement.replacement_scores`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from lightning_sae.circuit_tracer import save_cross_layer_transcoder
from lightning_sae.data_request import DataRequest, Hook, HookKind
from lightning_sae.formats import FormatCannotRunSelector
from lightning_sae.metrics import DeadLatentTracker, FeatureDensity, ReconstructionStats
from lightning_sae.module import SAETrainingModule, default_learning_rate
from lightning_sae.sae import geometric_median
from lightning_sae.selection import Selector
from lightning_sae_clt.clt import CrossLayerTranscoder
from lightning_sae_clt.replacement import CLTReplacement, replacement_scores


class CLTModule(SAETrainingModule):
    """A cross-layer transcoder over the DataModule's layers (its sites, sorted by layer).

    Args:
        k: features active per layer and token (TopK; the selector's rule otherwise).
        d_sae: features per layer; None gives expansion_factor * d_in.
        expansion_factor: d_sae / d_in when d_sae is None.
        selector: which features fire, per layer (any Selector; each layer gets its own copy).
        input: hook kind every layer's features read (default mlp_in).
        output: hook kind they predict (default mlp_out).
        **kwargs: SAETrainingModule's (lr, warmup_steps, dead_tokens, aux_k, seed, ...).
    """

    hparams_ignore = ("selector",)

    def __init__(
        self,
        k: int = 16,
        d_sae: int | None = None,
        expansion_factor: int = 2,
        selector: Selector | None = None,
        input: str = "mlp_in",
        output: str = "mlp_out",
        **kwargs: Any,
    ):
        HookKind(input), HookKind(output)
        self.set_selector(selector)
        super().__init__(**kwargs)

    def data_request(self) -> DataRequest:
        reads = {"x": Hook.kind(self.hparams.input), "y": Hook.kind(self.hparams.output)}
        return DataRequest(reads, gradients=self.selector.needs_gradients)

    # ---- one model over all sites -------------------------------------------------------------------
    def configure_model(self) -> None:
        if "clt" not in self._modules:  # built already when loaded from a checkpoint (hparams widths)
            super().configure_model()

    def _build(self, widths: dict[str, int], sites: list[str] | None = None) -> None:
        sites = list(sites or [])
        self.site_names = sorted(sites, key=_layer_of) if sites else [""]
        self.layer_numbers = [_layer_of(site) for site in self.site_names] if sites else [None]
        prefixes = [f"{site}/" if len(self.site_names) > 1 else "" for site in self.site_names]
        self.x_keys = [prefix + "x" for prefix in prefixes]
        self.y_keys = [prefix + "y" for prefix in prefixes]
        d_in, d_out = widths[self.x_keys[0]], widths[self.y_keys[0]]
        if any(widths[key] != d_in for key in self.x_keys) or any(widths[key] != d_out for key in self.y_keys):
            raise ValueError(f"every layer of a cross-layer transcoder needs the same widths, got {widths}")
        d_sae = self.hparams.d_sae or self.hparams.expansion_factor * d_in
        if not 1 <= self.hparams.k <= d_sae:
            raise ValueError(f"k must satisfy 1 <= k <= d_sae ({d_sae}), got k={self.hparams.k}")
        # The base's per-site SAEs stay empty: its loops over sae_names are no-ops for this module.
        self.sae_names, self.scopes = [], [""]
        self.clt = CrossLayerTranscoder(len(self.site_names), d_in, d_out, d_sae, self.hparams.k, seed=self.hparams.seed, selector=self.selector)
        self.clt_activity = nn.ModuleList(DeadLatentTracker(d_sae, self.hparams.dead_tokens) for _ in self.site_names)
        self.val_stats = nn.ModuleList(ReconstructionStats(d_out) for _ in self.site_names)
        self.val_density = nn.ModuleList(FeatureDensity(d_sae) for _ in self.site_names)
        self._calibration_rows: list[list[Tensor]] = [[] for _ in self.site_names]

    def layer_label(self, index: int) -> str:
        return self.site_names[index] or "layer"

    # ---- training -----------------------------------------------------------------------------------------
    def _inputs(self, batch: dict[str, Tensor]) -> tuple[list[Tensor], list[Tensor], list[Tensor | None]]:
        xs = [batch[key] for key in self.x_keys]
        ys = [batch[key] for key in self.y_keys]
        grads = [batch.get(key[:-1] + "grad") for key in self.x_keys]
        return xs, ys, grads

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        xs, ys, grads = self._inputs(batch)
        if (self._trainer is None or self.trainer.global_step == 0) and not bool(self.b_dec_initialized):
            self._initialize_output_biases(ys)
        dead = [None if t.tokens_seen < t.dead_tokens else t.dead_mask() for t in self.clt_activity]
        out = self.clt(xs, ys, grads=grads, dead_masks=dead, aux_k=self.hparams.aux_k)
        loss = out.fvu.sum() + self.hparams.aux_coefficient * out.auxk.sum()
        n = xs[0].shape[0]
        logged = {"train/fvu": out.fvu.mean()}
        for index, (layer, terms) in enumerate(zip(self.clt.layers, out.loss_terms)):
            if terms:  # a learned rule's sparsity penalty, weighted and warmed up as the rule says
                loss = loss + self.weighted_loss_terms(terms, layer.selector)
                logged.update({f"train/{self.layer_label(index)}/{name}": term for name, term in terms.items()})
        logged["train/loss"] = loss
        for index, (code, tracker) in enumerate(zip(out.codes, self.clt_activity)):
            tracker.update(code.indices, code.values.detach(), code.num_tokens)
            label = self.layer_label(index)
            logged.update({f"train/{label}/fvu": out.fvu[index], f"train/{label}/aux_loss": out.auxk[index],
                           f"train/{label}/l0": code.active_per_token().mean(), f"train/{label}/dead_fraction": tracker.dead_fraction()})
        self.log_dict(logged, on_step=True, on_epoch=False, batch_size=n)
        return loss

    @torch.no_grad()
    def _initialize_output_biases(self, ys: list[Tensor]) -> None:
        for index, y in enumerate(ys):
            y = y.float()
            if self.trainer.world_size > 1:
                y = self.all_gather(y).reshape(-1, y.shape[-1])
            method = self.hparams.b_dec_init
            value = geometric_median(y) if method == "geometric_median" else y.mean(0) if method == "mean" else torch.zeros_like(y[0])
            self.clt.b_dec[index].copy_(value)
        self.b_dec_initialized.fill_(True)

    def optimizer_and_schedule(self, total_steps: int) -> dict[str, Any]:
        lr = default_learning_rate(self.clt.d_sae) if self.hparams.lr is None else self.hparams.lr
        groups = [{"params": list(self.clt.parameters()), "lr": lr}]
        # The base builds Adam and the schedule from self.sae_names; one group here.
        optimizer = torch.optim.Adam(groups, betas=(0.9, 0.999), fused=self._fused_adam(groups))
        from lightning_sae.module import warmup_then_linear_decay

        total = max(1, int(total_steps))
        warmup = self.hparams.warmup_steps if self.hparams.warmup_steps is not None else min(1000, max(1, total // 20))
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_then_linear_decay(step, total, warmup, self.hparams.decay_fraction))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # ---- validation ---------------------------------------------------------------------------------------
    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        xs, ys, grads = self._inputs(batch)
        out = self.clt(xs, grads=grads)
        for index, (y, yhat, code) in enumerate(zip(ys, out.yhats, out.codes)):
            self.val_stats[index].update(y, yhat, code.values)
            self.val_density[index].update(code.indices, code.values, code.num_tokens)
            self._calibration_rows[index].append(xs[index].detach().float().cpu())

    def on_validation_epoch_end(self) -> None:
        values, explained = {}, []
        for index in range(len(self.site_names)):
            stats = {name: float(value) for name, value in self.val_stats[index].compute().items()}
            stats.pop("tokens", None)
            label = self.layer_label(index)
            values.update({f"val/{label}/{name}": value for name, value in stats.items()})
            values[f"val/{label}/dead_fraction"] = float(self.clt_activity[index].dead_fraction())
            explained.append(stats["explained_variance"])
            self.val_stats[index].reset()
            self.val_density[index].reset()
        values["val/explained_variance"] = sum(explained) / len(explained)
        if self._calibration_rows[0]:
            # The JumpReLU threshold an export to circuit-tracer uses (see lightning_sae.circuit_tracer).
            self.clt.calibrate_thresholds([torch.cat(rows).to(self.device) for rows in self._calibration_rows])
        self._calibration_rows = [[] for _ in self.site_names]
        values.update({f"val/{name}": value for name, value in self._replacement_scores().items()})
        self.core_results = {}
        self.log_dict(values, sync_dist=True)

    def _replacement_scores(self) -> dict[str, float]:
        trainer = self._trainer
        datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
        contexts_wanted = self.hparams.spliced_eval_contexts
        if (contexts_wanted <= 0 or trainer.sanity_checking or self.layer_numbers[0] is None
                or not (hasattr(datamodule, "load_language_model") and hasattr(datamodule, "validation_contexts"))):
            return {}
        if self.hparams.input != "mlp_in" or self.hparams.output != "mlp_out":
            return {}
        with torch.inference_mode(False):
            model = datamodule.load_language_model()
            if next(model.parameters()).device != self.device:
                model.to(self.device)
            contexts = datamodule.validation_contexts(contexts_wanted)
            tokenizer = getattr(datamodule, "tokenizer", None)
            with torch.no_grad():
                return replacement_scores(model, contexts, self.layer_numbers, CLTReplacement(self.clt),
                                          bos_token_id=getattr(tokenizer, "bos_token_id", None))

    # ---- export ----------------------------------------------------------------------------------------
    def save_saes(self, directory: str | Path) -> dict[str, Path]:
        """At the end of a fit: the CLT in circuit-tracer's cross_layer_transcoder layout at
        `<log dir>/circuit_tracer` (`directory` is the base's `<log dir>/sae`)."""
        target = Path(directory).parent / "circuit_tracer"
        try:
            self.save_circuit_tracer(target)
        except ValueError as error:  # FormatCannotRunSelector: no calibrated threshold (no validation ran)
            rank_zero_info(f"lightning-sae: the cross-layer transcoder was not exported for circuit-tracer: {error}")
            return {}
        rank_zero_info(f"lightning-sae: cross-layer transcoder saved (circuit-tracer format) to {target}")
        return {"clt": target}

    def save_circuit_tracer(self, directory: str | Path) -> Path:
        """The CLT in circuit-tracer's cross_layer_transcoder layout (`lightning-sae-export
        --format circuit-tracer`); a TopK CLT with the thresholds its last validation calibrated."""
        return save_clt_circuit_tracer(self.clt, Path(directory), self.hparams.input, self.hparams.output, self.layer_numbers, self.selector)

    def save_saes_sparsify(self, directory: str | Path) -> dict[str, Path]:
        return {}  # sparsify has no cross-layer transcoder format


def save_clt_circuit_tracer(clt: CrossLayerTranscoder, target: Path, input_kind: str, output_kind: str,
                            layers: list[int | None], selector: Selector) -> Path:
    """`clt` in circuit-tracer's layout; a TopK CLT with its calibrated thresholds."""
    if layers[0] != 0 or layers != list(range(len(layers))):
        raise FormatCannotRunSelector(f"circuit-tracer needs features on every layer 0..L-1; this CLT covers layers {layers}")
    thresholds = _selector_thresholds(clt)
    return save_cross_layer_transcoder(
        target, [layer.W_enc for layer in clt.layers], [layer.b_enc for layer in clt.layers],
        [layer.decoder() for layer in clt.layers], clt.b_dec, k=clt.k if thresholds is None else None,
        thresholds=thresholds if thresholds is not None else clt.calibrated_threshold.tolist(),
        input_kind=input_kind, output_kind=output_kind, metadata={"selector": selector.config(), "d_sae": clt.d_sae},
    )


def _selector_thresholds(clt: CrossLayerTranscoder) -> list[Tensor] | None:
    """Per-layer [d_sae] thresholds where the selector's inference rule is a JumpReLU (the
    SAELens export says so: JumpReLU, BatchTopK), which circuit-tracer runs as it is; None for
    TopK (exported with calibrated thresholds); refused for any other rule."""
    exports = [layer.selector.saelens_export(layer) for layer in clt.layers]
    architectures = {export.architecture for export in exports}
    if architectures == {"topk"}:
        return None
    if architectures == {"jumprelu"} and all("threshold" in export.tensors for export in exports):
        # Inference keeps pre > max(theta, 0) of the raw pre-activation: circuit-tracer's JumpReLU.
        return [export.tensors["threshold"].detach().float().clamp_min(0) for export in exports]
    raise FormatCannotRunSelector(f"circuit-tracer 0.5.0 runs ReLU or JumpReLU; this CLT's rule exports as {sorted(architectures)}")


def _layer_of(site: str) -> int:
    match = re.search(r"layers\.(\d+)", site)
    if match is None:
        raise ValueError(f"a cross-layer transcoder needs sites inside decoder layers (layers.N...), got {site!r}")
    return int(match[1])
