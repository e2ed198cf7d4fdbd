"""One run of a study: an SAE (TopK or g-SAE) or a JSAE pair trained on the shared cache for a
token budget, then validated once; resumable, and skipped once its result exists.

A run lives in <root>/runs/<run id>/: Lightning checkpoints (`ckpt/last.ckpt`, written every
`checkpoint_every` steps), the CSV log, and `result.json` once validated. Killed at any point
(SIGKILL included) it continues from its last checkpoint: the weights, Adam, the schedule and
the data loader's position are all in it (ActivationDataModule's loader is resumable). Training
runs for exactly `tokens // batch_size` optimizer steps, reading the cache's training rows in
shuffled epochs (more tokens than the cache holds means several epochs: the result says how many).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from study_data import CacheSpec, StudyData

from lightning_sae.atomic import atomic_write_text, exclusive_lock
from lightning_sae.checkpoint_io import AtomicCheckpointIO
from lightning_sae.module import SAEModule
from lightning_sae.registry import create_selector


@dataclass(frozen=True)
class RunSpec:
    """Everything that decides a run's result (its id is made from it)."""

    study: str  # "gsae" or "jsae"
    layer: int
    k: int
    seed: int
    tokens: int
    beta: float = 0.0  # gsae: 0 is the TopK baseline (the topk selector, not gradient_topk at 0)
    jacobian_coefficient: float = 0.0  # jsae: lambda
    lambda_label: str = ""  # jsae: e.g. "0.5 k^2/d" for the reference scaling rule
    normalized: bool = False  # normalize_activations="expected_average_only_in" for this run
    grad_normalize: str = ""  # gsae: another gradient normalisation than the settings' (an alternative checked)
    phase: int = 0  # the driver runs lower phases first

    @property
    def run_id(self) -> str:
        if self.study == "gsae":
            selector = "topk" if self.beta == 0 else f"gsae_b{self.beta:g}"
            variant = ("_norm" if self.normalized else "") + (f"_g{self.grad_normalize}" if self.grad_normalize else "")
            return f"gsae/L{self.layer}_k{self.k}_{selector}{variant}_s{self.seed}_t{self.tokens}"
        norm = "_norm" if self.normalized else ""
        return f"jsae/L{self.layer}_k{self.k}_lam{self.jacobian_coefficient:.4g}{norm}_s{self.seed}_t{self.tokens}"


@dataclass
class TrainSettings:
    batch_size: int = 1024
    lr: float = 1e-3
    expansion_factor: int = 8  # gsae: d_sae = expansion x d_in
    jsae_d_sae: int = 2304
    normalize: str = "rms"  # g-SAE's gradient normalisation
    normalize_activations: str = "none"  # every run's default; a run's `normalized` turns it on
    spliced_eval_contexts: int = 64
    jacobian_thresholds: list[float] = field(default_factory=lambda: [0.005, 0.01, 0.015, 0.02])
    checkpoint_every: int = 50
    threads: int = 1
    partial_cache: bool = False  # train on the shards written so far (the result records how many rows)
    test_mode: bool = False  # the tiny CI mode: its numbers are never reported


class TrainClock(L.Callback):
    """Seconds spent in this process's training steps (validation, caching and loading excluded):
    wall time, and the process's CPU time, which a pause (SIGSTOP) or waiting for a busy CPU does
    not inflate (the runs use one thread, so it is the steps' compute time). The totals ride in
    the run's checkpoints, so a resumed run's rates cover every segment, not only its last."""

    def __init__(self) -> None:
        self.seconds, self.cpu_seconds, self.steps, self._start, self._cpu_start = 0.0, 0.0, 0, 0.0, 0.0
        self.earlier = {"seconds": 0.0, "cpu_seconds": 0.0, "steps": 0}  # the segments before this one

    def on_train_batch_start(self, *args: Any) -> None:
        self._start, self._cpu_start = time.perf_counter(), time.process_time()

    def on_train_batch_end(self, *args: Any) -> None:
        self.seconds += time.perf_counter() - self._start
        self.cpu_seconds += time.process_time() - self._cpu_start
        self.steps += 1

    def totals(self) -> dict[str, float]:
        return {"seconds": self.earlier["seconds"] + self.seconds, "cpu_seconds": self.earlier["cpu_seconds"] + self.cpu_seconds,
                "steps": self.earlier["steps"] + self.steps}

    def state_dict(self) -> dict[str, float]:
        return self.totals()

    def load_state_dict(self, state_dict: dict[str, float]) -> None:
        self.earlier = dict(state_dict)


