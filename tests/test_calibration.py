"""lightning_sae.calibration: the JumpReLU threshold that keeps k latents per row on average,
computed in chunks, against a full sort of every pre-activation."""

from __future__ import annotations

import pytest
import torch

import lightning_sae.calibration as calibration
from lightning_sae.calibration import calibrate_threshold
from lightning_sae.sae import TopKSAE


def sorted_pre(sae: TopKSAE, rows: torch.Tensor) -> torch.Tensor:
    return torch.relu(rows @ sae.W_enc.T + sae.b_enc).detach().flatten().sort(descending=True).values


@pytest.mark.parametrize("chunk", [7, 64, 2048])
def test_the_chunked_threshold_is_the_nk_plus_first_largest_and_keeps_exactly_k_per_row(monkeypatch, chunk):
    monkeypatch.setattr(calibration, "CALIBRATION_CHUNK", chunk)
    sae = TopKSAE(16, 48, 5, seed=3).double()
    rows = torch.randn(301, 16, dtype=torch.float64) * torch.rand(301, 1, dtype=torch.float64) * 3  # the chunks' cutoffs differ
    result = calibrate_threshold(sae, rows, 5)
    pre = sorted_pre(sae, rows)
    # The threshold is the n*k + 1-th largest value and the n*k-th lies above it, so `pre > t`
    # keeps n*k. The reference's matmul and the chunks' addmm round differently, so the values
    # agree to float64 rounding, not bit for bit: compared with a tolerance far below their gaps.
    assert result["threshold"] == pytest.approx(float(pre[301 * 5]), rel=1e-12)
    assert float(pre[301 * 5 - 1]) > result["threshold"] * (1 + 1e-9)
    assert result["rows"] == 301 and result["k"] == 5


def test_fewer_positive_pre_activations_than_nk_leaves_every_positive_one_firing(monkeypatch):
    monkeypatch.setattr(calibration, "CALIBRATION_CHUNK", 4)
    sae = TopKSAE(8, 6, 5, seed=0)
    rows = torch.randn(10, 8)
    assert int((sorted_pre(sae, rows) > 0).sum()) < 10 * 5 + 1
    assert calibrate_threshold(sae, rows, 5)["threshold"] == 0.0


def test_no_rows_is_refused():
    with pytest.raises(ValueError, match="no rows"):
        calibrate_threshold(TopKSAE(8, 16, 2, seed=0), torch.zeros(0, 8), 2)
