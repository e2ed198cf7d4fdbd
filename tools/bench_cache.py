"""Caching throughput against the bare model on the same batches, in one run.

    python tools/bench_cache.py [--tokens 8192] [--layer 15] [--hook resid_post] [--device auto]

Four timings on the embedded SmolLM2-135M (no download), per model batch, each method run
back to back with its baseline on the same batch (so load from other processes hits both alike):
  bare forward      the model truncated after the hooked layer, inference mode, nothing kept
  cache             build_cache without gradients (forward with early stop, rows written to disk)
  bare fwd+bwd      full forward, next-token CE (sum), backward to the hooked activation only
  cache + grads     build_cache with gradients
Targets: cache >= 90% of bare forward; cache + grads >= 80% of bare fwd+bwd.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
import time
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from lightning_sae.data import EMBEDDED_MODEL, decoder_layers, hook_point, load_model, load_tokenizer
from lightning_sae.data.cache import build_cache
from lightning_sae.data.hooks import canonical_hookpoint
from lightning_sae.data.text import pack_contexts, python_docs


@contextmanager
def truncated(model: nn.Module, layer: int) -> Iterator[nn.Module]:
    """The base model (no LM head) running only layers 0..layer."""
    base = model.base_model
    layers = decoder_layers(model)
    parent = next(m for m in base.modules() if any(child is layers for child in m.children()))
    name = next(n for n, child in parent.named_children() if child is layers)
    depth = model.config.num_hidden_layers
    setattr(parent, name, nn.ModuleList(layers[: layer + 1]))
    model.config.num_hidden_layers = layer + 1
    try:
        yield base
    finally:
        setattr(parent, name, layers)
        model.config.num_hidden_layers = depth


def bare_forward(model: nn.Module, batches: list[torch.Tensor], layer: int) -> None:
    with truncated(model, layer) as base, torch.inference_mode():
        for tokens in batches:
            base(input_ids=tokens, use_cache=False)


def bare_forward_backward(model: nn.Module, batches: list[torch.Tensor], layer: int, hook: str) -> None:
    point = hook_point(model, layer, hook)
    leaf: list[torch.Tensor] = []

    def make_leaf(hidden: torch.Tensor) -> torch.Tensor:
        leaf.append(hidden.detach().requires_grad_(True))
        return leaf[-1]

    if point.on_input:
        handle = point.module.register_forward_pre_hook(lambda m, args: (make_leaf(args[0]), *args[1:]))
    else:
        handle = point.module.register_forward_hook(lambda m, args, out: make_leaf(out))
    try:
        with torch.enable_grad():
            for tokens in batches:
                logits = model(input_ids=tokens, use_cache=False).logits
                loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten(), reduction="sum")
                torch.autograd.grad(loss, leaf.pop())
    finally:
        handle.remove()


def cache(model: nn.Module, contexts: list[torch.Tensor], args, gradients: bool, bos: int) -> None:
    with tempfile.TemporaryDirectory() as folder:
        hookpoint = canonical_hookpoint(model, f"layers.{args.layer}.{args.hook}")
        build_cache(
            folder, {"context_size": args.context_size}, lambda: model, iter(contexts), roles={"x": hookpoint}, gradients={"grad": "x"} if gradients else {},
            plan=[("train", len(contexts))], context_size=args.context_size, cache_dtype=args.cache_dtype,
            exclude_token=bos, model_batch_size=args.model_batch_size, progress=False,
        )


def timed(fn: Callable[[], None], device: torch.device) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process). On a shared CPU the CPU time is the steadier
    measure of the work itself: it does not count time spent waiting for other processes."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=EMBEDDED_MODEL, help="a model name or local folder (default: the embedded SmolLM2)")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--context-size", type=int, default=128)
    parser.add_argument("--model-batch-size", type=int, default=8)
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--hook", default="resid_post")
    parser.add_argument("--cache-dtype", default="float32")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    started = time.perf_counter()
    model = load_model(args.model, device=args.device)
    tokenizer = load_tokenizer(args.model)
    device = next(model.parameters()).device
    print(f"model loaded in {time.perf_counter() - started:.1f} s on {device}, {torch.get_num_threads()} threads")
    contexts = list(itertools.islice(pack_contexts(python_docs(), tokenizer, args.context_size), args.tokens // args.context_size))
    step = args.model_batch_size
    units = [contexts[i : i + step] for i in range(0, len(contexts), step)]  # one forward pass each
    bos = tokenizer.bos_token_id
    runs: dict[str, Callable[[list[torch.Tensor]], None]] = {
        "bare forward": lambda unit: bare_forward(model, [torch.stack(unit).to(device)], args.layer),
        "cache": lambda unit: cache(model, unit, args, False, bos),
        "bare fwd+bwd": lambda unit: bare_forward_backward(model, [torch.stack(unit).to(device)], args.layer, args.hook),
        "cache + grads": lambda unit: cache(model, unit, args, True, bos),
    }
    pairs = (("bare forward", "cache", 0.9), ("bare fwd+bwd", "cache + grads", 0.8))
    for fn in runs.values():  # warm-up: allocator, kernels, page cache
        fn(units[0])
    # Paired, alternating measurements: each method and its baseline run back to back on the
    # same batch, so load from other processes affects both alike; the median ratio is reported.
    totals = {name: [0.0, 0.0] for name in runs}
    ratios: dict[str, list[tuple[float, float]]] = {ours: [] for _, ours, _ in pairs}
    for repeat in range(args.repeats):
        for index, unit in enumerate(units):
            for bare, ours, _ in pairs:
                seen = {}
                for name in (bare, ours) if (repeat + index) % 2 == 0 else (ours, bare):
                    seen[name] = timed(lambda: runs[name](unit), device)
                    totals[name][0] += seen[name][0]
                    totals[name][1] += seen[name][1]
                ratios[ours].append((seen[bare][0] / seen[ours][0], seen[bare][1] / seen[ours][1]))
    count = args.repeats * sum(len(unit) for unit in units) * args.context_size
    print(f"{count} tokens ({args.repeats} passes), layer {args.layer} {args.hook}, {step} contexts x {args.context_size} per forward")
    print(f"  {'':14s} {'wall tok/s':>12s} {'tok/CPU-s':>12s}")
    for name, (wall, cpu) in totals.items():
        print(f"  {name:14s} {count / wall:12,.0f} {count / cpu:12,.0f}")
    for bare, ours, target in pairs:
        wall = statistics.median(r[0] for r in ratios[ours])
        cpu = statistics.median(r[1] for r in ratios[ours])
        print(f"{ours:14s} / {bare:13s} = {wall:6.1%} wall, {cpu:6.1%} CPU (median of {len(ratios[ours])} pairs; target >= {target:.0%})")

if __name__ == "__main__":
    main()
