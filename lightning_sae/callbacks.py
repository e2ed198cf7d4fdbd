"""Callbacks: the side effects of a fit, kept out of the training module.

`SAETrainingModule.configure_callbacks` adds `default_callbacks()` to every Trainer (one given its
own instance of one of these keeps that instance instead): TensorBoard histograms after each
validation (`LatentHistograms`), the SAEs exported at the end of a fit (`ExportSAEs`) and the
console summary that says where they went (`FitSummary`). The `lightning-sae` command adds
`NonFiniteGuard` (and `CoreEvalWriter`, in lightning_sae.evaluation, for `--eval_output`).

They use the module's public surface only (`sae_names`, `get_sae`, `metric_prefix`,
`core_results`, `save_saes`, `save_saes_sparsify`), so any variant gets them.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from lightning_sae.errors import NonFiniteLossError


class LatentHistograms(Callback):
    """After each validation, per SAE and validation mode, TensorBoard histograms of the log10
    firing frequency of the latents that fired (`<prefix>log10_feature_density`) and of the
    decoder row norms (`<prefix>decoder_norms`). Needs a TensorBoardLogger; does nothing otherwise
    and during the sanity check (whose two batches are not a measurement: Lightning logs no
    scalar from it either)."""

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or not isinstance(trainer.logger, TensorBoardLogger):
            return
        writer = trainer.logger.experiment
        for prefix, result in (getattr(pl_module, "core_results", None) or {}).items():
            density = result.latents["feature_density"]
            alive = density[density > 0]
            if alive.numel():
                writer.add_histogram(prefix + "log10_feature_density", alive.log10(), trainer.global_step)
            decoder = pl_module.get_sae(result.sae_name).W_dec.detach()
            writer.add_histogram(prefix + "decoder_norms", decoder.norm(dim=1), trainer.global_step)


class ExportSAEs(Callback):
    """At the end of a fit, every SAE in SAELens format under `<log dir>/sae` and in sparsify's
    layout under `<log dir>/sparsify` (the module's `save_saes` / `save_saes_sparsify` say where
    each SAE goes). Nothing is written without a log directory (a Trainer with logger=False) or
    after a NaN stopped the fit. `written` / `written_sparsify` record where each SAE went."""

    def __init__(self, sparsify: bool = True):
        self.sparsify = sparsify
        self.written: dict[str, Path] = {}
        self.written_sparsify: dict[str, Path] = {}

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        log_dir = trainer.log_dir  # a collective under DDP: every rank must ask
        if not trainer.is_global_zero or log_dir is None:
            return
        self.written = pl_module.save_saes(Path(log_dir) / "sae")
        if self.sparsify:
            self.written_sparsify = pl_module.save_saes_sparsify(Path(log_dir) / "sparsify")


class LearningRateLog(Callback):
    """`train/lr`, the learning rate each training step uses (with several parameter groups, one
    SAE each: `train/<SAE name>/lr`), logged with the other training scalars. Lightning's
    LearningRateMonitor would name it after the optimizer class instead."""

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if not trainer.optimizers:
            return
        groups = trainer.optimizers[0].param_groups
        names = list(getattr(pl_module, "sae_names", []))
        for position, group in enumerate(groups):
            name = "train/lr" if len(groups) == 1 else f"train/{names[position] if len(names) == len(groups) else position}/lr"
            pl_module.log(name, float(group["lr"]), on_step=True, on_epoch=False)


class FitSummary(Callback):
    """At the end of a fit, a few lines on the console: each SAE's validation explained variance,
    L0 and (when a language model was at hand) ce_loss_score, where `ExportSAEs` (if the Trainer
    has one) saved it, and the TensorBoard command."""

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        log_dir = trainer.log_dir  # a collective under DDP: every rank must ask
        if not trainer.is_global_zero or log_dir is None:
            return
        exports = [callback for callback in trainer.callbacks if isinstance(callback, ExportSAEs)]
        metrics = trainer.callback_metrics
        lines = ["", "lightning-sae: training finished"]
        for name in pl_module.sae_names:
            prefix = pl_module.metric_prefix(name, "")
            if prefix + "explained_variance" in metrics:
                ev, l0 = float(metrics[prefix + "explained_variance"]), float(metrics[prefix + "l0"])
                ce = (f", ce_loss_score {float(metrics[prefix + 'ce_loss_score']):.4f}" if prefix + "ce_loss_score" in metrics
                      else ", ce_loss_score not computed (no spliced evaluation)")
                lines.append(f"  {name}: validation explained variance {ev:.4f}, L0 {l0:.1f}{ce}")
            else:
                lines.append(f"  {name}: no validation ran, so no explained variance was measured")
            for export in exports:
                if name in export.written:
                    lines.append(f"  {name} saved (SAELens format) to {export.written[name]}")
                if name in export.written_sparsify:
                    lines.append(f"  {name} saved (sparsify format) to {export.written_sparsify[name]}")
        lines.append(f"  TensorBoard logs: {log_dir}  (tensorboard --logdir {Path(log_dir).parent})")
        rank_zero_info("\n".join(lines))


def default_callbacks() -> list[Callback]:
    """The callbacks every fit gets unless its Trainer already has one of the same type (in the
    order their on_fit_end hooks run: the summary names what the export wrote)."""
    return [LatentHistograms(), LearningRateLog(), ExportSAEs(), FitSummary()]


_SQUARE_OVERFLOWS = 1.8e19  # sqrt of float32's largest value: a squared error beyond it is inf
_FAR_BEYOND = 1e3  # times the largest |value| of the batches so far: real activations' outliers stay well inside


class NonFiniteGuard(Callback):
    """Stops training at the first NaN or infinite loss, naming its step, and never lets a
    checkpoint (or the final SAE) be written after one.

    Once a loss is non-finite its gradients are too, so the weights are spoiled from that optimizer
    step on. The last checkpoint written before it therefore is the last good one; this callback
    makes sure no later one replaces it, whatever saves it (ModelCheckpoint every n steps, on
    validation, `save_last`, `save_on_exception`).

    Reading a device value from the host waits for the device, so the check is kept off the hot
    path: every step only records, on the device, the first bad step (whether its batch held
    NaN/inf inputs, and the largest |value| of its batch and of the batches before it, so that
    finite data far beyond the range seen so far is blamed on the data, not the learning rate). The host reads that record every `check_every_n_steps` steps, before every
    checkpoint save (which also checks the weights themselves), at each epoch end and when
    training ends. On CPU the reads cost nothing; set `check_every_n_steps=1` to stop at once.

    Args:
        check_every_n_steps: how often to read the record; None: the Trainer's log_every_n_steps.
    """

    def __init__(self, check_every_n_steps: int | None = None):
        if check_every_n_steps is not None and check_every_n_steps < 1:
            raise ValueError(f"check_every_n_steps must be >= 1 or None, got {check_every_n_steps}")
        self.check_every_n_steps = check_every_n_steps
        self._first: dict[str, Tensor] = {}  # step, epoch, batch of the first bad loss (-1: none)
        self._loss: Tensor | None = None
        self._bad_inputs: dict[str, Tensor] = {}
        self._range: dict[str, Tensor] = {}  # largest |value| of the batches before it, of its batch; steps before it
        self._position = (0, 0, 0)

    # ---- recording (device only) -------------------------------------------------------------------
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self._position = (trainer.global_step, trainer.current_epoch, batch_idx)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if isinstance(loss, Tensor):
            self._record(loss.detach(), batch)
        every = self.check_every_n_steps or trainer.log_every_n_steps or 1
        if trainer.global_step % every == 0:
            self.check(trainer, pl_module)

    @torch.no_grad()
    def _record(self, loss: Tensor, batch: Any) -> None:
        if not self._first:
            self._first = {name: torch.full((), -1, dtype=torch.long, device=loss.device) for name in ("step", "epoch", "batch")}
            self._loss = torch.zeros((), dtype=torch.float32, device=loss.device)
        before_any = self._first["step"] < 0
        finite = torch.isfinite(loss).all()
        new = ~finite & before_any
        for name, value in zip(("step", "epoch", "batch"), self._position):
            self._first[name].masked_fill_(new, value)  # a Python scalar: no host-device transfer
        self._loss = torch.where(new, loss.float().sum(), self._loss)
        self._record_range(batch, finite & before_any, new)
        if isinstance(batch, Mapping):
            for key, value in batch.items():
                if isinstance(value, Tensor) and value.is_floating_point():
                    bad = new & ~torch.isfinite(value).all()
                    previous = self._bad_inputs.get(key)
                    self._bad_inputs[key] = bad if previous is None else previous | bad

    def _record_range(self, batch: Any, good: Tensor, new: Tensor) -> None:
        """The largest |value| of the batches before the first bad loss, and of its batch: data far
        beyond what came before is the data's fault, not the optimisation's (one max per step)."""
        values = [v for v in batch.values() if isinstance(v, Tensor) and v.is_floating_point()] if isinstance(batch, Mapping) else []
        if not values:
            return
        largest = torch.stack([v.detach().abs().amax().float() for v in values]).amax()
        if not self._range:
            self._range = {name: torch.zeros((), dtype=torch.float32, device=largest.device) for name in ("seen", "bad", "steps")}
        self._range["seen"] = torch.where(good, torch.maximum(self._range["seen"], largest), self._range["seen"])
        self._range["steps"] = self._range["steps"] + good.float()
        self._range["bad"] = torch.where(new, largest, self._range["bad"])

    def _out_of_range(self) -> str | None:
        """Why the first bad batch's data, finite as it was, is to blame; None when it looked like the rest."""
        if not self._range:
            return None
        seen, bad, steps = (float(self._range[name]) for name in ("seen", "bad", "steps"))
        if bad > _SQUARE_OVERFLOWS:
            return f"its largest value, {bad:.3g}, is so large that its square overflows float32"
        if steps >= 1 and bad > _FAR_BEYOND * seen:
            return (f"its largest value, {bad:.3g}, is {bad / max(seen, 1e-30):.3g} times the largest of the {steps:.0f} "
                    f"batches before it ({seen:.3g})")
        return None

    # ---- checking (reads the device) -------------------------------------------------------------
    def check(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Raises NonFiniteLossError if any loss so far, on any rank, was NaN or infinite.

        Every rank calls this at the same points, and under DDP they agree first (one collective):
        a rank stopping alone would leave the others waiting in their next collective forever.
        """
        local = bool(self._first) and int(self._first["step"]) >= 0
        if not trainer.strategy.reduce_boolean_decision(local, all=False):
            return
        if not local:
            raise NonFiniteLossError(
                f"training stopped at global step {trainer.global_step}: another rank had a NaN or infinite "
                "loss (its error names the step). Checkpoints written before that step are intact."
            )
        step, epoch, batch = (int(self._first[name]) for name in ("step", "epoch", "batch"))
        value = float(self._loss)
        bad_keys = sorted(key for key, flag in self._bad_inputs.items() if bool(flag))
        if bad_keys:
            cause = (
                f"The batch itself holds NaN/inf in {bad_keys}: the activations are bad (a float16 overflow "
                "in the language model or the cache? try model_dtype/cache_dtype bfloat16 or float32, or "
                "rebuild a damaged cache)."
            )
        elif (beyond := self._out_of_range()) is not None:
            cause = (
                f"Its batch was finite but far out of the range of the data seen so far: {beyond}. The data is at "
                "fault, not the optimisation: check where those rows come from (a damaged cache? run `lightning-sae "
                "cache verify` on it, or keep data.verify at its default, which hashes every shard)."
            )
        else:
            cause = (
                "Its batch was finite and in the range of the data seen before, so the optimisation diverged: lower "
                "the learning rate (model lr) or keep gradient clipping on (trainer.gradient_clip_val)."
            )
        raise NonFiniteLossError(
            f"training stopped: the loss was {value} at global step {step} (epoch {epoch}, batch {batch}). "
            f"{cause} Checkpoints written before that step are intact; none was written after it."
        )

    def _check_weights(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        named = [(name, p) for name, p in pl_module.named_parameters() if p.is_floating_point()]
        if not named:
            return
        finite = torch.stack([torch.isfinite(p.detach()).all() for _, p in named])
        if bool(finite.all()):
            return
        bad = [name for (name, _), ok in zip(named, finite.tolist()) if not ok]
        raise NonFiniteLossError(
            f"training stopped at global step {trainer.global_step}: the weights {bad} hold NaN/inf, so no "
            "checkpoint was written (earlier checkpoints are intact). Lower the learning rate or keep "
            "gradient clipping on (trainer.gradient_clip_val)."
        )

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        # Runs inside Trainer.save_checkpoint before anything is written: raising here writes nothing.
        self.check(trainer, pl_module)
        self._check_weights(trainer, pl_module)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        # ModelCheckpoint(save_on_exception=True) would next try to save the spoiled weights; the
        # save would be refused above, but by raising inside Lightning's exception handling, which
        # then skips its teardown. Nothing worth saving is left, so turn those saves off. (This
        # callback's hooks run first: Lightning puts checkpoint callbacks last.)
        if isinstance(exception, NonFiniteLossError):
            for callback in trainer.checkpoint_callbacks:
                if hasattr(callback, "save_on_exception"):
                    callback.save_on_exception = False

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.check(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # on_fit_end (where ExportSAEs writes the SAE) runs after this: a raise here stops the export.
        self.check(trainer, pl_module)
        self._check_weights(trainer, pl_module)
