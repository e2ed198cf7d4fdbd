"""SAELens / sparsify interchange: each library loads our files and computes the same SAE, we
load theirs back exactly, and broken files fail with a clear error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lightning_sae.checkpoint_io import load_checkpoint
from lightning_sae.export_cli import main
from lightning_sae.formats import (
    SAEFormatError,
    load_sae,
    load_saelens,
    load_sparsify,
    save_saelens,
    save_sparsify,
)
from lightning_sae.sae import TopKSAE

D_IN, D_SAE, K = 16, 64, 5


def random_sae(seed: int = 0) -> TopKSAE:
    """Every parameter random and W_enc independent of W_dec, so a transposed or swapped tensor,
    or a bias applied in the wrong place, changes the outputs."""
    sae = TopKSAE(D_IN, D_SAE, K, seed=seed)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(D_SAE, D_IN, generator=generator) / D_IN**0.5)
        sae.b_enc.copy_(torch.randn(D_SAE, generator=generator) * 0.3)
        sae.b_dec.copy_(torch.randn(D_IN, generator=generator))
    return sae


def inputs(n: int = 64) -> torch.Tensor:
    return torch.randn(n, D_IN, generator=torch.Generator().manual_seed(123)) * 2


@torch.no_grad()
def ours(sae: TopKSAE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense latents [N, d_sae] and reconstructions."""
    code = sae.encode(x)
    return sae.dense_latents(code), sae.decode(code)


def assert_same_parameters(a: TopKSAE, b: TopKSAE) -> None:
    assert (a.d_in, a.d_sae, a.k) == (b.d_in, b.d_sae, b.k)
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), name


def assert_same_outputs(expected: tuple[torch.Tensor, torch.Tensor], latents: torch.Tensor, recon: torch.Tensor) -> None:
    # The latent sets must match exactly (same k latents); values and reconstructions to rounding.
    assert torch.equal(expected[0] != 0, latents != 0)
    torch.testing.assert_close(latents, expected[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(recon, expected[1], atol=1e-5, rtol=1e-5)


# ---- SAELens --------------------------------------------------------------------------------------------


def test_saelens_export_loads_in_sae_lens(tmp_path: Path) -> None:
    sae_lens = pytest.importorskip("sae_lens", reason="sae_lens is not installed")
    sae, x = random_sae(), inputs()
    save_saelens(sae, tmp_path / "sae", metadata={"model_name": "gpt2", "hook_name": "blocks.3.hook_resid_post"})

    theirs = sae_lens.SAE.load_from_disk(tmp_path / "sae")
    with torch.no_grad():
        latents = theirs.encode(x)
        assert_same_outputs(ours(sae, x), latents, theirs.decode(latents))
        torch.testing.assert_close(theirs(x), sae(x).xhat, atol=1e-5, rtol=1e-5)
    assert theirs.cfg.k == K and theirs.cfg.metadata.hook_name == "blocks.3.hook_resid_post"


@pytest.mark.parametrize("rescale", [False, True], ids=["plain", "rescale_acts_by_decoder_norm"])
def test_saelens_files_import_exactly(tmp_path: Path, rescale: bool) -> None:
    pytest.importorskip("sae_lens", reason="sae_lens is not installed")
    from sae_lens.saes.topk_sae import TopKSAE as SAELensTopK, TopKSAEConfig

    theirs = SAELensTopK(TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K, rescale_acts_by_decoder_norm=rescale))
    with torch.no_grad():
        for parameter in theirs.parameters():
            parameter.copy_(torch.randn_like(parameter))  # decoder norms far from 1
    theirs.save_model(tmp_path / "sae")

    sae, _ = load_saelens(tmp_path / "sae")
    x = inputs()
    with torch.no_grad():
        latents = theirs.encode(x)
        assert_same_outputs(ours(sae, x), latents, theirs.decode(latents))
    if not rescale:  # with rescaling the decoder norms are folded into the encoder instead
        assert torch.equal(sae.W_enc, theirs.W_enc.T) and torch.equal(sae.W_dec, theirs.W_dec)
        assert torch.equal(sae.b_enc, theirs.b_enc) and torch.equal(sae.b_dec, theirs.b_dec)
    else:
        torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(D_SAE))


def test_saelens_round_trip(tmp_path: Path) -> None:
    sae = random_sae()
    save_saelens(sae, tmp_path / "sae", metadata={"context_size": 128, "custom": [1, 2]})
    loaded, metadata = load_saelens(tmp_path / "sae")
    assert_same_parameters(loaded, sae)
    assert metadata["context_size"] == 128 and metadata["custom"] == [1, 2]
    assert metadata["sae_lens_version"] == "6.0.0" and metadata["hook_name"] is None

    save_saelens(sae, tmp_path / "half", dtype="bfloat16")
    loaded, _ = load_saelens(tmp_path / "half")
    assert loaded.W_enc.dtype == torch.float32
    assert torch.equal(loaded.W_enc, sae.W_enc.bfloat16().float())


