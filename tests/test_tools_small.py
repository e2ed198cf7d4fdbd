"""The benchmark tools, each run as a user runs it (a subprocess, its own command line) at a tiny
shape: on random data, or on a tiny random Llama and a local text file where a tool reads a model
(its `--model`, the embedded SmolLM2 by default). No timing is asserted: what
is checked is that every path a tool takes runs to its table, and the numbers a tool derives
from the library (L0, validation metrics) are the library's.

Two of these found crashes no other test could: `jsae_benchmark.py --compare-precision` read the
JSAE's validation metrics under names the module had stopped logging, and `bench_cache.py` gave
`build_cache` settings without the context size its manifest totals need."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from cache_fixtures import fit_args
from data_fixtures import save_model, write_text

TOOLS = Path(__file__).resolve().parents[1] / "tools"


def run_tool(script: str, *args: str, cwd: Path | None = None, **environment: str) -> str:
    done = subprocess.run([sys.executable, str(TOOLS / script), *args], capture_output=True, text=True, timeout=600,
                          check=False, env={**os.environ, "OMP_NUM_THREADS": "1", **environment}, cwd=cwd)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_bench_batch_topk_times_both_rules_and_the_evaluation_threshold_keeps_k():
    out = run_tool("bench_batch_topk.py", "--tokens", "64", "--d-in", "16", "--d-sae", "128", "--k", "4", "--repeats", "1")
    for row in ("select", "training step", "eval forward"):
        assert re.search(rf"^\s+{row}\s+TopK .* ratio [\d.]+x$", out, re.M), out
    l0 = float(re.search(r"evaluation L0 with the threshold [\d.]+: ([\d.]+) per token", out).group(1))
    assert 1 <= l0 <= 16  # the threshold was set on this batch by a k = 4 training forward


def test_jsae_benchmark_times_both_pairs():
    out = run_tool("jsae_benchmark.py", "--d-model", "16", "--d-mlp", "32", "--d-sae", "64", "--k", "4",
                   "--batch-size", "32", "--steps", "3", "--skip", "1", "--rounds", "1")
    assert "| lambda = 0 (two TopK SAEs) |" in out and "| lambda = 1 (JSAE) |" in out
    assert re.search(r"ratio JSAE / baseline: [\d.]+x", out)


def test_jsae_benchmark_compares_penalty_precisions_on_the_logged_validation_metrics():
    out = run_tool("jsae_benchmark.py", "--d-model", "16", "--d-mlp", "32", "--d-sae", "64", "--k", "4",
                   "--batch-size", "32", "--steps", "3", "--rounds", "1", "--compare-precision")
    rows = dict(re.findall(r"^\| (val/\S+) \| .* \| ([-+.\de]+) \|$", out, re.M))
    assert set(rows) == {"val/jacobian_at_x/l1", "val/jacobian_at_x/count_above_0.01",
                         "val/sae_in/explained_variance", "val/sae_out/explained_variance"}, out
    # three steps from one initialisation: bf16 products move the outcome by rounding only
    assert all(abs(float(value)) < 1e-2 for value in rows.values()), rows


def test_study_throughput_reports_every_kind():
    out = run_tool(str(Path("studies") / "throughput.py"), "--d", "32", "--d-mlp", "64", "--batch-size", "64",
                   "--steps", "2", "--rounds", "1")
    kinds = dict(re.findall(r"^\| (\w+) \| (\d+) \|", out, re.M))
    assert set(kinds) == {"topk", "gsae", "jsae0", "jsae1"} and all(int(v) > 0 for v in kinds.values()), out


def test_bench_verify_reads_a_real_cache_three_ways_and_hashes_it():
    out = run_tool("bench_verify.py", "--tokens", "6144", "--width", "16", "--repeats", "1", "--no-cold")
    for line in ("verify=off", "verify=header", "verify=full", "xxh3_128", "sha256", "crc32"):
        assert line in out, out


def test_spliced_memory_runs_both_variants_in_fresh_processes():
    if subprocess.run(["git", "-C", str(TOOLS.parent), "rev-parse", "HEAD"], capture_output=True).returncode != 0:
        pytest.skip("not a git checkout: the tool reads the 'before' spliced.py from git")
    # HEAD as 'before': a shallow clone holds no older revision
    out = run_tool("spliced_memory.py", "--vocab", "2048", "--contexts", "2", "--repeats", "1", "--before", "HEAD")
    assert re.search(r"before: peak rise \d+-\d+ MiB", out) and re.search(r"after : peak rise \d+-\d+ MiB", out), out


@pytest.fixture
def tiny_llama(tmp_path: Path) -> tuple[str, str]:
    return str(save_model("llama", tmp_path)), str(write_text(tmp_path, 2000))


def test_bench_cache_times_caching_against_the_bare_model(tiny_llama):
    model, _ = tiny_llama
    out = run_tool("bench_cache.py", "--model", model, "--tokens", "256", "--context-size", "16", "--layer", "1", "--repeats", "1")
    for name in ("bare forward", "cache", "bare fwd+bwd", "cache + grads"):
        assert re.search(rf"^  {re.escape(name)}\s+[\d,]+\s+[\d,]+$", out, re.M), out
    assert "256 tokens (1 passes), layer 1 resid_post" in out


def test_jsae_experiment_trains_each_lambda_and_tables_them(tiny_llama, tmp_path):
    model, text = tiny_llama
    out = run_tool("jsae_experiment.py", "--model", model, "--dataset", text, "--context-size", "16", "--layer", "1",
                   "--num-tokens", "2048", "--epochs", "1", "--batch-size", "128", "--d-sae", "64", "--k", "4",
                   "--dead-tokens", "1000", "--spliced-contexts", "2", "--out", str(tmp_path / "runs"), cwd=tmp_path)
    results = json.loads((tmp_path / "runs" / "results.json").read_text())
    assert set(results) == {"0.0", "1.0"}
    for metrics in results.values():
        assert metrics["val/sae_in/l0"] == pytest.approx(4) and metrics["val/sae_out/l0"] <= 4
    assert "| sae_in explained variance |" in out and "| training time / baseline | 1.00x |" in out


def test_bench_model_dtype_sae_trains_on_both_caches(tiny_llama, tmp_path):
    model, text = tiny_llama
    out = run_tool("bench_model_dtype_sae.py", "--model", model, "--dataset", text, "--layer", "1", "--num-tokens", "4096",
                   "--batch-size", "128", "--epochs", "1", "--k", "4", "--root", str(tmp_path / "runs"), cwd=tmp_path)
    rows = re.findall(r"^\| (TopK|g-SAE) \| (float32|bfloat16) \| (\d) \| ([\d.]+) \|", out, re.M)
    assert len(rows) == 6, out  # two selectors x (float32, bfloat16, float32 with the second seed)
    assert re.search(r"bf16 cache vs float32 cache on the held-out rows, relative error: x [\d.]+, grad [\d.]+", out)


def test_bench_model_dtype_compares_the_model_pass_in_both_dtypes(tiny_llama):
    model, _ = tiny_llama
    out = run_tool("bench_model_dtype.py", "--model", model, "--layer", "1", "--context-size", "16", "--contexts", "4", "--repeats", "1")
    for name in ("float32", "float32 + grad", "bfloat16", "bfloat16 + grad"):
        assert re.search(rf"^  {re.escape(name)}\s+[\d,]+ tok/s$", out, re.M), out
    errors = re.search(r"relative error: activations ([\d.]+), gradients ([\d.]+)", out)
    # bf16 keeps 8 bits of mantissa: a relative error of a few 1e-3, not zero and not O(1)
    assert 1e-4 < float(errors.group(1)) < 0.05 and 1e-4 < float(errors.group(2)) < 0.05


def test_bench_stream_runs_every_measurement(tiny_llama, tmp_path):
    model, _ = tiny_llama
    out = run_tool("bench_stream.py", "--model", model, "--contexts", "4", "--grad-contexts", "4", "--layers", "0", "1",
                   "--batch-size", "64", "--repeats", "1", "--memory-steps", "2", "--memory-layer", "1", cwd=tmp_path)
    assert re.search(r"^stream \(TopK\)\s+\d+ rows/s trained vs bare\s+\d+ rows/s", out, re.M), out
    assert re.search(r"^stream \+ grads \(g-SAE\)\s+\d+ rows/s", out, re.M), out
    assert "layers [0, 1] in one pass:" in out
    # fresh processes for 2 and 20 steps of 256 rows
    assert re.search(r"peak RSS of a streaming fit \(layer 1, batch 256\): 2 steps \d+ MiB, 20 steps \d+ MiB .*; 512 and 5,120 rows trained", out)
    assert re.search(r"caching 4 contexts at layer 1: 1 process [\d.]+ s, 2 ranks [\d.]+ s", out)  # the 2-rank DDP cache


def test_check_gsae_shortlist_compares_the_bf16_shortlist_with_exact_selection(tiny_llama, tmp_path):
    model, text = tiny_llama
    cache = tmp_path / "cache"
    fit = subprocess.run([sys.executable, "-m", "lightning_sae.cli", *fit_args(Path(model), Path(text), cache, "--model.selector=gradient_topk")],
                         capture_output=True, text=True, timeout=600, check=False, cwd=tmp_path)
    assert fit.returncode == 0, fit.stderr[-3000:]
    out = run_tool("check_gsae_shortlist.py", "--cache", str(cache), "--sae", "init", "--d-sae", "64", "--k", "4",
                   "--betas", "0.25", "1", "--tokens", "256", cwd=tmp_path)
    lines = re.findall(r"^init \(M=64, k=4\) beta=([\d.]+): (\d+) of (\d+) tokens select differently", out, re.M)
    assert [beta for beta, _, _ in lines] == ["0.25", "1.0"], out
    assert all(int(differing) <= int(total) == 256 for _, differing, total in lines)


def test_circuits_measure_compares_per_layer_transcoders_with_a_clt(tiny_llama, tmp_path):
    from lightning_sae.cli import main

    model, text = tiny_llama
    data = [f"--data.init_args.model={model}", f"--data.init_args.dataset={text}", "--data.init_args.layer=[0, 1, 2]",
            "--data.init_args.num_tokens=1024", "--data.init_args.context_size=16", "--data.init_args.batch_size=64",
            "--data.init_args.buffer_tokens=256", "--data.init_args.device=cpu", "--data.init_args.model_dtype=float32",
            "--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false", "--trainer.max_epochs=1"]
    rules = ["--model.init_args.d_sae=48", "--model.init_args.k=4", "--model.init_args.spliced_eval_contexts=0"]
    transcoders = main(["fit", "--config", str(TOOLS.parent / "configs" / "transcoders_all_layers.yaml"), *data, *rules,
                        f"--trainer.default_root_dir={tmp_path / 'tc'}"])
    clt = main(["fit", "--config", str(TOOLS.parent / "configs" / "transcoders_all_layers.yaml"), *data,
                "--model=clt", "--model.k=4", "--model.d_sae=48", "--model.spliced_eval_contexts=0",
                f"--trainer.default_root_dir={tmp_path / 'clt'}"])
    checkpoints = [str(next((Path(cli.trainer.log_dir) / "checkpoints").glob("*.ckpt"))) for cli in (transcoders, clt)]
    result = tmp_path / "circuits.json"
    out = run_tool("circuits_measure.py", "--transcoders", checkpoints[0], "--clt", checkpoints[1], "--model", model,
                   "--transcoders-export", str(Path(transcoders.trainer.log_dir) / "circuit_tracer"), "--skip", "0",
                   "--contexts", "4", "--context-size", "16", "--batch-tokens", "64", "--repeats", "1", "--out", str(result), cwd=tmp_path)
    measured = json.loads(result.read_text())
    assert [row["layer"] for row in measured["per_layer"]] == [0, 1, 2]
    assert set(measured["replacement"]) == {"transcoders", "clt"}
    for scores in measured["replacement"].values():  # every MLP replaced at once changes the loss
        assert scores["ce_loss_with_sae"] != scores["ce_loss_without_sae"]
    assert measured["throughput"] and re.search(r"^layer  2: EV transcoder ", out, re.M), out


def test_bench_batch_topk_real_times_the_rules_on_cached_rows(tiny_llama, tmp_path):
    model, text = tiny_llama
    out = run_tool("bench_batch_topk_real.py", "--model", model, "--dataset", text, "--layer", "1", "--context-size", "16",
                   "--num-tokens", "2048", "--tokens", "256", "--expansion", "4", "--k", "4", "--warm-steps", "2",
                   "--repeats", "1", cwd=tmp_path, XDG_CACHE_HOME=str(tmp_path / "xdg"))  # its cache, not the user's
    assert f"real rows ({model} layer 1), N=256 d_in=32 d_sae=128 k=4" in out, out
    for label in ("select", "training step"):
        assert re.search(rf"^  {label}\s+topk\s+[\d.]+ ms \(1.00x\)\s+batch_topk\s+[\d.]+ ms \([\d.]+x\)$", out, re.M), out
    assert any((tmp_path / "xdg" / "lightning-sae" / "activations").iterdir())
