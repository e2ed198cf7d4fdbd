"""g-SAE selection plugin (`gradient_topk`): exactness at beta = 0, the case it exists for,
normalisation, discovery through the registry and the CLI, and gradient caching end to end."""

from __future__ import annotations

import csv
import importlib.util
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from data_fixtures import _isolated_caches, save_model, tiny_root, write_text  # noqa: F401
from lightning_sae_gsae import GradientTopKSelector
from safetensors.torch import save_file

from lightning_sae.cli import main as cli_main
from lightning_sae.data import ActivationDataModule
from lightning_sae.data.cache import read_manifest
from lightning_sae.module import SAEModule
from lightning_sae.registry import create_selector
from lightning_sae.sae import TopKSAE


def _sorted_code(indices: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """topk(sorted=False) promises no order, so compare codes as sets: sort by latent index."""
    order = indices.argsort(dim=1)
    return indices.gather(1, order), values.gather(1, order)


@pytest.mark.parametrize("normalize", ["rms", "token", "none"])
def test_beta_zero_is_exactly_plain_topk(normalize: str) -> None:
    torch.manual_seed(0)
    x, grad = torch.randn(512, 32), 1e3 * torch.randn(512, 32)  # a large gradient must not leak in
    module = SAEModule(widths={"x": 32}, k=8, d_sae=256, seed=3)
    with torch.no_grad():
        module.sae.b_enc.normal_(0, 0.1)  # some exact zeros from relu, some near-ties
    results = {}
    for name, selector in {"topk": create_selector("topk"), "gsae": GradientTopKSelector(beta=0.0, normalize=normalize)}.items():
        xhat, code, pre = module.encode_decode("sae", x, selector, grad)
        results[name] = (xhat, *_sorted_code(code.indices, code.values), pre)
    (xhat_t, idx_t, val_t, pre_t), (xhat_g, idx_g, val_g, pre_g) = results["topk"], results["gsae"]
    assert torch.equal(pre_t, pre_g)
    assert torch.equal(GradientTopKSelector(beta=0.0, normalize=normalize).score(pre_g, module.sae, grad), pre_g)
    assert torch.equal(idx_t, idx_g)
    assert torch.equal(val_t, val_g)
    assert torch.equal(xhat_t, xhat_g)


def _orthonormal_sae(d_in: int, d_sae: int, k: int) -> TopKSAE:
    """Encoder = decoder = the first d_sae basis vectors, no biases: pre_i = x_i."""
    sae = TopKSAE(d_in, d_sae, k)
    with torch.no_grad():
        sae.W_dec.copy_(torch.eye(d_in)[:d_sae])
        sae.W_enc.copy_(sae.W_dec)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def test_small_but_consequential_latent_is_selected() -> None:
    # Latents 0 and 1 are large but the loss does not depend on their directions; latent 2 is
    # small but its direction is the loss gradient: ablating it changes the loss the most
    # (first order: pre_i * d_i . g = 0, 0, 0.3 * 5).
    sae = _orthonormal_sae(d_in=16, d_sae=8, k=2)
    x = torch.zeros(1, 16)
    x[0, :3] = torch.tensor([1.0, 0.8, 0.3])
    grad = torch.zeros(1, 16)
    grad[0, 2] = 5.0
    pre = sae.pre_activations(x)

    topk = create_selector("topk").select(pre, sae, grad)
    gsae = GradientTopKSelector(beta=1.0).select(pre, sae, grad)
    assert set(topk[0].tolist()) == {0, 1}
    assert set(gsae[0].tolist()) == {0, 2}  # score 0.3 * (1 + 1 * sqrt(16)) = 1.5 beats 0.8
    # The selected latents keep their encoder values, not their scores.
    values = sae.encode_selected(x, gsae, pre)
    assert torch.allclose(values, x[0, gsae[0]].unsqueeze(0))
    # Without a gradient (inference) the same weights fall back to plain TopK.
    assert set(GradientTopKSelector(beta=1.0).select(pre, sae, None)[0].tolist()) == {0, 1}


def test_normalisation_makes_beta_independent_of_gradient_scale() -> None:
    torch.manual_seed(1)
    sae = TopKSAE(32, 256, 8, seed=0)
    x, grad = torch.randn(256, 32), torch.randn(256, 32)
    pre = sae.pre_activations(x)
    for normalize in ("rms", "token"):
        selector = GradientTopKSelector(beta=0.5, normalize=normalize)
        small, large = selector.score(pre, sae, 1e-4 * grad), selector.score(pre, sae, 1e4 * grad)
        torch.testing.assert_close(small, large)
    raw = GradientTopKSelector(beta=0.5, normalize="none")
    assert not torch.allclose(raw.score(pre, sae, 1e-4 * grad), raw.score(pre, sae, 1e4 * grad))
    # An all-zero gradient is no gradient information: plain TopK, not NaN.
    assert torch.equal(GradientTopKSelector(beta=2.0).score(pre, sae, torch.zeros_like(grad)), pre)


def test_score_matches_the_spec_formula() -> None:
    torch.manual_seed(2)
    sae = TopKSAE(16, 64, 4, seed=1)
    x, grad = torch.randn(64, 16), torch.randn(64, 16)
    pre = sae.pre_activations(x)
    g = grad / grad.pow(2).mean().sqrt()
    expected = pre + 0.7 * pre * (g @ sae.W_dec.detach().T).abs()
    torch.testing.assert_close(GradientTopKSelector(beta=0.7).score(pre, sae, grad), expected)


def _exact_selection(selector: GradientTopKSelector, pre: torch.Tensor, sae: TopKSAE, grad: torch.Tensor) -> torch.Tensor:
    """The SPEC's rule computed the direct way: top-k of the full [N, M] score."""
    return selector.score(pre, sae, grad).topk(sae.k, dim=1).indices.sort(dim=1).values


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shortlist", ["off", "bf16", "auto"])
def test_blockwise_and_shortlisted_selection_equal_the_full_score(shortlist: str, dtype: torch.dtype) -> None:
    torch.manual_seed(4)
    sae = TopKSAE(64, 2048, 16, seed=2).to(dtype)
    x, grad = torch.randn(300, 64, dtype=dtype), torch.randn(300, 64, dtype=dtype)
    pre = sae.pre_activations(x)
    # 300 tokens in blocks of 128: the last block is partial.
    selector = GradientTopKSelector(beta=1.0, shortlist=shortlist, block_tokens=128)  # type: ignore[arg-type]
    selected = selector.select(pre, sae, grad).sort(dim=1).values
    assert torch.equal(selected, _exact_selection(selector, pre, sae, grad))


def test_shortlist_picks_by_exact_scores_where_bf16_would_misrank() -> None:
    # pre_i = x_i and d_i . g = g_i. Exact scores: latent 0: 1 * (1 + 1.0035) = 2.0035,
    # latent 1: 1.001 * (1 + 1) = 2.002, so latent 0 fires. bf16 rounds 1.0035 to 1.0 (its
    # spacing at 1 is 2^-7), which would rank latent 1 first.
    sae = _orthonormal_sae(d_in=16, d_sae=8, k=1)
    x = torch.zeros(1, 16)
    x[0, :2] = torch.tensor([1.0, 1.001])
    grad = torch.zeros(1, 16)
    grad[0, :2] = torch.tensor([1.0035, 1.0])
    pre = sae.pre_activations(x)
    selector = GradientTopKSelector(beta=1.0, normalize="none", shortlist="bf16")
    bf16_ranking = selector._blockwise_topk(pre, grad.bfloat16(), sae.W_dec.detach().bfloat16(), count=1)
    assert bf16_ranking.tolist() == [[1]]  # the shortlist alone would pick the wrong latent
    assert selector.select(pre, sae, grad).tolist() == [[0]]
    assert GradientTopKSelector(beta=1.0, normalize="none", shortlist="off").select(pre, sae, grad).tolist() == [[0]]


def test_invalid_arguments_are_rejected() -> None:
    for beta in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="beta"):
            GradientTopKSelector(beta=beta)
    with pytest.raises(ValueError, match="normalize"):
        GradientTopKSelector(normalize="l2")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="shortlist"):
        GradientTopKSelector(shortlist="fp8")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="block_tokens"):
        GradientTopKSelector(block_tokens=0)
    sae = TopKSAE(8, 16, 2)
    with pytest.raises(ValueError, match="grad must be"):
        GradientTopKSelector().score(torch.rand(4, 16), sae, torch.rand(4, 7))