# ---- sparsify -------------------------------------------------------------------------------------------


def sparsify_outputs(coder, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        out = coder.encode(x)
        latents = torch.zeros(x.shape[0], coder.num_latents).scatter(1, out.top_indices, out.top_acts)
        return latents, coder.decode(out.top_acts, out.top_indices)


def test_sparsify_export_loads_in_sparsify(tmp_path: Path) -> None:
    sparsify = pytest.importorskip("sparsify", reason="sparsify (eai-sparsify) is not installed")
    sae, x = random_sae(), inputs()
    written = save_sparsify(sae, tmp_path, "layers.3")
    assert written == tmp_path / "layers.3"

    coder = sparsify.SparseCoder.load_from_disk(written)
    assert (coder.d_in, coder.num_latents, coder.cfg.k) == (D_IN, D_SAE, K)
    assert_same_outputs(ours(sae, x), *sparsify_outputs(coder, x))
    assert list(sparsify.SparseCoder.load_many(str(tmp_path), local=True)) == ["layers.3"]


def test_sparsify_files_import_exactly(tmp_path: Path) -> None:
    sparsify = pytest.importorskip("sparsify", reason="sparsify (eai-sparsify) is not installed")
    coder = sparsify.SparseCoder(D_IN, sparsify.SparseCoderConfig(num_latents=D_SAE, k=K))
    with torch.no_grad():
        for parameter in coder.parameters():
            parameter.copy_(torch.randn_like(parameter))
    coder.save_to_disk(tmp_path / "layers.0.mlp")

    sae, metadata = load_sparsify(tmp_path)  # the only hookpoint is found without naming it
    assert metadata == {"hookpoint": "layers.0.mlp"}
    assert torch.equal(sae.W_enc, coder.encoder.weight) and torch.equal(sae.b_enc, coder.encoder.bias)
    assert torch.equal(sae.W_dec, coder.W_dec) and torch.equal(sae.b_dec, coder.b_dec)
    x = inputs()
    assert_same_outputs(ours(sae, x), *sparsify_outputs(coder, x))


def test_sparsify_round_trip_and_hookpoints(tmp_path: Path) -> None:
    a, b = random_sae(0), random_sae(1)
    save_sparsify(a, tmp_path, "layers.0", metadata={"model_name": "pythia"})
    save_sparsify(b, tmp_path, "layers.1")
    loaded, metadata = load_sparsify(tmp_path, "layers.0")
    assert_same_parameters(loaded, a)
    assert metadata == {"model_name": "pythia", "hookpoint": "layers.0"}
    assert_same_parameters(load_sparsify(tmp_path / "layers.1")[0], b)
    with pytest.raises(SAEFormatError, match=r"several hookpoints \['layers.0', 'layers.1'\]"):
        load_sparsify(tmp_path)
    with pytest.raises(ValueError, match="plain directory name"):
        save_sparsify(a, tmp_path, "../escape")


# ---- detection, validation, atomic writes ---------------------------------------------------------------


def test_load_sae_detects_format(tmp_path: Path) -> None:
    sae = random_sae()
    save_saelens(sae, tmp_path / "lens")
    save_sparsify(sae, tmp_path / "sparse", "layers.2")
    assert_same_parameters(load_sae(tmp_path / "lens")[0], sae)
    assert load_sae(tmp_path / "sparse")[1]["hookpoint"] == "layers.2"
    assert_same_parameters(load_sae(tmp_path / "sparse" / "layers.2")[0], sae)

    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "weights.pt").touch()
    with pytest.raises(SAEFormatError, match=r"sae_weights\.safetensors.*sae\.safetensors.*found \['weights\.pt'\]"):
        load_sae(tmp_path / "other")


def test_truncated_or_mismatched_files_fail_clearly(tmp_path: Path) -> None:
    save_saelens(random_sae(), tmp_path / "sae")
    weights = tmp_path / "sae" / "sae_weights.safetensors"
    data = weights.read_bytes()

    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(SAEFormatError, match="truncated or corrupt"):
        load_saelens(tmp_path / "sae")
    weights.write_bytes(b"not a safetensors file")
    with pytest.raises(SAEFormatError, match="truncated or corrupt"):
        load_sae(tmp_path / "sae")

    weights.write_bytes(data)
    cfg_path = tmp_path / "sae" / "cfg.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "d_sae": D_SAE * 2}))
    shape_error = r"W_enc has shape \[16, 64\], but cfg.json \(d_in=16, d_sae=128\) implies \[16, 128\]"
    with pytest.raises(SAEFormatError, match=shape_error):
        load_saelens(tmp_path / "sae")
    # An architecture no registered selector reads ("jumprelu" is the batch_topk plugin's).
    cfg_path.write_text(json.dumps({**cfg, "architecture": "gated"}))
    with pytest.raises(SAEFormatError, match="architecture='gated' is not supported"):
        load_saelens(tmp_path / "sae")
    # A jumprelu directory without the threshold SAELens writes is refused too.
    cfg_path.write_text(json.dumps({**cfg, "architecture": "jumprelu"}))
    with pytest.raises(SAEFormatError, match="jumprelu"):
        load_saelens(tmp_path / "sae")


