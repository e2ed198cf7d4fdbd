"""`lightning-sae validate` on a saved SAE and on a checkpoint, with a tiny local model and corpus:
the printed table holds every SPEC section 4 metric, with values that match an independent
computation; spliced CE is skipped (and said so) without a language model; fit records its
hyperparameters with its final metrics for TensorBoard."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from eval_helpers import HOOK, K, LAYER, TinySetup, build, dense_sae, reference_reconstruction_metrics, reference_spliced
from lightning_sae.cli import main as cli_main
from lightning_sae.data import ActivationDataModule
from lightning_sae.spliced import METRICS

SPLICED = 8  # contexts for spliced CE
TABLE_METRICS = (
    "explained_variance", "mse", "cossim", "l0", "frac_alive",
    "ce_loss_score", "kl_div_score", "ce_loss_without_sae", "ce_loss_with_sae", "ce_loss_with_ablation",
)
_ROW = re.compile(r"│\s*(val/\S+)\s*│\s*(\S+)\s*│")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> TinySetup:
    return build(tmp_path_factory.mktemp("validate"))


@pytest.fixture(autouse=True)
def _isolated_caches(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")


def run_cli(args: list[str], capsys) -> dict[str, float]:
    """Runs lightning-sae and returns the metrics of the table it printed."""
    capsys.readouterr()
    cli_main(args)
    out = capsys.readouterr().out
    table = {name: float(value) for name, value in _ROW.findall(out)}
    assert table, f"no metrics table in the output:\n{out}"
    return table


def common_args(tiny: TinySetup, root: Path) -> list[str]:
    return [*tiny.data_args(), "--trainer.accelerator=cpu", f"--trainer.default_root_dir={root}",
            "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--seed_everything=0"]


def independent_metrics(tiny: TinySetup) -> dict[str, float]:
    """The metrics recomputed without the library's evaluators: activations from
    output_hidden_states, a dense SAE from the saved tensors, CE/KL via a wrapped forward."""
    dm = ActivationDataModule(**tiny.datamodule_kwargs())
    dm.setup()  # the cache exists already: this only opens it
    contexts = dm.validation_contexts(10_000)
    model = AutoModelForCausalLM.from_pretrained(tiny.model_dir).eval()
    sae = dense_sae(load_file(tiny.sae_dir / "sae_weights.safetensors"), K)
    with torch.no_grad():
        hidden = model(input_ids=contexts, output_hidden_states=True).hidden_states[LAYER + 1]
    x = hidden[contexts != dm.tokenizer.bos_token_id]  # the rows the cache holds, in its order
    xhat, latents = sae(x)
    expected = reference_reconstruction_metrics(x, xhat, latents)
    expected["frac_alive"] = (latents > 0).any(0).double().mean().item()
    spliced = reference_spliced(model, model.model.layers[LAYER], contexts[:SPLICED], lambda rows: sae(rows)[0], dm.tokenizer.bos_token_id)
    return {**expected, **spliced}


def test_validate_saved_sae_prints_every_metric_matching_an_independent_computation(tiny, tmp_path, capsys):
    assert HOOK == "resid_post"  # independent_metrics reads layer outputs
    table = run_cli(["validate", "--model=sae", f"--model.init_from={tiny.sae_dir}",
                     f"--model.spliced_eval_contexts={SPLICED}", *common_args(tiny, tmp_path)], capsys)
    for metric in TABLE_METRICS:
        assert f"val/{metric}" in table, f"val/{metric} missing from the validate table {sorted(table)}"
    expected = independent_metrics(tiny)
    for metric, value in expected.items():
        # The table shows what Lightning logged: float32.
        assert table[f"val/{metric}"] == pytest.approx(value, rel=2e-4, abs=1e-5), metric
    assert list(tmp_path.glob("lightning_logs/version_*/events.out.tfevents*")), "validate logged nothing to TensorBoard"


def test_fit_records_hparams_with_final_metrics_and_checkpoint_validates_identically(tiny, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.plugins.hparams import plugin_data_pb2

    args = common_args(tiny, tmp_path)
    cli_main(["fit", "--model=sae", "--model.k=4", "--model.d_sae=64", f"--model.spliced_eval_contexts={SPLICED}",
              "--trainer.max_epochs=1", "--trainer.limit_train_batches=6", "--trainer.limit_val_batches=2", *args])
    run = next(tmp_path.glob("lightning_logs/version_0"))

    records: dict[str, plugin_data_pb2.HParamsPluginData] = {}
    final: dict[str, float] = {}
    for event in EventFileLoader(str(next(run.glob("events.out.tfevents*")))).Load():
        for value in event.summary.value:
            if value.tag.startswith("_hparams_/"):
                records[value.tag] = plugin_data_pb2.HParamsPluginData.FromString(value.metadata.plugin_data.content)
            elif value.tag.startswith("final/"):
                final[value.tag] = value.tensor.float_val[0]
    experiment = records["_hparams_/experiment"].experiment
    assert {"final/ce_loss_score", "final/explained_variance", "final/kl_div_score"} <= {m.name.tag for m in experiment.metric_infos}
    assert "hp_metric" not in {m.name.tag for m in experiment.metric_infos}
    hparams = records["_hparams_/session_start_info"].session_start_info.hparams
    assert hparams["k"].number_value == 4 and hparams["layer"].number_value == LAYER  # module's and DataModule's
    assert {"final/ce_loss_score", "final/l0", "final/train/loss"} <= set(final)

    checkpoint = next(run.glob("checkpoints/*.ckpt"))
    by_ckpt = run_cli(["validate", "--model=sae", f"--ckpt_path={checkpoint}", "--trainer.limit_val_batches=2", *args], capsys)
    by_init = run_cli(["validate", "--model=sae", f"--model.init_from={checkpoint}", f"--model.spliced_eval_contexts={SPLICED}",
                       "--trainer.limit_val_batches=2", *args], capsys)
    for metric in ("explained_variance", "ce_loss_score", "kl_div_score", "l0"):
        assert by_ckpt[f"val/{metric}"] == pytest.approx(final[f"final/{metric}"], rel=1e-5), metric
        assert by_init[f"val/{metric}"] == pytest.approx(final[f"final/{metric}"], rel=1e-5), metric


def test_without_a_language_model_spliced_metrics_are_not_logged_and_the_reason_is_printed_once(tmp_path, capsys, caplog):
    data = ["--data=lightning_sae.tensor_data.TensorDataModule", "--data.synthetic.num_tokens=1200", "--data.synthetic.d_in=16",
            "--data.synthetic.num_features=32", "--data.batch_size=256", "--data.validation_fraction=0.25"]
    with caplog.at_level("INFO"):
        cli_main(["fit", "--model=sae", "--model.k=4", "--model.d_sae=32", "--trainer.max_epochs=2", "--trainer.accelerator=cpu",
                  f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=false", *data])
    notices = [r for r in caplog.records if "spliced CE" in r.getMessage() and "not computed" in r.getMessage()]
    assert len(notices) == 1, [r.getMessage() for r in caplog.records]
    table = run_cli(["validate", "--model=sae", f"--model.init_from={tmp_path}/lightning_logs/version_0/sae",
                     "--trainer.accelerator=cpu", f"--trainer.default_root_dir={tmp_path}", *data], capsys)
    assert "val/explained_variance" in table
    assert not [name for name in table if name.rsplit("/", 1)[-1] in METRICS]


def test_gradient_selector_reports_spliced_ce_with_gradient_selection_and_with_plain_topk(tiny, tmp_path, capsys):
    """SPEC section 4 for the g-SAE: ce_loss_score with gradient selection and with plain TopK on
    the same weights; the latter equals a plain TopK SAE's."""
    pytest.importorskip("lightning_sae_gsae")
    args = [arg for arg in common_args(tiny, tmp_path) if not arg.startswith("--data.cache_dir=")]
    args.append(f"--data.cache_dir={tmp_path / 'gradient-cache'}")  # a cache with dL/dx
    table = run_cli(["validate", "--model=sae", "--model.selector=gradient_topk", "--model.selector.beta=4.0",
                     f"--model.init_from={tiny.sae_dir}", f"--model.spliced_eval_contexts={SPLICED}", *args], capsys)
    expected = independent_metrics(tiny)
    for metric in ("ce_loss_score", "kl_div_score", "ce_loss_with_sae"):
        assert table[f"val/plain_topk/{metric}"] == pytest.approx(expected[metric], rel=2e-4, abs=1e-5), metric
        assert f"val/{metric}" in table
    assert table["val/ce_loss_with_sae"] != pytest.approx(table["val/plain_topk/ce_loss_with_sae"], rel=1e-4)  # gradients changed the selection
    assert table["val/ce_loss_without_sae"] == pytest.approx(expected["ce_loss_without_sae"], rel=1e-5)
