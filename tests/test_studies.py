"""tools/studies: the issue-29 study plan in its tiny CI mode (random tiny Llama, a few thousand
tokens). Every step of the real plan runs: the shared cache (activations, dL/dx at two layers,
MLP input and output in one model pass), the g-SAE/TopK and JSAE sweeps, the curves over
training tokens, resuming, and the report's tables and plots. The numbers mean nothing."""

from __future__ import annotations

import json
import math
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from data_fixtures import _isolated_caches, save_model, write_text  # noqa: F401

STUDIES = Path(__file__).resolve().parents[1] / "tools" / "studies"
sys.path.insert(0, str(STUDIES))


def tiny_configs(tmp: Path, model: Path, text: Path) -> list[str]:
    common = {
        "root": str(tmp / "studies"),
        "cache_dir": str(tmp / "cache"),
        "cache": {"model": str(model), "dataset": str(text), "gsae_layers": [2, 1], "jsae_layer": 1, "num_tokens": 16 * 160,
                  "validation_fraction": 0.1, "context_size": 16, "cache_dtype": "float32", "model_batch_size": 8,
                  "shard_tokens": 16 * 32, "model_dtype": "float32"},
        "train": {"batch_size": 64, "lr": 1.0e-3, "expansion_factor": 4, "jsae_d_sae": 64, "normalize": "rms",
                  "spliced_eval_contexts": 4, "jacobian_thresholds": [0.005, 0.01, 0.015, 0.02], "checkpoint_every": 4,
                  "threads": 1},
    }
    gsae = {**common, "study": "gsae", "sweep": {"layers": [1, 2], "k": [4, 8], "beta": [1.0], "seeds": [0, 1], "tokens": 512,
                                                 "headline": {"k": 4, "beta": [1.0]}, "curve_tokens": [256, 512], "curve_seeds": [0],
                                                 "alternative_gradient_normalizations": ["token"]}}
    jsae = {**common, "study": "jsae", "sweep": {"k": 4, "d_model": 32, "lambdas": [0, 1], "seeds": [0, 1], "tokens": 512,
                                                 "headline_lambdas": [0, 1], "normalized_lambdas": [1], "curve_tokens": [256, 512],
                                                 "curve_seeds": [0]}}
    paths = []
    for name, config in (("gsae", gsae), ("jsae", jsae)):
        path = tmp / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        paths.append(str(path))
    return paths


@pytest.fixture
def tiny_study(tmp_path, tmp_path_factory):
    folder = tmp_path_factory.mktemp("study_model")
    return tiny_configs(tmp_path, save_model("llama", folder), write_text(folder, count=600))


