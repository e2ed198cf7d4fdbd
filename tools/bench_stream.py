"""Streaming fits against the bare model, many hook points per pass, memory, parallel caching.

    python tools/bench_stream.py [--contexts 64] [--grad-contexts 24] [--layers 5 10 15] [--repeats 2]
                                 [--memory-steps 30] [--skip throughput hooks memory cache]

Everything on the embedded SmolLM2-135M (or `--model`) and the python-docs text (no download), in one run, each
ratio from measurements taken back to back (alternating order) so other load hits both alike:

  stream            a streaming TopK fit (Trainer.fit, source: stream) whose one epoch trains on
                    the rows of `--contexts` contexts, timed from the first to the last training
                    batch, against a bare forward of the model truncated after the deepest hook on
                    the same contexts (rows per second; target >= 0.85)
  stream + grads    the same with the g-SAE selector (dL/dx streamed) against a bare full forward
                    with a backward to the hooked activation (target >= 0.8)
  3 hooks, 1 pass   one fit on --layers against one single-layer fit per layer (target >= 2.4x);
                    the bound for early-exit passes is sum(layer + 1) / (deepest + 1)
  memory            peak resident memory of a streaming fit of N steps and of 10 N steps (fresh
                    processes), which should be flat
  cache, 2 ranks    writing the cache with 2 DDP ranks (gloo, one thread each) against 1 process
                    (two threads) on the same text
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cache import bare_forward, bare_forward_backward  # noqa: E402  (sibling file)

import lightning_sae.data.extract as extract_module  # noqa: E402
from lightning_sae.data import EMBEDDED_MODEL, ActivationDataModule  # noqa: E402
from lightning_sae.module import SAEModule  # noqa: E402
from lightning_sae.registry import create_selector  # noqa: E402

CONTEXT = 128
MODEL = EMBEDDED_MODEL  # --model replaces it (workers get it on their command line)
COMPUTED = {"rows": 0}


def _counting(extract):
    """extract_rows, counting the rows the model produced (see EpochTimer.steady_rows_per_second)."""

    def run(*args, **kwargs):
        rows = extract(*args, **kwargs)
        COMPUTED["rows"] += len(next(iter(rows.values())))
        return rows

    return run


extract_module.extract_rows = _counting(extract_module.extract_rows)
SCRATCH = tempfile.TemporaryDirectory(prefix="bench_stream_")


class EpochTimer(L.Callback):
    """Wall time of the training epochs: from before the loader's first fetch (which runs the
    stream's model passes for the first buffer) to the end of the last batch. Setup, model
    loading and validation are not counted."""

    def __init__(self):
        self.started = self.ended = None
        self.rows = self.steps = 0
        self.step_seconds = 0.0

    def on_train_epoch_start(self, trainer, module):
        if self.started is None:
            self.started = time.perf_counter()
            self.computed_before = COMPUTED["rows"]

    @property
    def computed(self) -> int:
        return COMPUTED["rows"] - self.computed_before

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.step_started = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.ended = time.perf_counter()
        self.rows += len(next(iter(batch.values())))
        self.steps += 1
        self.step_seconds += self.ended - self.step_started

    def steady_rows_per_second(self) -> float:
        """Rows per second of a long run, where every row the model computes is trained on: the
        model's time per computed row (epoch time less the steps' time) plus one step's time per
        trained row. A short run computes up to one model group more than it trains on (a fill's
        leftover, which a long run uses in its next fill)."""
        fetch = (self.seconds - self.step_seconds) / self.computed
        return 1.0 / (fetch + self.step_seconds / self.rows)

    @property
    def seconds(self) -> float:
        return self.ended - self.started


def stream_datamodule(layers: list[int], contexts: int, batch_size: int, **kwargs) -> ActivationDataModule:
    """A stream whose one epoch is `contexts` training contexts, read in one buffer fill."""
    rows = contexts * (CONTEXT - 1)
    return ActivationDataModule(
        model=MODEL, layer=layers, source="stream", context_size=CONTEXT, device="cpu",
        num_tokens=(contexts + 1) * CONTEXT, validation_fraction=1 / (contexts + 1), batch_size=batch_size,
        buffer_tokens=rows // batch_size * batch_size, model_batch_size=8, **kwargs,
    )


def stream_fit(layers: list[int], contexts: int, batch_size: int, selector: str = "topk", steps: int | None = None) -> EpochTimer:
    L.seed_everything(0)
    timer = EpochTimer()
    module = SAEModule(k=32, expansion_factor=8, selector=create_selector(selector), spliced_eval_contexts=0)
    trainer = L.Trainer(
        max_epochs=-1 if steps else 1, max_steps=steps or -1, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        callbacks=[timer], default_root_dir=tempfile.mkdtemp(dir=SCRATCH.name),  # exports land there, not in the working tree
    )
    trainer.fit(module, stream_datamodule(layers, contexts, batch_size))
    return timer


def contexts_of_the_stream(contexts: int) -> list[torch.Tensor]:
    """The training contexts a stream of `contexts` contexts reads, in its model batches."""
    plan = stream_datamodule([0], contexts, 256).context_plan()
    block = list(itertools.islice(plan.training(0, 1), contexts))
    return [torch.stack(block[i : i + 8]) for i in range(0, len(block), 8)]


def bare_rows_per_second(model, batches, layer: int, gradients: bool) -> float:
    started = time.perf_counter()
    if gradients:
        bare_forward_backward(model, batches, layer, "resid_post")
    else:
        bare_forward(model, batches, layer)
    seconds = time.perf_counter() - started
    bos = ActivationDataModule(model=MODEL).load_tokenizer().bos_token_id
    return sum(int((b != bos).sum()) for b in batches) / seconds  # the rows a stream keeps (no BOS)


def throughput(args) -> None:
    model = ActivationDataModule(model=MODEL, device="cpu").load_language_model()
    deepest = max(args.layers)
    for gradients, selector, target in ((False, "topk", 0.85), (True, "gradient_topk", 0.8)):
        contexts = args.grad_contexts if gradients else args.contexts
        batches = contexts_of_the_stream(contexts)
        ratios, ours, bare, steady = [], [], [], []
        for repeat in range(args.repeats):
            order = ("bare", "stream") if repeat % 2 == 0 else ("stream", "bare")
            seen = {}
            for which in order:
                if which == "bare":
                    seen[which] = bare_rows_per_second(model, batches, deepest, gradients)
                else:
                    timer = stream_fit([deepest], contexts, args.batch_size, selector)
                    seen[which] = timer.rows / timer.seconds
                    seen["computed"] = timer.steady_rows_per_second()
            steady.append(seen["computed"] / seen["bare"])
            ours.append(seen["stream"])
            bare.append(seen["bare"])
            ratios.append(seen["stream"] / seen["bare"])
        name = "stream + grads (g-SAE)" if gradients else "stream (TopK)"
        print(f"{name:24s} {statistics.median(ours):8.0f} rows/s trained vs bare {statistics.median(bare):8.0f} rows/s: "
              f"{statistics.median(ratios):.2f} (runs {', '.join(f'{r:.2f}' for r in ratios)}); "
              f"steady state (see EpochTimer): {statistics.median(steady):.2f} (runs {', '.join(f'{r:.2f}' for r in steady)}; "
              f"target >= {target})")


def many_hooks(args) -> None:
    joint_times, single_times = [], []
    for repeat in range(args.repeats):
        joint = stream_fit(args.layers, args.contexts, args.batch_size).seconds
        singles = sum(stream_fit([layer], args.contexts, args.batch_size).seconds for layer in args.layers)
        joint_times.append(joint)
        single_times.append(singles)
    bound = sum(layer + 1 for layer in args.layers) / (max(args.layers) + 1)
    ratios = [s / j for s, j in zip(single_times, joint_times)]
    print(f"layers {args.layers} in one pass: {statistics.median(joint_times):.1f} s; one fit each: "
          f"{statistics.median(single_times):.1f} s in total: {statistics.median(ratios):.2f}x faster "
          f"(runs {', '.join(f'{r:.2f}' for r in ratios)}; early-exit bound {bound:.2f}x; target >= 2.4x)")


def memory(args) -> None:
    results = {}
    for steps in (args.memory_steps, 10 * args.memory_steps):
        done = subprocess.run([sys.executable, __file__, "--memory-run", str(steps), "--layers", str(args.memory_layer),
                               "--model", MODEL],
                              capture_output=True, text=True, check=True)
        results[steps] = json.loads(done.stdout.strip().splitlines()[-1])
    (short, a), (long, b) = results.items()
    print(f"peak RSS of a streaming fit (layer {args.memory_layer}, batch 256): {short} steps {a['peak_mib']:.0f} MiB, "
          f"{long} steps {b['peak_mib']:.0f} MiB ({b['peak_mib'] / a['peak_mib']:.3f}x); "
          f"{a['rows']:,} and {b['rows']:,} rows trained")


def peak_resident_mib() -> float:
    """VmHWM: this process image's peak resident set. (getrusage's ru_maxrss would not do: Linux
    carries it over from the parent through fork and exec.)"""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def memory_run(steps: int, layer: int) -> None:
    timer = stream_fit([layer], 64, 256, steps=steps)
    print(json.dumps({"peak_mib": peak_resident_mib(), "rows": timer.rows}))


def parallel_cache(args) -> None:
    times = {}
    for world in (1, 2):
        with tempfile.TemporaryDirectory() as folder:
            env = {**os.environ, "OMP_NUM_THREADS": str(2 // world)}
            done = subprocess.run([sys.executable, __file__, "--cache-run", str(world), "--cache-dir", folder,
                                   "--layers", str(max(args.layers)), "--contexts", str(args.contexts), "--model", MODEL],
                                  capture_output=True, text=True, env=env)
            if done.returncode:
                raise RuntimeError(done.stderr[-3000:])
            times[world] = json.loads(done.stdout.strip().splitlines()[-1])["seconds"]
    print(f"caching {args.contexts} contexts at layer {max(args.layers)}: 1 process {times[1]:.1f} s, 2 ranks "
          f"{times[2]:.1f} s ({times[1] / times[2]:.2f}x; both use the machine's 2 cores)")


class TimedCache(ActivationDataModule):
    """Records how long this rank spent writing its part of the cache."""

    def _build_cache(self, routing, writer, writers):
        started = time.perf_counter()
        try:
            return super()._build_cache(routing, writer, writers)
        finally:
            self.cache_seconds = getattr(self, "cache_seconds", 0.0) + time.perf_counter() - started


def cache_run(world: int, folder: str, layer: int, contexts: int) -> None:
    data = TimedCache(model=MODEL, layer=layer, context_size=CONTEXT, device="cpu", cache_dir=folder,
                      num_tokens=(contexts + 1) * CONTEXT, validation_fraction=1 / (contexts + 1), batch_size=256,
                      model_batch_size=8)
    trainer = L.Trainer(max_steps=1, accelerator="cpu", devices=world, strategy="ddp" if world > 1 else "auto",
                        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=folder)
    trainer.fit(SAEModule(k=32, expansion_factor=8, spliced_eval_contexts=0), data)
    seconds = torch.tensor(getattr(data, "cache_seconds", 0.0))
    if world > 1:
        seconds = trainer.strategy.reduce(seconds, reduce_op="max")
    if trainer.is_global_zero:
        print(json.dumps({"seconds": float(seconds)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=EMBEDDED_MODEL, help="a model name or local folder (default: the embedded SmolLM2)")
    parser.add_argument("--contexts", type=int, default=64, help="training contexts of 128 tokens per measured fit")
    parser.add_argument("--grad-contexts", type=int, default=24, help="the same, for the runs with gradients")
    parser.add_argument("--layers", type=int, nargs="+", default=[5, 10, 15])
    # 8 contexts of at most 127 rows (BOS excluded; documents that start inside a context add a
    # BOS each) per batch: about one model group per batch. See EpochTimer for the steady state.
    parser.add_argument("--batch-size", type=int, default=8 * (CONTEXT - 1))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--memory-steps", type=int, default=30)
    parser.add_argument("--memory-layer", type=int, default=3)
    parser.add_argument("--skip", nargs="*", default=[], choices=["throughput", "hooks", "memory", "cache"])
    parser.add_argument("--memory-run", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--cache-run", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    global MODEL
    MODEL = args.model
    if args.memory_run:
        return memory_run(args.memory_run, args.layers[0])
    if args.cache_run:
        return cache_run(args.cache_run, args.cache_dir, args.layers[0], args.contexts)
    load = os.getloadavg()[0]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {load:.1f} at start")
    for name, step in (("throughput", throughput), ("hooks", many_hooks), ("memory", memory), ("cache", parallel_cache)):
        if name not in args.skip:
            step(args)
    print(f"load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
