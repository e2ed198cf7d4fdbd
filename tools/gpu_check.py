"""The steps of tools/gpu_check.sh, one per process, each appending one JSON line to OUT/results.jsonl;
`table` turns them into one markdown table.

    python tools/gpu_check.py prepare|fit VARIANT|bench --triton on|off|stream|ddp [--dry-run] --out DIR
    python tools/gpu_check.py table --out DIR

On a GPU every step runs on cuda:0 in bf16 (bf16-mixed fits, bf16 model pass, tools/bench.py
--dtype bf16). `--dry-run` runs the same steps on the CPU at toy sizes (give --model and --dataset
of a tiny model to keep it fast): it checks the script, never the GPU, and its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

TOOLS = Path(__file__).resolve().parent
ROOT = TOOLS.parent
FITS = {  # variant -> (config, extra CLI arguments)
    "topk": ("configs/quickstart.yaml", []),
    "gsae": ("configs/gsae.yaml", []),
    "batch_topk": ("configs/quickstart.yaml", ["--model.selector=batch_topk"]),
    "jsae": ("configs/jsae.yaml", []),
    "transcoder": ("configs/transcoder.yaml", []),
}


def sizes(dry: bool) -> dict:
    """Budgets: tiny on the GPU (the whole check fits in 8 minutes), toy in a dry run."""
    if dry:
        return {"layer": 1, "context": 16, "fit_steps": 3, "batch": 64, "num_tokens": 16 * 40, "stream_steps": 3,
                "bench": ["--tokens", "256", "--d-in", "32", "--d-sae", "256", "--k", "4", "--repeats", "1", "--warmup", "1",
                          "--variants", "floor,sparsify,topk", "--no-memory"]}
    return {"layer": 15, "context": 128, "fit_steps": 100, "batch": 4096, "num_tokens": 128 * 4096, "stream_steps": 60,
            "bench": ["--variants", "floor,sparsify,topk,sparsify+auxk,topk+auxk,gsae,jsae0,jsae", "--repeats", "5"]}


def device(dry: bool) -> torch.device:
    return torch.device("cpu" if dry else "cuda")


def reset_peak(where: torch.device) -> None:
    if where.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_mib(where: torch.device) -> float:
    """CUDA: max_memory_allocated; CPU (dry run): the process's VmHWM."""
    if where.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def record(out: Path, entry: dict) -> None:
    with open(out / "results.jsonl", "a") as handle:
        handle.write(json.dumps(entry) + "\n")
    print(json.dumps(entry))


def data_args(args, s: dict, source: str = "stream") -> list[str]:
    return [f"--data.init_args.model={args.model}", f"--data.init_args.dataset={args.dataset}",
            f"--data.init_args.layer={s['layer']}", f"--data.init_args.context_size={s['context']}",
            f"--data.init_args.num_tokens={s['num_tokens']}", f"--data.init_args.batch_size={s['batch']}",
            f"--data.init_args.source={source}", "--data.init_args.validation_fraction=0.05"]


# ---- steps --------------------------------------------------------------------------------------------
def step_prepare(args) -> None:
    """The environment, and the model converted / loaded once (so no fit pays for it)."""
    from lightning_sae.data import models

    started = time.perf_counter()
    location = models.model_location(args.model)
    models.load_model(args.model, "auto", str(device(args.dry_run)))
    try:
        import triton  # noqa: F401

        triton_version = sys.modules["triton"].__version__
    except ImportError:
        triton_version = None
    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
    record(args.out, {"step": "prepare", "ok": True, "seconds": time.perf_counter() - started,
                      "result": f"{name}; torch {torch.__version__}; triton {triton_version or 'not installed'}; model {location}"})


class _Clock:
    """Seconds and rows of the training batches (from the first fetch to the last step)."""

    def __init__(self):
        import lightning as L

        clock = self

        class Callback(L.Callback):
            def on_train_epoch_start(self, trainer, module):
                if clock.started is None:
                    clock.sync()
                    clock.started = time.perf_counter()

            def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
                clock.sync()
                clock.ended = time.perf_counter()
                clock.rows += len(next(iter(batch.values())))

        self.callback = Callback()
        self.started = self.ended = None
        self.rows = 0

    @staticmethod
    def sync() -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    @property
    def rows_per_second(self) -> float:
        return self.rows / (self.ended - self.started) if self.started and self.ended and self.ended > self.started else float("nan")


