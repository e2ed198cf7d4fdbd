"""Cross-layer transcoder (plugins/clt): the function, loss and gradients against a dense autograd
CLT written here; one layer against the per-layer transcoder; a CLI fit on a tiny Llama with the
replacement model's scores against an independent splice; a fit killed with SIGKILL resumes to
the same weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from data_fixtures import save_model, write_text
from helpers import fit_in_subprocess, sigkill_at_checkpoint
from lightning_sae_clt import CLTModule, CrossLayerTranscoder
from lightning_sae_clt.replacement import CLTReplacement, replacement_scores
from lightning_sae_transcoder import Transcoder
from torch import Tensor

from lightning_sae.cli import main
from lightning_sae.data.hooks import mlp_module

REPO = Path(__file__).resolve().parents[1]


def random_clt(n_layers: int, d_in: int, d_out: int, d_sae: int, k: int, seed: int = 0) -> CrossLayerTranscoder:
    clt = CrossLayerTranscoder(n_layers, d_in, d_out, d_sae, k, seed=seed)
    generator = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for layer in clt.layers:
            layer.W_dec.copy_(0.3 * torch.randn(layer.W_dec.shape, generator=generator))
            layer.b_enc.copy_(0.1 * torch.randn(layer.b_enc.shape, generator=generator))
        clt.b_dec.copy_(torch.randn(clt.b_dec.shape, generator=generator))
    return clt


def dense_reference(params: dict[str, list[Tensor] | Tensor], xs, ys, k: int, dead: list[Tensor | None], k_aux: int):
    """The CLT written densely with autograd: TopK of relu(W_enc x + b_enc) per layer; outputs
    b_dec[m] + sum_{l<=m} z_l W_dec^{l->m}; per-layer FVU; AuxK regressing the concatenated later
    residuals with the dead latents' top k_aux."""
    L = len(xs)
    zs, pres = [], []
    for layer in range(L):
        pre = torch.relu(xs[layer] @ params["W_enc"][layer].T + params["b_enc"][layer])
        top = pre.topk(k, dim=1).indices
        zs.append(pre * torch.zeros_like(pre).scatter(1, top, 1.0))
        pres.append(pre)
    yhats = []
    for out in range(L):
        total = params["b_dec"][out].expand_as(ys[out])
        for source in range(out + 1):
            decoder = params["W_dec"][source].view(params["W_dec"][source].shape[0], L - source, -1)
            total = total + zs[source] @ decoder[:, out - source]
        yhats.append(total)

    def fvu(y, yhat):
        return (y - yhat).pow(2).sum() / (y - y.mean(0)).pow(2).sum()

    fvus = torch.stack([fvu(y, yhat) for y, yhat in zip(ys, yhats)])
    auxk = []
    for source in range(L):
        if dead[source] is None:
            auxk.append(torch.zeros((), dtype=torch.float64))
            continue
        masked = pres[source].masked_fill(~dead[source], -1.0)
        top = masked.topk(k_aux, dim=1).indices
        z_aux = pres[source] * torch.zeros_like(masked).scatter(1, top, 1.0) * dead[source]
        residual = torch.cat([(y - yhat).detach() for y, yhat in zip(ys[source:], yhats[source:])], dim=1)
        scale = min(int(dead[source].sum()) / k_aux, 1.0)
        auxk.append(scale * fvu(residual, z_aux @ params["W_dec"][source]))
    return yhats, fvus, torch.stack(auxk)


