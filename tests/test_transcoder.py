"""The transcoder plugin (plugins/transcoder): its loss and gradients against a dense autograd
reference written here, its SAELens and sparsify exports read back by the real libraries, and a
short fit on a tiny Llama that validates against mlp_out and splices (read mlp_in, write
mlp_out) with the spliced CE checked against a splice that replaces the MLP module's forward."""

from __future__ import annotations

import json
from contextlib import contextmanager
from copy import deepcopy
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from data_fixtures import _isolated_caches, datamodule, save_model, tiny_root, write_text  # noqa: F401
from lightning_sae.calibration import calibrate_threshold
from lightning_sae.data.hooks import mlp_module
from lightning_sae.data_request import DataRequest, Hook, HookKind
from lightning_sae.formats import FormatCannotRunSelector
from lightning_sae.spliced import spliced_metrics
from lightning_sae_transcoder import (
    Transcoder,
    TranscoderModule,
    load_saelens_transcoder,
    load_sparsify_transcoder,
    save_saelens_transcoder,
    save_sparsify_transcoder,
)
from lightning_sae_transcoder.threshold import ThresholdRule

D_IN, D_SAE, K = 12, 48, 5


def random_transcoder(skip: bool, seed: int = 0, d_out: int = D_IN) -> Transcoder:
    """Every parameter random (the decoder starts at zero and the skip at zero otherwise)."""
    torch.manual_seed(seed)
    sae = Transcoder(D_IN, D_SAE, K, seed=seed, d_out=d_out, skip_connection=skip)
    with torch.no_grad():
        for parameter in sae.parameters():
            parameter.normal_(0, 0.4)
    return sae


def dense_reference(p: dict[str, Tensor], x: Tensor, y: Tensor, k: int, dead: Tensor, k_aux: int) -> tuple[Tensor, Tensor, Tensor]:
    """(yhat, FVU, AuxK) of a TopK transcoder written densely: no b_dec subtracted from the input,
    W_skip x added to the output, AuxK's dead latents regressing the detached residual y - yhat."""
    pre = torch.relu(x @ p["W_enc"].T + p["b_enc"])
    top = pre.topk(k, dim=1).indices
    z = torch.zeros_like(pre).scatter(1, top, pre.gather(1, top))
    yhat = z @ p["W_dec"] + p["b_dec"]
    if "W_skip" in p:
        yhat = yhat + x @ p["W_skip"].T
    fvu = ((y - yhat) ** 2).sum() / ((y - y.mean(0)) ** 2).sum()
    dead_pre = torch.where(dead, pre, torch.full_like(pre, -1.0))
    aux_top = dead_pre.topk(k_aux, dim=1).indices
    z_aux = torch.zeros_like(pre).scatter(1, aux_top, dead_pre.gather(1, aux_top).clamp_min(0))
    residual = (y - yhat).detach()
    residual_hat = z_aux @ p["W_dec"]
    aux = ((residual - residual_hat) ** 2).sum() / ((residual - residual.mean(0)) ** 2).sum()
    return yhat, fvu, min(float(dead.sum()) / k_aux, 1.0) * aux


@pytest.mark.parametrize("skip", [False, True])
def test_loss_and_gradients_match_a_dense_autograd_reference(skip):
    sae = random_transcoder(skip)
    x, y = torch.randn(64, D_IN), 3 * torch.randn(64, D_IN) + 1
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[::3] = True
    out = sae(x, y, dead_mask=dead, aux_k=6)
    (out.fvu + 0.5 * out.auxk_loss).backward()

    params = {name: p.detach().clone().requires_grad_(True) for name, p in sae.named_parameters() if not name.startswith("selector")}
    yhat, fvu, aux = dense_reference(params, x, y, K, dead, 6)
    (fvu + 0.5 * aux).backward()
    torch.testing.assert_close(out.xhat, yhat, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.fvu, fvu, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.auxk_loss, aux, rtol=1e-5, atol=1e-6)
    assert aux > 0 and ("W_skip" in params) == skip
    for name, parameter in sae.named_parameters():
        if not name.startswith("selector"):
            torch.testing.assert_close(parameter.grad, params[name].grad, rtol=1e-4, atol=1e-5, msg=name)
    assert sae.W_skip is None or sae.W_skip.grad.abs().sum() > 0


def test_a_transcoder_of_another_width_and_its_initialisation():
    sae = Transcoder(D_IN, D_SAE, K, seed=0, d_out=7, skip_connection=True)
    # sparsify's transcoder initialisation: decoder and skip start at zero, nothing is centred.
    assert sae.W_dec.shape == (D_SAE, 7) and sae.W_skip.shape == (7, D_IN) and not sae.centers_input
    assert not sae.W_dec.any() and not sae.W_skip.any()
    x = torch.randn(5, D_IN)
    torch.testing.assert_close(sae(x, torch.randn(5, 7)).xhat, sae.b_dec.expand(5, 7))
    with torch.no_grad():
        sae.W_dec.normal_()
    sae.normalize_decoder()  # free decoder rows: left as they are
    assert not torch.allclose(sae.W_dec.norm(dim=1), torch.ones(D_SAE))


