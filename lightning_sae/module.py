"""LightningModules: the shared training base and the single-SAE module.

`SAETrainingModule` owns what every variant shares: lazily built TopK SAEs sized from the data
(each computes its own losses), Adam with warm-up and linear decay, decoder maintenance,
dead-latent tracking across ranks, and the logged metrics. The side effects of a fit
(histograms, export, the console summary) are callbacks it adds by default (`configure_callbacks`).
A variant (e.g. the JSAE pair) subclasses it and says which SAEs it has and what its loss is.
`SAEModule` trains one SAE whose latent selection is a plugin.

Sites: a DataModule may serve several hook points at once (one model pass for all). The variant
is then instantiated once per site: its SAEs, losses, metrics and exports are the same as in a
fit on that site alone, named under the site (`train/layers.9/fvu`, `<log dir>/sae/layers.9`).
A variant's code never sees the site: while it runs for one, `get_sae("sae")`, the batch and
`self.log("train/...")` all refer to that site's (see `site_scope`).
"""

from __future__ import annotations

import copy
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from lightning_sae import normalization
from lightning_sae.callbacks import default_callbacks
from lightning_sae.checkpoint_io import load_checkpoint
from lightning_sae.data_request import DataRequest, Hook, Splice
from lightning_sae.errors import ConfigError
from lightning_sae.formats import FormatCannotRunSelector, load_sae, save_saelens, save_sparsify, unit_decoder_rows
from lightning_sae.metrics import DeadLatentTracker, FeatureDensity, ReconstructionStats, fraction_of_variance_unexplained
from lightning_sae.sae import SparseCode, TopKSAE
from lightning_sae.selection import Coefficient, Selector, TopK, selector_from_config


@dataclass(frozen=True)
class SAESpec:
    """One SAE a variant trains at each site: it encodes batch key `input` and reconstructs
    `target` (default: `input`; a transcoder reads mlp_in and predicts mlp_out), with `d_sae`
    latents, `k` per token for TopK-like rules, selected by `selector` (default TopK; each site
    gets its own copy, so a selector's state is per SAE)."""

    input: str
    d_sae: int
    k: int
    target: str | None = None
    selector: Selector | None = None

    @property
    def target_key(self) -> str:
        return self.input if self.target is None else self.target


@dataclass
class SAEStep:
    """One SAE's forward on a batch, with its share of the loss."""

    xhat: Tensor
    code: SparseCode
    fvu: Tensor
    aux_loss: Tensor
    loss: Tensor
    loss_terms: dict[str, Tensor] = field(default_factory=dict)  # the selector's, unweighted


def default_learning_rate(d_sae: int) -> float:
    """2e-4 / sqrt(M / 2^14): the scaling law of OpenAI's "Scaling and evaluating SAEs"."""
    return 2e-4 / math.sqrt(d_sae / 2**14)