@pytest.mark.parametrize("with_dead", [False, True], ids=["no_dead", "dead_latents"])
def test_forward_loss_and_gradients_match_a_dense_autograd_clt(with_dead):
    L, d_in, d_out, d_sae, k, k_aux = 3, 12, 10, 40, 5, 6
    clt = random_clt(L, d_in, d_out, d_sae, k).double()
    generator = torch.Generator().manual_seed(1)
    xs = [torch.randn(64, d_in, generator=generator, dtype=torch.float64) for _ in range(L)]
    ys = [torch.randn(64, d_out, generator=generator, dtype=torch.float64) * (layer + 1) for layer in range(L)]
    dead = [torch.rand(d_sae, generator=generator) < 0.5 for _ in range(L)] if with_dead else [None] * L

    out = clt(xs, ys, dead_masks=dead, aux_k=k_aux)
    loss = out.fvu.sum() + 0.25 * out.auxk.sum()
    loss.backward()

    params = {
        "W_enc": [layer.W_enc.detach().clone().requires_grad_() for layer in clt.layers],
        "b_enc": [layer.b_enc.detach().clone().requires_grad_() for layer in clt.layers],
        "W_dec": [layer.W_dec.detach().clone().requires_grad_() for layer in clt.layers],
        "b_dec": clt.b_dec.detach().clone().requires_grad_(),
    }
    yhats, fvus, auxk = dense_reference(params, xs, ys, k, dead, k_aux)
    (fvus.sum() + 0.25 * auxk.sum()).backward()

    for got, expected in zip(out.yhats, yhats):
        torch.testing.assert_close(got, expected.detach(), rtol=1e-10, atol=1e-10)
    # The losses are float32, as the core's FVU (its sums of squares are taken in float32).
    torch.testing.assert_close(out.fvu.double(), fvus.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out.auxk.double(), auxk.detach(), rtol=1e-5, atol=1e-7)
    if with_dead:
        assert (auxk > 0).all()
    for name in ("W_enc", "b_enc", "W_dec"):
        for layer, reference in zip(clt.layers, params[name]):
            torch.testing.assert_close(getattr(layer, name).grad, reference.grad, rtol=1e-5, atol=1e-7, msg=name)
    torch.testing.assert_close(clt.b_dec.grad, params["b_dec"].grad, rtol=1e-5, atol=1e-7)
    # Layer 0's features write to all three outputs: its decoder gradient reaches every block.
    assert all(block.abs().sum() > 0 for block in clt.layers[0].W_dec.grad.view(d_sae, L, d_out).unbind(1))


def test_one_layer_is_the_per_layer_transcoder():
    d_in, d_out, d_sae, k = 12, 10, 40, 5
    clt = CrossLayerTranscoder(1, d_in, d_out, d_sae, k, seed=3)
    transcoder = Transcoder(d_in, d_sae, k, seed=3, d_out=d_out)
    # The same initialisation (seeded alike) ...
    torch.testing.assert_close(clt.layers[0].W_enc, transcoder.W_enc, rtol=0, atol=0)
    torch.testing.assert_close(clt.layers[0].W_dec, transcoder.W_dec, rtol=0, atol=0)
    # ... and, from the same trained-looking weights, the same outputs, losses and gradients.
    with torch.no_grad():
        transcoder.W_dec.normal_(0, 0.3)
        transcoder.b_enc.normal_(0, 0.1)
        transcoder.b_dec.normal_()
        clt.layers[0].W_dec.copy_(transcoder.W_dec)
        clt.layers[0].b_enc.copy_(transcoder.b_enc)
        clt.b_dec[0].copy_(transcoder.b_dec)
    x, y = torch.randn(50, d_in), torch.randn(50, d_out)
    dead = torch.arange(d_sae) % 3 == 0
    ours = clt([x], [y], dead_masks=[dead], aux_k=6)
    theirs = transcoder(x, y, dead_mask=dead, aux_k=6)
    torch.testing.assert_close(ours.yhats[0], theirs.xhat)
    torch.testing.assert_close(ours.fvu[0], theirs.fvu)
    torch.testing.assert_close(ours.auxk[0], theirs.auxk_loss)
    (ours.fvu.sum() + ours.auxk.sum()).backward()
    (theirs.fvu + theirs.auxk_loss).backward()
    for name in ("W_enc", "b_enc", "W_dec"):
        torch.testing.assert_close(getattr(clt.layers[0], name).grad, getattr(transcoder, name).grad, msg=name)
    torch.testing.assert_close(clt.b_dec.grad[0], transcoder.b_dec.grad)