def with_threshold(sae: Transcoder, threshold: float) -> Transcoder:
    """A copy of `sae` that selects by the JumpReLU rule pre > threshold (our side of the export)."""
    rule = ThresholdRule()
    rule.threshold = torch.full((sae.d_sae,), threshold)
    copied = deepcopy(sae)
    copied.selector = rule
    return copied


@pytest.mark.parametrize("skip", [False, True])
def test_saelens_export_loads_in_sae_lens_with_identical_outputs(skip, tmp_path):
    """SAELens has no TopK transcoder: the export is its JumpReLU (skip) transcoder with the
    threshold that keeps k latents per training row on average, and SAELens's forward equals the
    threshold rule's on our side, on rows it was not calibrated on."""
    from sae_lens import SAE, JumpReLUSkipTranscoder, JumpReLUTranscoder

    sae = random_transcoder(skip)
    training_rows, x = torch.randn(300, D_IN), torch.randn(32, D_IN)
    calibration = calibrate_threshold(sae, training_rows, K)
    # Independently: the threshold keeps exactly K per training row on average (a full sort).
    pre = torch.relu(training_rows @ sae.W_enc.T + sae.b_enc).detach().flatten().sort(descending=True).values
    assert calibration["threshold"] == pytest.approx(float(pre[300 * K]), rel=1e-6)
    assert int((pre > calibration["threshold"]).sum()) == 300 * K
    path = save_saelens_transcoder(sae, tmp_path / "sae", metadata={"hook_name": "blocks.1.ln2.hook_normalized",
                                                                     "hook_name_out": "blocks.1.hook_mlp_out"},
                                   calibration=calibration)
    loaded = SAE.load_from_disk(str(path))
    assert type(loaded) is (JumpReLUSkipTranscoder if skip else JumpReLUTranscoder)
    assert loaded.cfg.architecture() == sae.saelens_architecture()  # what SAEBench output names it
    assert loaded.cfg.d_out == D_IN and loaded.cfg.metadata.hook_name_out == "blocks.1.hook_mlp_out"
    assert loaded.cfg.metadata.k == K and loaded.cfg.metadata.training_architecture == "topk"
    ours = with_threshold(sae, calibration["threshold"]).eval()
    with torch.no_grad():
        theirs = loaded(x)
        expected = ours(x)
        torch.testing.assert_close(theirs, expected.xhat, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(loaded.encode(x), expected.code.to_dense(D_SAE), rtol=1e-5, atol=1e-6)
    back, metadata = load_saelens_transcoder(path)
    assert metadata["hook_name_out"] == "blocks.1.hook_mlp_out" and (back.W_skip is not None) == skip
    assert isinstance(back.selector, ThresholdRule) and back.k == K
    torch.testing.assert_close(back(x).xhat, expected.xhat, rtol=0, atol=0)
    # Read back, it is written again as the same file.
    again = save_saelens_transcoder(back, tmp_path / "again")
    torch.testing.assert_close(SAE.load_from_disk(str(again))(x), theirs, rtol=0, atol=0)


def test_saelens_export_without_a_calibrated_threshold_is_refused_in_one_line(tmp_path):
    with pytest.raises(FormatCannotRunSelector, match="SAELens has no TopK transcoder") as refused:
        save_saelens_transcoder(random_transcoder(True), tmp_path / "sae")
    assert "\n" not in str(refused.value) and not (tmp_path / "sae").exists()


def test_a_threshold_transcoder_is_not_written_as_a_sparsify_topk_one(tmp_path):
    rule = with_threshold(random_transcoder(True), 0.5)
    with pytest.raises(FormatCannotRunSelector, match="sparsify runs transcoders with TopK only, but selector ThresholdRule"):
        save_sparsify_transcoder(rule, tmp_path, "layers.1.mlp")
    assert not (tmp_path / "layers.1.mlp").exists()


@pytest.mark.parametrize("skip", [False, True])
def test_sparsify_export_loads_in_sparsify_with_identical_outputs(skip, tmp_path):
    from sparsify import SparseCoder

    sae = random_transcoder(skip)
    x, y = torch.randn(32, D_IN), torch.randn(32, D_IN)
    target = save_sparsify_transcoder(sae, tmp_path, "layers.1.mlp", {"model_name": "tiny"})
    loaded = SparseCoder.load_from_disk(target)
    assert loaded.cfg.transcode and loaded.cfg.skip_connection == skip
    theirs, ours = loaded(x, y), sae(x, y)
    torch.testing.assert_close(theirs.sae_out, ours.xhat, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(theirs.fvu, ours.fvu, rtol=1e-5, atol=1e-6)
    assert sorted(theirs.latent_indices[0].tolist()) == sorted(ours.code.indices[0].tolist())
    back, metadata = load_sparsify_transcoder(target)
    assert metadata == {"model_name": "tiny", "module": "layers.1.mlp"}
    torch.testing.assert_close(back(x).xhat, ours.xhat, rtol=0, atol=0)


def test_the_request_is_typed_and_reads_the_older_spelling():
    request = TranscoderModule(k=4, d_sae=32).data_request()
    assert request.reads == {"x": Hook.kind(HookKind.MLP_IN), "y": Hook.kind(HookKind.MLP_OUT)}
    assert request.roles == {"x": "mlp_in", "y": "mlp_out"} and not request.gradients
    older = DataRequest({"x": None, "y": "mlp_out", "z": "layers.2.mlp.down_proj"})
    assert older.reads == {"x": Hook.site(), "y": Hook.kind("mlp_out"), "z": Hook.point("layers.2.mlp.down_proj")}
    with pytest.raises(ValueError):
        Hook.kind("mlp_middle")
    with pytest.raises(ValueError):
        TranscoderModule(output="mlp_middle")


# ---- a fit on a tiny Llama ------------------------------------------------------------------------


@contextmanager
def mlp_replaced(mlp: torch.nn.Module, fn, keep: Tensor | None):
    """The MLP module's output replaced by fn(its input) by wrapping its forward (the library
    hooks instead), except at the `keep` positions [B, T], which keep the MLP's own output."""
    original = mlp.forward

    def forward(h):
        new = fn(h.reshape(-1, h.shape[-1])).reshape(*h.shape[:-1], -1)
        return new if keep is None else torch.where(keep[..., None], original(h), new)

    mlp.forward = forward
    try:
        yield
    finally:
        del mlp.forward


def reference_transcoder_splice(model, tokens: Tensor, layer: int, fn, bos: int) -> dict[str, float]:
    """SAELens's CE/KL conventions written out with torch's loss functions: BOS positions keep the
    clean MLP output and leave the means; zero ablation zeroes the MLP output everywhere."""
    mlp = mlp_module(model, layer)

    def log_probs(replace) -> Tensor:
        with torch.no_grad():
            if replace is None:
                return F.log_softmax(model(input_ids=tokens).logits.double(), -1)
            with mlp_replaced(mlp, *replace):
                return F.log_softmax(model(input_ids=tokens).logits.double(), -1)

    counted = tokens != bos
    clean = log_probs(None)
    spliced = log_probs((fn, tokens == bos))
    zero = log_probs((lambda rows: torch.zeros_like(rows), None))
    ce_rows, targets = counted[:, :-1], tokens[:, 1:][counted[:, :-1]]
    ce = {name: F.nll_loss(lp[:, :-1][ce_rows], targets).item() for name, lp in (("clean", clean), ("sae", spliced), ("zero", zero))}
    kl = {name: F.kl_div(lp[counted], clean[counted], log_target=True, reduction="batchmean").item() for name, lp in (("sae", spliced), ("zero", zero))}
    return {
        "ce_loss_without_sae": ce["clean"], "ce_loss_with_sae": ce["sae"], "ce_loss_with_ablation": ce["zero"],
        "ce_loss_score": (ce["zero"] - ce["sae"]) / (ce["zero"] - ce["clean"]),
        "kl_div_with_sae": kl["sae"], "kl_div_with_ablation": kl["zero"], "kl_div_score": (kl["zero"] - kl["sae"]) / kl["zero"],
    }


def test_spliced_metrics_read_one_hook_and_write_another(tiny_root):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(save_model("llama", tiny_root)).eval()
    with torch.no_grad():  # an MLP output that matters, so that the scores' denominators are far from rounding
        mlp_module(model, 1).down_proj.weight.mul_(30)
    tokens = torch.randint(3, 256, (4, 12))
    tokens[:, 0] = 1  # BOS
    mix = torch.randn(32, 32) * 0.3
    got = spliced_metrics(model, tokens, 1, "mlp_in", lambda x, grad: x @ mix, write="mlp_out", bos_token_id=1)
    expected = reference_transcoder_splice(model, tokens, 1, lambda rows: rows @ mix, bos=1)
    assert abs(expected["ce_loss_with_sae"] - expected["ce_loss_without_sae"]) > 1e-4  # the splice matters
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, rel=1e-4, abs=1e-6), name


def test_a_short_fit_validates_against_mlp_out_splices_and_exports(tiny_root, tmp_path):
    from sae_lens import SAE, JumpReLUSkipTranscoder
    from sparsify import SparseCoder

    model_dir, text = save_model("llama", tiny_root), write_text(tiny_root)
    dm = datamodule(model_dir, text, tmp_path / "cache", None, num_tokens=16 * 48)
    L.seed_everything(0)
    module = TranscoderModule(k=4, d_sae=64, skip_connection=True, lr=3e-3, dead_tokens=200, spliced_eval_contexts=4)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, max_epochs=2, default_root_dir=tmp_path / "run")
    trainer.fit(module, dm)
    sae = module.get_sae("sae")
    assert sae.W_dec.abs().sum() > 0 and sae.W_skip.abs().sum() > 0  # trained from their zero start
    assert dm.metadata["hookpoints"] == {"x": "layers.1.mlp_in", "y": "layers.1.mlp_out"}

    metrics = {name: float(value) for name, value in trainer.validate(module, dm, verbose=False)[0].items()}
    # Explained variance of mlp_out, recomputed from the validation batches in float64.
    xs, ys = zip(*((batch["x"], batch["y"]) for batch in dm.val_dataloader()))
    x, y = torch.cat(xs).double(), torch.cat(ys).double()
    with torch.no_grad():
        yhat = sae.double()(x).xhat
    sae.float()
    explained = 1 - ((y - yhat) ** 2).sum() / ((y - y.mean(0)) ** 2).sum()
    assert metrics["val/explained_variance"] == pytest.approx(float(explained), abs=1e-4)

    # The spliced CE: the MLP's output replaced by the transcoder's prediction from its input.
    language_model = dm.load_language_model()
    contexts = dm.validation_contexts(4)
    with torch.no_grad():
        expected = reference_transcoder_splice(language_model, contexts, 1, lambda rows: sae(rows).xhat, bos=1)
    assert expected["ce_loss_with_sae"] != pytest.approx(expected["ce_loss_without_sae"], rel=1e-4)
    for name in ("ce_loss_with_sae", "ce_loss_without_sae", "ce_loss_with_ablation", "kl_div_with_sae", "kl_div_with_ablation"):
        assert metrics[f"val/{name}"] == pytest.approx(expected[name], rel=1e-4, abs=1e-6), name

    from lightning_sae.evaluation import core_eval_output

    assert core_eval_output(module, "val/")["sae_cfg_dict"]["apply_b_dec_to_input"] is False

    # The fit's exports, read by the real libraries.
    root = Path(trainer.default_root_dir)
    loaded = SAE.load_from_disk(str(root / "sae"))
    assert isinstance(loaded, JumpReLUSkipTranscoder)
    assert loaded.cfg.metadata.hook_name == "blocks.1.ln2.hook_normalized"
    assert loaded.cfg.metadata.hook_name_out == "blocks.1.hook_mlp_out"
    cfg = json.loads((root / "sae" / "cfg.json").read_text())
    assert (cfg["metadata"]["hook"], cfg["metadata"]["layer"]) == ("mlp_in", 1)  # what it reads, not the DataModule's default
    sparse = SparseCoder.load_from_disk(root / "sparsify" / "layers.1.mlp")
    rows = x[:16].float()
    torch.testing.assert_close(sparse(rows).sae_out, sae(rows).xhat, rtol=1e-5, atol=1e-5)
    # SAELens runs the calibrated JumpReLU rule: the same outputs as that rule on our side, and on
    # the training rows it keeps k = 4 latents per row on average.
    threshold = float(loaded.threshold[0])
    assert bool((loaded.threshold == threshold).all()) and threshold > 0
    calibration = cfg["metadata"]["training_architecture_details"]["threshold_calibration"]
    assert calibration["threshold"] == pytest.approx(threshold) and calibration["k"] == 4
    training = torch.cat([batch["x"] for batch in dm.train_dataloader()])
    assert calibration["rows"] == training.shape[0]
    assert int((sae.pre_activations(training) > threshold).sum()) == pytest.approx(4 * training.shape[0], abs=1)
    with torch.no_grad():
        torch.testing.assert_close(loaded(rows), with_threshold(sae, threshold)(rows).xhat, rtol=1e-5, atol=1e-5)


def test_registered_and_yaml_config_parse():
    from lightning_sae.cli import SAECLI
    from lightning_sae.module import SAETrainingModule
    from lightning_sae.registry import VARIANTS, load_all_plugins, load_plugins

    load_all_plugins()
    assert load_plugins(VARIANTS)["transcoder"] is TranscoderModule
    config = Path(__file__).resolve().parents[1] / "configs/transcoder.yaml"
    cli = SAECLI(SAETrainingModule, L.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True, run=False,
                 args=["--config", str(config), "--trainer.logger=false"])
    assert isinstance(cli.model, TranscoderModule) and cli.model.hparams.skip_connection
    assert cli.model.data_request().roles == {"x": "mlp_in", "y": "mlp_out"}
