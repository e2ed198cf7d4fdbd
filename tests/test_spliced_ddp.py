"""Spliced CE under 2-process DDP (CPU, gloo): each rank scores its share of the contexts, the
totals are summed, and the scores equal a single process's; nothing hangs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from eval_helpers import build
from lightning_sae.data import ActivationDataModule

SCRIPT = Path(__file__).with_name("ddp_spliced.py")
SPLICED = ("ce_loss_score", "kl_div_score", "ce_loss_without_sae", "ce_loss_with_sae", "ce_loss_with_ablation", "kl_div_with_sae", "kl_div_with_ablation")


def run(root: Path, devices: int) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(SCRIPT.parents[1]), "OMP_NUM_THREADS": "1", "XDG_CACHE_HOME": str(root / "xdg")}
    done = subprocess.run([sys.executable, str(SCRIPT), str(root), str(devices)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads((root / f"spliced_{devices}.json").read_text())


@pytest.mark.slow  # two process launches: about a minute on a 2-core machine
def test_two_process_spliced_scores_equal_single_process(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")
    tiny = build(tmp_path)
    ActivationDataModule(**tiny.datamodule_kwargs()).setup()  # the cache, built once up front
    single, double = run(tmp_path, 1), run(tmp_path, 2)
    for name in SPLICED:
        assert double[f"val/{name}"] == pytest.approx(single[f"val/{name}"], rel=1e-5), name
