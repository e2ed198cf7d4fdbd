"""Fine-tuning from an SAE whose decoder rows are not unit norm (issue 18): kept function-preserving
where a unit-norm SAE computes the same function, refused in one line where none does; and
`lr: 0` means a learning rate of zero, not "unset"."""

from __future__ import annotations

import re
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import dense_reference, random_sae
from safetensors.torch import save_file

from lightning_sae.cli import main
from lightning_sae.formats import SAEFormatError, save_saelens, unit_decoder_rows
from lightning_sae.module import SAEModule
from lightning_sae.tensor_data import TensorDataModule

D, M, K = 16, 64, 4
QUIET = dict(logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)


def weights(sae) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in sae.named_parameters()}


def scaled(norms: torch.Tensor, k: int = K):
    """A random SAE with decoder row i scaled to norm norms[i]."""
    sae = random_sae(D, M, k, seed=1)
    with torch.no_grad():
        sae.W_dec.mul_(norms[:, None])
    return sae


def data(rows: int = 512) -> torch.Tensor:
    return torch.randn(rows, D, generator=torch.Generator().manual_seed(2)) * 2


def test_unit_rows_come_back_untouched():
    sae = random_sae(D, M, K)
    assert unit_decoder_rows(sae) is sae


@pytest.mark.parametrize("case", ["equal_norms", "every_latent_kept"])
def test_conversion_keeps_the_function_and_makes_rows_unit(case):
    if case == "equal_norms":
        sae = scaled(torch.full((M,), 2.5))
    else:  # k = d_sae: nothing is selected away, so each row may have its own norm
        sae = scaled(torch.linspace(0.2, 3.0, M), k=M)
    original, x = weights(sae), data()
    converted = unit_decoder_rows(sae)
    torch.testing.assert_close(converted.W_dec.norm(dim=1), torch.ones(M), rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(converted(x).xhat, dense_reference(original, x, sae.k), rtol=1e-5, atol=1e-5)


def test_unequal_norms_are_refused_in_one_line_unless_only_evaluating():
    sae = scaled(torch.linspace(0.5, 2.0, M))
    with pytest.raises(SAEFormatError) as error:
        unit_decoder_rows(sae, "some/sae")
    message = str(error.value)
    assert "\n" not in message and message.startswith("some/sae: decoder row norms range from 0.5 to 2")
    assert unit_decoder_rows(sae, refuse=False) is sae
    # Not refused for nothing: folding the norms in would indeed change the reconstructions.
    folded = weights(sae)
    norms = sae.W_dec.norm(dim=1)
    folded["W_enc"], folded["b_enc"], folded["W_dec"] = folded["W_enc"] * norms[:, None], folded["b_enc"] * norms, folded["W_dec"] / norms[:, None]
    x = data()
    assert not torch.allclose(dense_reference(folded, x, K), dense_reference(weights(sae), x, K), atol=1e-3)


def tensor_file(path: Path) -> Path:
    save_file({"x": data()}, str(path))
    return path


def test_fine_tuning_at_lr_zero_keeps_the_saved_sae(tmp_path):
    """The issue's report: a SAELens TopK SAE saved with rows of norm != 1 changed at the first step
    even at lr 1e-12, and `lr: 0` was taken as unset (the default rate)."""
    sae = scaled(torch.full((M,), 3.0))
    directory = save_saelens(sae, tmp_path / "sae")
    original, x = weights(sae), data()
    module = SAEModule(init_from=str(directory), lr=0.0, spliced_eval_contexts=0, warmup_steps=1)
    trainer = L.Trainer(max_steps=3, accelerator="cpu", default_root_dir=tmp_path, limit_val_batches=0, **QUIET)
    trainer.fit(module, datamodule=TensorDataModule(str(tensor_file(tmp_path / "x.safetensors")), batch_size=128))
    assert trainer.global_step == 3
    assert all(group["lr"] == 0.0 for group in trainer.optimizers[0].param_groups)
    with torch.no_grad():
        torch.testing.assert_close(module.get_sae("sae")(x).xhat, dense_reference(original, x, K), rtol=1e-5, atol=1e-5)


def test_fit_from_unequal_norms_fails_in_one_line_but_validate_runs(tmp_path, capsys):
    sae = scaled(torch.linspace(0.5, 2.0, M))
    directory = save_saelens(sae, tmp_path / "sae")
    common = ["--model=sae", f"--model.init_from={directory}", "--model.spliced_eval_contexts=0",
              "--data=lightning_sae.tensor_data.TensorDataModule", f"--data.path={tensor_file(tmp_path / 'x.safetensors')}",
              "--data.batch_size=64", "--data.validation_fraction=0.25", "--trainer.accelerator=cpu",
              f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false", "--trainer.enable_progress_bar=false",
              "--trainer.enable_model_summary=false"]
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        main(["fit", "--trainer.max_steps=1", *common])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("lightning-sae: error: ")]
    assert stop.value.code != 0 and "Traceback" not in err and len(lines) == 1, err[-2000:]
    assert "decoder row norms range from 0.5 to 2" in lines[0]
    # Evaluation never renormalises, so the saved SAE is evaluated as it is: the explained
    # variance on the held-out rows (the last quarter) is that of its own weights.
    main(["validate", *common])
    table = capsys.readouterr().out
    row = re.search(r"val/explained_variance\s*│\s*(\S+)", table)
    assert row, table
    x = data()[-128:]
    xhat = dense_reference(weights(sae), x, K)
    expected = 1 - ((x - xhat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert float(row.group(1)) == pytest.approx(expected.item(), rel=1e-4)