def test_registered_and_asks_the_data_for_gradients() -> None:
    selector = create_selector("gradient_topk", beta=0.25, normalize="token")
    assert isinstance(selector, GradientTopKSelector)
    assert (selector.beta, selector.normalize) == (0.25, "token")
    module = SAEModule(widths={"x": 8}, k=2, d_sae=16, selector=selector)
    assert module.data_request().gradients
    assert module.validation_modes() == ["", "plain_topk"]
    assert module.hparams.selector == {
        "class_path": "lightning_sae_gsae.selector.GradientTopKSelector",
        "init_args": {"beta": 0.25, "normalize": "token", "shortlist": "auto", "block_tokens": 512},
    }


# ---- the CLI on a file of activations and gradients --------------------------------------------

def _write_activations(path: Path, rows: int = 2048, d_in: int = 16) -> None:
    generator = torch.Generator().manual_seed(0)
    save_file({"x": torch.randn(rows, d_in, generator=generator), "grad": torch.randn(rows, d_in, generator=generator)}, str(path))


def _logged_metrics(root: Path) -> dict[str, float]:
    """Last logged value of every metric in the CSVLogger files under `root`."""
    values: dict[str, float] = {}
    for file in sorted(root.rglob("metrics.csv")):
        with file.open() as handle:
            for row in csv.DictReader(handle):
                values.update({key: float(value) for key, value in row.items() if value not in ("", None)})
    return values