def test_calibrated_threshold_keeps_k_per_token_on_average():
    clt = random_clt(2, 12, 10, 40, 5)
    xs = [torch.randn(200, 12) for _ in range(2)]
    thresholds = clt.calibrate_thresholds(xs)
    for layer, x, threshold in zip(clt.layers, xs, thresholds):
        fired = (layer.pre_activations(x) > threshold.item()).sum(1).float().mean().item()
        assert fired == 5  # N k entries above the N k + 1-th largest value (continuous values: no ties)


# ---- the replacement model on a tiny Llama -------------------------------------------------------------
def independent_replacement_ce(model, tokens: Tensor, clt: CrossLayerTranscoder, bos: int) -> tuple[float, float]:
    """CE of the clean model and of the model whose MLP forwards are rewritten (no hooks) to the
    CLT's prediction from their own inputs, computed densely; BOS positions keep the MLP."""
    features: dict[int, Tensor] = {}
    originals = {}

    def forward_for(layer: int):
        original = mlp_module(model, layer).forward

        def forward(h):
            pre = torch.relu(h @ clt.layers[layer].W_enc.T + clt.layers[layer].b_enc)
            top = pre.topk(clt.k, dim=-1).indices
            features[layer] = pre * torch.zeros_like(pre).scatter(-1, top, 1.0)
            out = clt.b_dec[layer].expand(*h.shape[:-1], -1)
            for source in range(layer + 1):
                out = out + features[source] @ clt.layers[source].decoder()[:, layer - source]
            return torch.where((tokens == bos)[..., None], original(h), out)

        return original, forward

    with torch.no_grad():
        clean = F.cross_entropy(model(input_ids=tokens).logits[:, :-1][tokens[:, :-1] != bos], tokens[:, 1:][tokens[:, :-1] != bos])
        for layer in range(clt.n_layers):
            originals[layer], mlp_module(model, layer).forward = forward_for(layer)
        try:
            logits = model(input_ids=tokens).logits
        finally:
            for layer in originals:
                del mlp_module(model, layer).forward
        replaced = F.cross_entropy(logits[:, :-1][tokens[:, :-1] != bos], tokens[:, 1:][tokens[:, :-1] != bos])
    return clean.item(), replaced.item()