def test_small_mode_runs_every_study_and_writes_every_table_and_plot(tiny_study, tmp_path, capsys):
    import run_studies

    out = tmp_path / "report" / "results.md"
    out.parent.mkdir()
    out.write_text("# Hand-written\n\nkept\n")
    kept = tmp_path / "kept"
    run_studies.main([*tiny_study, "--test-mode", "--out", str(out), "--results-dir", str(kept)])
    run_studies.main([*tiny_study, "--test-mode", "--out", str(out), "--report-only"])  # rewrites only its part
    report = out.read_text()
    assert report.startswith("# Hand-written\n\nkept\n") and report.count("study_report: start") == 1
    assert "TEST MODE" in report
    for heading in ("### g-SAE vs TopK, 512 training tokens", "### JSAE lambda sweep, 512 training tokens",
                    "### gsae: over training tokens", "### jsae: over training tokens", "Pareto front"):
        assert heading in report
    # Both selections of every g-SAE, the rule's lambda (0.5 k^2 / d = 0.25 here), and seed spreads.
    assert "gradient selection" in report and "plain TopK selection" in report and "lambda = 0.25" in report
    assert "± " in report and "(2)" in report
    # every run of both lambdas recorded its CPU time, and the cell says how many runs it averages
    assert re.search(r"\| training tokens / CPU second \(the timed steps; pauses excluded\) \| \d+ \(2\) \| \d+ \(2\) \|", report)
    # each curve's gap to its baseline over the two budgets (no uncertainty from two points)
    assert "| L1 k4 g-SAE beta=1 - TopK | 256: " in report and "| L1 k4 lambda=1 - lambda=0 | 256: " in report
    for name in ("gsae_score_vs_k.png", "jsae_lambda_512.png", "curves_tokens.png"):
        png = out.parent / "results" / name
        assert png.is_file() and 0 < png.stat().st_size < 200_000
    assert not (out.parent / "results" / "jsae_lambda_256.png").exists()  # a curve budget: two lambdas are no sweep
    # a JSAE curve shows both sides of the trade-off: the cost and the Jacobian count
    assert "| L1 k4 lambda=1: sae_out explained var. |" in report and "| L1 k4 lambda=1: count abs(J) > " in report
    results = [json.loads(p.read_text()) for p in (tmp_path / "studies" / "runs").rglob("result.json")]
    # 2 layers x 2 k x 2 selectors x 2 seeds, plus one curve budget per headline selector;
    # 3 lambdas x 2 seeds, one curve budget per headline lambda, lambda 1 normalised x 2 seeds.
    assert sum(r["run"]["study"] == "gsae" for r in results) == 16 + 2 + 2  # + beta 1 with token normalisation x 2 seeds
    assert "### g-SAE with another gradient normalisation" in report
    assert sum(r["run"]["study"] == "jsae" for r in results) == 6 + 2 + 2
    assert "### With activation normalisation" in report
    for result in results:
        assert result["test_mode"] and result["tokens_trained"] == result["run"]["tokens"] // 64 * 64
        assert result["tokens_per_cpu_second"] > 0 and result["train_cpu_seconds_last_segment"] > 0
        assert 0 < result["metrics"]["val/explained_variance" if result["run"]["study"] == "gsae" else "val/sae_out/explained_variance"] <= 1
    gsae = next(r for r in results if r["run"]["beta"] == 1.0)
    assert "val/plain_topk/ce_loss_score" in gsae["metrics"] and "val/ce_loss_score" in gsae["metrics"]
    jsae = next(r for r in results if r["run"]["study"] == "jsae")
    ratio = jsae["scale_ratio"]
    assert f"val/jacobian_at_x/count_above_{float(f'{0.01 * ratio:.3g}'):g}" in jsae["metrics"]
    # every result is also kept in the results folder, as the run folder has it
    assert {p.relative_to(kept).with_suffix("").as_posix(): json.loads(p.read_text()) for p in kept.rglob("*.json")} == \
        {r["run_id"]: r for r in results}
    check_recovery_from_the_tables(tiny_study, tmp_path, out, ratio, capsys)


def generated_rows(report: str) -> list[str]:
    import study_report

    return [line for line in report.split(study_report.START)[1].split(study_report.END)[0].splitlines() if line.startswith("|")]


def check_recovery_from_the_tables(tiny_study: list[str], tmp_path: Path, out: Path, ratio: float, capsys) -> None:
    """The machine that held the run folders is gone and only the report is left: its tables give
    the results back, the driver counts those runs as done, and the report rebuilt from them alone
    prints the same tables."""
    import recover_results
    import run_studies
    import shutil

    shutil.rmtree(tmp_path / "studies")
    recovered = tmp_path / "recovered_only"
    record = recovered / "recovered" / "old.json"
    recover_results.main([*tiny_study, "--report", str(out), "--source", "the test's first report",
                          "--scale-ratio", str(ratio), "--out", str(record)])
    data = json.loads(record.read_text())
    data["settings"]["test_mode"] = True  # it recovers test-mode runs
    record.write_text(json.dumps(data))
    args = [*tiny_study, "--test-mode", "--results-dir", str(recovered)]
    with pytest.raises(ValueError):  # more seeds than two are not recoverable from a half range
        recover_results.cell_values("0.5 ± 0.1 (3)")
    assert recover_results.cell_values("0.5000 ± 0.1000 (2)") == [0.6, 0.4]
    rebuilt = tmp_path / "rebuilt.md"
    run_studies.main([*args, "--out", str(rebuilt)])  # trains nothing: every run is recovered
    assert not (tmp_path / "studies" / "runs").exists()
    old, new = generated_rows(out.read_text()), generated_rows(rebuilt.read_text())
    # every table row is the same; the derived rows (speed ratios, gaps between curves) are recomputed
    # from rounded values, and the tiny model's gaps are below the rounding
    derived = ("| training time / lambda = 0", " - TopK | ", " - lambda=0 | ")
    same = lambda rows: [row for row in rows if not any(part in row for part in derived)]  # noqa: E731
    assert same(new) == same(old) and len(old) > 60
    assert "30 of these runs are recovered from an earlier report's tables (the test's first report)" in rebuilt.read_text()
    capsys.readouterr()
    run_studies.main([*args, "--plan"])
    states = [line.split()[2] for line in capsys.readouterr().out.splitlines()]
    assert len(states) == 30 and set(states) == {"recovered"}
    # another experiment (a different cache) does not take them for its own
    run_studies.main([*args, "--plan", "--num-tokens", "999"])
    assert {line.split()[2] for line in capsys.readouterr().out.splitlines()} == {"pending"}