def warmup_then_linear_decay(step: int, total_steps: int, warmup_steps: int, decay_fraction: float) -> float:
    """Learning-rate multiplier: linear warm-up, flat, then linear decay to 0 over the last steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = int(total_steps * decay_fraction)
    decay_start = total_steps - decay_steps
    if decay_steps > 0 and step >= decay_start:
        return max(0.0, (total_steps - step) / decay_steps)
    return 1.0


class SAETrainingModule(L.LightningModule):
    """Base of every variant. Subclasses implement `sae_shapes`, `data_request` and `training_loss`,
    and may override `validate_batch`; all four see one site's names and batch (see `site_scope`).

    Args:
        lr: Adam learning rate; None gives 2e-4 / sqrt(d_sae / 2^14) per SAE.
        warmup_steps: linear warm-up length; None gives min(1000, 5% of all steps).
        decay_fraction: fraction of the steps, at the end, over which the rate decays linearly to 0.
        dead_tokens: a latent that has not fired for this many training tokens is dead.
        aux_k: latents AuxK revives per token; None gives d_in / 2.
        aux_coefficient: weight of the AuxK loss.
        b_dec_init: "geometric_median", "mean" or "zeros" of the first training batch.
        widths: input width per batch key; inferred from the DataModule when None.
        sites: the DataModule's hook points (one set of SAEs each); inferred from it when None.
        seed: seed of the decoder initialisation (the same at every site).
        spliced_eval_contexts: held-out contexts on which each validation splices the SAEs into the
            language model for ce_loss_score / kl_div_score (0 disables; needs a DataModule with
            a language model).
        reconstruction_objective: "fvu" (||x - xhat||^2 / ||x - mean x||^2 over the batch, the
            default) or "mse" (SAELens's: squared error summed over features, averaged over
            tokens), the scale a selector's loss-term coefficients are relative to. (Named apart
            from JSAE's own `reconstruction_loss`, whose "mse" is the mean over elements.)
        normalize_activations: "none" (default: train on the activations as they are) or
            "expected_average_only_in": every batch key is scaled by one factor estimated from the
            first training batch so that its rows' mean norm is sqrt(width), which makes the
            learning rate and loss weights mean the same across models; exported SAEs take raw
            activations (lightning_sae.normalization). Variants opt in (`supports_activation_normalization`).
    """

    hparams_ignore: tuple[str, ...] = ()
    """Init arguments that are objects, not settings: kept out of checkpoints' hyperparameters."""

    supports_activation_normalization: bool = False
    """Whether the variant trains correctly on normalised batches (its loss must not mix a key's
    scale with raw model quantities, e.g. a frozen MLP between two SAEs)."""

    def __init__(
        self,
        lr: float | None = None,
        warmup_steps: int | None = None,
        decay_fraction: float = 0.2,
        dead_tokens: int = 10_000_000,
        aux_k: int | None = None,
        aux_coefficient: float = 1 / 32,
        b_dec_init: str = "geometric_median",
        widths: dict[str, int] | None = None,
        sites: list[str] | None = None,
        seed: int = 0,
        spliced_eval_contexts: int = 32,
        reconstruction_objective: str = "fvu",
        normalize_activations: str = "none",
    ):
        super().__init__()
        # Called here, Lightning collects the init arguments of every subclass in the chain too.
        self.save_hyperparameters(ignore=list(self.hparams_ignore))
        if isinstance(self.__dict__.get("selector"), Selector):  # set by `set_selector`, before us
            self.hparams["selector"] = self.selector.config()
        check_learning_rate(lr)
        if b_dec_init not in ("geometric_median", "mean", "zeros"):
            raise ValueError(f"b_dec_init must be 'geometric_median', 'mean' or 'zeros', got {b_dec_init!r}")
        if not 0 <= decay_fraction <= 1:
            raise ValueError(f"decay_fraction must be in [0, 1], got {decay_fraction}")
        if dead_tokens < 1:
            raise ValueError(f"dead_tokens must be >= 1, got {dead_tokens}")
        if spliced_eval_contexts < 0:
            raise ValueError(f"spliced_eval_contexts must be >= 0, got {spliced_eval_contexts}")
        if reconstruction_objective not in ("fvu", "mse"):
            raise ValueError(f"reconstruction_objective must be 'fvu' or 'mse', got {reconstruction_objective!r}")
        if normalize_activations not in normalization.MODES:
            raise ValueError(f"normalize_activations must be one of {list(normalization.MODES)}, got {normalize_activations!r}")
        if normalize_activations != "none" and not self.supports_activation_normalization:
            raise ValueError(f"{type(self).__name__} does not support normalize_activations={normalize_activations!r}")
        self.sae_names: list[str] = []
        self.sae_sites: dict[str, tuple[str, str]] = {}  # SAE name -> (site scope, name inside the site)
        self.scopes: list[str] = [""]
        self._scope = ""
        self.register_buffer("b_dec_initialized", torch.tensor(False))
        if widths is not None:
            self._build(widths, sites)

    # ---- what a variant defines -------------------------------------------------------------
    def sae_shapes(self, widths: dict[str, int]) -> dict[str, SAESpec | tuple[str, int, int]]:
        """{sae attribute name: SAESpec} (or the older (batch key, d_sae, k), meaning an SAE that
        reconstructs its own input with TopK)."""
        raise NotImplementedError

    def build_sae(self, spec: SAESpec, widths: dict[str, int], seed: int) -> TopKSAE:
        """The SAE module for `spec` (override to train another TopKSAE subclass)."""
        selector = copy.deepcopy(spec.selector) if spec.selector is not None else TopK()
        return TopKSAE(widths[spec.input], spec.d_sae, spec.k, seed=seed, selector=selector, d_out=widths[spec.target_key])

    def data_request(self) -> DataRequest:
        raise NotImplementedError

    def set_selector(self, selector: Selector | dict[str, Any] | None) -> Selector:
        """Make `selector` (an instance, a checkpoint's `config()` dict, or None for TopK) the
        prototype that this module's SAESpecs hand to their SAEs (each SAE copies it), recorded in
        hparams as its config. A variant taking a selector calls this before `super().__init__`,
        which may build the SAEs at once (`widths`). The prototype stays out of the module tree,
        so it is neither checkpointed nor trained; the SAEs' copies are."""
        selector = selector_from_config(selector)
        object.__setattr__(self, "selector", selector)
        if "_hparams" in self.__dict__:  # after save_hyperparameters
            self.hparams["selector"] = selector.config()
        return selector

    def training_loss(self, batch: dict[str, Tensor]) -> Tensor:
        raise NotImplementedError

    # ---- construction ----------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.sae_names:
            return
        datamodule = getattr(self.trainer, "datamodule", None)
        widths = getattr(datamodule, "widths", None)
        if not widths:
            raise RuntimeError("the SAE widths are unknown: give model.widths or use a DataModule that sets `widths`")
        sites = list(getattr(datamodule, "sites", None) or [])
        self.hparams["widths"] = dict(widths)
        self.hparams["sites"] = sites or None
        self._build(dict(widths), sites)

    def _build(self, widths: dict[str, int], sites: list[str] | None = None) -> None:
        # One site keeps the bare names ("sae", batch key "x"); several prefix theirs ("layers.9/").
        self.scopes = list(sites) if sites and len(sites) > 1 else [""]
        self.sae_inputs: dict[str, str] = {}  # SAE name -> the batch key it encodes
        self.sae_keys: dict[str, str] = {}  # the same key inside the SAE's site
        self.sae_targets: dict[str, str] = {}  # SAE name -> the batch key it reconstructs
        self.sae_target_keys: dict[str, str] = {}  # the same key inside the SAE's site
        for scope in self.scopes:
            local_widths = self._site_items(widths, scope)
            shapes = self.sae_shapes(local_widths)
            for offset, (local, spec) in enumerate(shapes.items()):
                if not isinstance(spec, SAESpec):
                    spec = SAESpec(*spec)
                for key in (spec.input, spec.target_key):
                    if key not in local_widths:
                        raise ValueError(f"SAE '{local}' reads batch key '{key}', but the data provides {sorted(local_widths)}")
                name = self._scoped(scope, local)
                self.add_module(self._attribute(name), self.build_sae(spec, local_widths, self.hparams.seed + offset))
                self.add_module(self._attribute(name) + "_activity", DeadLatentTracker(spec.d_sae, self.hparams.dead_tokens))
                self.sae_names.append(name)
                self.sae_sites[name] = (scope, local)
                self.sae_inputs[name] = self._scoped(scope, spec.input)
                self.sae_keys[name] = spec.input
                self.sae_targets[name] = self._scoped(scope, spec.target_key)
                self.sae_target_keys[name] = spec.target_key
        if self.normalizes_activations:
            # One factor per batch key, estimated at the first training step (then checkpointed).
            for key in widths:
                self.register_buffer(self._scale_buffer(key), torch.tensor(1.0))
            self.register_buffer("activation_scales_estimated", torch.tensor(False))
        self.val_stats = nn.ModuleDict()
        self.val_density = nn.ModuleDict()
        for name in self.sae_names:
            for mode in self.validation_modes():
                self.val_stats[self._metric_key(name, mode)] = ReconstructionStats(widths[self.sae_targets[name]])
                self.val_density[self._metric_key(name, mode)] = FeatureDensity(self.get_sae(name).d_sae)

    # ---- sites ----------------------------------------------------------------------------------------
    @staticmethod
    def _scoped(scope: str, name: str) -> str:
        return f"{scope}/{name}" if scope else name

    @staticmethod
    def _attribute(name: str) -> str:
        """Module attribute of an SAE: its name where that is a valid one (always, for one site)."""
        return name.replace(".", "_").replace("/", "__").replace(":", "_")

    @staticmethod
    def _site_items(items: dict[str, Any], scope: str) -> dict[str, Any]:
        """The entries of one site, with the site prefix taken off their keys."""
        if not scope:
            return dict(items)
        prefix = scope + "/"
        return {key[len(prefix) :]: value for key, value in items.items() if key.startswith(prefix)}

    @contextmanager
    def site_scope(self, scope: str) -> Iterator[None]:
        """Inside the block, SAE names and logged metric names are those of site `scope`."""
        previous, self._scope = self._scope, scope
        try:
            yield
        finally:
            self._scope = previous

    def _resolve(self, name: str) -> str:
        if not self._scope or name in self.sae_sites:
            return name
        return self._scoped(self._scope, name)

    def scoped_metric(self, name: str) -> str:
        """`train/fvu` -> `train/layers.9/fvu` while site layers.9 runs (unchanged for one site)."""
        if not self._scope:
            return name
        head, _, tail = name.partition("/")
        return f"{head}/{self._scope}/{tail}" if tail else f"{self._scope}/{head}"

    def log(self, name: str, *args: Any, **kwargs: Any) -> None:
        # LightningModule.log_dict logs through this too.
        super().log(self.scoped_metric(name), *args, **kwargs)

    def site_saes(self, scope: str) -> list[str]:
        return [name for name in self.sae_names if self.sae_sites[name][0] == scope]

    def get_sae(self, name: str) -> TopKSAE:
        return getattr(self, self._attribute(self._resolve(name)))

    def get_tracker(self, name: str) -> DeadLatentTracker:
        return getattr(self, self._attribute(self._resolve(name)) + "_activity")

    # ---- the shared SAE step -------------------------------------------------------------------
    def encode_decode(self, name: str, x: Tensor, selector: Selector | None = None, grad: Tensor | None = None) -> tuple[Tensor, SparseCode, Tensor]:
        """(reconstruction, code, dense pre-activations) of SAE `name` on x; `selector` overrides
        the SAE's own (e.g. plain TopK for a gradient selector's second validation)."""
        sae = self.get_sae(name)
        code, pre = sae.encode_with_pre(x, grad, selector)
        return sae.decode(code, x), code, pre

    def dead_mask(self, name: str) -> Tensor | None:
        """SAE `name`'s dead latents, or None while too few tokens have been seen for any to be
        dead (known on the host, so the step skips AuxK without reading the device)."""
        tracker = self.get_tracker(name)
        return None if tracker.tokens_seen < tracker.dead_tokens else tracker.dead_mask()

    def sae_step(
        self, name: str, x: Tensor, selector: Selector | None = None, grad: Tensor | None = None, target: Tensor | None = None
    ) -> SAEStep:
        """The SAE's own forward (reconstruction of `target`, default x, with FVU and AuxK), its
        share of the loss, and its dead-latent counts updated."""
        sae = self.get_sae(name)
        out = sae(x, target, grad=grad, dead_mask=self.dead_mask(name), aux_k=self.hparams.aux_k, selector=selector)
        self.get_tracker(name).update(out.code.indices, out.code.values.detach(), out.code.num_tokens)
        reconstruction = out.fvu if self.hparams.get("reconstruction_objective", "fvu") == "fvu" else self.reconstruction_error(x if target is None else target, out.xhat)
        loss = reconstruction + self.hparams.aux_coefficient * out.auxk_loss
        if out.loss_terms:
            loss = loss + self.weighted_loss_terms(out.loss_terms, sae.selector if selector is None else selector)
        return SAEStep(out.xhat, out.code, out.fvu, out.auxk_loss, loss, out.loss_terms)

    def _total_optimizer_steps(self) -> int | None:
        steps = getattr(self, "_total_steps_cache", None)
        if steps is None:
            try:
                steps = int(self.trainer.estimated_stepping_batches)
            except (RuntimeError, ValueError, TypeError, OverflowError):  # e.g. an unbounded fit
                return None
            self._total_steps_cache = steps
        return steps

    def reconstruction_error(self, target: Tensor, xhat: Tensor) -> Tensor:
        """The reconstruction loss of `xhat` as `reconstruction_objective` chooses (fp32): FVU, or
        SAELens's MSE (summed over features, averaged over tokens). Variants with extra
        reconstructions (Matryoshka's prefixes) score them with this."""
        target, xhat = target.float(), xhat.float()
        if self.hparams.get("reconstruction_objective", "fvu") == "mse":
            return (target - xhat).pow(2).sum(-1).mean()
        return fraction_of_variance_unexplained(target, xhat)

    def weighted_loss_terms(self, terms: dict[str, Tensor], selector: Selector) -> Tensor:
        """sum over a selector's loss terms of coefficient(step) * term, with each term's
        `Coefficient` (value and warm-up) from `selector.coefficients()` at this optimizer step."""
        coefficients = selector.coefficients()
        step, total_steps = 0, None
        if self._trainer is not None:
            step, total_steps = self.global_step, self._total_optimizer_steps()
        total = None
        for term_name, term in terms.items():
            weighted = coefficients.get(term_name, Coefficient(1.0)).at(step, total_steps) * term
            total = weighted if total is None else total + weighted
        return total

    @torch.no_grad()
    def _initialize_decoder_biases(self, batch: dict[str, Tensor]) -> None:
        """b_dec from the first batch's targets (b_dec is in the output's space: the input's for an
        autoencoder, mlp_out's for a transcoder), gathered over all ranks so every replica starts equal."""
        for name in self.sae_names:
            x = batch[self.sae_targets[name]].float()
            if self.trainer.world_size > 1:
                x = self.all_gather(x).reshape(-1, x.shape[-1])
            self.get_sae(name).initialize_decoder_bias(x, self.hparams.b_dec_init)
        self.b_dec_initialized.fill_(True)

    # ---- activation normalisation (lightning_sae.normalization) -------------------------------
    @property
    def normalizes_activations(self) -> bool:
        return self.hparams.get("normalize_activations", "none") != "none"

    def _scale_buffer(self, key: str) -> str:
        return "activation_scale__" + self._attribute(key)

    def activation_scale(self, key: str) -> float:
        """The factor batch key `key` is multiplied by before the SAEs see it (1 without normalisation)."""
        return float(getattr(self, self._scale_buffer(key))) if self.normalizes_activations else 1.0

    @torch.no_grad()
    def _estimate_activation_scales(self, batch: dict[str, Tensor]) -> None:
        for key, rows in batch.items():
            if normalization.is_gradient_key(key) or not hasattr(self, self._scale_buffer(key)):
                continue
            scale = normalization.activation_scale(rows)
            if self._trainer is not None and self.trainer.world_size > 1:
                scale = self.all_gather(scale).mean()  # every replica trains on the same scale
            getattr(self, self._scale_buffer(key)).fill_(scale)
        self.activation_scales_estimated.fill_(True)

    def normalized_batch(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """`batch` in the units the SAEs train in (itself without normalisation)."""
        if not self.normalizes_activations:
            return batch
        out = {}
        for key, value in batch.items():
            if normalization.is_gradient_key(key):
                out[key] = value / self.activation_scale(normalization.gradient_source(key))  # dL/d(s x)
            else:
                out[key] = value * self.activation_scale(key) if hasattr(self, self._scale_buffer(key)) else value
        return out

    def exported_sae(self, name: str) -> TopKSAE:
        """SAE `name` as it is saved: on raw activations (the normalisation folded in)."""
        sae = self.get_sae(name)
        if not self.normalizes_activations:
            return sae
        name = self._resolve(name)
        return normalization.fold_activation_scales(
            sae, self.activation_scale(self.sae_inputs[name]), self.activation_scale(self.sae_targets[name])
        )

    # ---- Lightning hooks ---------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        if self.normalizes_activations:
            if not bool(self.activation_scales_estimated):
                self._estimate_activation_scales(batch)
            batch = self.normalized_batch(batch)
        # Only the first optimizer step can need it; checking the step on the host first keeps
        # every later step free of a device read.
        if (self._trainer is None or self.trainer.global_step == 0) and not bool(self.b_dec_initialized):
            self._initialize_decoder_biases(batch)
        # Sites share no parameter, so the sum's gradient is each site's own.
        total = None
        for scope in self.scopes:
            with self.site_scope(scope):
                loss = self.training_loss(self._site_items(batch, scope))
            total = loss if total is None else total + loss
        return total

    def configure_gradient_clipping(
        self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None, gradient_clip_algorithm: str | None = None
    ) -> None:
        """Clipping per site, so that each site's SAEs train exactly as in a fit of their own."""
        if len(self.scopes) == 1 or gradient_clip_val is None or gradient_clip_val == 0:
            return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        for scope in self.scopes:
            params = [p for name in self.site_saes(scope) for p in self.get_sae(name).parameters() if p.grad is not None]
            if gradient_clip_algorithm in (None, "norm"):
                torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)
            else:
                torch.nn.utils.clip_grad_value_(params, gradient_clip_val)

    def log_sae_training(self, name: str, step: SAEStep, prefix: str = "train/") -> None:
        values = {
            f"{prefix}fvu": step.fvu,
            f"{prefix}aux_loss": step.aux_loss,
            f"{prefix}l0": step.code.active_per_token().mean(),
            f"{prefix}dead_fraction": self.get_tracker(name).dead_fraction(),
        }
        values.update({f"{prefix}{term}": value for term, value in step.loss_terms.items()})
        self.log_dict(values, on_step=True, on_epoch=False, batch_size=step.code.num_tokens)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        for name in self.sae_names:
            self.get_sae(name).remove_gradient_parallel_to_decoder()

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        for name in self.sae_names:
            self.get_sae(name).normalize_decoder()

    def configure_optimizers(self) -> dict[str, Any]:
        return self.optimizer_and_schedule(max(1, int(self.trainer.estimated_stepping_batches)))

    def optimizer_and_schedule(self, total_steps: int) -> dict[str, Any]:
        """Adam over every SAE (one parameter group each, with its own learning rate) and the
        warm-up/decay schedule of a run of `total_steps` optimizer steps, in Lightning's
        configure_optimizers layout; callable without a Trainer (benchmarks use it so)."""
        groups = []
        for name in self.sae_names:
            sae = self.get_sae(name)
            groups.append({"params": list(sae.parameters()), "lr": default_learning_rate(sae.d_sae) if self.hparams.lr is None else self.hparams.lr})
        optimizer = torch.optim.Adam(groups, betas=(0.9, 0.999), fused=self._fused_adam(groups))
        total = max(1, int(total_steps))
        warmup = self.hparams.warmup_steps if self.hparams.warmup_steps is not None else min(1000, max(1, total // 20))
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_then_linear_decay(step, total, warmup, self.hparams.decay_fraction)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def _fused_adam(self, groups: list[dict[str, Any]]) -> bool | None:
        """True (one fused kernel over all parameters) on the CPU, where torch's default Adam is a
        per-parameter loop of ~10 elementwise passes, 4-5x slower at SAE sizes; None (torch's
        default, foreach) elsewhere. Not under a mixed-precision plugin, because Lightning
        refuses to clip the gradients of an optimizer that unscales them itself, as fused Adam
        declares it does."""
        from lightning.pytorch.plugins.precision import MixedPrecision

        params = [p for group in groups for p in group["params"]]
        if not params or any(p.device.type != "cpu" or not p.dtype.is_floating_point for p in params):
            return None
        if isinstance(getattr(self._trainer, "precision_plugin", None), MixedPrecision):
            return None
        return True

    # ---- validation --------------------------------------------------------------------------------
    def validation_modes(self) -> list[str]:
        """Ways each SAE is evaluated; "" is its training selection. Subclasses may add more."""
        return [""]

    @classmethod
    def _metric_key(cls, name: str, mode: str) -> str:
        return f"{cls._attribute(name)}{'__' + mode if mode else ''}"

    def metric_prefix(self, name: str, mode: str) -> str:
        """Logged names: `val/explained_variance` for a single SAE, `val/<sae>/...` for several at
        a site, `val/<site>/...` for several sites."""
        scope, local = self.sae_sites[self._resolve(name)]
        several = len(self.site_saes(scope)) > 1
        parts = ["val"] + ([scope] if scope else []) + ([local] if several else []) + ([mode] if mode else [])
        return "/".join(parts) + "/"

    def update_validation(self, name: str, mode: str, target: Tensor, xhat: Tensor, code: SparseCode) -> None:
        key = self._metric_key(self._resolve(name), mode)
        self.val_stats[key].update(target, xhat, code.values)
        self.val_density[key].update(code.indices, code.values, code.num_tokens)

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        batch = self.normalized_batch(batch)
        for scope in self.scopes:
            with self.site_scope(scope):
                self.validate_batch(self._site_items(batch, scope))

    def validate_batch(self, batch: dict[str, Tensor]) -> None:
        """Accumulates the validation metrics of one site's batch (variants override this)."""
        for name in self.site_saes(self._scope):
            x, target = batch[self.sae_keys[name]], batch[self.sae_target_keys[name]]
            xhat, code, _ = self.encode_decode(name, x)
            self.update_validation(name, "", target, xhat, code)

    def on_validation_epoch_end(self) -> None:
        from lightning_sae.evaluation import core_result, spliced_validation_metrics

        # SAEBench's core set per SAE and mode, by metric prefix (`--eval_output` writes these).
        self.core_results = {}
        for name in self.sae_names:
            for mode in self.validation_modes():
                key = self._metric_key(name, mode)
                prefix = self.metric_prefix(name, mode)
                density = self.val_density[key].compute()
                result = core_result(name, mode, self.val_stats[key], density, self.get_sae(name))
                result.metrics["dead_fraction"] = float(self.get_tracker(name).dead_fraction())
                # torchmetrics already reduced the sums over ranks; sync_dist only averages equal values
                self.log_dict({prefix + metric: value for metric, value in result.logged().items()}, sync_dist=True)
                self.core_results[prefix] = result
                self.val_stats[key].reset()
                self.val_density[key].reset()
        # Every rank calls this: it sums its totals across ranks, so all log the same values.
        for prefix, scores in spliced_validation_metrics(self, self.hparams.spliced_eval_contexts).items():
            self.core_results[prefix].metrics.update(scores)
            self.log_dict({prefix + metric: value for metric, value in self.core_results[prefix].logged().items()
                           if metric in scores}, sync_dist=True)

    def splice(self, name: str) -> Splice:
        """Where SAE `name` is spliced into the language model, as batch keys (site-prefixed where
        there are several sites): it reads its input's hook and writes in place of its target's
        (the same hook for an autoencoder; mlp_in -> mlp_out for a transcoder)."""
        name = self._resolve(name)
        return Splice(read=self.sae_inputs[name], write=self.sae_targets[name])

    def spliced_reconstruction(self, name: str, mode: str) -> Callable[[Tensor, Tensor | None], Tensor]:
        """How SAE `name` reconstructs the activations spliced into the language model when
        validating in `mode`: (activation rows, their dL/dx or None) -> reconstruction."""
        return lambda x, grad: self.encode_decode(name, x, None, grad)[0]

    # ---- export ---------------------------------------------------------------------------------------
    def sae_metadata(self, name: str) -> dict[str, Any]:
        datamodule = getattr(self._trainer, "datamodule", None)
        metadata = dict(getattr(datamodule, "metadata", {}) or {})
        hook_names = metadata.pop("hook_names", None)
        hookpoints = metadata.pop("hookpoints", None)
        metadata.pop("sites", None)
        if hook_names and self.sae_inputs[name] in hook_names:
            metadata["hook_name"] = hook_names[self.sae_inputs[name]]
        if hookpoints and self.sae_inputs[name] in hookpoints:
            metadata["hookpoint"] = hookpoints[self.sae_inputs[name]]
            # The DataModule's `hook` and `layer` are its settings (a default a transcoder's request
            # overrides; a list of layers): each SAE records the ones it actually reads.
            metadata.update(hook_and_layer(metadata["hookpoint"]))
        return metadata

    def sae_directory(self, name: str) -> Path:
        """Where SAE `name` goes under an export directory: nowhere deeper for a lone SAE,
        <site>/ and <name>/ below it where there are several."""
        scope, local = self.sae_sites[name]
        parts = ([scope] if scope else []) + ([local] if len(self.site_saes(scope)) > 1 else [])
        return Path(*parts) if parts else Path()

    def save_saes(self, directory: str | Path) -> dict[str, Path]:
        """Write every SAE as a SAELens v6 directory (`directory` itself for a single SAE,
        `directory/<site>/<name>` as `sae_directory` says for several). Returns where each went."""
        directory = Path(directory)
        written = {}
        for name in self.sae_names:
            target = directory / self.sae_directory(name)
            save_saelens(self.exported_sae(name), target, metadata=self.sae_metadata(name))
            written[name] = target
        return written

    def save_saes_sparsify(self, directory: str | Path) -> dict[str, Path]:
        """Every SAE in EleutherAI sparsify's layout, `directory/<hook point>/`, the hook point
        being the one the SAE reads (an SAE without a known hook point is skipped)."""
        written = {}
        for name in self.sae_names:
            metadata = self.sae_metadata(name)
            hookpoint = metadata.pop("hookpoint", None)
            if not hookpoint:
                continue
            try:
                written[name] = save_sparsify(self.exported_sae(name), directory, hookpoint, metadata)
            except FormatCannotRunSelector as error:  # e.g. a threshold at inference
                rank_zero_info(f"lightning-sae: {name} not saved in sparsify format: {error}")
        return written

    def on_fit_end(self) -> None:
        from lightning_sae.evaluation import log_final_hparams

        log_final_hparams(self)

    # ---- side effects ---------------------------------------------------------------------------------
    def configure_callbacks(self) -> list[L.Callback]:
        """The fit's side effects, as callbacks (lightning_sae.callbacks): histograms after each
        validation, the SAEs exported at the end and the console summary. A Trainer given its own
        instance of one of them keeps it (Lightning would otherwise replace it with this default)."""
        have = self._trainer.callbacks if self._trainer is not None else []
        return [callback for callback in default_callbacks() if not any(isinstance(c, type(callback)) for c in have)]


def hook_and_layer(hookpoint: str) -> dict[str, Any]:
    """{"hook", "layer"} of a canonical hook point name: `layers.9.mlp_in` -> mlp_in of layer 9,
    `layers.9` -> resid_post of layer 9 (sparsify's name for it); a hook point outside every
    layer (`model.norm`) is its own hook, with layer None."""
    from lightning_sae.data.hooks import hookpoint_layer

    layer = hookpoint_layer(hookpoint)
    if layer is None:
        return {"hook": hookpoint, "layer": None}
    rest = hookpoint.removeprefix(f"layers.{layer}").removeprefix(".")
    return {"hook": rest or "resid_post", "layer": layer}


def check_learning_rate(lr: float | None) -> None:
    """A negative rate climbs the loss (gradient ascent: the fit "succeeds" with an SAE worse than
    none) and NaN/inf spoil the first step; both are refused before anything runs. 0 is allowed:
    it keeps the weights (evaluating or fine-tuning nothing, e.g. an init_from SAE at lr 0)."""
    if lr is not None and not (math.isfinite(lr) and lr >= 0):
        raise ConfigError(f"lr must be a finite number >= 0 (None: the default 2e-4 / sqrt(d_sae / 2^14)), got lr={lr}")


def check_init_from_settings(init_from: str, given: dict[str, int | None], loaded: dict[str, int]) -> None:
    """Settings given alongside init_from must be the saved SAE's: training another shape than
    asked for, silently, is worse than stopping."""
    differing = [f"{name}={given[name]} (the SAE has {name}={loaded[name]})" for name in given
                 if given[name] is not None and given[name] != loaded[name]]
    if differing:
        raise ConfigError(f"model settings disagree with the SAE at {init_from}: {', '.join(differing)}; leave "
                          f"{' and '.join(n for n in given if given[n] is not None)} unset to take the SAE's, or drop init_from")


DEFAULT_K = 32


class SAEModule(SAETrainingModule):
    """One TopK SAE on the DataModule's hook, with a pluggable selection rule.

    Args:
        k: latents active per token; None gives 32, or init_from's k.
        d_sae: number of latents; None gives expansion_factor * d_in, or init_from's d_sae.
        expansion_factor: d_sae / d_in when d_sae is None.
        selector: which latents fire: any Selector (a plugin, e.g. `gradient_topk`); None is the
            core's TopK. Each site's SAE gets its own copy (`get_sae("sae").selector`), so a
            selector's state is per SAE; checkpoints record its class path and arguments.
        init_from: a saved SAE directory (SAELens or sparsify) or a Lightning checkpoint of this
            module, to start from or to evaluate. A k or d_sae given with it must be the SAE's.
    """

    hparams_ignore = ("selector",)
    supports_activation_normalization = True

    def __init__(
        self,
        k: int | None = None,
        d_sae: int | None = None,
        expansion_factor: int = 16,
        selector: Selector | None = None,
        init_from: str | None = None,
        **kwargs: Any,
    ):
        kwargs.pop("selector_name", None)  # written by checkpoints before selectors had a config
        # A checkpoint's hparams carry {"class_path", "init_args"}; reloading passes it back.
        self.set_selector(selector)
        super().__init__(**kwargs)

    def sae_shapes(self, widths: dict[str, int]) -> dict[str, tuple[str, int, int]]:
        d_sae = self.hparams.d_sae or self.hparams.expansion_factor * widths["x"]
        if not 1 <= self.hparams.k <= d_sae:
            raise ValueError(f"k must satisfy 1 <= k <= d_sae ({d_sae}), got k={self.hparams.k}")
        return {"sae": SAESpec("x", d_sae, self.hparams.k, selector=self.selector)}

    def _build(self, widths: dict[str, int], sites: list[str] | None = None) -> None:
        if self.hparams.init_from is None:
            if self.hparams.k is None:
                self.hparams.k = DEFAULT_K  # concrete in checkpoints
            return super()._build(widths, sites)
        if sites and len(sites) > 1:
            raise ValueError(f"init_from gives one SAE, but the data has {len(sites)} hook points {sites}: train one at a time")
        if Path(self.hparams.init_from).is_file():  # a Lightning checkpoint of this module
            loaded, _ = load_checkpoint(self.hparams.init_from)
        else:
            loaded, _ = load_sae(self.hparams.init_from)
        loaded = unit_decoder_rows(loaded, self.hparams.init_from, refuse=self._trainer is None or self._trainer.state.fn == "fit")
        if type(self.selector) is TopK and loaded.selector.state_dict():
            # The SAE brings a selector with state (e.g. a BatchTopK threshold) that the default
            # TopK would drop: it is kept unless another selector was asked for. (A stateless
            # one, e.g. g-SAE's from a checkpoint, is evaluated with TopK as before.)
            self.set_selector(loaded.selector)
        if loaded.d_in != widths["x"]:
            raise ValueError(f"the SAE at {self.hparams.init_from} has d_in={loaded.d_in}, but the data has width {widths['x']}")
        check_init_from_settings(self.hparams.init_from, {"d_sae": self.hparams.d_sae, "k": self.hparams.k},
                                 {"d_sae": loaded.d_sae, "k": loaded.k})
        self.hparams.d_sae, self.hparams.k = loaded.d_sae, loaded.k
        super()._build(widths, sites)
        missing, unexpected = self.get_sae("sae").load_state_dict(loaded.state_dict(), strict=False)
        if unexpected or any(not key.startswith("selector.") for key in missing):
            raise ValueError(f"the SAE at {self.hparams.init_from} does not fit: missing {missing}, unexpected {unexpected}")
        self.b_dec_initialized.fill_(True)

    def data_request(self) -> DataRequest:
        return DataRequest({"x": Hook.site()}, gradients=self.selector.needs_gradients)

    def training_loss(self, batch: dict[str, Tensor]) -> Tensor:
        step = self.sae_step("sae", batch["x"], grad=batch.get("grad"))
        self.log("train/loss", step.loss, on_step=True, prog_bar=True, batch_size=batch["x"].shape[0])
        self.log_sae_training("sae", step)
        return step.loss

    def validation_modes(self) -> list[str]:
        # A gradient-using selector is also scored with plain TopK on the same weights, since
        # gradients are often unavailable where the SAE is used.
        return ["", "plain_topk"] if self.selector.needs_gradients else [""]

    @staticmethod
    def _mode_selector(mode: str) -> Selector | None:
        """The selector a validation mode uses: the SAE's own, or plain TopK on its weights."""
        return TopK() if mode == "plain_topk" else None

    def spliced_reconstruction(self, name: str, mode: str) -> Callable[[Tensor, Tensor | None], Tensor]:
        selector = self._mode_selector(mode)
        return lambda x, grad: self.encode_decode(name, x, selector, grad)[0]

    def validate_batch(self, batch: dict[str, Tensor]) -> None:
        x = batch["x"]
        for mode in self.validation_modes():
            xhat, code, _ = self.encode_decode("sae", x, self._mode_selector(mode), batch.get("grad"))
            self.update_validation("sae", mode, x, xhat, code)
