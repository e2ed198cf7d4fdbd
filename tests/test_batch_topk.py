"""The batch_topk plugin (BatchTopK, Bussmann et al. 2024): batch-level selection in training
against an independent implementation and dense autograd, its threshold statistic, the
threshold rule in evaluation, checkpoint/resume, and SAELens's format in both directions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lightning_sae import TopKSAE
from lightning_sae.cli import main
from lightning_sae.export_cli import main as export_main
from lightning_sae.formats import FormatCannotRunSelector, load_sae, save_saelens, save_sparsify
from lightning_sae.module import SAEModule
from tests.helpers import checkpointed_fit_args
from data_fixtures import _isolated_caches, tiny_root  # noqa: F401

lightning_sae_batch_topk = pytest.importorskip("lightning_sae_batch_topk")
BatchTopK = lightning_sae_batch_topk.BatchTopK

REPO = Path(__file__).resolve().parents[1]
DDP_SCRIPT = Path(__file__).with_name("ddp_batch_topk.py")


def reference_batch_mask(pre: torch.Tensor, k: int) -> torch.Tensor:
    """The N*k largest positive entries of the batch, by a full descending sort (not topk)."""
    flat = pre.flatten()
    order = torch.argsort(flat, descending=True, stable=True)[: pre.shape[0] * k]
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[order] = True
    return (mask & (flat > 0)).reshape(pre.shape)


def selection_mask(selection, shape) -> torch.Tensor:
    tokens = torch.repeat_interleave(torch.arange(shape[0]), selection.offsets.diff())
    mask = torch.zeros(shape, dtype=torch.bool)
    mask[tokens, selection.indices] = True
    assert int(mask.sum()) == selection.indices.numel(), "a latent was selected twice on one token"
    return mask


def random_sae(d_in: int = 16, d_sae: int = 96, k: int = 4, seed: int = 0) -> TopKSAE:
    sae = TopKSAE(d_in, d_sae, k, seed=seed, selector=BatchTopK())
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.5, generator=torch.Generator().manual_seed(seed))
        sae.b_dec.normal_(0, 0.1, generator=torch.Generator().manual_seed(seed + 1))
    return sae


@pytest.mark.parametrize("zeros, dominant", [(0.0, False), (0.97, False), (0.0, True)],
                         ids=["dense", "fewer_positive_than_nk", "one_token_takes_most"])
def test_training_keeps_the_n_k_largest_of_the_batch(zeros, dominant):
    generator = torch.Generator().manual_seed(1)
    pre = torch.rand(64, 200, generator=generator)
    pre[torch.rand(pre.shape, generator=generator) < zeros] = 0  # relu'd: many exact zeros
    if dominant:  # token 3 holds more of the batch's top N*k than the per-token candidates
        pre[3] += 10
    selector = BatchTopK().train()
    sae = TopKSAE(8, 200, 5)
    selection = selector.select(pre, sae, None)
    assert selection.offsets[0] == 0 and selection.offsets[-1] == selection.indices.numel()
    assert bool((selection.offsets.diff() >= 0).all())
    mask = selection_mask(selection, pre.shape)
    expected = reference_batch_mask(pre, 5)
    assert torch.equal(mask, expected)
    assert int(mask.sum()) == min(64 * 5, int((pre > 0).sum()))
    if dominant:
        assert int(mask[3].sum()) == 200
    _, smallest = lightning_sae_batch_topk.batch_topk(pre, 5)
    assert float(smallest) == float(pre[expected].min())
    if zeros == 0.0:
        assert int(mask.sum()) == 64 * 5
        per_token = mask.sum(1)
        assert per_token.min() != per_token.max(), "tokens should keep different numbers of latents"


@pytest.mark.parametrize("k, width", [(1, 50), (4, 200), (16, 40), (30, 50)])
def test_the_selection_is_exact_on_rows_of_very_different_scales(k, width):
    """Language-model rows differ in scale by orders of magnitude (BOS): a few tokens then hold
    far more than their share of the batch's top N*k, beyond their own per-token candidates."""
    generator = torch.Generator().manual_seed(k)
    scale = torch.exp(2 * torch.randn(96, 1, generator=generator))
    scale[::17] *= 50
    pre = (torch.randn(96, width, generator=generator) * scale).relu_()
    selection, smallest = lightning_sae_batch_topk.batch_topk(pre, k)
    expected = reference_batch_mask(pre, k)
    assert torch.equal(selection_mask(selection, pre.shape), expected)
    assert float(smallest) == float(pre[expected].min())
    # The case this is about: some token keeps more than its 2k candidates (where it can).
    assert int(expected.sum(1).max()) > 2 * k or 2 * k >= int((pre > 0).sum(1).max())