def selection(run: RunSpec, spec: CacheSpec) -> dict[str, str]:
    """{batch key: cache key} of the run's tensors."""
    if run.study == "gsae":
        if run.layer not in spec.gsae_layers:
            raise ValueError(f"layer {run.layer} is not among the cache's g-SAE layers {list(spec.gsae_layers)}")
        return {"x": f"layers.{run.layer}/x", "grad": f"layers.{run.layer}/grad"}
    if run.layer != spec.jsae_layer:
        raise ValueError(f"layer {run.layer} is not the cache's JSAE layer {spec.jsae_layer}")
    return {"x": f"layers.{run.layer}/mlp_in", "y": f"layers.{run.layer}/mlp_out"}


def scale_ratio(data: StudyData, rows: int = 8192) -> float:
    """RMS(mlp_out) / RMS(mlp_in) on held-out rows: how much larger |J| is here than between
    comparably scaled input and output (the "scale-matched" thresholds are the paper's times it)."""
    reader = data._readers["val"]
    batch = reader(torch.arange(min(rows, reader.num_rows)))
    return float(batch["y"].pow(2).mean().sqrt() / batch["x"].pow(2).mean().sqrt())


def scale_matched(threshold: float, ratio: float) -> float:
    """A paper threshold times RMS(mlp_out) / RMS(mlp_in), to 3 digits: the runs name their
    count metrics by it (count_above_0.102), so the report reads them with the same rounding."""
    return float(f"{threshold * ratio:.3g}")


def matched_thresholds(settings: TrainSettings, ratio: float) -> tuple[float, ...]:
    paper = [float(t) for t in settings.jacobian_thresholds]
    scaled = [scale_matched(t, ratio) for t in paper]
    return tuple(sorted(set(paper + scaled)))


def make_module(run: RunSpec, settings: TrainSettings, dead_tokens: int, thresholds: tuple[float, ...] = ()) -> L.LightningModule:
    normalize = "expected_average_only_in" if run.normalized else settings.normalize_activations
    common = {"lr": settings.lr, "seed": run.seed, "dead_tokens": dead_tokens, "spliced_eval_contexts": settings.spliced_eval_contexts,
              "normalize_activations": normalize}
    if run.study == "gsae":
        selector = create_selector("topk") if run.beta == 0 else create_selector("gradient_topk", beta=run.beta,
                                                                                normalize=run.grad_normalize or settings.normalize)
        return SAEModule(k=run.k, expansion_factor=settings.expansion_factor, selector=selector, **common)
    from lightning_sae_jsae import JSAEModule

    return JSAEModule(k=run.k, d_sae=settings.jsae_d_sae, jacobian_coefficient=run.jacobian_coefficient, reconstruction_loss="fvu",
                      jacobian_thresholds=thresholds, example_jacobians=0, **common)


def run_dir(root: Path, run: RunSpec) -> Path:
    return root / "runs" / run.run_id


def result_path(root: Path, run: RunSpec) -> Path:
    return run_dir(root, run) / "result.json"


def training_lock(root: Path, run: RunSpec) -> Path:
    return run_dir(root, run) / ".training.lock"