def test_replacement_scores_against_rewritten_mlp_forwards(tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(save_model("llama", tmp_path)).eval()
    clt = random_clt(3, 32, 32, 48, 4)
    tokens = torch.randint(3, 256, (3, 10), generator=torch.Generator().manual_seed(0))
    tokens[:, 0] = 1
    got = replacement_scores(model, tokens, [0, 1, 2], CLTReplacement(clt), bos_token_id=1)
    clean, replaced = independent_replacement_ce(model, tokens, clt, bos=1)
    assert got["ce_loss_without_sae"] == pytest.approx(clean, rel=1e-5)
    assert got["ce_loss_with_sae"] == pytest.approx(replaced, rel=1e-5)
    assert abs(replaced - clean) > 1e-3  # the replacement matters


# ---- fits through the CLI ---------------------------------------------------------------------------------
def clt_fit_args(tiny: Path, root: Path, *extra: str, cache: Path | None = None) -> list[str]:
    data = [
        "--data=lightning_sae.data.ActivationDataModule", f"--data.model={save_model('llama', tiny)}",
        f"--data.dataset={write_text(tiny)}", "--data.layer=[0, 1, 2]", "--data.context_size=16", "--data.num_tokens=960",
        "--data.batch_size=64", "--data.device=cpu", "--data.model_dtype=float32", "--data.validation_fraction=0.1",
    ]
    data += [f"--data.cache_dir={cache}", "--data.shard_tokens=256"] if cache is not None else ["--data.source=stream", "--data.buffer_tokens=256"]
    return [
        "fit", "--seed_everything=0", "--model=clt", "--model.k=4", "--model.d_sae=48", "--model.lr=3e-3",
        "--model.dead_tokens=300", "--model.spliced_eval_contexts=4", *data,
        "--trainer.max_epochs=2", "--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false", f"--trainer.default_root_dir={root}", *extra,
    ]


def test_a_cli_fit_trains_every_layer_jointly_and_exports_for_circuit_tracer(tmp_path):
    cli = main(clt_fit_args(tmp_path / "tiny", tmp_path / "run"))
    module = cli.model
    assert isinstance(module, CLTModule) and module.layer_numbers == [0, 1, 2]
    metrics = cli.trainer.callback_metrics
    for layer in range(3):
        assert f"val/layers.{layer}/explained_variance" in metrics and float(metrics[f"train/layers.{layer}/l0"]) == 4
    # The replacement model's score, recomputed independently on the same validation contexts.
    contexts = cli.datamodule.validation_contexts(4)
    model = cli.datamodule.load_language_model()
    clean, replaced = independent_replacement_ce(model, contexts, module.clt.eval(), bos=cli.datamodule.tokenizer.bos_token_id)
    assert float(metrics["val/ce_loss_without_sae"]) == pytest.approx(clean, rel=1e-4)
    assert float(metrics["val/ce_loss_with_sae"]) == pytest.approx(replaced, rel=1e-4)
    assert torch.isfinite(module.clt.calibrated_threshold).all()
    folder = Path(cli.trainer.log_dir) / "circuit_tracer"
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["config.yaml"] + [f"W_{kind}_{i}.safetensors" for kind in ("enc", "dec") for i in range(3)])
    # The export command writes the same folder from the fit's checkpoint.
    from lightning_sae.export_cli import main as export_main

    checkpoint = next((Path(cli.trainer.log_dir) / "checkpoints").glob("*.ckpt"))
    assert export_main([str(checkpoint), str(tmp_path / "exported"), "--format", "circuit-tracer"]) == 0
    for path in folder.iterdir():
        assert (tmp_path / "exported" / path.name).read_bytes() == path.read_bytes(), path.name



def test_a_clt_fit_killed_with_sigkill_resumes_to_the_same_weights(tmp_path):
    checkpoints = ["--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.every_n_train_steps=3",
                   "--trainer.callbacks.save_top_k=-1", "--trainer.callbacks.save_last=true"]
    tiny, cache = tmp_path / "tiny", tmp_path / "cache"
    reference = main(clt_fit_args(tiny, tmp_path / "reference", *checkpoints, f"--trainer.callbacks.dirpath={tmp_path / 'ref_ckpt'}",
                                  cache=cache))
    steps = reference.trainer.global_step
    root = tmp_path / "killed"
    args = clt_fit_args(tiny, root, *checkpoints, f"--trainer.callbacks.dirpath={root / 'ckpt'}",
                        "--trainer.callbacks+=test_resume.Throttle", "--trainer.callbacks.seconds=0.3", cache=cache)
    with fit_in_subprocess(args, REPO) as process:
        stopped_at = sigkill_at_checkpoint(process, root / "ckpt", 6)
    assert 6 <= stopped_at < steps
    resumed = main(clt_fit_args(tiny, root, *checkpoints, f"--trainer.callbacks.dirpath={root / 'ckpt'}", "--ckpt_path=last", cache=cache))
    assert resumed.trainer.global_step == steps
    final, expected = resumed.model.state_dict(), reference.model.state_dict()
    assert final.keys() == expected.keys()
    largest = 0.0
    for name, value in expected.items():
        if torch.is_tensor(value) and value.is_floating_point():
            largest = max(largest, (final[name] - value).abs().max().item() if value.numel() else 0.0)
            torch.testing.assert_close(final[name], value, rtol=0, atol=1e-6, equal_nan=True, msg=name)
        elif torch.is_tensor(value):
            assert torch.equal(final[name], value), name
        else:
            assert final[name] == value, name
    print(f"\nSIGKILL after the checkpoint of step {stopped_at} of {steps}; largest weight difference {largest}")


