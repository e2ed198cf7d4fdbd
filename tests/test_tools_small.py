"""The benchmark tools that need neither the embedded model nor a prepared cache, each run as a
user runs it (a subprocess, its own command line) at a tiny shape. No timing is asserted: what
is checked is that every path a tool takes runs to its table, and the numbers a tool derives
from the library (L0, validation metrics) are the library's.

One of these found that `jsae_benchmark.py --compare-precision` still read the JSAE's validation
metrics under names the module had stopped logging."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[1] / "tools"


def run_tool(script: str, *args: str) -> str:
    done = subprocess.run([sys.executable, str(TOOLS / script), *args], capture_output=True, text=True, timeout=600,
                          check=False, env={**os.environ, "OMP_NUM_THREADS": "1"})
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