def _fit_args(tmp_path: Path, data: Path) -> list[str]:
    return [
        "fit",
        "--data=lightning_sae.tensor_data.TensorDataModule",
        f"--data.path={data}",
        "--data.batch_size=256",
        "--data.validation_fraction=0.125",
        "--trainer.max_steps=6",
        "--trainer.val_check_interval=3",
        "--trainer.accelerator=cpu",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.enable_checkpointing=false",
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
        f"--trainer.logger.save_dir={tmp_path / 'logs'}",
        f"--trainer.default_root_dir={tmp_path}",
    ]


def _saved_selector(logs: Path) -> tuple[str, dict]:
    """The selector as the CLI recorded it in the run's config.yaml."""
    config = yaml.safe_load(next(logs.rglob("config.yaml")).read_text())
    selector = config["model"]["init_args"]["selector"]
    return selector["class_path"], selector["init_args"]


def _assert_both_modes_logged(logs: Path) -> None:
    metrics = _logged_metrics(logs)
    for mode in ("val/", "val/plain_topk/"):
        for name in ("explained_variance", "l0", "dead_fraction"):
            assert mode + name in metrics, f"{mode + name} not logged; got {sorted(metrics)}"
    assert metrics["val/l0"] == pytest.approx(4.0, abs=0.5)


def test_cli_flags_select_gradient_topk(tmp_path: Path) -> None:
    data = tmp_path / "acts.safetensors"
    _write_activations(data)
    cli_main(_fit_args(tmp_path, data) + [
        "--model=sae",
        "--model.k=4",
        "--model.d_sae=64",
        "--model.selector=gradient_topk",
        "--model.selector.init_args.beta=0.5",
    ])
    _assert_both_modes_logged(tmp_path / "logs")
    assert _saved_selector(tmp_path / "logs") == ("lightning_sae.registered.gradient_topk", {"beta": 0.5, "normalize": "rms", "shortlist": "auto", "block_tokens": 512})