# ---- a learned rule: JumpReLU (plugins/jumprelu) with the CLT's tanh sparsity penalty ---------------------
def jumprelu_clt(n_layers: int, sparsity_loss: str = "tanh") -> CrossLayerTranscoder:
    from lightning_sae_jumprelu import JumpReLU

    selector = JumpReLU(init_threshold=0.3, bandwidth=0.2, sparsity_loss=sparsity_loss, tanh_scale=2.0)
    clt = CrossLayerTranscoder(n_layers, 12, 10, 40, 5, seed=0, selector=selector)
    generator = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for layer in clt.layers:
            layer.W_dec.copy_(0.3 * torch.randn(layer.W_dec.shape, generator=generator))
            layer.selector.threshold.copy_(0.2 + 0.4 * torch.rand(40, generator=generator))
    return clt


@pytest.mark.parametrize("sparsity_loss", ["tanh", "step"])
def test_one_layer_with_jumprelu_is_the_per_layer_transcoder(sparsity_loss):
    import copy

    clt = jumprelu_clt(1, sparsity_loss)
    transcoder = Transcoder(12, 40, 5, seed=0, d_out=10, selector=copy.deepcopy(clt.layers[0].selector))
    with torch.no_grad():
        for name in ("W_enc", "b_enc", "W_dec"):
            getattr(transcoder, name).copy_(getattr(clt.layers[0], name))
        clt.b_dec[0].copy_(transcoder.b_dec)
    x, y = torch.randn(64, 12), torch.randn(64, 10)
    ours, theirs = clt([x], [y]), transcoder(x, y)
    torch.testing.assert_close(ours.yhats[0], theirs.xhat)
    assert ours.loss_terms[0].keys() == theirs.loss_terms.keys() == {"l0_loss"}
    torch.testing.assert_close(ours.loss_terms[0]["l0_loss"], theirs.loss_terms["l0_loss"])
    (ours.fvu.sum() + ours.loss_terms[0]["l0_loss"]).backward()
    (theirs.fvu + theirs.loss_terms["l0_loss"]).backward()
    for name in ("W_enc", "b_enc", "W_dec", "selector.threshold"):
        got = clt.layers[0].get_parameter(name).grad
        assert got is not None and got.abs().sum() > 0, name
        torch.testing.assert_close(got, transcoder.get_parameter(name).grad, msg=name)


def test_jumprelu_clt_function_and_tanh_penalty_against_the_formula():
    clt = jumprelu_clt(3)
    generator = torch.Generator().manual_seed(4)
    xs = [torch.randn(64, 12, generator=generator) for _ in range(3)]
    ys = [torch.randn(64, 10, generator=generator) for _ in range(3)]
    out = clt(xs, ys)
    for source, layer in enumerate(clt.layers):
        pre = xs[source] @ layer.W_enc.T + layer.b_enc
        theta = layer.selector.threshold
        a = (pre * (pre > theta)).detach()  # the JumpReLU's value
        torch.testing.assert_close(out.codes[source].to_dense(40), a)
        # SPEC: tanh(c * ||W_dec,i^l|| * a_i), the norm over feature i's decoders to all later layers
        norms = layer.W_dec.detach().view(40, 3 - source, 10).pow(2).sum((1, 2)).sqrt()
        expected = torch.tanh(2.0 * norms * a).sum() / 64
        torch.testing.assert_close(out.loss_terms[source]["l0_loss"].detach(), expected)
    penalty = sum(terms["l0_loss"] for terms in out.loss_terms)
    penalty.backward()
    # Layer 0's penalty reaches its decoders to every output layer, and its thresholds.
    assert all(block.abs().sum() > 0 for block in clt.layers[0].W_dec.grad.view(40, 3, 10).unbind(1))
    assert clt.layers[0].selector.threshold.grad.abs().sum() > 0
    # In evaluation the thresholds are exported as they are (no calibration).
    from lightning_sae_clt.module import _selector_thresholds

    for threshold, layer in zip(_selector_thresholds(clt.eval()), clt.layers):
        torch.testing.assert_close(threshold, layer.selector.threshold.detach().clamp_min(0))
