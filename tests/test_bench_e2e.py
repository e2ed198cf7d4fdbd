"""tools/bench_e2e.py's small mode: every tool runs end to end on a tiny random Llama and a few
hundred tokens, and the table has a row per tool with its held-out explained variance. No timing
is asserted (numbers from a tiny model mean nothing)."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from data_fixtures import save_model, write_text

TOOL = Path(__file__).resolve().parents[1] / "tools" / "bench_e2e.py"
MISSING = [name for name in ("sparsify", "sae_lens") if importlib.util.find_spec(name) is None]


@pytest.mark.skipif(bool(MISSING), reason=f"the peers are not installed ({', '.join(MISSING)}): pip install eai-sparsify sae-lens")
def test_every_tool_trains_three_hook_points_from_one_pass(tmp_path):
    model, text = save_model("llama", tmp_path), write_text(tmp_path, 2000)
    results = tmp_path / "runs.json"
    done = subprocess.run(
        [sys.executable, str(TOOL), "--model", str(model), "--dataset", str(text), "--model-dtype", "float32",
         "--configs", "3", "--layers", "1", "--multi-layers", "0", "1", "2", "--tokens", "128", "--batch", "64", "--buffer", "256",
         "--width", "64", "--k", "4", "--context", "16", "--model-batch", "4", "--validation-contexts", "4",
         "--repeats", "1", "--threads", "1", "--work", str(tmp_path / "work"), "--json", str(results),
         "--tools", "bare", "stream-serial", "stream-overlap", "cache", "sparsify", "saelens"],
        capture_output=True, text=True, timeout=900, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    runs = json.loads(results.read_text())["runs"]["3"][0]
    by_tool = {run["tool"]: run for run in runs}
    assert set(by_tool) == {"bare", "stream-serial", "stream-overlap", "cache", "cache (2nd fit)", "sparsify", "saelens"}
    for name, run in by_tool.items():
        assert "error" not in run, f"{name}: {run.get('error')}"
        assert run["seconds"] > 0 and run["rows"] >= 128 - 64 and run["peak_rss_mib"] > 0
        if name != "bare":  # every trainer scored an SAE per hook point on the same held-out rows
            assert set(run["ev"]) == {"0", "1", "2"}, name
            assert all(math.isfinite(value) and value < 1 for value in run["ev"].values()), name
    # the serial and the overlapped stream serve the same batches: the same SAEs
    assert by_tool["stream-serial"]["ev"] == pytest.approx(by_tool["stream-overlap"]["ev"], abs=1e-6)
    for name in by_tool:
        assert f"| {name} |" in done.stdout