def test_a_run_killed_with_sigkill_continues_from_its_checkpoint(tiny_study, tmp_path):
    """The run is killed (SIGKILL) once it has written a checkpoint; the driver, run again, finishes
    it from there, and the result equals an uninterrupted run's (same weights)."""
    import signal
    import subprocess
    import time

    import run_studies
    from safetensors.torch import load_file

    args = [*tiny_study, "--test-mode", "--only-phase", "0", "--max-runs", "1", "--train-tokens", "4096"]
    run = tmp_path / "studies" / "runs" / "gsae" / "L1_k4_topk_s0_t4096"
    code = f"import sys; sys.path.insert(0, {str(STUDIES)!r}); import run_studies; run_studies.main({args!r})"
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (run / "ckpt" / "last.ckpt").is_file() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert (run / "ckpt" / "last.ckpt").is_file() and not (run / "result.json").is_file()
    run_studies.main(args)
    resumed = json.loads((run / "result.json").read_text())
    assert resumed["steps"] == 64 and resumed["tokens_trained"] == 4096
    assert resumed["train_steps_last_segment"] < 64  # it did continue, not start over
    # the clock's totals came back with the checkpoint: every step trained is timed once
    assert resumed["train_steps_timed"] == 64 and resumed["train_cpu_seconds"] > resumed["train_cpu_seconds_last_segment"]

    run_studies.main([*args, "--root", str(tmp_path / "uninterrupted")])
    whole = tmp_path / "uninterrupted" / "runs" / "gsae" / "L1_k4_topk_s0_t4096"
    weights = [load_file(str(max(folder.rglob("sae_weights.safetensors"), key=lambda p: p.stat().st_mtime))) for folder in (run, whole)]
    for name, tensor in weights[1].items():
        torch.testing.assert_close(weights[0][name], tensor, rtol=1e-5, atol=1e-6)


def test_sigterm_while_training_stops_the_driver_and_the_run_resumes_from_its_checkpoint(tiny_study, tmp_path):
    """Stopping a driver with SIGTERM (kill's default) mid-fit ends it, exit status 143, with the
    run unfinished and the next one not begun; the same command then finishes the run from its
    checkpoint."""
    import signal
    import subprocess
    import time

    import run_studies

    args = [*tiny_study, "--test-mode", "--only-phase", "0", "--train-tokens", "4096"]
    run = tmp_path / "studies" / "runs" / "gsae" / "L1_k4_topk_s0_t4096"
    code = f"import sys; sys.path.insert(0, {str(STUDIES)!r}); import run_studies; run_studies.main({args!r})"
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    deadline = time.monotonic() + 300
    while not (run / "ckpt" / "last.ckpt").is_file() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGTERM)
    printed, _ = process.communicate(timeout=300)
    assert process.returncode == 128 + signal.SIGTERM
    assert "stopped by SIGTERM in gsae/L1_k4_topk_s0_t4096" in printed
    assert (run / "ckpt" / "last.ckpt").is_file() and not (run / "result.json").exists()
    assert sorted(path.name for path in run.parent.iterdir()) == [run.name]  # the next run never began
    run_studies.main([*args, "--max-runs", "1"])
    resumed = json.loads((run / "result.json").read_text())
    assert resumed["steps"] == 64 and resumed["train_steps_last_segment"] < 64