def test_forward_and_backward_match_dense_autograd():
    sae = random_sae().train()
    x = torch.randn(48, 16, generator=torch.Generator().manual_seed(2))
    target = torch.randn(48, 16, generator=torch.Generator().manual_seed(3))
    out = sae(x, target)
    out.fvu.backward()

    W_enc, b_enc, W_dec, b_dec = (p.detach().clone().requires_grad_() for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec))
    pre = torch.relu((x - b_dec) @ W_enc.T + b_enc)
    z = pre * reference_batch_mask(pre.detach(), sae.k)
    xhat = z @ W_dec + b_dec
    fvu = (target - xhat).pow(2).sum() / (target - target.mean(0)).pow(2).sum()
    fvu.backward()

    torch.testing.assert_close(out.xhat, xhat, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.fvu, fvu, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(sae.dense_latents(out.code), z, atol=1e-5, rtol=1e-5)
    for name, reference in (("W_enc", W_enc), ("b_enc", b_enc), ("W_dec", W_dec), ("b_dec", b_dec)):
        torch.testing.assert_close(getattr(sae, name).grad, reference.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_threshold_is_a_bias_corrected_moving_average_of_the_smallest_kept_activation():
    sae = random_sae(k=3).train()
    lr = sae.selector.threshold_lr
    average = torch.zeros((), dtype=torch.float64)  # SAELens's topk_threshold, started at 0
    for step in range(5):
        x = torch.randn(32, 16, generator=torch.Generator().manual_seed(10 + step)) * (1 + step)
        pre = sae.pre_activations(x)
        smallest = pre.flatten().sort(descending=True).values[32 * 3 - 1].double()
        average = (1 - lr) * average + lr * smallest
        expected = average / (1 - (1 - lr) ** (step + 1))
        sae(x)
        torch.testing.assert_close(sae.selector.threshold, expected, rtol=1e-12, atol=0)
        if step == 0:  # one batch: the corrected average is that batch's cutoff
            torch.testing.assert_close(sae.selector.threshold, smallest, rtol=1e-12, atol=0)
    assert int(sae.selector.threshold_updates) == 5
    sae.eval()
    sae(torch.randn(32, 16))  # evaluation reads the threshold, never moves it
    torch.testing.assert_close(sae.selector.threshold, expected, rtol=1e-12, atol=0)


def test_evaluation_selects_by_the_threshold_not_the_batch():
    sae = random_sae().train()
    x = torch.randn(40, 16, generator=torch.Generator().manual_seed(4))
    trained = sae.encode(x)
    threshold = float(sae.selector.threshold)
    sae.eval()
    evaluated = sae.encode(x * 1.5)  # a batch of larger activations: more of it clears the threshold
    pre = sae.pre_activations(x * 1.5)
    assert torch.equal(selection_mask(evaluated, pre.shape), pre > threshold)
    assert evaluated.indices.numel() > 40 * sae.k == trained.indices.numel()
    # One token alone gets the same latents as inside its batch: no batch dependence.
    alone = sae.encode(x[:1] * 1.5)
    assert torch.equal(alone.indices, evaluated.indices[: int(evaluated.offsets[1])])


def test_saelens_loads_our_export_with_the_same_outputs(tmp_path):
    sae_lens = pytest.importorskip("sae_lens")
    sae = random_sae()
    sae(torch.randn(64, 16, generator=torch.Generator().manual_seed(5)))  # estimate a threshold
    sae.eval()
    save_saelens(sae, tmp_path / "sae", metadata={"hook_name": "blocks.0.hook_resid_post"})
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu" and cfg["metadata"]["training_architecture"] == "batchtopk"
    assert sae.saelens_architecture() == "jumprelu"  # what SAEBench output names it
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path / "sae"), device="cpu")
    assert type(theirs).__name__ == "JumpReLUSAE"
    torch.testing.assert_close(theirs.threshold, sae.selector.threshold.float().expand(sae.d_sae))
    x = torch.randn(50, 16, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        latents = theirs.encode(x)
        ours = sae(x)
        assert torch.equal(latents > 0, sae.dense_latents(ours.code) > 0)
        torch.testing.assert_close(latents, sae.dense_latents(ours.code), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(theirs.decode(latents), ours.xhat, atol=1e-5, rtol=1e-5)

    loaded, metadata = load_sae(tmp_path / "sae")
    assert isinstance(loaded.selector, BatchTopK) and loaded.k == sae.k
    assert metadata["hook_name"] == "blocks.0.hook_resid_post"
    torch.testing.assert_close(loaded.selector.threshold, sae.selector.threshold.float().double())
    torch.testing.assert_close(loaded.eval()(x).xhat, ours.xhat)


def test_we_load_saelens_own_batchtopk_export(tmp_path):
    pytest.importorskip("sae_lens")
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig

    theirs = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=16, d_sae=64, k=6, rescale_acts_by_decoder_norm=False))
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for parameter in (theirs.W_enc, theirs.b_enc, theirs.b_dec):
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
        theirs.W_dec.copy_(torch.nn.functional.normalize(torch.randn(64, 16, generator=generator), dim=1))
        theirs.topk_threshold.fill_(0.8)
    theirs.save_inference_model(tmp_path / "theirs")

    ours, _ = load_sae(tmp_path / "theirs")
    assert isinstance(ours.selector, BatchTopK) and ours.k == 6 and float(ours.selector.threshold) == pytest.approx(0.8)
    from sae_lens import SAE

    inference = SAE.load_from_disk(str(tmp_path / "theirs"), device="cpu")
    x = torch.randn(30, 16, generator=generator)
    with torch.no_grad():
        out = ours.eval()(x)
        torch.testing.assert_close(ours.dense_latents(out.code), inference.encode(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.xhat, inference.decode(inference.encode(x)), atol=1e-5, rtol=1e-5)


def test_a_jumprelu_sae_not_trained_as_batchtopk_goes_to_the_jumprelu_plugin(tmp_path):
    """Both plugins read SAELens's "jumprelu"; the metadata decides. BatchTopK itself still refuses
    a file it did not train, and the loader then asks the JumpReLU plugin, which reads it."""
    sae = random_sae()
    save_saelens(sae, tmp_path / "sae")
    cfg_path = tmp_path / "sae" / "cfg.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["metadata"]["training_architecture"] = "jumprelu"
    cfg.pop("selector", None)
    cfg["metadata"].pop("selector", None)
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="not trained as BatchTopK"):
        BatchTopK.from_saelens(cfg, {"threshold": torch.full((sae.d_sae,), 0.5)})
    loaded, _ = load_sae(tmp_path / "sae")
    assert type(loaded.selector).__name__ == "JumpReLU"


