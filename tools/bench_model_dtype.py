"""The model pass in float32 against bfloat16: tokens/s and how far bf16 activations and gradients
are from fp32 ones, on the embedded SmolLM2-135M (layer 15 residual stream), interleaved runs.

    python tools/bench_model_dtype.py [--model smollm2-135m --layer 15 --contexts 16 --repeats 3]
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

import torch

from lightning_sae.data import models
from lightning_sae.data.extract import Extractor
from lightning_sae.data.text import pack_contexts, python_docs

DTYPES = ("float32", "bfloat16")


def relative_error(reference: torch.Tensor, other: torch.Tensor) -> float:
    return ((reference - other.float()).norm() / reference.norm()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=models.EMBEDDED_MODEL, help="a model name or local folder")
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--context-size", type=int, default=128)
    parser.add_argument("--contexts", type=int, default=16, help="per forward; the gradient pass takes half")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    tokenizer = models.load_tokenizer(args.model)
    contexts = torch.stack(list(itertools.islice(pack_contexts(python_docs(), tokenizer, args.context_size), args.contexts)))
    grad_contexts = contexts[: max(1, args.contexts // 2)]
    roles = {"x": f"layers.{args.layer}"}
    forward, backward = {}, {}
    for dtype in DTYPES:
        model = models.load_model(args.model, dtype, "cpu")
        forward[dtype], backward[dtype] = Extractor(model, None, roles), Extractor(model, None, roles, True)
        forward[dtype](contexts[:2]), backward[dtype](contexts[:2])  # warm-up
    rates: dict[str, list[float]] = {f"{dtype}{kind}": [] for dtype in DTYPES for kind in ("", " + grad")}
    for repeat in range(args.repeats):  # alternate the order so that load hits both alike
        for dtype in DTYPES if repeat % 2 == 0 else DTYPES[::-1]:
            start = time.perf_counter()
            forward[dtype](contexts)
            rates[dtype].append(contexts.numel() / (time.perf_counter() - start))
            start = time.perf_counter()
            backward[dtype](grad_contexts)
            rates[f"{dtype} + grad"].append(grad_contexts.numel() / (time.perf_counter() - start))
    print(f"{args.model}, layer {args.layer}, {args.contexts} contexts x {args.context_size}, {torch.get_num_threads()} threads, "
          f"median of {args.repeats}")
    for name, values in rates.items():
        print(f"  {name:18s} {statistics.median(values):10,.0f} tok/s")
    activations = relative_error(forward["float32"](contexts)["x"], forward["bfloat16"](contexts)["x"])
    gradients = relative_error(backward["float32"](grad_contexts)["grad"], backward["bfloat16"](grad_contexts)["grad"])
    print(f"bfloat16 against float32, relative error: activations {activations:.4f}, gradients {gradients:.4f}")


if __name__ == "__main__":
    main()
