"""tools/gpu_check.sh --dry-run: every step of the GPU check runs on the CPU at toy sizes (a tiny
random Llama) and the script writes its one markdown table with a row per step."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
from data_fixtures import save_model, write_text

SCRIPT = Path(__file__).resolve().parents[1] / "tools" / "gpu_check.sh"
STEPS = ["prepare", "fit topk", "fit gsae", "fit batch_topk", "fit jsae", "fit transcoder",
         "bench.py, Triton on", "bench.py, Triton off", "streaming fit vs bare forward", "DDP on one device"]


@pytest.mark.skipif(importlib.util.find_spec("sparsify") is None, reason="tools/bench.py compares with sparsify: pip install eai-sparsify")
def test_the_dry_run_runs_every_step_and_writes_the_table(tmp_path):
    model, text = save_model("llama", tmp_path), write_text(tmp_path, 2000)
    out = tmp_path / "check"
    done = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run", "--out", str(out), "--model", str(model), "--dataset", str(text)],
        capture_output=True, text=True, timeout=1800, check=False, env={**os.environ, "PYTHON": sys.executable},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    table = (out / "gpu_check.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| step")]
    assert [row.split(" | ")[0].removeprefix("| ") for row in rows] == STEPS, table
    failed = [row for row in rows if row.split(" | ")[1] != "yes"]
    assert not failed, "\n".join(failed) + "\n" + (out / "steps.log").read_text()[-4000:]


def test_without_a_gpu_the_script_points_to_the_dry_run(tmp_path):
    if importlib.util.find_spec("torch") and __import__("torch").cuda.is_available():
        pytest.skip("a GPU is present")
    done = subprocess.run(["bash", str(SCRIPT), "--out", str(tmp_path)], capture_output=True, text=True, timeout=300,
                          check=False, env={**os.environ, "PYTHON": sys.executable})
    assert done.returncode == 2 and "--dry-run" in done.stderr