def train_and_validate(run: RunSpec, spec: CacheSpec, cache_dir: str, root: Path, settings: TrainSettings) -> dict:
    """The run's result, training (or finishing) it first if there is none. While it trains the
    process holds the run's lock, so drivers started side by side on one plan (one per core or
    GPU) share its runs out: a run another live process holds raises atomic.LockHeld at once."""
    done = result_path(root, run)
    if done.is_file():
        return json.loads(done.read_text())
    folder = run_dir(root, run)
    folder.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(training_lock(root, run)):
        if done.is_file():  # another driver finished it between the check above and the lock
            return json.loads(done.read_text())
        return _train_and_validate(run, spec, cache_dir, root, settings)


def _train_and_validate(run: RunSpec, spec: CacheSpec, cache_dir: str, root: Path, settings: TrainSettings) -> dict:
    folder, done = run_dir(root, run), result_path(root, run)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    L.seed_everything(run.seed, verbose=False)
    data = StudyData(spec, cache_dir, select=selection(run, spec), partial=settings.partial_cache,
                     batch_size=settings.batch_size, seed=run.seed)
    steps = max(1, run.tokens // settings.batch_size)
    # A latent is dead after a quarter of the run without firing (at least 100k tokens), so that
    # short runs are not judged by a window longer than themselves.
    dead_tokens = max(100_000, run.tokens // 4)
    ratio = None
    if run.study == "jsae":
        data.setup("fit")
        ratio = scale_ratio(data)
    module = make_module(run, settings, dead_tokens, matched_thresholds(settings, ratio) if ratio else ())
    clock = TrainClock()
    checkpoints = ModelCheckpoint(dirpath=folder / "ckpt", save_last=True, every_n_train_steps=settings.checkpoint_every,
                                  save_top_k=1, monitor=None)
    trainer = L.Trainer(
        max_steps=steps, max_epochs=-1, accelerator="auto", precision="32-true", gradient_clip_val=1.0,
        limit_val_batches=0, num_sanity_val_steps=0, callbacks=[clock, checkpoints], logger=CSVLogger(folder, name="log"),
        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=20, default_root_dir=folder,
        plugins=[AtomicCheckpointIO()],  # a kill while writing never leaves a truncated last.ckpt
    )
    last = folder / "ckpt" / "last.ckpt"
    trainer.fit(module, data, ckpt_path=str(last) if last.is_file() else None)
    # One validation on the held-out rows and contexts, after the last step.
    evaluator = L.Trainer(accelerator="auto", precision="32-true", logger=False, enable_progress_bar=False,
                          enable_model_summary=False, enable_checkpointing=False)
    started = time.perf_counter()
    evaluator.validate(module, data, verbose=False)
    metrics = {name: float(value) for name, value in evaluator.callback_metrics.items() if name.startswith("val/")}
    timed = clock.totals()
    result = {
        "run": asdict(run), "run_id": run.run_id, "settings": asdict(settings), "cache": asdict(spec),
        "steps": trainer.global_step, "batch_size": settings.batch_size, "tokens_trained": trainer.global_step * settings.batch_size,
        "pool_rows": data.pool_rows, "epochs": trainer.global_step * settings.batch_size / max(1, data.pool_rows),
        "train_seconds_last_segment": clock.seconds, "train_steps_last_segment": clock.steps,
        "train_cpu_seconds_last_segment": clock.cpu_seconds,
        # every segment's steps (runs before session 6 timed only their last segment)
        "train_seconds": timed["seconds"], "train_cpu_seconds": timed["cpu_seconds"], "train_steps_timed": timed["steps"],
        "tokens_per_second": timed["steps"] * settings.batch_size / timed["seconds"] if timed["seconds"] else math.nan,
        "tokens_per_cpu_second": timed["steps"] * settings.batch_size / timed["cpu_seconds"] if timed["cpu_seconds"] else math.nan,
        "validation_seconds": time.perf_counter() - started, "load_average": os.getloadavg(),
        "threads": torch.get_num_threads(), "scale_ratio": ratio, "test_mode": settings.test_mode, "metrics": metrics,
    }
    atomic_write_text(done, json.dumps(result, indent=1, sort_keys=True))
    # The checkpoints served their purpose; the exported SAE stays in the log directory.
    for stale in (folder / "ckpt").glob("*.ckpt"):
        stale.unlink()
    return result
