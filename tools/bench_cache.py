"""Caching throughput against the bare model on the same batches, in one run.

    python tools/bench_cache.py [--tokens 8192] [--layer 15] [--hook resid_post] [--device auto]

Four timings on the embedded SmolLM2-135M (no download), each the best of --repeats, run
interleaved so that load from other processes hits them alike:
  bare forward      the model truncated after the hooked layer, inference mode, nothing kept
  cache             build_cache without gradients (forward with early stop, rows written to disk)
  bare fwd+bwd      full forward, next-token CE (sum), backward to the hooked activation only
  cache + grads     build_cache with gradients
Targets: cache >= 90% of bare forward; cache + grads >= 80% of bare fwd+bwd.
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from lightning_sae.data import EMBEDDED_MODEL, decoder_layers, hook_point, load_model, load_tokenizer
from lightning_sae.data.cache import build_cache
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
        build_cache(
            folder, {}, lambda: model, iter(contexts), layer=args.layer, roles={"x": args.hook}, gradients=gradients,
            plan=[("train", len(contexts))], context_size=args.context_size, cache_dtype=args.cache_dtype,
            exclude_token=bos, model_batch_size=args.model_batch_size, progress=False,
        )


def timed(fn: Callable[[], None], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    model = load_model(EMBEDDED_MODEL, device=args.device)
    tokenizer = load_tokenizer(EMBEDDED_MODEL)
    device = next(model.parameters()).device
    print(f"model loaded in {time.perf_counter() - started:.1f} s on {device}, {torch.get_num_threads()} threads")
    contexts = list(itertools.islice(pack_contexts(python_docs(), tokenizer, args.context_size), args.tokens // args.context_size))
    tokens = torch.stack(contexts).to(device)
    batches = list(tokens.split(args.model_batch_size))
    count = tokens.numel()
    runs = {
        "bare forward": lambda: bare_forward(model, batches, args.layer),
        "cache": lambda: cache(model, contexts, args, False, tokenizer.bos_token_id),
        "bare fwd+bwd": lambda: bare_forward_backward(model, batches, args.layer, args.hook),
        "cache + grads": lambda: cache(model, contexts, args, True, tokenizer.bos_token_id),
    }
    for fn in runs.values():  # warm-up: allocator, kernels, page cache
        fn()
    best = {name: float("inf") for name in runs}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            best[name] = min(best[name], timed(fn, device))
    print(f"{count} tokens, layer {args.layer} {args.hook}, {args.model_batch_size} contexts x {args.context_size} per forward")
    for name, seconds in best.items():
        print(f"  {name:14s} {count / seconds:10,.0f} tok/s")
    print(f"cache / bare forward        = {best['bare forward'] / best['cache']:.1%} (target >= 90%)")
    print(f"cache + grads / bare fwd+bwd = {best['bare fwd+bwd'] / best['cache + grads']:.1%} (target >= 80%)")


if __name__ == "__main__":
    main()
