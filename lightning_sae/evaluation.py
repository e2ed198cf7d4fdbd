"""Evaluation glue for the training modules: SAEBench's core metrics of each SAE at the end of
each validation epoch (with spliced-in CE/KL), their SAEBench-layout JSON (`--eval_output`), and
the run's hyperparameters with its final metrics for TensorBoard's HPARAMS tab.

Kept out of module.py so the modules only call in; the evaluators themselves live in
`lightning_sae.spliced` (language-model side) and `lightning_sae.metrics` (reconstruction side).
docs/metrics.md defines every metric.
"""

from __future__ import annotations

import json
import math
import time
import uuid
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from lightning_sae.atomic import atomic_write_text
from lightning_sae.metrics import ReconstructionStats, density_metrics, latent_weight_metrics
from lightning_sae.sae import TopKSAE
from lightning_sae.spliced import TOTAL_FIELDS, Reconstruct, scores_from_totals, spliced_totals

if TYPE_CHECKING:
    from lightning_sae.module import SAETrainingModule

FINAL_METRIC_PREFIX = "final/"
"""TensorBoard tag prefix of the final metrics written beside the hyperparameters."""

CORE_GROUPS: dict[str, tuple[str, ...]] = {
    "model_behavior_preservation": ("kl_div_score", "kl_div_with_ablation", "kl_div_with_sae"),
    "model_performance_preservation": ("ce_loss_score", "ce_loss_with_ablation", "ce_loss_with_sae", "ce_loss_without_sae"),
    "reconstruction_quality": ("explained_variance", "explained_variance_legacy", "mse", "cossim"),
    "shrinkage": ("l2_norm_in", "l2_norm_out", "l2_ratio", "relative_reconstruction_bias"),
    "sparsity": ("l0", "l1"),
    "token_stats": ("total_tokens_eval_reconstruction", "total_tokens_eval_sparsity_variance"),
    "misc_metrics": (
        "freq_over_1_percent", "freq_over_10_percent", "normalized_freq_over_1_percent",
        "normalized_freq_over_10_percent", "average_max_encoder_cosine_sim", "average_max_decoder_cosine_sim",
        "frac_alive",
    ),
}
"""SAEBench's core result groups (`eval_result_metrics`) and the metric names in each."""
LATENT_FIELDS = (
    "feature_density", "consistent_activation_heuristic", "encoder_bias", "encoder_norm",
    "encoder_decoder_cosine_sim", "max_decoder_cosine_sim", "max_encoder_cosine_sim",
)
"""SAEBench's per-latent fields (`eval_result_details`, with `index`)."""
TOKEN_COUNTS = CORE_GROUPS["token_stats"]
"""Counts that go to the JSON but not to the logger."""


@dataclass
class CoreResult:
    """One SAE in one validation mode: SAEBench's core metrics and per-latent statistics, plus
    this library's own metrics (fvu, mse_per_element, dead_fraction, ...) under their names."""

    sae_name: str
    mode: str
    metrics: dict[str, float]
    latents: dict[str, Tensor] = field(default_factory=dict)  # per latent, on the CPU

    def logged(self) -> dict[str, float]:
        return {name: value for name, value in self.metrics.items() if name not in TOKEN_COUNTS}


def core_result(sae_name: str, mode: str, stats: ReconstructionStats, density: Tensor, sae: TopKSAE) -> CoreResult:
    """The core metrics that need no language model: the reconstruction statistics accumulated
    over the epoch, the latents' firing frequencies and the SAE's weights."""
    values = {name: float(value) for name, value in stats.compute().items()}
    values["total_tokens_eval_sparsity_variance"] = values.pop("tokens")
    values.update({name: float(value) for name, value in density_metrics(density).items()})
    weights = latent_weight_metrics(sae.W_enc.detach(), sae.b_enc.detach(), sae.W_dec.detach())
    values["average_max_encoder_cosine_sim"] = float(weights["max_encoder_cosine_sim"].mean())
    values["average_max_decoder_cosine_sim"] = float(weights["max_decoder_cosine_sim"].mean())
    latents = {"feature_density": density.detach().double().cpu(), **{k: v.cpu() for k, v in weights.items()}}
    return CoreResult(sae_name, mode, values, latents)


