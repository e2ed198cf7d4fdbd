"""Exports for circuit-tracer (lightning_sae.circuit_tracer): the folders loaded by circuit-tracer's
own loaders compute our function (max abs differences printed); an attribution graph builds on a
tiny Llama through circuit-tracer's nnsight backend; `lightning-sae-export --format circuit-tracer`
writes what the fit's end wrote, and refuses a TopK set it cannot calibrate with one line.

Needs the `circuits` extra (circuit-tracer 0.5.0, nnsight 0.6.1); skipped without it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from data_fixtures import save_model

from lightning_sae.circuit_tracer import (
    import_circuit_tracer,
    load_circuit_tracer,
    read_config,
)
from lightning_sae.formats import FormatCannotRunSelector

try:
    import_circuit_tracer()
except ImportError as error:
    pytest.skip(f"circuit-tracer is not installed ({error}); install the extra: pip install -e '.[circuits]'", allow_module_level=True)

from lightning_sae_clt import CrossLayerTranscoder
from lightning_sae_clt.module import save_clt_circuit_tracer
from lightning_sae_transcoder import TranscoderModule
from lightning_sae_transcoder.circuit_tracer import save_circuit_tracer_set

REPO = Path(__file__).resolve().parents[1]


def trained_looking_clt(n_layers: int = 3, d: int = 32, d_sae: int = 48, k: int = 4) -> CrossLayerTranscoder:
    clt = CrossLayerTranscoder(n_layers, d, d, d_sae, k, seed=0)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for layer in clt.layers:
            layer.W_dec.copy_(0.2 * torch.randn(layer.W_dec.shape, generator=generator))
            layer.b_enc.copy_(0.1 * torch.randn(layer.b_enc.shape, generator=generator))
        clt.b_dec.copy_(0.1 * torch.randn(clt.b_dec.shape, generator=generator))
    return clt


def test_circuit_tracer_runs_our_cross_layer_transcoder(tmp_path):
    from lightning_sae.selection import TopK

    clt = trained_looking_clt().eval()
    xs = [torch.randn(300, 32, generator=torch.Generator().manual_seed(layer)) for layer in range(3)]
    clt.calibrate_thresholds(xs[:])
    save_clt_circuit_tracer(clt, tmp_path / "clt", "mlp_in", "mlp_out", [0, 1, 2], TopK())
    config = read_config(tmp_path / "clt")
    assert (config["model_kind"], config["feature_input_hook"], config["feature_output_hook"]) == (
        "cross_layer_transcoder", "mlp.hook_in", "mlp.hook_out")
    assert config["lightning_sae"]["k"] == 4 and config["lightning_sae"]["exported_activation"] == "jumprelu_calibrated_from_topk"
    x = torch.stack([x[:40] for x in xs])  # [L, N, d]

    # What circuit-tracer's stock loader runs: JumpReLU at the calibrated per-layer thresholds.
    theirs = load_circuit_tracer(tmp_path / "clt")
    features = theirs.encode(x)
    with torch.no_grad():
        pres = [layer.pre_activations(rows) for layer, rows in zip(clt.layers, x)]
        ours = torch.stack([pre * (pre > threshold.item()) for pre, threshold in zip(pres, clt.calibrated_threshold)])
        ours_out = torch.stack([clt.b_dec[m] + sum(ours[l] @ clt.layers[l].decoder()[:, m - l] for l in range(m + 1)) for m in range(3)])
    encode_diff = (features - ours).abs().max().item()
    decode_diff = (theirs.decode(features) - ours_out).abs().max().item()
    print(f"\nCLT, JumpReLU export: max |encode diff| {encode_diff:.3g}, max |decode diff| {decode_diff:.3g}")
    assert encode_diff < 1e-5 and decode_diff < 1e-5
    assert 2 < (features > 0).sum(-1).float().mean() < 7  # about k fire per token

    # With circuit-tracer's own TopK module swapped in: exactly our trained function.
    theirs = load_circuit_tracer(tmp_path / "clt", activation="topk")
    with torch.no_grad():
        out = clt([rows for rows in x])
        ours_topk = torch.stack([code.to_dense(48) for code in out.codes])
    features = theirs.encode(x)
    encode_diff = (features - ours_topk).abs().max().item()
    decode_diff = (theirs.decode(features) - torch.stack(out.yhats)).abs().max().item()
    print(f"CLT, TopK: max |encode diff| {encode_diff:.3g}, max |decode diff| {decode_diff:.3g}")
    assert encode_diff < 1e-5 and decode_diff < 1e-5


def transcoder_set(n_layers: int = 3, d: int = 32, skip: bool = False) -> TranscoderModule:
    sites = [f"layers.{layer}" for layer in range(n_layers)]
    widths = {f"{site}/{key}": d for site in sites for key in ("x", "y")}
    module = TranscoderModule(k=4, d_sae=48, skip_connection=skip, widths=widths, sites=sites)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name in module.sae_names:
            sae = module.get_sae(name)
            sae.W_dec.copy_(0.2 * torch.randn(sae.W_dec.shape, generator=generator))
            sae.b_dec.copy_(0.1 * torch.randn(sae.b_dec.shape, generator=generator))
            if skip:
                sae.W_skip.copy_(0.05 * torch.randn(sae.W_skip.shape, generator=generator))
    return module.eval()


@pytest.mark.parametrize("skip", [False, True], ids=["plain", "skip"])
def test_circuit_tracer_runs_our_transcoder_set(tmp_path, skip):
    module = transcoder_set(skip=skip)
    rows = {f"layers.{layer}/x": torch.randn(256, 32, generator=torch.Generator().manual_seed(layer)) for layer in range(3)}
    save_circuit_tracer_set(module, tmp_path / "set", [rows])
    assert read_config(tmp_path / "set")["model_kind"] == "transcoder_set"
    x = torch.stack([rows[f"layers.{layer}/x"][:50] for layer in range(3)])
    thresholds = read_config(tmp_path / "set")["lightning_sae"]["calibrated_thresholds"]
    for activation in ("exported", "topk"):
        theirs = load_circuit_tracer(tmp_path / "set", activation=activation)
        features = theirs.encode(x)
        with torch.no_grad():
            if activation == "topk":
                outs = [module.get_sae(f"layers.{layer}/sae")(x[layer]) for layer in range(3)]
                ours = torch.stack([out.code.to_dense(48) for out in outs])
                ours_out = torch.stack([out.xhat for out in outs])
            else:
                saes = [module.get_sae(f"layers.{layer}/sae") for layer in range(3)]
                pres = [sae.pre_activations(x[layer]) for layer, sae in enumerate(saes)]
                ours = torch.stack([pre * (pre > t) for pre, t in zip(pres, thresholds)])
                ours_out = torch.stack([ours[layer] @ sae.W_dec + sae.b_dec + (x[layer] @ sae.W_skip.T if skip else 0)
                                        for layer, sae in enumerate(saes)])
        encode_diff = (features - ours).abs().max().item()
        decode_diff = (theirs.decode(features, x) - ours_out).abs().max().item()
        print(f"\ntranscoder set ({'skip' if skip else 'no skip'}, {activation}): max |encode diff| {encode_diff:.3g}, "
              f"max |decode diff| {decode_diff:.3g}")
        assert encode_diff < 1e-5 and decode_diff < 1e-5


def test_a_topk_set_without_calibration_rows_is_refused(tmp_path):
    with pytest.raises(FormatCannotRunSelector, match="calibrated on held-out activations"):
        save_circuit_tracer_set(transcoder_set(), tmp_path / "set", None)
    with pytest.raises(FormatCannotRunSelector, match="every layer 0..L-1"):
        save_clt_circuit_tracer(trained_looking_clt(), tmp_path / "clt", "mlp_in", "mlp_out", [0, 2, 3], None)


@pytest.mark.parametrize("kind", ["clt", "transcoder_set"])
def test_an_attribution_graph_builds_through_the_tool(tmp_path, kind):
    from lightning_sae.selection import TopK

    model = save_model("llama", tmp_path)
    folder = tmp_path / kind
    if kind == "clt":
        clt = trained_looking_clt()
        clt.calibrate_thresholds([torch.randn(200, 32) for _ in range(3)])
        save_clt_circuit_tracer(clt, folder, "mlp_in", "mlp_out", [0, 1, 2], TopK())
    else:
        rows = {f"layers.{layer}/x": torch.randn(200, 32) for layer in range(3)}
        save_circuit_tracer_set(transcoder_set(), folder, [rows])
    text = tmp_path / "contexts.txt"
    text.write_text("the model learns a sparse feature\nred river and green garden near the city\n" * 3)
    out = tmp_path / "graph"
    command = [sys.executable, str(REPO / "tools" / "attribution_graph.py"), "--model", str(model), "--transcoders", str(folder),
               "--prompt", "the model learns a sparse", "--out", str(out), "--contexts", str(text), "--max-feature-nodes", "40",
               "--activation", "topk"]
    result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["active_features"] > 0 and summary["graph_nodes"] > len(summary["logits"]) > 0
    features = [node for node in summary["strongest_paths"]["nodes"] if node["kind"] == "feature"]
    assert features and summary["strongest_paths"]["edges"]
    assert any(node["top_contexts"] for node in features)  # contexts from the given text
    assert (out / "graph.html").read_text().startswith("<!DOCTYPE html>")
    graph = torch.load(out / "graph.pt", weights_only=True)  # plain tensors: no pickled objects
    assert graph["adjacency_matrix"].shape[0] == summary["graph_nodes"]
    print(f"\n{kind}: {result.stdout.strip()}")


def test_the_all_layers_config_fits_a_transcoder_per_layer_and_exports_both_layouts(tmp_path, capsys):
    from data_fixtures import write_text
    from sae_lens import SAE

    from lightning_sae.cli import main
    from lightning_sae.export_cli import main as export_main

    model, text = save_model("llama", tmp_path), write_text(tmp_path)
    cli = main(["fit", "--config", str(REPO / "configs" / "transcoders_all_layers.yaml"), f"--data.init_args.model={model}",
                f"--data.init_args.dataset={text}", "--data.init_args.layer=[0, 1, 2]", "--data.init_args.num_tokens=1024",
                "--data.init_args.context_size=16", "--data.init_args.batch_size=64", "--data.init_args.buffer_tokens=256",
                "--data.init_args.device=cpu", "--data.init_args.model_dtype=float32", "--model.init_args.d_sae=48",
                "--model.init_args.k=4", "--model.init_args.spliced_eval_contexts=0", f"--trainer.default_root_dir={tmp_path / 'run'}",
                "--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false"])
    log_dir = Path(cli.trainer.log_dir)
    # One transcoder per layer, each its own metrics and SAELens directory ...
    for layer in range(3):
        assert f"val/layers.{layer}/explained_variance" in cli.trainer.callback_metrics
        assert SAE.load_from_disk(str(log_dir / "sae" / f"layers.{layer}")).cfg.d_sae == 48
    # ... and together circuit-tracer's transcoder_set, calibrated on the validation rows.
    config = read_config(log_dir / "circuit_tracer")
    assert config["model_kind"] == "transcoder_set" and len(config["lightning_sae"]["calibrated_thresholds"]) == 3
    loaded = load_circuit_tracer(log_dir / "circuit_tracer")
    assert len(loaded) == 3
    torch.testing.assert_close(loaded[1].W_enc, cli.model.get_sae("layers.1/sae").W_enc)
    # From the checkpoint alone there is nothing to calibrate a TopK set on: one line, status 2.
    checkpoint = next((log_dir / "checkpoints").glob("*.ckpt"))
    capsys.readouterr()
    assert export_main([str(checkpoint), str(tmp_path / "exported"), "--format", "circuit-tracer"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and error.startswith("lightning-sae-export: error:") and "calibrated" in error