# ---- through the training module and the CLI ------------------------------------------------------


def fit_args(data: Path, root: Path, *extra: str) -> list[str]:
    return checkpointed_fit_args(data, root, "--model.dead_tokens=300", "--model.selector=batch_topk",
                                 "--model.selector.threshold_lr=0.2", *extra)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 3-epoch BatchTopK fit through the CLI (7 steps an epoch, a checkpoint every 5 steps)."""
    root = tmp_path_factory.mktemp("batch_topk_fit")
    data = root / "x.safetensors"
    save_file({"x": torch.randn(520, 16, generator=torch.Generator().manual_seed(0))}, str(data))
    cwd = os.getcwd()
    os.chdir(root)  # the SAE a fit without a logger exports goes to the working directory
    try:
        cli = main(fit_args(data, root))
    finally:
        os.chdir(cwd)
    return cli, data, root


def test_cli_fit_records_the_selector_and_its_threshold(trained):
    cli, _, root = trained
    selector = cli.model.sae.selector
    assert isinstance(selector, BatchTopK) and selector.threshold_lr == 0.2
    assert int(selector.threshold_updates) == cli.trainer.global_step == 21
    assert float(selector.threshold) > 0
    assert cli.model.hparams["selector"] == {
        "class_path": "lightning_sae_batch_topk.selector.BatchTopK", "init_args": {"threshold_lr": 0.2}
    }
    checkpoint = torch.load(root / "ckpt" / "epoch=2-step=20.ckpt", weights_only=True)
    assert {"sae.selector.threshold", "sae.selector.threshold_updates"} <= set(checkpoint["state_dict"])
    reloaded = SAEModule.load_from_checkpoint(root / "ckpt" / "epoch=2-step=20.ckpt")
    assert isinstance(reloaded.sae.selector, BatchTopK) and reloaded.sae.selector.threshold_lr == 0.2
    assert int(reloaded.sae.selector.threshold_updates) == 20
    assert float(reloaded.sae.selector.threshold) > 0


def test_resuming_continues_the_threshold_exactly(trained, tmp_path):
    cli, data, root = trained
    resumed = main(fit_args(data, tmp_path, f"--ckpt_path={root / 'ckpt' / 'epoch=1-step=10.ckpt'}"))
    for name in ("threshold", "threshold_updates"):
        assert torch.equal(getattr(resumed.model.sae.selector, name), getattr(cli.model.sae.selector, name)), name
    assert torch.equal(resumed.model.sae.W_enc, cli.model.sae.W_enc)


def test_validation_uses_the_threshold(trained):
    cli, _, _ = trained
    module = cli.model
    validation = cli.datamodule.val_dataloader()
    x = torch.cat([batch["x"] for batch in validation])
    pre = module.sae.pre_activations(x)
    expected_l0 = float((pre > float(module.sae.selector.threshold)).sum(1).float().mean())
    metrics = cli.trainer.validate(module, cli.datamodule, verbose=False)[0]
    assert metrics["val/l0"] == pytest.approx(expected_l0, rel=1e-5)
    assert metrics["val/l0"] != pytest.approx(module.hparams.k, abs=1e-3)  # not the training rule's k per token


def test_fit_exports_saelens_with_its_threshold_and_refuses_sparsify(trained, tmp_path):
    cli, _, root = trained
    exported = root / "sae"  # a fit without a logger exports into the working directory
    loaded, _ = load_sae(exported)
    assert isinstance(loaded.selector, BatchTopK)
    torch.testing.assert_close(loaded.selector.threshold, cli.model.sae.selector.threshold.float().double())
    # sparsify can only run TopK: the SAE is not written there as one.
    # The CLI built the selector from its registry alias (lightning_sae.registered.batch_topk);
    # messages still name the class.
    assert type(cli.model.sae.selector).__module__ == "lightning_sae.registered"
    with pytest.raises(FormatCannotRunSelector, match="sparsify runs SAEs with TopK only, but this SAE's selector BatchTopK "):
        save_sparsify(cli.model.sae, tmp_path / "sparsify", "layers.0")
    assert not (tmp_path / "sparsify" / "layers.0").exists()
    # The export command rebuilds the selector from a checkpoint's hyper-parameters and state.
    assert export_main([str(root / "ckpt" / "epoch=2-step=20.ckpt"), str(tmp_path / "from_ckpt"), "--format=saelens"]) == 0
    from_ckpt, _ = load_sae(tmp_path / "from_ckpt")
    assert isinstance(from_ckpt.selector, BatchTopK) and float(from_ckpt.selector.threshold) > 0
    # init_from a BatchTopK export brings its selector along.
    module = SAEModule(init_from=str(exported), widths={"x": 16})
    assert isinstance(module.sae.selector, BatchTopK)
    assert torch.equal(module.sae.selector.threshold, loaded.selector.threshold)


# ---- DDP ----------------------------------------------------------------------------------------


def test_threshold_statistic_is_reduced_across_two_gloo_processes(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(DDP_SCRIPT), str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert results[0]["thresholds"] == results[1]["thresholds"], "the ranks disagree"

    # Independently: each rank's smallest kept activation (a sort of its own batch), averaged
    # over the ranks that kept any, then the moving average.
    lr, average = 0.3, 0.0
    for step in range(4):
        minima = []
        for rank in range(2):
            pre = torch.load(tmp_path / f"pre_{rank}_{step}.pt", weights_only=True)
            positive = pre.flatten().sort(descending=True).values[: pre.shape[0] * 3]
            positive = positive[positive > 0]
            if positive.numel():
                minima.append(float(positive.min()))
        assert minima
        average = (1 - lr) * average + lr * sum(minima) / len(minima)
        expected = average / (1 - (1 - lr) ** (step + 1))
        assert results[0]["thresholds"][step] == pytest.approx(expected, rel=1e-6), step
    assert results[0]["updates"] == 4


# ---- on a tiny language model, through the CLI to the exports --------------------------------------


def test_a_cli_fit_on_a_language_model_exports_a_threshold_that_keeps_k(tiny_root, tmp_path):  # noqa: F811
    """A few hundred BatchTopK steps on a tiny random Llama through `lightning-sae fit`, to the end
    of the fit's exports: SAELens gets the inference threshold, whose L0 on held-out rows is
    within 10% of k; sparsify, which runs TopK only, is refused in one line."""
    from data_fixtures import save_model, write_text

    k = 8
    cli = main([
        "fit", "--seed_everything=0", "--model=sae", f"--model.k={k}", "--model.d_sae=128", "--model.selector=batch_topk",
        "--model.lr=3e-3", "--model.dead_tokens=2000", "--model.spliced_eval_contexts=2",
        "--data=lightning_sae.data.ActivationDataModule", f"--data.model={save_model('llama', tiny_root)}",
        f"--data.dataset={write_text(tiny_root)}", "--data.layer=1", "--data.context_size=16",
        f"--data.num_tokens={16 * 80}", "--data.batch_size=32", "--data.validation_fraction=0.1", "--data.model_dtype=float32",
        "--trainer.max_epochs=8", "--trainer.check_val_every_n_epoch=8", "--trainer.accelerator=cpu",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", f"--trainer.default_root_dir={tmp_path}",
    ])
    assert cli.trainer.global_step >= 250
    log_dir = Path(cli.trainer.log_dir)
    exported, metadata = load_sae(log_dir / "sae")
    assert isinstance(exported.selector, BatchTopK) and metadata["hookpoint"] == "layers.1"
    assert not (log_dir / "sparsify").exists()
    held_out = torch.cat([batch["x"] for batch in cli.datamodule.val_dataloader()])
    pre = exported.pre_activations(held_out)
    l0 = float((pre > float(exported.selector.threshold)).sum(1).float().mean())
    print(f"held-out L0 {l0:.2f} with k = {k} after {cli.trainer.global_step} steps")
    assert abs(l0 - k) <= 0.1 * k, l0
