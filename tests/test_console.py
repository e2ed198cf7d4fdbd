"""What a fit prints and logs (issue 31, item 4): every TensorBoard tag the README lists is in a
fit's event file, the learning rate among them; Lightning's tips, `v_num`, `Total FLOPs: 0` and
irrelevant deprecation warnings stay off the console; a plain progress line replaces the bars
when the output is not a terminal; the end-of-fit summary has ce_loss_score."""

from __future__ import annotations

import re
from pathlib import Path

import lightning as L
import pytest
import torch

from eval_helpers import build
from lightning_sae.cli import main as cli_main
from lightning_sae.console import PlainProgress
from lightning_sae.module import SAEModule
from lightning_sae.tensor_data import SyntheticActivations, TensorDataModule

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_tags() -> list[str]:
    section = README.read_text().split("### Watching training in TensorBoard", 1)[1].split("\n## ", 1)[0].split("\n### ", 1)[0]
    tags = [tag for tag in re.findall(r"`([^`\s]+)`", section) if re.fullmatch(r"(train|val)/[\w./]+", tag)]
    assert len(tags) >= 8, f"the README's TensorBoard section lists too few tags: {tags}"
    return tags


@pytest.fixture(scope="module")
def fit(tmp_path_factory) -> dict:
    import datasets

    root = tmp_path_factory.mktemp("console")
    tiny = build(root)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(root / "xdg"))
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", root / "hf-datasets")
        import contextlib
        import io

        out, err = io.StringIO(), io.StringIO()
        import logging

        handler = logging.StreamHandler(err)
        lightning_logger = logging.getLogger("lightning.pytorch")
        lightning_logger.addHandler(handler)
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                cli = cli_main(["fit", "--model=sae", "--model.k=6", "--model.expansion_factor=3", "--model.spliced_eval_contexts=4", "--model.lr=0.002",
                                *tiny.data_args(), "--trainer.max_epochs=1", "--trainer.accelerator=cpu",
                                f"--trainer.default_root_dir={root}", "--trainer.log_every_n_steps=1"])
        finally:
            lightning_logger.removeHandler(handler)
    return {"cli": cli, "stdout": out.getvalue(), "stderr": err.getvalue(), "log_dir": cli.trainer.log_dir}


def test_every_tag_the_readme_lists_is_in_the_event_file(fit):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(fit["log_dir"], size_guidance={"scalars": 0, "histograms": 0}).Reload()
    logged = set(events.Tags()["scalars"]) | set(events.Tags()["histograms"])
    missing = [tag for tag in readme_tags() if tag not in logged]
    assert not missing, f"the README lists {missing}, which the fit did not log (it logged {sorted(logged)})"
    # The learning rate each step used: the configured 0.002, decaying to 0 over the last 20%.
    lr = [event.value for event in events.Scalars("train/lr")]
    assert len(lr) == fit["cli"].trainer.global_step
    assert max(lr) == pytest.approx(0.002) and lr[-1] < 0.002 * 0.5


def test_the_console_has_no_tips_flops_or_v_num(fit):
    text = fit["stdout"] + fit["stderr"]
    for noise in ("litlogger", "litmodels", "Tip:", "Total FLOPs", "v_num", "LeafSpec", "skip_none"):
        assert noise not in text, f"{noise!r} on the console"
    assert "trainable parameters" in text  # the summary that replaces Lightning's table


def test_the_summary_and_the_plain_progress_lines(fit):
    text, metrics = fit["stdout"] + fit["stderr"], fit["cli"].trainer.callback_metrics
    assert f"ce_loss_score {float(metrics['val/ce_loss_score']):.4f}" in text
    assert re.search(r"lightning-sae: epoch 1/1, batch (\d+)/\1 \(100%\), step \d+", text), text[-2000:]
    # The caching phase before the loop (not a terminal here either): its closing plain line.
    cached = re.search(r"lightning-sae: caching activations: ([\d,]+)/([\d,]+) tok \(100%\), [\d,]+ tok/s, [\d.]+ min \(done\)", text)
    assert cached and cached.group(1) == cached.group(2), text[:2000]


def test_plain_lines_print_every_interval_and_once_at_the_end(capsys):
    from lightning_sae.progress import PlainLines, progress_bar

    assert isinstance(progress_bar(10, "work", "tok"), PlainLines)  # pytest's captured stderr is no terminal
    lines = PlainLines(total=40, desc="caching activations", unit="tok", interval=0.0)
    for _ in range(4):
        lines.update(10)
    lines.close()
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("lightning-sae: caching activations: 10/40 tok (25%), ") and "min left" in printed[0]
    assert len(printed) == 5 and printed[-1].endswith("(done)") and "40/40 tok (100%)" in printed[-1]
    silent = progress_bar(10, "work", "tok", enabled=False)
    silent.update(10)
    silent.close()
    assert capsys.readouterr().out == ""


def test_plain_progress_prints_a_line_every_interval(capsys):
    L.seed_everything(0)
    data = TensorDataModule(synthetic=SyntheticActivations(num_tokens=2_048, d_in=8, num_features=32, active=2), batch_size=256)
    module = SAEModule(k=2, d_sae=32, lr=1e-3, spliced_eval_contexts=0)
    progress = PlainProgress(interval=0.0)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_model_summary=False, callbacks=[progress])
    trainer.fit(module, data)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("lightning-sae: epoch")]
    steps = trainer.global_step
    assert progress.plain and len(lines) == steps + 1  # one per batch, one at the epoch's end
    assert all("v_num" not in line for line in lines) and "train/loss" in lines[-1]
    assert torch.isfinite(torch.tensor(float(lines[-1].split("train/loss ")[1].split(",")[0].split()[0])))