def test_cli_yaml_selects_gradient_topk(tmp_path: Path) -> None:
    data = tmp_path / "acts.safetensors"
    _write_activations(data)
    config = tmp_path / "gsae.yaml"
    config.write_text(
        "model:\n"
        "  class_path: sae\n"
        "  init_args:\n"
        "    k: 4\n"
        "    d_sae: 64\n"
        "    selector:\n"
        "      class_path: gradient_topk\n"
        "      init_args: {beta: 2.0, normalize: token}\n"
    )
    cli_main(_fit_args(tmp_path, data) + [f"--config={config}"])
    _assert_both_modes_logged(tmp_path / "logs")
    assert _saved_selector(tmp_path / "logs") == ("lightning_sae.registered.gradient_topk", {"beta": 2.0, "normalize": "token", "shortlist": "auto", "block_tokens": 512})


# ---- the ActivationDataModule caches gradients because the selector asks ---------------------

class _BatchKeys(L.Callback):
    """Records which keys the training batches carried."""

    def __init__(self) -> None:
        self.keys: set[str] = set()

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch: dict, batch_idx: int) -> None:
        self.keys.update(batch)


@pytest.mark.parametrize("selector", ["gradient_topk", "topk"])
def test_selecting_gradient_topk_makes_the_datamodule_cache_gradients(selector: str, tiny_root: Path, tmp_path: Path) -> None:
    # A tiny random Llama from a config (no hub), on a small local corpus; no setting but the
    # selector mentions gradients.
    data = ActivationDataModule(
        model=str(save_model("llama", tiny_root)), dataset=str(write_text(tiny_root)), cache_dir=str(tmp_path / "cache"),
        layer=1, context_size=16, num_tokens=16 * 24, shard_tokens=16 * 8, model_batch_size=4, batch_size=32,
        device="cpu", validation_fraction=0.2,
    )
    module = SAEModule(k=4, d_sae=64, selector=create_selector(selector))
    batches = _BatchKeys()
    trainer = L.Trainer(
        max_steps=2, val_check_interval=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[batches], default_root_dir=tmp_path,
    )
    trainer.fit(module, data)
    wants_gradients = selector == "gradient_topk"
    manifest = read_manifest(tmp_path / "cache")
    assert manifest["complete"] and bool(manifest["settings"]["gradients"]) is wants_gradients
    assert ("grad" in manifest["widths"]) is wants_gradients
    assert batches.keys == ({"x", "grad"} if wants_gradients else {"x"})
    # Validation splices the SAE into the language model in each mode: with gradient selection
    # (the evaluator computes dL/dx itself) and, for the g-SAE, with plain TopK on the same weights.
    for mode in ("val/", "val/plain_topk/"):
        for name in ("explained_variance", "l0", "dead_fraction", "ce_loss_score", "kl_div_score"):
            assert (mode + name in trainer.callback_metrics) is (mode == "val/" or wants_gradients), mode + name


def test_compare_tool_runs_on_a_tiny_model(tiny_root: Path, tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("compare_gsae", Path(__file__).parents[1] / "tools" / "compare_gsae.py")
    tool = importlib.util.module_from_spec(spec)
    sys.modules["compare_gsae"] = tool  # dataclasses look their module up there
    spec.loader.exec_module(tool)
    out = tmp_path / "table.md"
    runs = tool.main([
        "--model", str(save_model("llama", tiny_root)), "--dataset", str(write_text(tiny_root)), "--layer", "1",
        "--context-size", "16", "--num-tokens", str(16 * 40), "--validation-fraction", "0.2", "--device", "cpu",
        "--cache-dir", str(tmp_path / "cache"), "--k", "4", "--expansion-factor", "2", "--batch-size", "64",
        "--epochs", "2", "--beta", "0", "2", "--root", str(tmp_path / "runs"), "--out", str(out),
    ])
    table = out.read_text()
    rows = [line for line in table.splitlines() if line.startswith("| TopK") or line.startswith("| g-SAE")]
    assert len(rows) == 1 + 2 * 2  # TopK, and each g-SAE with gradient and with plain TopK selection
    assert "n/a" not in table
    topk, beta0 = runs[0].rows["TopK"], runs[1].rows["g-SAE beta=0 (gradient selection)"]
    # beta = 0 is plain TopK: identical training, so identical metrics.
    for name in ("explained_variance", "ce_loss_score", "l0"):
        assert beta0[name] == pytest.approx(topk[name], rel=1e-6, abs=1e-9)
