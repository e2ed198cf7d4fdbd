"""What the `lightning-sae` command prints, and what it leaves out.

Lightning's own console output is written for its platform, not for this library's users:
`quiet_lightning()` drops its tips (litlogger, litmodels) and the deprecation warnings of
libraries we call that a user cannot act on; `install(trainer)` swaps the model summary for one
without its FLOPs column (Lightning cannot count the FLOPs of these modules and prints 0) and
the progress bar for one without `v_num` (the log version, which the end-of-fit summary names
as a path) that, when the output is not a terminal (a log file, a batch job), prints a plain
progress line every `interval` seconds instead of bars nobody sees (lightning_sae.progress does
the same for the work outside the Trainer's loop).
"""

from __future__ import annotations

import logging
import sys
import time
import warnings
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelSummary, TQDMProgressBar
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.model_summary import summarize

_TIPS = ("litlogger", "litmodels")
# Warnings from libraries under this one that no user of it can act on.
_IRRELEVANT_WARNINGS = (
    r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",  # Lightning's own use of torch's pytree
    r".*skip_none parameter was deprecated.*",  # LightningCLI's use of jsonargparse
    r".*`IterableDataset` has `__len__` defined.*",  # about num_workers > 1, which a stream refuses
    r".*does not have many workers which may be a bottleneck.*",  # batches come from memory or the model
)


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("💡 Tip") or any(f"[{tip}]" in message for tip in _TIPS))


def quiet_lightning() -> None:
    """Filters Lightning's tips and the irrelevant warnings (idempotent)."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning_fabric", "pytorch_lightning"):
        logger = logging.getLogger(name)
        for target in [logger, *logger.handlers]:
            if not any(isinstance(f, _DropTips) for f in target.filters):
                target.addFilter(_DropTips())
    for pattern in _IRRELEVANT_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)


class ParameterSummary(ModelSummary):
    """Lightning's model summary as plain lines, without the FLOPs it cannot count here."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._max_depth or not trainer.is_global_zero:
            return
        summary = summarize(pl_module, max_depth=self._max_depth)
        lines = [f"  {name} ({kind}): {params:,} parameters"
                 for name, kind, params in zip(summary.layer_names, summary.layer_types, summary.param_nums) if params]
        rank_zero_info(f"lightning-sae: {summary.trainable_parameters:,} trainable parameters\n" + "\n".join(lines))


class PlainProgress(TQDMProgressBar):
    """Lightning's progress bar without `v_num`; on a non-terminal, one plain line every
    `interval` seconds (and at each epoch's end) instead of the bars."""

    def __init__(self, interval: float = 30.0, **kwargs: Any):
        super().__init__(**kwargs)
        self.interval = interval
        self.plain = not sys.stdout.isatty()
        self._last = 0.0
        self._started = 0.0

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return items

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.plain:  # the bars are then created disabled (they write nothing); the lines take their place
            self.disable()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._started = self._last = time.monotonic()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self.plain and time.monotonic() - self._last >= self.interval:
            self._line(trainer, pl_module, batch_idx + 1)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self.plain:
            self._line(trainer, pl_module, self.total_train_batches, "epoch done")

    def _line(self, trainer: L.Trainer, pl_module: L.LightningModule, done: int | float, note: str = "") -> None:
        self._last = now = time.monotonic()
        total = self.total_train_batches
        epochs = f"/{trainer.max_epochs}" if trainer.max_epochs and trainer.max_epochs > 0 else ""
        share = f" ({done / total:.0%})" if isinstance(total, int) and total else ""
        metrics = ", ".join(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}"
                            for key, value in self.get_metrics(trainer, pl_module).items())
        rate = trainer.global_step / max(now - self._started, 1e-9) * 60
        message = (f"lightning-sae: epoch {trainer.current_epoch + 1}{epochs}, batch {int(done)}/{total}{share}, "
                   f"step {trainer.global_step}, {rate:.0f} steps/min, {(now - self._started) / 60:.1f} min"
                   + (f", {metrics}" if metrics else "") + (f" ({note})" if note else ""))
        if trainer.is_global_zero:
            print(message, flush=True)


def install(trainer: L.Trainer) -> L.Trainer:
    """Swaps the Trainer's default progress bar and model summary (exactly Lightning's own
    classes, Rich's or tqdm's: a user's subclass or own callback is kept) for this module's."""
    for position, callback in enumerate(trainer.callbacks):
        if type(callback) is TQDMProgressBar:
            trainer.callbacks[position] = PlainProgress(refresh_rate=callback.refresh_rate, leave=callback._leave)
        elif type(callback).__name__ == "RichProgressBar":  # its refresh rate counts differently
            trainer.callbacks[position] = PlainProgress()
        elif type(callback).__name__ in ("ModelSummary", "RichModelSummary") and isinstance(callback, ModelSummary):
            trainer.callbacks[position] = ParameterSummary(max_depth=callback._max_depth)
    return trainer
