"""tools/compare_rules.py (issue 26's table) end to end on a tiny language model: one fit per rule
through the CLI, resumable per rule, and the interleaved step timing from their checkpoints."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import pytest

from eval_helpers import build

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import compare_rules  # noqa: E402


def test_compare_rules_fits_each_rule_times_its_step_and_resumes(tmp_path, monkeypatch, capsys):
    import datasets

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")
    tiny = build(tmp_path / "tiny")
    common = ["--model=sae", "--model.k=4", "--model.expansion_factor=2", "--model.spliced_eval_contexts=0",
              "--trainer.max_epochs=1", "--trainer.accelerator=cpu", *tiny.data_args()]
    out = tmp_path / "rules"
    argv = ["--out", str(out), "--repeats", "3", "--common", shlex.join(common),
            "--rule", "topk=", "--rule", "jumprelu=--model.selector=jumprelu --model.selector.init_threshold=0.05"]
    argv_before = list(sys.argv)
    assert compare_rules.main(argv) == 0
    assert sys.argv == argv_before  # emptied for the in-process fits, then given back

    records = {name: json.loads((out / f"{name}.json").read_text()) for name in ("topk", "jumprelu")}
    assert records["topk"]["metrics"]["val/l0"] == pytest.approx(4.0)  # TopK's L0 is k exactly
    assert Path(records["jumprelu"]["checkpoint"]).exists() and records["jumprelu"]["args"][0] == "--model.selector=jumprelu"
    table = (out / "table.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| topk") or line.startswith("| jumprelu")]
    assert len(rows) == 2 and rows[0].startswith("| topk | (config as is) |") and rows[0].endswith("| 1.00x | 1.00x |")  # the reference against itself
    assert f"{records['jumprelu']['metrics']['val/explained_variance']:.4f}" in rows[1]

    # A rerun finds both records and fits nothing again (the records stay byte for byte).
    before = {name: (out / f"{name}.json").read_bytes() for name in records}
    assert compare_rules.main([*argv[:2], "--repeats", "0", *argv[4:]]) == 0
    assert before == {name: (out / f"{name}.json").read_bytes() for name in records}
    assert "step vs" not in (out / "table.md").read_text()