def test_sigterm_outside_a_fit_lets_the_run_in_hand_finish_and_stops_before_the_next(tiny_study, tmp_path, capsys, monkeypatch):
    """A SIGTERM that lands where Lightning does not look (before the fit here; the validation after
    it in practice) is not swallowed: that run completes, the driver stops, no report is written."""
    import signal

    import run_studies

    train = run_studies.train_and_validate

    def train_after_a_sigterm(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return train(*args, **kwargs)

    monkeypatch.setattr(run_studies, "train_and_validate", train_after_a_sigterm)
    before = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "report.md"
    run_studies.main([*tiny_study, "--test-mode", "--only-phase", "0", "--train-tokens", "256", "--out", str(out)])
    runs = sorted(path.parent.name + "/" + path.name for path in (tmp_path / "studies" / "runs").glob("*/*") if path.is_dir())
    assert len(runs) == 1 and (tmp_path / "studies" / "runs" / runs[0] / "result.json").is_file()
    assert "stopped by SIGTERM before" in capsys.readouterr().out and not out.exists()
    assert signal.getsignal(signal.SIGTERM) is before


def test_drivers_side_by_side_share_the_plan_out_and_skip_a_run_another_holds(tiny_study, tmp_path, capsys):
    """A run whose lock a live process holds is left to it; the driver trains the next one, and
    takes the first up once the holder has let go."""
    import run_studies

    from lightning_sae.atomic import exclusive_lock

    args = [*tiny_study, "--test-mode", "--only-phase", "0", "--train-tokens", "256"]
    run_studies.main([*args, "--plan"])
    first, second = [line.split()[-1] for line in capsys.readouterr().out.splitlines()[:2]]
    runs = tmp_path / "studies" / "runs"
    (runs / first).mkdir(parents=True)
    with exclusive_lock(runs / first / ".training.lock"):  # this process plays the other driver
        run_studies.main([*args, "--max-runs", "1"])
        run_studies.main([*args, "--plan"])
    printed = capsys.readouterr().out
    assert f"PID {os.getpid()} is training it: on to the next run" in printed
    assert f"training (PID {os.getpid()})  {first}" in printed and f"done     {second}" in printed
    assert not (runs / first / "result.json").exists() and (runs / second / "result.json").is_file()
    run_studies.main([*args, "--max-runs", "1"])
    assert (runs / first / "result.json").is_file()


def test_match_narrows_the_plan_to_the_runs_named_and_a_pattern_matching_nothing_is_an_error(tiny_study, capsys):
    import run_studies

    run_studies.main([*tiny_study, "--test-mode", "--plan"])
    every = [line.split()[-1] for line in capsys.readouterr().out.splitlines()]
    run_studies.main([*tiny_study, "--test-mode", "--plan", "--match", "gsae/L1_k8_*", "jsae/*_s1_*"])
    chosen = [line.split()[-1] for line in capsys.readouterr().out.splitlines()]
    expected = [run for run in every if re.fullmatch(r"gsae/L1_k8_.*|jsae/.*_s1_.*", run)]
    assert chosen == expected and 0 < len(chosen) < len(every)
    with pytest.raises(SystemExit, match="no run of the plan matches"):
        run_studies.main([*tiny_study, "--test-mode", "--plan", "--match", "gsae/L7_*"])


def fake_result(study: str, tokens: int, value: float, beta: float = 0.0, lam: float = 0.0, seed: int = 0) -> dict:
    run = {"study": study, "layer": 15, "k": 32, "beta": beta, "jacobian_coefficient": lam, "tokens": tokens, "seed": seed}
    return {"run": run, "run_id": f"{study}_{beta}_{lam}_{tokens}_{seed}",
            "metrics": {"val/ce_loss_score": value, "val/sae_out/explained_variance": value}}


def test_a_gap_closing_linearly_in_log_tokens_crosses_where_the_line_does():
    from study_report import gap_trend

    budgets = [250_000, 500_000, 1_000_000, 2_000_000]
    results = [fake_result("gsae", t, 0.99) for t in budgets]
    # g-SAE behind TopK by 0.004 at 250k, closing by 0.001 per decade: zero at 250k x 10^4
    results += [fake_result("gsae", t, 0.99 - 0.004 + 0.001 * math.log10(t / 250_000), beta=1.0) for t in budgets]
    table = gap_trend(results, "gsae")
    assert "| L15 k32 g-SAE beta=1 - TopK | 250k: -0.0040, 500k: -0.0037, 1M: -0.0034, 2M: -0.0031 | +0.0010 ± 0.0000 |" in table
    assert "~2.5B tokens (slope ± 1 s.e.: 2.5B to 2.5B)" in table and "extrapolation" in table


def test_the_trend_and_its_error_agree_with_numpy_and_an_opening_gap_never_crosses():
    from study_report import gap_trend, linear_fit

    xs, ys = [5.4, 5.7, 6.0, 6.3, 6.7], [-0.0041, -0.0033, -0.0036, -0.0027, -0.0022]
    (slope, intercept), cov = np.polyfit(xs, ys, 1, cov=True)  # numpy scales by chi2 / (n - 2)
    a, b, se = linear_fit(xs, ys)
    assert (a, b, se) == pytest.approx((intercept, slope, math.sqrt(cov[0, 0])), rel=1e-9)
    budgets = [250_000, 1_000_000, 2_000_000]
    opening = [fake_result("jsae", t, 0.8) for t in budgets]
    opening += [fake_result("jsae", t, 0.8 - 0.01 * (1 + i), lam=1.0) for i, t in enumerate(budgets)]
    row = next(line for line in gap_trend(opening, "jsae").splitlines() if line.startswith("| L15 k32 lambda=1 - lambda=0"))
    assert row.endswith("| not closing |") and "250k: -0.0100, 1M: -0.0200, 2M: -0.0300" in row
    # one budget is no trend at all
    assert gap_trend([fake_result("gsae", 2_000_000, 0.99), fake_result("gsae", 2_000_000, 0.98, beta=1.0)], "gsae") == ""


def test_a_gap_that_changed_sign_in_the_data_is_reported_as_measured_not_as_not_closing():
    from study_report import gap_trend

    budgets = [250_000, 1_000_000, 2_000_000, 5_000_000]
    gaps = [-0.0025, -0.0008, -0.0021, +0.0011]  # behind, then ahead at the last budget
    results = [fake_result("gsae", t, 0.99) for t in budgets]
    results += [fake_result("gsae", t, 0.99 + gap, beta=0.25) for t, gap in zip(budgets, gaps)]
    row = next(line for line in gap_trend(results, "gsae").splitlines() if line.startswith("| L15 k32 g-SAE beta=0.25"))
    xs = [math.log10(t) for t in budgets]
    slope, intercept = np.polyfit(xs, gaps, 1)
    fitted_zero = 10 ** (-intercept / slope)  # where the least-squares line is 0
    assert f"measured: the gap changes sign between 2M and 5M (the fitted line: ~{fitted_zero / 1e6:.2g}M tokens)" in row
    assert "not closing" not in row


def test_the_crossing_range_pivots_the_fitted_slope_at_the_centre_of_the_data():
    from study_report import estimate_label, gap_trend

    budgets = [250_000, 500_000, 1_000_000, 2_000_000, 5_000_000]
    gaps = [-0.0161, -0.0147, -0.0120, -0.0094, -0.0071]
    results = [fake_result("gsae", t, 0.99) for t in budgets]
    results += [fake_result("gsae", t, 0.99 + gap, beta=1.0) for t, gap in zip(budgets, gaps)]
    xs = np.log10(budgets)
    (slope, _), cov = np.polyfit(xs, gaps, 1, cov=True)
    se = math.sqrt(cov[0, 0])
    point, low, high = (10 ** (xs.mean() - np.mean(gaps) / b) for b in (slope, slope + se, slope - se))
    expected = f"~{estimate_label(point)} tokens (slope ± 1 s.e.: {estimate_label(low)} to {estimate_label(high)})"
    assert expected in gap_trend(results, "gsae")
    assert low < point < high and estimate_label(2.04e7) == "20M" and estimate_label(3.3e9) == "3.3B"
    assert [estimate_label(t) for t in (996e6, 123_456, 7.25)] == ["1B", "120k", "7.2"]


def test_a_crawling_gap_is_cut_off_at_the_horizon_and_two_budgets_give_no_uncertainty():
    from study_report import gap_trend

    def row(budgets: list[int], gaps: list[float]) -> str:
        results = [fake_result("gsae", t, 0.99) for t in budgets]
        results += [fake_result("gsae", t, 0.99 + gap, beta=1.0) for t, gap in zip(budgets, gaps)]
        return next(line for line in gap_trend(results, "gsae").splitlines() if line.startswith("| L15 k32 g-SAE beta=1"))

    # -0.01 closing by 0.0001 per decade: the line reaches 0 a hundred decades out
    crawling = row([250_000, 1_000_000, 4_000_000], [-0.0100, -0.0100 + 0.0001 * math.log10(4), -0.0100 + 0.0001 * math.log10(16)])
    assert crawling.endswith("| beyond 1e15 tokens |")
    # two budgets: closing by 0.002 per decade from -0.002 at 1M crosses at 10M, with no error on the
    # slope (the 10M gap sits just below zero: a sign change in the data would be reported as measured)
    assert row([1_000_000, 10_000_000], [-0.002, -1e-12]).endswith("| ~10M tokens (two budgets: no uncertainty) |")
    # a slope one standard error smaller that no longer closes the gap says so
    wobbly = row([250_000, 1_000_000, 4_000_000], [-0.0100, -0.0040, -0.0060])  # closing, one s.e. from flat
    assert "| ~100M tokens (slope ± 1 s.e.: " in wobbly  # 1M x 10^(0.00667 / 0.00333)
    assert wobbly.endswith(" to never (a slope one standard error smaller does not close it)) |")


def test_the_lambda_front_carries_seed_spreads_and_drops_dominated_lambdas():
    from study_report import FrontPoint, jsae_table, pareto

    def result(lam: float, seed: int, count: float, ev: float) -> dict:
        run = {"study": "jsae", "layer": 15, "k": 32, "beta": 0.0, "jacobian_coefficient": lam, "tokens": 2000, "seed": seed}
        return {"run": run, "scale_ratio": 10.2,
                "metrics": {"val/jacobian_at_x/count_above_0.102": count, "val/sae_out/explained_variance": ev}}

    results = [result(0.0, 0, 900, 0.71), result(0.0, 1, 910, 0.73), result(0.5, 0, 100, 0.60),
               result(2.0, 0, 300, 0.50)]  # more entries and a worse reconstruction than lambda 0.5
    table, front = jsae_table(results, 2000)
    assert front[0] == FrontPoint(0.0, pytest.approx(905), pytest.approx(0.72), pytest.approx(5), pytest.approx(0.01))
    assert front[1] == FrontPoint(0.5, 100, 0.60, 0.0, 0.0) and [p.lam for p in front] == [0.0, 0.5, 2.0]
    assert pareto(front) == [0.0, 0.5]
    assert "| at_x: count abs(J) > 0.102 (= 0.01 x 10.2, scale-matched) | 905.0000 ± 5.0000 (2) | 100.0000 (1) |" in table


def test_the_score_against_k_lines_average_seeds_at_the_main_budget_and_leave_the_alternatives_out():
    from study_report import score_vs_k

    def result(k: int, beta: float, seed: int, tokens: int, value: float, plain: float, normalize: str = "") -> dict:
        run = {"study": "gsae", "layer": 15, "k": k, "beta": beta, "jacobian_coefficient": 0.0, "tokens": tokens, "seed": seed,
               "grad_normalize": normalize}
        return {"run": run, "metrics": {"val/ce_loss_score": value, "val/plain_topk/ce_loss_score": plain}}

    results = [result(16, 0.0, 0, 2000, 0.90, 0.90), result(16, 0.0, 1, 2000, 0.92, 0.92), result(32, 0.0, 0, 2000, 0.95, 0.95),
               result(16, 1.0, 0, 2000, 0.80, 0.85), result(32, 1.0, 0, 2000, 0.96, 0.97),
               result(32, 1.0, 0, 2000, 0.10, 0.10, normalize="token"),  # the alternative: its own table, not this line
               result(32, 0.0, 0, 500, 0.50, 0.50)]  # a curve point at a budget with fewer runs
    budget, lines = score_vs_k(results)
    assert budget == 2000 and list(lines) == [15]
    ks, ys, spreads = lines[15][(0.0, "")]
    assert ks == [16, 32] and ys == pytest.approx([0.91, 0.95]) and spreads == pytest.approx([0.01, 0.0])
    assert lines[15][(1.0, "")] == ([16, 32], pytest.approx([0.80, 0.96]), [0.0, 0.0])
    assert lines[15][(1.0, "plain_topk/")] == ([16, 32], pytest.approx([0.85, 0.97]), [0.0, 0.0])
    assert set(lines[15]) == {(0.0, ""), (1.0, ""), (1.0, "plain_topk/")}
