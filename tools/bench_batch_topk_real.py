"""BatchTopK's training step against TopK's on the same batch of real activations (the embedded
default's quickstart cache), interleaved in one run, best of several; optionally against another
BatchTopK implementation read from a file (e.g. an earlier version, `git show REV:path > old.py`).

The SAE is first trained for --warm-steps BatchTopK steps, so its pre-activations have the
spread of a trained SAE's (a fresh SAE's do not); every rule then runs on those same weights, with
AuxK on (a quarter of the latents marked dead), as a fit's step does.

    python tools/bench_batch_topk_real.py [--other old_selector.py] [--warm-steps 30 --repeats 5]
"""

from __future__ import annotations

import argparse
import copy
import importlib.util

import torch

from lightning_sae import TopKSAE
from lightning_sae.data import ActivationDataModule
from lightning_sae.selection import TopK
from lightning_sae_batch_topk import BatchTopK

from bench_batch_topk import best_time  # noqa: E402  (sibling file)


def quickstart_rows(count: int, model: str = "smollm2-135m", dataset: str = "python-docs", layer: int = 15,
                    context_size: int = 128, num_tokens: int = 102400) -> torch.Tensor:
    """`count` training rows of configs/quickstart.yaml's cache (built by a quickstart fit; the
    defaults are its settings), or of the cache of other settings (built here if missing)."""
    dm = ActivationDataModule(model=model, layer=layer, hook="resid_post", dataset=dataset, context_size=context_size,
                              num_tokens=num_tokens, validation_fraction=0.05, batch_size=count)

    class Request:  # what a training module would ask of the DataModule: x at the default hook
        def data_request(self):
            from lightning_sae.data_request import DataRequest
            return DataRequest({"x": None})

    class Trainer:
        global_rank, world_size, lightning_module = 0, 1, Request()

    dm.trainer = Trainer()
    dm.prepare_data()
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))["x"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--expansion", type=int, default=8)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--warm-steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--other", help="a file defining another BatchTopK class to time as well")
    parser.add_argument("--model", default="smollm2-135m", help="with --dataset/--layer/--context-size/--num-tokens: another cache")
    parser.add_argument("--dataset", default="python-docs")
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--context-size", type=int, default=128)
    parser.add_argument("--num-tokens", type=int, default=102400)
    args = parser.parse_args()
    x = quickstart_rows(args.tokens * 2, args.model, args.dataset, args.layer, args.context_size, args.num_tokens)
    train, batch = x[: args.tokens], x[args.tokens:]
    d_in = x.shape[1]
    sae = TopKSAE(d_in, args.expansion * d_in, args.k, seed=0, selector=BatchTopK())
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-3)
    for _ in range(args.warm_steps):
        optimizer.zero_grad()
        sae(train).fvu.backward()
        optimizer.step()
    rules = {"topk": TopK(), "batch_topk": BatchTopK()}
    if args.other:
        spec = importlib.util.spec_from_file_location("other_batch_topk", args.other)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        rules["other"] = module.BatchTopK()
    saes = {}
    for name, rule in rules.items():
        copied = copy.deepcopy(sae)
        copied.selector = rule
        rule.setup(copied)
        if name != "topk":  # a running threshold as a fit would have it
            copied(train)
        saes[name] = copied
    dead = torch.zeros(sae.d_sae, dtype=torch.bool)
    dead[: sae.d_sae // 4] = True

    def step(model: TopKSAE) -> None:
        model.zero_grad(set_to_none=True)
        out = model(batch, dead_mask=dead)
        (out.fvu + out.auxk_loss / 32).backward()

    pre = sae.pre_activations(batch)
    rows = {"select": {name: (lambda m=model: m.selector.select(pre, m, None)) for name, model in saes.items()},
            "training step": {name: (lambda m=model: step(m)) for name, model in saes.items()}}
    print(f"real rows ({args.model} layer {args.layer}), N={args.tokens} d_in={d_in} d_sae={sae.d_sae} k={args.k}, "
          f"after {args.warm_steps} warm-up steps, threads={torch.get_num_threads()}, best of {args.repeats}, interleaved")
    for label, functions in rows.items():
        times = {name: float("inf") for name in functions}
        for _ in range(args.repeats):  # interleaved: each round times every rule once
            for name, function in functions.items():
                times[name] = min(times[name], best_time(function, 1))
        line = "  ".join(f"{name} {value * 1e3:8.1f} ms ({value / times['topk']:.2f}x)" for name, value in times.items())
        print(f"  {label:14s} {line}")


if __name__ == "__main__":
    main()
