"""Evaluation glue for the training modules: spliced-in CE at the end of each validation epoch,
and the run's hyperparameters with its final metrics for TensorBoard's HPARAMS tab.

Kept out of module.py so the modules only call in; the evaluators themselves live in
`lightning_sae.spliced` (language-model side) and `lightning_sae.metrics` (reconstruction side).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from lightning_sae.spliced import Reconstruct, scores_from_totals, spliced_totals

if TYPE_CHECKING:
    from lightning_sae.module import SAETrainingModule

FINAL_METRIC_PREFIX = "final/"
"""TensorBoard tag prefix of the final metrics written beside the hyperparameters."""


def spliced_validation_metrics(module: "SAETrainingModule", max_contexts: int) -> dict[str, float]:
    """Spliced-in scores of every SAE in every validation mode, named like the module's other
    validation metrics (`val/ce_loss_score`, `val/plain_topk/ce_loss_score`, ...).

    The DataModule must offer `load_language_model()` and `validation_contexts(n)`; without them
    nothing is computed and a notice says why, once. Every rank must call this (the totals are
    summed across ranks, each rank taking every world_size-th context); all ranks get the same
    numbers back.
    """
    trainer = module.trainer
    if max_contexts <= 0 or trainer.sanity_checking:
        return {}
    datamodule = getattr(trainer, "datamodule", None)
    if not (hasattr(datamodule, "load_language_model") and hasattr(datamodule, "validation_contexts")):
        _notice_once(
            module,
            f"lightning-sae: spliced CE (ce_loss_score, kl_div_score) not computed: the DataModule "
            f"({type(datamodule).__name__}) has no language model to splice the reconstruction into.",
        )
        return {}
    metadata = getattr(datamodule, "metadata", {}) or {}
    hookpoints = hook_points(metadata)
    # Loaded outside inference mode (validation runs inside it): parameters created in it could
    # never take part in the gradient pass a gradient selector needs.
    with torch.inference_mode(False):
        model = datamodule.load_language_model()
    device = module.device
    if next(model.parameters()).device != device:
        model.to(device)  # each rank evaluates beside its own SAE copy
    contexts = datamodule.validation_contexts(max_contexts)[trainer.global_rank :: trainer.world_size]
    tokenizer = getattr(datamodule, "tokenizer", None)
    # The data's gradient (and so a gradient selector) is dL/dx of each site's role "x" only.
    gradients = bool(module.data_request().gradients)
    results: dict[str, float] = {}
    for name in module.sae_names:
        key = module.sae_inputs[name]
        if key not in hookpoints:
            _notice_once(
                module,
                f"lightning-sae: spliced CE not computed for SAE '{name}': the DataModule's metadata "
                f"does not say where batch key '{key}' comes from.",
            )
            continue
        reconstructions = {
            mode: _on_device(module.spliced_reconstruction(name, mode), device) for mode in module.validation_modes()
        }
        totals = spliced_totals(
            model,
            contexts,
            None,
            hookpoints[key],
            reconstructions,
            needs_gradients=gradients and module.sae_keys[name] == "x",
            exclude_bos=bool(getattr(datamodule, "exclude_bos", True)),
            bos_token_id=getattr(tokenizer, "bos_token_id", None),
            progress=None if trainer.is_global_zero else False,
        )
        for mode, total in totals.items():
            summed = trainer.strategy.reduce(total.to(device), reduce_op="sum")
            prefix = module.metric_prefix(name, mode)
            results.update({prefix + metric: value for metric, value in scores_from_totals(summed).items()})
    return results


def hook_points(metadata: dict[str, Any]) -> dict[str, str]:
    """{batch key: hook point name} from an ActivationDataModule's metadata."""
    return dict(metadata.get("hookpoints") or {})


def _on_device(reconstruct: Reconstruct, device: torch.device) -> Reconstruct:
    """Runs the SAE where its weights are and hands the result back where the model is."""

    def run(rows: Tensor, grad: Tensor | None) -> Tensor:
        with torch.no_grad():
            out = reconstruct(rows.to(device), grad.to(device) if grad is not None else None)
        return out.to(rows.device)

    return run


def _notice_once(module: Any, message: str) -> None:
    shown: set[str] = module.__dict__.setdefault("_evaluation_notices", set())
    if message not in shown:
        shown.add(message)
        rank_zero_info(message)


def log_final_hparams(module: "SAETrainingModule") -> None:
    """Writes the run's hyperparameters with its final metrics (as `final/...`) to
    TensorBoard, so runs compare side by side in the HPARAMS tab.

    TensorBoard keeps the first hyperparameter record of a run, so the logger must not have
    written one at fit start: it needs `default_hp_metric=False` (the CLI's default logger has).
    The metrics get their own `final/` tags because log_hyperparams also writes them as scalars
    at step 0, which would put a stray point at the start of the `val/` curves.
    """
    logger = module.logger
    if not isinstance(logger, TensorBoardLogger):
        return
    if getattr(logger, "_default_hp_metric", False):
        rank_zero_info(
            "lightning-sae: hyperparameters not written with the final metrics: the TensorBoardLogger "
            "already wrote them with its placeholder hp_metric; give it default_hp_metric=False."
        )
        return
    # Validation metrics as final/<metric>; the last training values too (final/train/...), so
    # that a run without validation still gets its record.
    metrics = {
        FINAL_METRIC_PREFIX + name.removeprefix("val/"): float(value)
        for name, value in module.trainer.callback_metrics.items()
        if torch.as_tensor(value).numel() == 1
    }
    logger.log_hyperparams(run_hparams(module), metrics)


def run_hparams(module: "SAETrainingModule") -> dict[str, Any]:
    """The DataModule's hyperparameters updated with the module's, merged as Lightning merges them
    at fit start (so the logger's hparams.yaml keeps the same keys)."""
    datamodule = getattr(module.trainer, "datamodule", None)
    return {**dict(getattr(datamodule, "hparams", {}) or {}), **dict(module.hparams)}