def step_fit(args) -> None:
    """A bf16-mixed fit of one variant through the CLI (stream source, tiny budget)."""
    from lightning_sae.cli import main

    s, where = sizes(args.dry_run), device(args.dry_run)
    config, extra = FITS[args.variant]
    root = args.out / "fits" / args.variant
    reset_peak(where)
    started = time.perf_counter()
    cli = main(["fit", f"--config={ROOT / config}", *extra, *data_args(args, s),
                f"--trainer.accelerator={'cpu' if args.dry_run else 'gpu'}", "--trainer.devices=1",
                "--trainer.precision=bf16-mixed", f"--trainer.max_steps={s['fit_steps']}", "--trainer.max_epochs=-1",
                "--trainer.limit_val_batches=2", "--trainer.val_check_interval=null", "--trainer.check_val_every_n_epoch=null",
                f"--trainer.default_root_dir={root}", "--trainer.logger=false", "--model.init_args.spliced_eval_contexts=2"])
    seconds = time.perf_counter() - started
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items() if "explained_variance" in k or k.endswith("fvu")}
    shown = ", ".join(f"{k} {v:.3f}" for k, v in sorted(metrics.items())[:3]) or "no validation metric"
    record(args.out, {"step": f"fit {args.variant}", "ok": cli.trainer.global_step == s["fit_steps"], "seconds": seconds,
                      "peak_mib": peak_mib(where), "result": f"{cli.trainer.global_step} steps bf16-mixed; {shown}"})


def step_bench(args) -> None:
    """tools/bench.py --device cuda --dtype bf16, sparsify with or without its Triton decoder."""
    s = sizes(args.dry_run)
    env = dict(os.environ)
    if args.triton == "off":
        env["SPARSIFY_DISABLE_TRITON"] = "1"  # sparsify's own switch to its eager decoder
    command = [sys.executable, str(TOOLS / "bench.py"), "--device", "cpu" if args.dry_run else "cuda",
               "--dtype", "fp32" if args.dry_run else "bf16", *s["bench"]]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| (\S+)\s+\|\s+(\d+)\s+\|", done.stdout, re.MULTILINE)}
    ratio = re.search(r"^\| topk\s+\|(?:[^|]*\|){3}\s*([\d.]+x)", done.stdout, re.MULTILINE)
    triton = "eager (Triton disabled)" if args.triton == "off" else (
        "Triton" if "Triton not installed" not in done.stdout + done.stderr else "eager (Triton not installed)")
    result = (f"sparsify decoder: {triton}; tokens/s " + ", ".join(f"{k} {v}" for k, v in rows.items())
              + (f"; topk vs sparsify {ratio.group(1)}" if ratio else ""))
    (args.out / f"bench_triton_{args.triton}.txt").write_text(done.stdout + done.stderr[-4000:])
    record(args.out, {"step": f"bench.py, Triton {args.triton}", "ok": done.returncode == 0 and bool(rows),
                      "seconds": time.perf_counter() - started, "result": result if rows else done.stderr[-300:]})


