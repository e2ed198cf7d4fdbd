"""SAEBench's core metrics (docs/metrics.md) against an independent computation on a fixed batch:
numpy in float64, written per token with explicit loops where the library sums, so that a
wrong axis, a wrong aggregation or a mean of batch means would show."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_sae.evaluation import core_result
from lightning_sae.metrics import FeatureDensity, ReconstructionStats, density_metrics, latent_weight_metrics, max_cosine_similarity
from lightning_sae.sae import TopKSAE

D, M, K = 12, 40, 5
BATCHES = (37, 23, 64)  # unequal, so any mean of per-batch values would differ from the corpus value


def fixed_data() -> tuple[TopKSAE, list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    sae = TopKSAE(D, M, K, seed=1)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.3, generator=generator)
        sae.W_enc.add_(0.2 * torch.randn(M, D, generator=generator))  # encoder no longer the decoder's copy
    # Sparse combinations of the decoder's directions around a large shared offset (where variance
    # about zero and about the mean differ most), plus noise: a good but imperfect reconstruction.
    offset = 3.0 * torch.randn(D, generator=generator)
    with torch.no_grad():
        sae.b_dec.copy_(offset)
    batches = []
    for n in BATCHES:
        codes = torch.zeros(n, M).scatter(1, torch.rand(n, M, generator=generator).topk(K - 1).indices,
                                          1 + torch.rand(n, K - 1, generator=generator))
        batches.append(offset + codes @ sae.W_dec.detach() + 0.3 * torch.randn(n, D, generator=generator))
    return sae, batches


def reference(sae: TopKSAE, batches: list[torch.Tensor]) -> dict[str, float]:
    """Every metric from numpy arrays, token by token."""
    xs, xhats, zs, legacy = [], [], [], []
    W_enc, b_enc, W_dec, b_dec = (t.detach().double().numpy() for t in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec))
    for batch in batches:
        x = batch.double().numpy()
        pre = np.maximum((x - b_dec) @ W_enc.T + b_enc, 0)
        z = np.zeros_like(pre)
        for i, row in enumerate(pre):
            top = np.argsort(-row)[:K]
            z[i, top] = row[top]
        xhat = z @ W_dec + b_dec
        batch_mean = x.mean(0)
        for i in range(len(x)):  # SAEBench's legacy value: each token centred on its batch's mean
            legacy.append(1 - np.sum((x[i] - xhat[i]) ** 2) / np.sum((x[i] - batch_mean) ** 2))
        xs.append(x), xhats.append(xhat), zs.append(z)
    x, xhat, z = np.concatenate(xs), np.concatenate(xhats), np.concatenate(zs)
    n = len(x)
    error = np.array([np.sum((x[i] - xhat[i]) ** 2) for i in range(n)])
    variance = sum(np.var(x[:, d]) for d in range(D))  # sum_d Var(x_d), population variance
    norm_in, norm_out = np.linalg.norm(x, axis=1), np.linalg.norm(xhat, axis=1)
    return {
        "explained_variance": 1 - error.mean() / variance,
        "explained_variance_legacy": float(np.mean(legacy)),
        "fvu": error.mean() / variance,
        "mse": error.mean(),
        "mse_per_element": error.mean() / D,
        "cossim": float(np.mean([x[i] @ xhat[i] / (norm_in[i] * norm_out[i]) for i in range(n)])),
        "l2_norm_in": norm_in.mean(),
        "l2_norm_out": norm_out.mean(),
        "l2_ratio": float(np.mean(norm_out / norm_in)),
        "relative_reconstruction_bias": np.mean(norm_out**2) / np.mean(np.sum(x * xhat, axis=1)),
        "l0": float(np.mean((z != 0).sum(1))),
        "l1": float(np.mean(np.abs(z).sum(1))),
        "tokens": float(n),
        "density": (z != 0).mean(0),
    }


def accumulated(sae: TopKSAE, batches: list[torch.Tensor]) -> tuple[ReconstructionStats, FeatureDensity]:
    stats, density = ReconstructionStats(D), FeatureDensity(M)
    for batch in batches:
        code = sae.encode(batch)
        stats.update(batch, sae.decode(code).detach(), code.values)
        density.update(code.indices, code.values)
    return stats, density


def test_reconstruction_shrinkage_and_sparsity_match_numpy():
    sae, batches = fixed_data()
    expected = reference(sae, batches)
    stats, _ = accumulated(sae, batches)
    got = {name: value.item() for name, value in stats.compute().items()}
    assert set(got) == set(expected) - {"density"}
    for name, value in got.items():
        assert value == pytest.approx(expected[name], rel=1e-5, abs=1e-7), name
    # Not vacuous: an imperfect reconstruction that changes the activations' size.
    assert got["explained_variance"] < 0.99 and got["relative_reconstruction_bias"] != pytest.approx(1, abs=1e-3)
    assert got["l2_ratio"] != pytest.approx(1, abs=1e-3) and 0 < got["cossim"] < 0.999
    # The legacy value depends on the batching; the corrected one does not.
    whole, _ = accumulated(sae, [torch.cat(batches)])
    assert whole.compute()["explained_variance"].item() == pytest.approx(got["explained_variance"], rel=1e-9)
    assert whole.compute()["explained_variance_legacy"].item() != pytest.approx(got["explained_variance_legacy"], rel=1e-6)


def test_explained_variance_is_zero_for_the_mean_and_one_for_the_input():
    """The property SAELens PR 665 restored: predicting each dimension's mean explains nothing.
    With variance measured about zero (the bug) the mean would 'explain' most of it here."""
    _, batches = fixed_data()
    x = torch.cat(batches)
    for xhat, expected in ((x.mean(0).expand_as(x), 0.0), (x.clone(), 1.0)):
        stats = ReconstructionStats(D)
        stats.update(x, xhat, torch.ones(len(x), 1))
        assert stats.compute()["explained_variance"].item() == pytest.approx(expected, abs=1e-9)
    buggy_total = x.pow(2).sum(1).mean() - x.pow(2).mean(0).mean() ** 2  # SAEBench's current denominator
    residual = (x - x.mean(0)).pow(2).sum(1).mean()
    assert 1 - residual / buggy_total > 0.5


def test_legacy_skips_tokens_without_a_defined_value():
    stats = ReconstructionStats(3)
    x = torch.tensor([[1.0, 2.0, 3.0]])  # a one-row batch: the token is its batch's mean
    stats.update(x, x * 0.5, torch.ones(1, 1))
    two = torch.tensor([[0.0, 1.0, 0.0], [2.0, 1.0, 0.0]])
    stats.update(two, two * 0.5, torch.ones(2, 1))
    # Only the two-row batch defines it: each token is 1 from its mean, errors 0.25 and 1.25.
    assert stats.compute()["explained_variance_legacy"].item() == pytest.approx(1 - (0.25 + 1.25) / 2)


def test_l2_ratio_guards_near_zero_inputs_as_saelens_does():
    stats = ReconstructionStats(2)
    x = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    xhat = torch.tensor([[0.6, 0.8], [0.0, 2.5]])
    stats.update(x, xhat, torch.ones(2, 1))
    assert stats.compute()["l2_ratio"].item() == pytest.approx((1.0 / 1 + 2.5 / 5) / 2)


def test_density_and_misc_metrics_match_numpy():
    sae, batches = fixed_data()
    expected = reference(sae, batches)["density"]
    _, density = accumulated(sae, batches)
    got = density.compute()
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12)
    misc = {name: value.item() for name, value in density_metrics(got).items()}
    assert misc["frac_alive"] == pytest.approx(np.count_nonzero(expected) / M)
    for name, threshold in (("1_percent", 0.01), ("10_percent", 0.1)):
        assert misc[f"freq_over_{name}"] == pytest.approx(sum(d > threshold for d in expected) / M)
        assert misc[f"normalized_freq_over_{name}"] == pytest.approx(sum(d for d in expected if d > threshold) / expected.sum())
    assert 0 < misc["freq_over_10_percent"] < misc["freq_over_1_percent"] <= misc["frac_alive"] < 1
    assert density_metrics(torch.zeros(4))["normalized_freq_over_1_percent"].item() == 0


def test_weight_metrics_match_numpy_and_never_compare_a_latent_with_itself():
    sae, _ = fixed_data()
    W_enc, W_dec = sae.W_enc.detach().double().numpy(), sae.W_dec.detach().double().numpy()

    def max_other_cosine(rows: np.ndarray) -> np.ndarray:
        unit = rows / np.linalg.norm(rows, axis=1, keepdims=True)
        return np.array([max(unit[i] @ unit[j] for j in range(len(unit)) if j != i) for i in range(len(unit))])

    got = latent_weight_metrics(sae.W_enc.detach(), sae.b_enc.detach(), sae.W_dec.detach())
    np.testing.assert_allclose(got["max_encoder_cosine_sim"].numpy(), max_other_cosine(W_enc), rtol=1e-5)
    np.testing.assert_allclose(got["max_decoder_cosine_sim"].numpy(), max_other_cosine(W_dec), rtol=1e-5)
    np.testing.assert_allclose(got["encoder_norm"].numpy(), np.linalg.norm(W_enc, axis=1), rtol=1e-6)
    cos = np.sum(W_enc * W_dec, 1) / (np.linalg.norm(W_enc, axis=1) * np.linalg.norm(W_dec, axis=1))
    np.testing.assert_allclose(got["encoder_decoder_cosine_sim"].numpy(), cos, rtol=1e-5)
    # Blocks of one row at a time give the same; a duplicated direction has cosine 1 with its twin.
    np.testing.assert_allclose(max_cosine_similarity(sae.W_dec.detach(), max_elements=1).numpy(), max_other_cosine(W_dec), rtol=1e-5)
    twins = torch.cat([sae.W_dec.detach()[:3], sae.W_dec.detach()[:1]])
    assert max_cosine_similarity(twins)[0].item() == pytest.approx(1.0)


def test_core_result_puts_it_together():
    sae, batches = fixed_data()
    expected = reference(sae, batches)
    stats, density = accumulated(sae, batches)
    result = core_result("sae", "", stats, density.compute(), sae)
    assert result.metrics["total_tokens_eval_sparsity_variance"] == sum(BATCHES)
    assert "total_tokens_eval_sparsity_variance" not in result.logged()
    assert result.metrics["l2_ratio"] == pytest.approx(expected["l2_ratio"], rel=1e-6)
    assert result.metrics["average_max_decoder_cosine_sim"] == pytest.approx(result.latents["max_decoder_cosine_sim"].mean().item())
    assert result.latents["feature_density"].shape == (M,)