def test_save_replaces_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "sae"
    old, new = random_sae(0), random_sae(1)
    save_saelens(old, target)
    save_saelens(new, target)  # replacing a previous SAE is fine
    assert_same_parameters(load_saelens(target)[0], new)

    # A write that fails half-way leaves the previous SAE whole and no temporary directory behind.
    import lightning_sae.formats as formats

    def fail_after_partial_write(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(formats, "save_file", fail_after_partial_write)
    with pytest.raises(OSError, match="disk full"):
        save_saelens(old, target)
    assert_same_parameters(load_saelens(target)[0], new)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sae"]

    unrelated = tmp_path / "notes"
    unrelated.mkdir()
    (unrelated / "todo.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="refusing to replace"):
        save_saelens(old, unrelated)
    assert (unrelated / "todo.txt").read_text() == "keep me"


# ---- lightning-sae-export ------------------------------------------------------------------------------


def write_checkpoint(path: Path, saes: dict[str, TopKSAE], hyper_parameters: dict) -> None:
    """The parts of a Lightning checkpoint the exporter reads, plus typical other entries."""
    state = {f"{prefix}{name}": p.detach().clone() for prefix, sae in saes.items() for name, p in sae.named_parameters()}
    state["sae_activity.steps_since_fired"] = torch.zeros(D_SAE)
    torch.save(
        {"epoch": 0, "global_step": 10, "pytorch-lightning_version": "2.6.6", "state_dict": state,
         "optimizer_states": [{"state": {}, "param_groups": [{"lr": 1e-3}]}], "hyper_parameters": hyper_parameters},
        path,
    )


def test_export_cli_from_checkpoint_and_between_formats(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sae = random_sae()
    ckpt = tmp_path / "last.ckpt"
    write_checkpoint(ckpt, {"sae.": sae}, {"k": K, "hook_name": "blocks.1.hook_resid_post", "lr": 1e-3})

    assert main([str(ckpt), str(tmp_path / "lens"), "--format", "saelens"]) == 0
    loaded, metadata = load_saelens(tmp_path / "lens")
    assert_same_parameters(loaded, sae)
    assert metadata["hook_name"] == "blocks.1.hook_resid_post"

    assert main([str(tmp_path / "lens"), str(tmp_path / "sparse"), "--format", "sparsify", "--hookpoint", "layers.1"]) == 0
    assert_same_parameters(load_sparsify(tmp_path / "sparse", "layers.1")[0], sae)
    # Back again: the hookpoint picks the SAE out of the sparsify directory.
    assert main([str(tmp_path / "sparse"), str(tmp_path / "back"), "--format", "saelens", "--hookpoint", "layers.1"]) == 0
    assert_same_parameters(load_saelens(tmp_path / "back")[0], sae)
    assert "wrote saelens SAE (d_in=16, d_sae=64, k=5)" in capsys.readouterr().out


def test_export_cli_checkpoint_prefix_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sae_in, sae_out = random_sae(0), random_sae(1)
    ckpt = tmp_path / "two.ckpt"
    write_checkpoint(ckpt, {"sae_in.": sae_in, "sae_out.": sae_out}, {})

    argv = [str(ckpt), str(tmp_path / "out"), "--format", "sparsify", "--hookpoint", "h", "--prefix", "sae_out.", "--k", "5"]
    assert main(argv) == 0
    assert_same_parameters(load_sparsify(tmp_path / "out", "h")[0], sae_out)

    with pytest.raises(SAEFormatError, match=r"SAE prefixes present: \['sae_in\.', 'sae_out\.'\]"):
        load_checkpoint(ckpt)
    with pytest.raises(SAEFormatError, match="give --k"):
        load_checkpoint(ckpt, prefix="sae_in.")
    assert main([str(ckpt), str(tmp_path / "x"), "--format", "saelens"]) == 2  # bad input: the status lightning-sae uses too
    assert "SAE prefixes present" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse error: sparsify output needs a hookpoint
        main([str(ckpt), str(tmp_path / "x"), "--format", "sparsify", "--prefix", "sae_in.", "--k", "5"])

    ckpt.write_bytes(ckpt.read_bytes()[:100])
    with pytest.raises(SAEFormatError, match="truncated or corrupt"):
        load_checkpoint(ckpt)
