"""The core metric set against SAELens's own `run_evals` (everything on), metric by metric, on a
tiny GPT-2 built twice (transformers for us, TransformerLens for SAELens: see
test_saelens_conventions.py, whose models, SAE and token batches this reuses) and our SAE saved
in SAELens's format and loaded with `sae_lens.SAE.load_from_disk`.

Our validation sees the cache's rows: the activations at non-BOS positions, in batches. Here each
of SAELens's token batches is one of our validation batches, so even the batch-dependent
`explained_variance_legacy` must agree. `relative_reconstruction_bias` is the one documented
difference: SAELens averages one ratio per batch, we take one ratio over all tokens.
"""

from __future__ import annotations

import pytest
import torch

import test_saelens_conventions as conventions
from lightning_sae.data.hooks import ActivationRecorder
from lightning_sae.evaluation import CORE_GROUPS, core_result
from lightning_sae.metrics import FeatureDensity, ReconstructionStats
from lightning_sae.spliced import spliced_metrics

sae_lens_evals = pytest.importorskip("sae_lens.evals", reason="sae_lens is not installed")
from sae_lens.training.activation_scaler import ActivationScaler  # noqa: E402

BOS, D, KIND = conventions.BOS, conventions.D, "resid_post"


class RestartableBatches(conventions.TokenBatches):
    """What run_evals asks of an ActivationsStore: token batches, restarted between its passes."""

    context_size = conventions.CONTEXT
    store_batch_size_prompts = 3

    def __init__(self) -> None:
        super().__init__(conventions.batches())

    def reset_input_dataset(self) -> None:
        self.__init__()


def saelens_run_evals(sae, tl, tmp_path, n_batches: int = 2) -> tuple[dict, dict]:
    config = sae_lens_evals.get_eval_everything_config(batch_size_prompts=3, n_eval_reconstruction_batches=n_batches,
                                                       n_eval_sparsity_variance_batches=n_batches)
    with torch.no_grad():
        return sae_lens_evals.run_evals(conventions.saelens_sae(sae, KIND, tmp_path), RestartableBatches(), tl,
                                        ActivationScaler(), config, exclude_special_tokens=[BOS])


def ours(hf, sae, n_batches: int = 2) -> tuple[dict[str, float], torch.Tensor, list[float]]:
    """Our validation's metrics, one update per token batch of rows at non-BOS positions; also the
    feature density and each batch's own relative_reconstruction_bias."""
    stats, density, per_batch_bias = ReconstructionStats(D), FeatureDensity(sae.d_sae), []
    for tokens in conventions.batches()[:n_batches]:
        with torch.no_grad(), ActivationRecorder(hf, 1, [KIND]) as recorder:
            hf(input_ids=tokens)
        x = recorder.values[KIND][tokens != BOS].float()
        code = sae.encode(x)
        xhat = sae.decode(code).detach()
        stats.update(x, xhat, code.values)
        density.update(code.indices, code.values)
        alone = ReconstructionStats(D)
        alone.update(x, xhat, code.values)
        per_batch_bias.append(alone.compute()["relative_reconstruction_bias"].item())
    result = core_result("sae", "", stats, density.compute(), sae)
    contexts = torch.cat(conventions.batches()[:n_batches])
    result.metrics.update(spliced_metrics(hf, contexts, 1, KIND, lambda x, grad: sae(x).xhat, bos_token_id=BOS))
    return result.metrics, result.latents, per_batch_bias


def test_every_saelens_core_metric_matches(tmp_path):
    hf, tl = conventions.twin_models()
    sae = conventions.random_sae()
    theirs, features = saelens_run_evals(sae, tl, tmp_path)
    got, latents, per_batch_bias = ours(hf, sae)
    compared = 0
    for group, values in theirs.items():
        if group == "token_stats":  # SAELens counts every position it was given, BOS included
            continue
        assert set(values) <= set(CORE_GROUPS[group]), (group, set(values) - set(CORE_GROUPS[group]))
        for name, value in values.items():
            if name == "relative_reconstruction_bias":
                # SAELens: the mean of each batch's ratio. Ours: one ratio over all tokens.
                assert value == pytest.approx(sum(per_batch_bias) / len(per_batch_bias), rel=1e-4)
                assert got[name] != pytest.approx(value, rel=1e-4)
                continue
            assert got[name] == pytest.approx(value, rel=2e-4, abs=1e-6), (group, name)
            compared += 1
    assert compared == 16  # 3 KL, 4 CE, 4 reconstruction, 3 shrinkage (and the bias above), 2 sparsity
    torch.testing.assert_close(latents["feature_density"], torch.tensor(features["feature_density"], dtype=torch.float64),
                               rtol=1e-6, atol=1e-9)
    for name in ("encoder_norm", "encoder_bias", "encoder_decoder_cosine_sim"):
        torch.testing.assert_close(latents[name], torch.tensor(features[name]), rtol=1e-5, atol=1e-6, msg=name)
    # Not vacuous: the SAE is far from perfect and some latents are dead, some frequent.
    assert got["explained_variance"] < 0.95 and 0 < got["frac_alive"] < 1 and got["freq_over_10_percent"] > 0


def test_relative_reconstruction_bias_matches_on_one_batch(tmp_path):
    hf, tl = conventions.twin_models()
    sae = conventions.random_sae()
    theirs, _ = saelens_run_evals(sae, tl, tmp_path, n_batches=1)
    got, _, _ = ours(hf, sae, n_batches=1)
    assert got["relative_reconstruction_bias"] == pytest.approx(theirs["shrinkage"]["relative_reconstruction_bias"], rel=1e-4)
