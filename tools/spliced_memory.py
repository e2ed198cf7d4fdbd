"""Peak memory of the spliced CE/KL evaluation on a Gemma-sized vocabulary (262144 tokens), before
and after it computed CE/KL in chunks, in one run.

A tiny random Gemma 3 model (hidden size 64, 2 layers) carries the full vocabulary, so the
logits, not the model, dominate. Each measurement runs in a fresh process: it builds the model
and the contexts, notes its resident memory, runs `spliced_metrics` once (layer 0, resid_post,
a random TopK SAE spliced in) and reports the rise of the process's peak resident memory
(ru_maxrss) above that. "before" is `lightning_sae/spliced.py` as it was at the git revision
`--before` (loaded from git, not installed), "after" the working tree's. Runs alternate
(after, before, after, before, ...) so that load on a shared machine hits both alike.

    python tools/spliced_memory.py --contexts 8 --context-size 64 --repeats 2
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BEFORE = "6a16b32"  # the last revision whose spliced.py held all logits of a batch in float32


def load_spliced(variant: str, revision: str):
    if variant == "after":
        import lightning_sae.spliced as spliced

        return spliced
    source = subprocess.run(["git", "-C", str(REPO), "show", f"{revision}:lightning_sae/spliced.py"],
                            check=True, capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "spliced_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("spliced_before", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def worker(args: argparse.Namespace) -> dict:
    import psutil
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from lightning_sae.sae import TopKSAE

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=args.vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=32, bos_token_id=2,
                              max_position_embeddings=max(512, args.context_size))
    model = Gemma3ForCausalLM(config).eval().requires_grad_(False)
    contexts = torch.randint(3, args.vocab, (args.contexts, args.context_size), generator=torch.Generator().manual_seed(1))
    contexts[:, 0] = config.bos_token_id
    sae = TopKSAE(64, 512, 16, seed=0)
    spliced = load_spliced(args.worker, args.before)
    extra = {"progress": False} if args.worker == "after" else {}
    resident = psutil.Process().memory_info().rss
    start = time.perf_counter()
    with torch.no_grad():
        scores = spliced.spliced_metrics(model, contexts, 0, "resid_post", lambda x, grad: sae(x).xhat,
                                         batch_size=args.contexts, **extra)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {"variant": args.worker, "peak_rise_mib": (peak - resident) / 2**20, "resident_before_mib": resident / 2**20,
            "seconds": seconds, "ce_clean": scores.get("ce_loss_without_sae", scores.get("ce_clean")), "ce_loss_score": scores["ce_loss_score"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=262_144)
    parser.add_argument("--contexts", type=int, default=8)
    parser.add_argument("--context-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--before", default=BEFORE, help="git revision of the unchunked lightning_sae/spliced.py")
    parser.add_argument("--worker", choices=["before", "after"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    common = [f"--vocab={args.vocab}", f"--contexts={args.contexts}", f"--context-size={args.context_size}",
              f"--threads={args.threads}", f"--before={args.before}"]
    runs: dict[str, list[dict]] = {"after": [], "before": []}
    for _ in range(args.repeats):
        for variant in ("after", "before"):
            done = subprocess.run([sys.executable, __file__, f"--worker={variant}", *common], env=env,
                                  capture_output=True, text=True)
            if done.returncode != 0:
                sys.exit(f"{variant} run failed:\n{done.stderr[-3000:]}")
            runs[variant].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(json.dumps(runs[variant][-1]), flush=True)
    logits_mib = args.contexts * args.context_size * args.vocab * 4 / 2**20
    print(f"\nvocabulary {args.vocab}, {args.contexts} contexts x {args.context_size} tokens "
          f"(float32 logits of the batch: {logits_mib:.0f} MiB); {args.repeats} runs each, alternating")
    for variant in ("before", "after"):
        peaks = [r["peak_rise_mib"] for r in runs[variant]]
        seconds = [r["seconds"] for r in runs[variant]]
        print(f"  {variant:6s}: peak rise {min(peaks):.0f}-{max(peaks):.0f} MiB, {min(seconds):.2f}-{max(seconds):.2f} s")
    ratio = min(r["peak_rise_mib"] for r in runs["before"]) / max(r["peak_rise_mib"] for r in runs["after"])
    time_ratio = sum(r["seconds"] for r in runs["after"]) / sum(r["seconds"] for r in runs["before"])
    print(f"  before / after peak: {ratio:.1f}x less memory; after / before time: {time_ratio:.2f}")


if __name__ == "__main__":
    main()