def spliced_validation_metrics(module: "SAETrainingModule", max_contexts: int) -> dict[str, dict[str, float]]:
    """Spliced-in scores of every SAE in every validation mode, by metric prefix
    (`{"val/": {"ce_loss_score": ...}, "val/plain_topk/": {...}}`), with the number of positions
    whose predictions were scored as `total_tokens_eval_reconstruction`.

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
    results: dict[str, dict[str, float]] = {}
    for name in module.sae_names:
        # Read where the SAE's input comes from, write where its target does (module.splice).
        splice = module.splice(name)
        unknown = [key for key in (splice.read, splice.write) if key not in hookpoints]
        if unknown:
            _notice_once(
                module,
                f"lightning-sae: spliced CE not computed for SAE '{name}': the DataModule's metadata "
                f"does not say where batch key '{unknown[0]}' comes from.",
            )
            continue
        reconstructions = {
            mode: _on_device(_in_raw_units(module, name, module.spliced_reconstruction(name, mode)), device)
            for mode in module.validation_modes()
        }
        totals = spliced_totals(
            model,
            contexts,
            None,
            hookpoints[splice.read],
            reconstructions,
            write=hookpoints[splice.write],
            needs_gradients=gradients and module.sae_keys[name] == "x",
            exclude_bos=bool(getattr(datamodule, "exclude_bos", True)),
            bos_token_id=getattr(tokenizer, "bos_token_id", None),
            progress=None if trainer.is_global_zero else False,
            exclusion=getattr(datamodule, "exclusion", None),
        )
        for mode, total in totals.items():
            summed = trainer.strategy.reduce(total.to(device), reduce_op="sum")
            results[module.metric_prefix(name, mode)] = {
                **scores_from_totals(summed),
                "total_tokens_eval_reconstruction": float(summed[TOTAL_FIELDS.index("kl_tokens")]),
            }
    return results


def _in_raw_units(module: Any, name: str, reconstruct: Callable) -> Callable:
    """`reconstruct` (in the units the SAE trains in) on the model's raw activations: scaled in,
    the reconstruction scaled back (no change without activation normalisation)."""
    if not getattr(module, "normalizes_activations", False):
        return reconstruct
    splice = module.splice(name)
    s_in, s_out = module.activation_scale(splice.read), module.activation_scale(splice.write)
    return lambda x, grad: reconstruct(x * s_in, None if grad is None else grad / s_in) / s_out


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


_shown_notices: "weakref.WeakKeyDictionary[Any, set[str]]" = weakref.WeakKeyDictionary()
"""Notices already shown, per training module (forgotten with the module)."""


def _notice_once(module: Any, message: str) -> None:
    shown = _shown_notices.setdefault(module, set())
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



# ---- SAEBench's core result file ----------------------------------------------------------------


def core_eval_output(module: "SAETrainingModule", prefix: str) -> dict[str, Any]:
    """The result of `module.core_results[prefix]` in SAEBench's core layout (`CoreEvalOutput`).

    A metric that was not computed (the spliced scores without a language model; the
    consistent_activation_heuristic, which needs tokens grouped by context) or is undefined is
    -1, as SAEBench writes NaN; `eval_result_unstructured` lists which, and holds this library's
    other metrics of the SAE.
    """
    result: CoreResult = module.core_results[prefix]
    datamodule = getattr(module._trainer, "datamodule", None) if module._trainer is not None else None
    metadata = module.sae_metadata(result.sae_name)
    sae = module.get_sae(result.sae_name)
    spliced = "ce_loss_score" in result.metrics
    not_computed = sorted({name for names in CORE_GROUPS.values() for name in names} - set(result.metrics))
    not_computed.append("consistent_activation_heuristic")
    groups = {
        group: {name: _number(result.metrics.get(name, math.nan), integer=group == "token_stats") for name in names}
        for group, names in CORE_GROUPS.items()
    }
    core_names = {name for names in CORE_GROUPS.values() for name in names}
    details = [
        {"index": i, **{name: _number(float(result.latents[name][i]) if name in result.latents else math.nan) for name in LATENT_FIELDS}}
        for i in range(sae.d_sae)
    ]
    model_dtype = getattr(datamodule, "model_dtype", None)
    return {
        "eval_type_id": "core",
        "eval_config": {
            "model_name": str(metadata.get("model_name") or ""),
            "llm_dtype": str(model_dtype or "float32"),
            "batch_size_prompts": int(module.hparams.get("spliced_eval_contexts", 0) or 0),
            "n_eval_reconstruction_batches": 1,
            "n_eval_sparsity_variance_batches": 1,
            "dataset": str(metadata.get("dataset_path") or ""),
            "context_size": int(metadata.get("context_size") or 0),
            "compute_kl": spliced,
            "compute_ce_loss": spliced,
            "compute_l2_norms": True,
            "compute_sparsity_metrics": True,
            "compute_variance_metrics": True,
            "compute_featurewise_density_statistics": True,
            "compute_featurewise_weight_based_metrics": True,
            "exclude_special_tokens_from_reconstruction": bool(getattr(datamodule, "exclude_bos", False)),
            "verbose": False,
        },
        "eval_id": str(uuid.uuid4()),
        "datetime_epoch_millis": int(time.time() * 1000),
        "eval_result_metrics": groups,
        "eval_result_details": details,
        "sae_bench_commit_hash": "",  # not run by SAEBench: see eval_result_unstructured
        "sae_lens_id": _result_key(prefix) or result.sae_name,
        "sae_lens_release_id": None,
        "sae_lens_version": _version("sae-lens"),
        "sae_cfg_dict": {
            "architecture": sae.saelens_architecture(), "d_in": sae.d_in, "d_sae": sae.d_sae, "k": sae.k, "dtype": "float32",
            "apply_b_dec_to_input": bool(sae.centers_input), "normalize_activations": "none", "metadata": metadata,
        },
        "eval_result_unstructured": {
            "evaluated_by": f"lightning-sae {_version('lightning-sae')}",
            "sae": result.sae_name,
            "validation_mode": result.mode or "training selection",
            "not_computed_written_as_-1": not_computed,
            "other_metrics": {name: _number(value) for name, value in result.metrics.items() if name not in core_names},
            "definitions": "docs/metrics.md of lightning-sae: explained_variance is the corrected (SAELens PR 665) "
            "one, mse is not divided by the batch's token count, relative_reconstruction_bias is one ratio over all tokens",
        },
    }


def write_core_eval(module: "SAETrainingModule", path: str | Path) -> list[Path]:
    """Writes every SAE's (and validation mode's) core result as SAEBench JSON; see `core_eval_paths`."""
    paths = core_eval_paths(path, list(module.core_results))
    for prefix, target in paths.items():
        atomic_write_text(target, json.dumps(core_eval_output(module, prefix), indent=2, default=str, allow_nan=False))
    return list(paths.values())


def core_eval_paths(path: str | Path, prefixes: list[str]) -> dict[str, Path]:
    """Where each result goes: the SAE's training selection at a lone site at `path` itself; any
    other (several SAEs or sites, a second validation mode) beside it with its name added to the
    stem before SAEBench's `_eval_results` suffix where the stem ends so
    (`run_eval_results.json` -> `run_layers.9_eval_results.json`), else at the end
    (`results.json` -> `results_plain_topk.json`)."""
    path = Path(path)
    stem, tail = path.stem, ""
    if stem.endswith("_eval_results"):
        stem, tail = stem[: -len("_eval_results")], "_eval_results"
    out = {}
    for prefix in prefixes:
        key = _result_key(prefix)
        out[prefix] = path if not key else path.with_name(f"{stem}_{key.replace('/', '_')}{tail}{path.suffix}")
    return out


class CoreEvalWriter(L.Callback):
    """Writes the SAEBench core result file(s) after every validation (so after `lightning-sae
    validate`, and at the end of a fit the last validation's): `--eval_output PATH`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or not getattr(pl_module, "core_results", None):
            return
        written = write_core_eval(pl_module, self.path)
        rank_zero_info("lightning-sae: SAEBench core results written to " + ", ".join(str(p) for p in written))


def _result_key(prefix: str) -> str:
    """`val/layers.9/plain_topk/` -> `layers.9/plain_topk`."""
    return prefix.removeprefix("val/").rstrip("/")


def _number(value: float, integer: bool = False) -> float | int:
    if not math.isfinite(value):
        return -1  # SAEBench's replace_nans_with_negative_one
    return int(round(value)) if integer else float(value)


def _version(distribution: str) -> str | None:
    try:
        return version(distribution)
    except PackageNotFoundError:
        return None