def step_stream(args) -> None:
    """A streaming TopK fit's rows/s against a bare forward truncated at its layer, same contexts."""
    import itertools

    import lightning as L

    sys.path.insert(0, str(TOOLS))
    from bench_cache import truncated  # sibling file

    from lightning_sae.data import ActivationDataModule
    from lightning_sae.module import SAEModule

    s, where = sizes(args.dry_run), device(args.dry_run)
    data = ActivationDataModule(model=args.model, dataset=args.dataset, layer=s["layer"], context_size=s["context"],
                                num_tokens=s["num_tokens"], batch_size=s["batch"], source="stream", device=str(where),
                                buffer_tokens=4 * s["batch"], validation_fraction=0.05)
    model = data.load_language_model()
    bos = data.load_tokenizer().bos_token_id
    contexts = list(itertools.islice(data.context_plan(limit_training=False).training(0, 1, cycle=True),
                                     s["stream_steps"] * s["batch"] // (s["context"] - 1) + 1))
    reset_peak(where)
    _Clock.sync()
    started = time.perf_counter()
    with truncated(model, s["layer"]) as base, torch.inference_mode():
        for i in range(0, len(contexts), 16):
            base(input_ids=torch.stack(contexts[i : i + 16]).to(where), use_cache=False)
    _Clock.sync()
    bare = sum(int((c != bos).sum()) for c in contexts) / (time.perf_counter() - started)
    bare_peak = peak_mib(where)
    clock = _Clock()
    reset_peak(where)
    trainer = L.Trainer(max_steps=s["stream_steps"], accelerator="cpu" if args.dry_run else "gpu", devices=1,
                        precision="bf16-mixed", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, callbacks=[clock.callback],
                        default_root_dir=str(args.out / "stream"))
    trainer.fit(SAEModule(k=32 if not args.dry_run else 4, expansion_factor=8, spliced_eval_contexts=0), data)
    ratio = clock.rows_per_second / bare
    record(args.out, {"step": "streaming fit vs bare forward", "ok": trainer.global_step == s["stream_steps"],
                      "seconds": clock.ended - clock.started, "peak_mib": peak_mib(where),
                      "result": f"stream {clock.rows_per_second:.0f} rows/s, bare forward to layer {s['layer']} {bare:.0f} rows/s "
                                f"({ratio:.2f}x; bare peak {bare_peak:.0f} MiB)"})


def step_ddp(args) -> None:
    """strategy ddp with one device: the process group, DDP wrapping and the sharded stream on one GPU."""
    import lightning as L

    from lightning_sae.data import ActivationDataModule
    from lightning_sae.module import SAEModule

    s, where = sizes(args.dry_run), device(args.dry_run)
    data = ActivationDataModule(model=args.model, dataset=args.dataset, layer=s["layer"], context_size=s["context"],
                                num_tokens=s["num_tokens"], batch_size=s["batch"], source="stream",
                                buffer_tokens=2 * s["batch"], validation_fraction=0.05)
    reset_peak(where)
    started = time.perf_counter()
    trainer = L.Trainer(max_steps=3, accelerator="cpu" if args.dry_run else "gpu", devices=1, strategy="ddp",
                        precision="bf16-mixed", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=1,
                        default_root_dir=str(args.out / "ddp"))
    trainer.fit(SAEModule(k=4, expansion_factor=2, spliced_eval_contexts=0), data)
    backend = torch.distributed.get_backend() if torch.distributed.is_initialized() else "none"
    record(args.out, {"step": "DDP on one device", "ok": trainer.global_step == 3, "seconds": time.perf_counter() - started,
                      "peak_mib": peak_mib(where), "result": f"{trainer.global_step} steps, world size {trainer.world_size}, "
                                                             f"backend {backend}"})


def table(out: Path) -> str:
    lines = ["| step | ok | seconds | peak MiB | result |", "|---|---|---|---|---|"]
    path = out / "results.jsonl"
    for line in (path.read_text().splitlines() if path.exists() else []):
        entry = json.loads(line)
        peak = entry.get("peak_mib")
        seconds = entry.get("seconds")
        result = str(entry.get("result", entry.get("error", ""))).replace("|", "/").replace("\n", " ")
        lines.append(f"| {entry['step']} | {'yes' if entry.get('ok') else 'NO'} | {'' if seconds is None else f'{seconds:.1f}'} "
                     f"| {'' if peak is None else f'{peak:.0f}'} | {result} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=["prepare", "fit", "bench", "stream", "ddp", "table"])
    parser.add_argument("variant", nargs="?", choices=list(FITS))
    parser.add_argument("--triton", choices=["on", "off"], default="on")
    parser.add_argument("--dry-run", action="store_true", help="the same steps on the CPU at toy sizes")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dataset", default="python-docs")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.step == "table":
        print(table(args.out))
        return
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run tools/gpu_check.sh --dry-run to check the script on the CPU")
    tempfile.tempdir = str(args.out)  # any scratch files land in the output folder
    {"prepare": step_prepare, "fit": step_fit, "bench": step_bench, "stream": step_stream, "ddp": step_ddp}[args.step](args)


if __name__ == "__main__":
    main()
