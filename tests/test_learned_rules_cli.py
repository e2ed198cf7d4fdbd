"""JumpReLU, Matryoshka (BatchTopK) and L1 through the `lightning-sae` command on a tiny random
language model (issue 26): a fit killed with SIGKILL resumes to the weights of an uninterrupted
fit (thresholds and the coefficient warm-up included), and `validate --model.init_from=<the
fit's SAELens export>` reproduces the fit's final validation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers import fit_in_subprocess, sigkill_at_checkpoint
from lightning_sae.cli import main

REPO = Path(__file__).resolve().parents[1]

RULES = {
    "jumprelu": ["--model=sae", "--model.selector=jumprelu", "--model.selector.init_args.l0_coefficient=0.002",
                 "--model.selector.init_args.l0_warm_up_steps=8", "--model.selector.init_args.bandwidth=0.1"],
    "matryoshka": ["--model=matryoshka", "--model.prefix_sizes=[8,24]", "--model.selector=batch_topk"],
    "relu_l1": ["--model=sae", "--model.selector=relu_l1", "--model.selector.init_args.l1_coefficient=0.002",
                "--model.selector.init_args.l1_warm_up_fraction=0.3"],
}
VALIDATION_METRICS = ("explained_variance", "mse", "l0", "frac_alive", "ce_loss_score", "kl_div_score")


@pytest.fixture(scope="module")
def lm(tmp_path_factory) -> list[str]:
    """Data arguments for a tiny random GPT-2 and its activation cache (written once, here)."""
    from data_fixtures import save_model, write_text

    from lightning_sae.data import ActivationDataModule

    tiny = tmp_path_factory.mktemp("tiny_lm")
    kwargs = {"model": str(save_model("gpt2", tiny)), "dataset": str(write_text(tiny)), "layer": 1, "context_size": 16,
              "num_tokens": 768, "batch_size": 64, "device": "cpu", "model_dtype": "float32", "cache_dir": str(tiny / "cache"),
              "validation_fraction": 0.15}
    ActivationDataModule(**kwargs).setup("fit")
    return ["--data=lightning_sae.data.ActivationDataModule", *(f"--data.{key}={value}" for key, value in kwargs.items())]


def fit_args(rule: str, lm: list[str], root: Path, *extra: str) -> list[str]:
    return [
        "fit", "--seed_everything=0", *RULES[rule], "--model.k=4", "--model.d_sae=32", "--model.dead_tokens=300",
        "--model.spliced_eval_contexts=4", *lm, "--trainer.max_epochs=2", "--trainer.accelerator=cpu", "--trainer.logger=false",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", f"--trainer.default_root_dir={root}",
        "--trainer.callbacks+=ModelCheckpoint", f"--trainer.callbacks.dirpath={root / 'ckpt'}",
        "--trainer.callbacks.every_n_train_steps=3", "--trainer.callbacks.save_top_k=-1", "--trainer.callbacks.save_last=true", *extra,
    ]



@pytest.mark.parametrize("rule", sorted(RULES))
def test_killed_fit_resumes_to_the_same_weights_and_export_validates_identically(rule, lm, tmp_path):
    killed_root = tmp_path / "killed"
    args = fit_args(rule, lm, killed_root, "--trainer.callbacks+=test_resume.Throttle", "--trainer.callbacks.seconds=0.3")
    with fit_in_subprocess(args, REPO) as process:
        reference = main(fit_args(rule, lm, tmp_path / "reference"))  # meanwhile, the uninterrupted fit
        stopped_at = sigkill_at_checkpoint(process, killed_root / "ckpt", 6)
    steps = reference.trainer.global_step
    assert stopped_at < steps  # it really stopped part-way
    resumed = main(fit_args(rule, lm, killed_root, "--ckpt_path=last"))
    assert resumed.trainer.global_step == steps
    expected, actual = reference.model.state_dict(), resumed.model.state_dict()
    assert expected.keys() == actual.keys()
    learned = [key for key in expected if ".selector." in key]
    assert learned or rule == "relu_l1"  # thresholds (JumpReLU's parameter, BatchTopK's buffer) are in the state
    for key, value in expected.items():
        if torch.is_tensor(value) and value.is_floating_point():
            torch.testing.assert_close(actual[key], value, rtol=0, atol=1e-6, msg=key)
        elif torch.is_tensor(value):
            assert torch.equal(actual[key], value), key
        else:
            assert actual[key] == value, key

    final = {metric: float(reference.trainer.callback_metrics[f"val/{metric}"]) for metric in VALIDATION_METRICS}
    validated = main(["validate", "--model=sae", f"--model.init_from={tmp_path / 'reference' / 'sae'}", "--model.spliced_eval_contexts=4",
                      *lm, "--trainer.accelerator=cpu", "--trainer.logger=false", "--trainer.enable_progress_bar=false",
                      f"--trainer.default_root_dir={tmp_path / 'validate'}", "--seed_everything=0"])
    for metric, value in final.items():
        assert float(validated.trainer.callback_metrics[f"val/{metric}"]) == pytest.approx(value, rel=1e-5, abs=1e-6), metric
