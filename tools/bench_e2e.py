"""End to end: tokens of SAE training per second, from a loaded model to N trained tokens, for
lightning-sae, EleutherAI sparsify's trainer and SAELens's training runners, on the same model,
text, contexts, hook points and budget.

    python tools/bench_e2e.py                                  # 1 hook and 3 hooks, 3 repeats, 2 steps per run
    python tools/bench_e2e.py --tokens 262144 --buffer 65536 --repeats 5   # a longer budget
    python tools/bench_e2e.py --tools bare stream-serial stream-overlap --configs 1   # A/B of the overlap

Every tool runs in a fresh process (its peak RSS is that process's VmHWM) with the same number of
threads, in an order that rotates between repeats (A B C, B C A, ...), so load from other jobs
hits all of them alike. Each process loads the model (not timed), then times from "model loaded"
to "the budget trained", then scores its SAE(s) on the same held-out rows (explained variance =
1 - |x - x_hat|^2 / |x - mean|^2 over the rows, per hook point), so equal work is visible.

Tools (one row each):
  bare           the model truncated after the deepest hook, activations only (inference mode),
                 on the training contexts: the floor of any trainer that runs the model
  stream         lightning-sae, data.source stream, with the library's defaults
  stream-serial  the same with overlap_model_pass false: the model fills the buffer, then the
                 steps use it (A/B of the overlap)
  stream-overlap the same with overlap_model_pass true: the next fill runs in a background
                 thread while the steps use the current one
  cache          lightning-sae, data.source cache: building the cache and the fit from it, timed
                 together; its second fit from the finished cache is the row "cache (2nd fit)"
  sparsify       sparsify.Trainer, as its README's Python example and its CLI compose it (CLI
                 settings: AutoModel for the fvu loss, the dataset shuffled with seed 42, signum),
                 on the CPU. Its CLI itself cannot run without CUDA: `load_artifacts` loads the
                 model with device_map={"": "cuda:<rank>"}.
  saelens        SAELens's LanguageModelSAETrainingRunner (one hook) / MultiSAETrainingRunner
                 (several hooks, one pass), the model loaded by SAELens's own HF path
                 (`load_model("AutoModelForCausalLM", ...)`, a HookedProxyLM)

Matched: the model folder (the embedded default's converted folder unless --model), the model's
dtype, the training contexts (the text packed by lightning-sae into contexts of --context tokens;
the peers read them as a pre-tokenised local dataset, the first --validation-contexts are held
out from every tool), the hook points, width, k, the batch of --batch rows, BOS positions left out
of training rows in every tool, the number of training steps, threads. Each tool otherwise keeps
its defaults (optimizer, learning rate, initialisation), as a user would run it; SAELens's mixing
buffer and lightning-sae's shuffle buffer are both --buffer rows. Rows trained differ slightly:
sparsify's batch is whole sequences (batch / context of them, BOS dropped).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TOOLS = ("bare", "stream", "cache", "sparsify", "saelens")
ALL_TOOLS = TOOLS + ("stream-serial", "stream-overlap")
PEERS = ("sparsify", "saelens")


# ---- shared helpers -----------------------------------------------------------------------------------
def peak_rss_mib() -> float:
    """VmHWM: this process's peak resident set (ru_maxrss would carry the parent's over fork)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def explained_variance(x, xhat) -> float:
    x, xhat = x.double(), xhat.double()
    return float(1 - (x - xhat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


def model_folder(model: str) -> str:
    from lightning_sae.data import models

    return models.model_location(model)


def work_settings(work: Path) -> dict:
    return json.loads((work / "settings.json").read_text())


# ---- preparation (parent process) --------------------------------------------------------------------
def prepare(args, work: Path) -> dict:
    """The held-out contexts' activations, the training contexts as a pre-tokenised dataset, and the
    settings every run reads."""
    import datasets
    import torch
    from safetensors.torch import save_file

    from lightning_sae.data import ActivationDataModule, models
    from lightning_sae.data.extract import Extractor, extract_rows, groups

    folder = model_folder(args.model)
    rows_per_step = args.batch
    steps = max(1, args.tokens // rows_per_step)
    # Every training context has at most context - 1 rows (BOS left out); a buffer more than the
    # budget keeps SAELens's mixing buffer and sparsify's whole-sequence batches in the text.
    train_contexts = math.ceil((steps * rows_per_step + args.buffer) / (args.context - 1)) + 2 * args.model_batch
    total = args.validation_contexts + train_contexts
    data = ActivationDataModule(model=folder, dataset=args.dataset, context_size=args.context,
                                num_tokens=total * args.context, validation_fraction=args.validation_contexts / total,
                                model_dtype=args.model_dtype, device="cpu")
    plan = data.context_plan()
    if plan.validation_contexts != args.validation_contexts:
        raise RuntimeError(f"the plan holds out {plan.validation_contexts} contexts, not {args.validation_contexts}")
    held_out = torch.stack(list(plan.validation()))
    training = list(plan.training())
    if len(training) < train_contexts:
        raise SystemExit(f"the text gives {len(training)} training contexts, {train_contexts} needed: lower --tokens")
    dtype = data.model_dtype
    model = models.load_model(folder, dtype, "cpu")
    bos = data.load_tokenizer().bos_token_id
    layers = sorted(set(args.layers) | set(args.multi_layers))
    extractor = Extractor(model, None, {f"layer{n}": f"layers.{n}" for n in layers})
    parts: dict[str, list] = {}
    for tokens in groups(iter(held_out), args.model_batch):
        for key, value in extract_rows(extractor, tokens, bos).items():
            parts.setdefault(key, []).append(value)
    save_file({key: torch.cat(value).contiguous() for key, value in parts.items()}, str(work / "held_out.safetensors"))
    datasets.Dataset.from_dict({"input_ids": torch.stack(training).tolist()}).to_parquet(str(work / "train" / "train.parquet"))
    settings = {
        "model": args.model, "folder": folder, "dataset": args.dataset, "model_dtype": dtype, "context": args.context,
        "validation_contexts": args.validation_contexts, "train_contexts": len(training), "steps": steps,
        "batch": args.batch, "buffer": args.buffer, "width": args.width, "k": args.k, "bos": bos,
        "model_batch": args.model_batch, "threads": args.threads, "held_out_rows": sum(len(v) for v in next(iter(parts.values()))),
        "num_hidden_layers": model.config.num_hidden_layers,
    }
    (work / "settings.json").write_text(json.dumps(settings, indent=1))
    return settings


# ---- the runs (one fresh process each) -------------------------------------------------------------------
def held_out_rows(work: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(work / "held_out.safetensors"))


def training_tokens(work: Path):
    import torch
    from datasets import load_dataset

    return torch.tensor(load_dataset(str(work / "train"), split="train")["input_ids"])


def run_bare(work: Path, layers: list[int]) -> dict:
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_cache import truncated  # sibling file

    from lightning_sae.data import models

    s = work_settings(work)
    model = models.load_model(s["folder"], s["model_dtype"], "cpu")
    contexts = training_tokens(work)
    rows_needed = s["steps"] * s["batch"]
    started = time.perf_counter()
    rows = 0
    with truncated(model, max(layers)) as base, torch.inference_mode():
        for start in range(0, len(contexts), s["model_batch"]):
            tokens = contexts[start : start + s["model_batch"]]
            base(input_ids=tokens, use_cache=False)
            rows += int((tokens != s["bos"]).sum())
            if rows >= rows_needed:
                break
    return {"seconds": time.perf_counter() - started, "rows": rows, "ev": {}}


def _lightning_fit(work: Path, layers: list[int], source: str, cache_dir: str | None, overlap: bool | None, model=None):
    import lightning as L

    from lightning_sae.data import ActivationDataModule
    from lightning_sae.module import SAEModule

    s = work_settings(work)
    total = s["validation_contexts"] + s["train_contexts"]
    extra = {} if overlap is None else {"overlap_model_pass": overlap}
    data = ActivationDataModule(
        model=s["folder"], dataset=s["dataset"], context_size=s["context"], num_tokens=total * s["context"],
        validation_fraction=s["validation_contexts"] / total, model_dtype=s["model_dtype"], device="cpu",
        layer=layers if len(layers) > 1 else layers[0], source=source, cache_dir=cache_dir, batch_size=s["batch"],
        buffer_tokens=s["buffer"], model_batch_size=s["model_batch"], **extra,
    )
    if model is not None:
        data._model = model  # the model already loaded by the first fit of this process
    else:
        data.load_language_model()
    L.seed_everything(0, verbose=False)
    module = SAEModule(k=s["k"], d_sae=s["width"], spliced_eval_contexts=0)
    trainer = L.Trainer(max_steps=s["steps"], accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, default_root_dir=str(work / "lightning_root"))
    started = time.perf_counter()
    trainer.fit(module, data)
    seconds = time.perf_counter() - started
    return module, data, seconds


def _lightning_ev(module, layers: list[int], work: Path) -> dict:
    import torch

    held = held_out_rows(work)
    ev = {}
    with torch.no_grad():
        for name in module.sae_names:
            scope = module.sae_sites[name][0]
            layer = layers[0] if not scope else int(scope.split(".")[1])
            x = held[f"layer{layer}"]
            ev[str(layer)] = explained_variance(x, module.get_sae(name)(x).xhat)
    return ev


def run_lightning(work: Path, layers: list[int], source: str, overlap: bool | None = None) -> dict | list[dict]:
    s = work_settings(work)
    rows = s["steps"] * s["batch"]
    if source == "stream":
        module, data, seconds = _lightning_fit(work, layers, "stream", None, overlap)
        return {"seconds": seconds, "rows": rows, "ev": _lightning_ev(module, layers, work)}
    with tempfile.TemporaryDirectory(dir=work) as cache_dir:
        module, data, seconds = _lightning_fit(work, layers, "cache", cache_dir, overlap)
        first = {"seconds": seconds, "rows": rows, "ev": _lightning_ev(module, layers, work)}
        module, _, seconds = _lightning_fit(work, layers, "cache", cache_dir, overlap, model=data._model)
        second = {"seconds": seconds, "rows": rows, "ev": _lightning_ev(module, layers, work)}
    return [first, second]


def run_sparsify(work: Path, layers: list[int]) -> dict:
    import torch
    from datasets import load_dataset
    from sparsify import SaeConfig, TrainConfig, Trainer
    from transformers import AutoModel

    s = work_settings(work)
    # As sparsify's CLI loads it for loss_fn "fvu" (AutoModel), on the CPU, in the shared dtype.
    model = AutoModel.from_pretrained(s["folder"], torch_dtype=getattr(torch, s["model_dtype"]))
    per_batch = s["batch"] // s["context"]  # sparsify's batch_size counts sequences
    dataset = load_dataset(str(work / "train"), split="train").shuffle(42).with_format("torch")
    dataset = dataset.select(range(s["steps"] * per_batch))
    cfg = TrainConfig(SaeConfig(num_latents=s["width"], k=s["k"]), batch_size=per_batch,
                      hookpoints=[f"layers.{n}" for n in layers], exclude_tokens=[s["bos"]], log_to_wandb=False,
                      save_dir=str(work / "sparsify_out"), save_every=10**9)
    started = time.perf_counter()
    trainer = Trainer(cfg, dataset, model)
    trainer.fit()
    seconds = time.perf_counter() - started
    rows = int((torch.stack(list(dataset["input_ids"])) != s["bos"]).sum())
    held = held_out_rows(work)
    ev = {}
    with torch.no_grad():
        for name, sae in trainer.saes.items():
            layer = int(name.split(".")[1])
            x = held[f"layer{layer}"]
            ev[str(layer)] = explained_variance(x, sae(x).sae_out)
    return {"seconds": seconds, "rows": rows, "ev": ev}


def run_saelens(work: Path, layers: list[int]) -> dict:
    import torch
    from datasets import load_dataset
    from sae_lens import (
        LanguageModelSAERunnerConfig,
        LanguageModelSAETrainingRunner,
        LoggingConfig,
    )
    from sae_lens.load_model import load_model
    from sae_lens.saes.topk_sae import TopKTrainingSAEConfig

    s = work_settings(work)
    hooks = {f"layer{n}": f"model.layers.{n}" for n in layers}
    model = load_model("AutoModelForCausalLM", s["folder"], device="cpu",
                       model_from_pretrained_kwargs={"torch_dtype": getattr(torch, s["model_dtype"])},
                       hook_names=list(hooks.values()))
    # The dataset object rather than its path: SAELens would check a path's tokenizer on the hub.
    # Its mixing buffer holds n_batches_in_buffer * context_size rows (activations_store.py).
    dataset = load_dataset(str(work / "train"), split="train")
    common = {
        "model_name": s["folder"], "model_class_name": "AutoModelForCausalLM", "dataset_path": str(work / "train"),
        "streaming": False, "context_size": s["context"], "training_tokens": s["steps"] * s["batch"],
        "train_batch_size_tokens": s["batch"], "store_batch_size_prompts": s["model_batch"],
        "n_batches_in_buffer": math.ceil(s["buffer"] / s["context"]), "device": "cpu",
        "exclude_special_tokens": [s["bos"]], "logger": LoggingConfig(log_to_wandb=False), "output_path": str(work / "saelens_out"),
        "checkpoint_path": None, "n_checkpoints": 0,
    }
    sae_config = {"d_in": model.model.config.hidden_size, "d_sae": s["width"], "k": s["k"], "device": "cpu"}
    started = time.perf_counter()
    if len(layers) == 1:
        cfg = LanguageModelSAERunnerConfig(sae=TopKTrainingSAEConfig(**sae_config), hook_name=hooks[f"layer{layers[0]}"], **common)
        saes = {f"layer{layers[0]}": LanguageModelSAETrainingRunner(cfg, override_dataset=dataset, override_model=model).run()}
    else:
        from sae_lens.multi_sae_training_runner import (
            MultiSAETrainingRunner,
            MultiSAETrainingRunnerConfig,
        )

        common.pop("dataset_path")
        cfg = MultiSAETrainingRunnerConfig(saes={name: TopKTrainingSAEConfig(**sae_config) for name in hooks}, hook_names=hooks,
                                           dataset_path=str(work / "train"), **common)
        saes = MultiSAETrainingRunner(cfg, override_dataset=dataset, override_model=model).run()
    seconds = time.perf_counter() - started
    held = held_out_rows(work)
    ev = {}
    with torch.no_grad():
        for name, sae in saes.items():
            x = held[name]
            ev[name.removeprefix("layer")] = explained_variance(x, sae(x.to(sae.dtype)).float())
    return {"seconds": seconds, "rows": s["steps"] * s["batch"], "ev": ev}


def run_one(tool: str, work: Path, layers: list[int]) -> None:
    import torch

    torch.set_num_threads(work_settings(work)["threads"])
    if tool == "bare":
        results = run_bare(work, layers)
    elif tool.startswith("stream"):
        results = run_lightning(work, layers, "stream", overlap={"stream": None, "stream-serial": False}.get(tool, True))
    elif tool == "cache":
        results = run_lightning(work, layers, "cache")
    elif tool == "sparsify":
        results = run_sparsify(work, layers)
    elif tool == "saelens":
        results = run_saelens(work, layers)
    else:
        raise SystemExit(f"unknown tool {tool}")
    results = results if isinstance(results, list) else [results]
    names = [tool, "cache (2nd fit)"] if tool == "cache" else [tool]
    for name, result in zip(names, results):
        result.update(tool=name, peak_rss_mib=peak_rss_mib())
        print("RESULT " + json.dumps(result), flush=True)


def spawn(tool: str, work: Path, layers: list[int], threads: int, timeout: float) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "WANDB_MODE": "disabled",
           "TOKENIZERS_PARALLELISM": "false", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, __file__, "--run", tool, "--work", str(work), "--layers", *map(str, layers)]
    done = subprocess.run(command, check=False, capture_output=True, text=True, env=env, timeout=timeout, cwd=work)
    results = [json.loads(line[len("RESULT "):]) for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not results:
        tail = (done.stderr or done.stdout)[-2500:]
        return [{"tool": tool, "error": f"exit {done.returncode}: {tail}"}]
    return results


# ---- the table ---------------------------------------------------------------------------------------------
def summarize(runs: list[list[dict]], peers: list[str]) -> list[str]:
    """Markdown rows: medians over repeats, ratios per repeat against the faster peer and the bare forward."""
    names = list(dict.fromkeys(r["tool"] for repeat in runs for r in repeat))
    per_tool: dict[str, list[dict]] = {name: [] for name in names}
    for repeat in runs:
        for r in repeat:
            per_tool[r["tool"]].append(r)
    lines = [("| tool | tokens/s (median) | runs | vs faster peer (median, range) | vs bare forward (median, range) "
             "| peak RSS MiB | validation explained variance |"),
             "|---|---|---|---|---|---|---|"]

    def rate(r: dict) -> float | None:
        return r["rows"] / r["seconds"] if "seconds" in r else None

    for name in names:
        results = [r for r in per_tool[name] if "error" not in r]
        if not results:
            lines.append(f"| {name} | failed: {per_tool[name][0]['error'].strip().splitlines()[-1][:200]} | | | | | |")
            continue
        rates = [rate(r) for r in results]
        vs_peer, vs_bare = [], []
        for repeat in runs:
            mine = next((rate(r) for r in repeat if r["tool"] == name and "error" not in r), None)
            peer_rates = [rate(r) for r in repeat if r["tool"] in peers and "error" not in r]
            bare = next((rate(r) for r in repeat if r["tool"] == "bare" and "error" not in r), None)
            if mine and peer_rates:
                vs_peer.append(mine / max(peer_rates))
            if mine and bare:
                vs_bare.append(mine / bare)

        def ratio(values: list[float]) -> str:
            return f"{statistics.median(values):.2f}x ({min(values):.2f}-{max(values):.2f})" if values else "-"

        ev = {}
        for r in results:
            for layer, value in r["ev"].items():
                ev.setdefault(layer, []).append(value)
        ev_text = ", ".join(f"L{layer} {statistics.median(v):.3f}" for layer, v in sorted(ev.items(), key=lambda i: int(i[0]))) or "-"
        lines.append(f"| {name} | {statistics.median(rates):.0f} | {len(results)} | {ratio(vs_peer)} | {ratio(vs_bare)} "
                     f"| {statistics.median(r['peak_rss_mib'] for r in results):.0f} | {ev_text} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="the embedded default, or a local model folder")
    parser.add_argument("--dataset", default="python-docs")
    parser.add_argument("--model-dtype", default="auto", help="auto: lightning-sae's default for this CPU, used by all tools")
    parser.add_argument("--layers", type=int, nargs="+", default=[15], help="the one-hook configuration")
    parser.add_argument("--multi-layers", type=int, nargs="+", default=[5, 10, 15], help="the several-hooks configuration")
    parser.add_argument("--configs", nargs="+", default=["1", "3"], choices=["1", "3"], help="1: --layers; 3: --multi-layers")
    parser.add_argument("--tools", nargs="+", default=list(TOOLS), choices=list(ALL_TOOLS))
    parser.add_argument("--tokens", type=int, default=8192, help="training rows per run (steps = tokens // batch)")
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--buffer", type=int, default=4096, help="shuffle / mixing buffer rows (lightning-sae, SAELens)")
    parser.add_argument("--width", type=int, default=4608)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--model-batch", type=int, default=16, help="contexts per model forward (all tools)")
    parser.add_argument("--validation-contexts", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    parser.add_argument("--work", help="working folder (default: a temporary one)")
    parser.add_argument("--json", help="also write every run's result here")
    parser.add_argument("--run", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        return run_one(args.run, Path(args.work), args.layers)
    missing = [tool for tool in args.tools if tool in PEERS and not _importable(tool)]
    tools = [tool for tool in args.tools if tool not in missing]
    if missing:
        print(f"not installed, left out: {', '.join(missing)}")
    with tempfile.TemporaryDirectory(prefix="bench_e2e_") as scratch:
        work = Path(args.work or scratch)
        (work / "train").mkdir(parents=True, exist_ok=True)
        settings = prepare(args, work)
        print(f"load average at start {os.getloadavg()}; {args.threads} threads; model {args.model} in {settings['model_dtype']}; "
              f"{settings['steps']} steps of {args.batch} rows; width {args.width}, k {args.k}; context {args.context}; "
              f"held-out rows {settings['held_out_rows']}")
        everything = {}
        for config in args.configs:
            layers = args.layers if config == "1" else args.multi_layers
            runs = []
            for repeat in range(args.repeats):
                order = tools[repeat % len(tools):] + tools[: repeat % len(tools)]
                results = []
                for tool in order:
                    results += spawn(tool, work, layers, args.threads, args.timeout)
                    print(f"  [{config} hook(s), repeat {repeat + 1}] {json.dumps(results[-1])[:300]}", flush=True)
                runs.append(results)
            everything[config] = runs
            print(f"\n{len(layers)} hook point(s), layers {layers}, median of {args.repeats}, load average now {os.getloadavg()}")
            print("\n".join(summarize(runs, [t for t in PEERS if t in tools])) + "\n")
        if args.json:
            Path(args.json).write_text(json.dumps({"settings": settings, "runs": everything}, indent=1))
        print(f"load average at the end {os.getloadavg()}")


def _importable(tool: str) -> bool:
    import importlib.util

    return importlib.util.find_spec({"sparsify": "sparsify", "saelens": "sae_lens"}[tool]) is not None


if __name__ == "__main__":
    main()
