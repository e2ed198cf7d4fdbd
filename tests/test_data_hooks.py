"""Cached activations and gradients against independent computations, for every family and hook."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from data_fixtures import FAMILIES, _isolated_caches, datamodule, save_model, tiny_root, write_text  # noqa: F401

from lightning_sae.data import (
    HOOK_KINDS,
    hook_point,
    load_model,
    mlp_family,
    mlp_module,
    replace_hook,
    transformer_lens_name,
    zero_ablate_hook,
)
from lightning_sae.data.cache import ShardReader, read_manifest
from lightning_sae.data.hooks import ActivationRecorder
from lightning_sae.data_request import DataRequest

LAYER = 1


def _norm_and_down(model, family: str, layer: int):
    """The modules whose outputs are mlp_in and mlp_out, named independently of the library."""
    if family == "llama":
        block = model.model.layers[layer]
        return block.post_attention_layernorm, block.mlp.down_proj
    if family == "neox":
        block = model.gpt_neox.layers[layer]
        return block.post_attention_layernorm, block.mlp.dense_4h_to_h
    block = model.transformer.h[layer]
    return block.ln_2, block.mlp.c_proj


def _reference(model, family: str, tokens: torch.Tensor, leaf_kind: str | None = None):
    """All four activations at LAYER from output_hidden_states and test-side hooks; with
    `leaf_kind`, also d(sum of next-token cross-entropy)/d(that activation)."""
    norm, down = _norm_and_down(model, family, LAYER)
    seen: dict[str, torch.Tensor] = {}

    def recorder(kind):
        def hook(module, args, output):
            if kind == leaf_kind:
                output = output.detach().requires_grad_(True)
            seen[kind] = output
            return output

        return hook

    handles = [norm.register_forward_hook(recorder("mlp_in")), down.register_forward_hook(recorder("mlp_out"))]
    layers = model.transformer.h if family == "gpt2" else (model.model if family == "llama" else model.gpt_neox).layers
    if leaf_kind in ("resid_pre", "resid_post"):  # resid_pre of LAYER is the output of LAYER - 1
        source = layers[LAYER - 1] if leaf_kind == "resid_pre" else layers[LAYER]
        handles.append(source.register_forward_hook(recorder(leaf_kind)))
    try:
        with torch.enable_grad():
            out = model(input_ids=tokens, output_hidden_states=True)
            grad = None
            if leaf_kind is not None:
                loss = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten(), reduction="sum")
                (grad,) = torch.autograd.grad(loss, seen[leaf_kind])
    finally:
        for handle in handles:
            handle.remove()
    values = {
        "resid_pre": out.hidden_states[LAYER],
        "resid_post": out.hidden_states[LAYER + 1],
        "mlp_in": seen["mlp_in"],
        "mlp_out": seen["mlp_out"],
    }
    return {k: v.detach() for k, v in values.items()}, grad


def _cached(dm, keys):
    """Every row of the cache (validation then training) with the contexts they came from."""
    manifest = read_manifest(dm.metadata["cache_dir"])
    rows, tokens = {key: [] for key in keys}, []
    for split in ("val", "train"):
        reader = ShardReader(dm.metadata["cache_dir"], manifest, split, keys)
        for key, value in reader(torch.arange(reader.num_rows)).items():
            rows[key].append(value)
        tokens.append(reader.contexts(10**6))
    return {key: torch.cat(value) for key, value in rows.items()}, torch.cat(tokens)


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_activations_match_an_independent_forward(family, tiny_root, tmp_path):
    roles = {"x": "resid_pre", "a": "mlp_in", "b": "mlp_out", "c": "resid_post"}
    dm = datamodule(save_model(family, tiny_root), write_text(tiny_root), tmp_path / "cache", DataRequest(reads=roles))
    dm.prepare_data()
    dm.setup("fit")
    cached, tokens = _cached(dm, list(roles))
    model = load_model(str(save_model(family, tiny_root)), device="cpu")
    reference, _ = _reference(model, family, tokens)
    keep = tokens != 1  # BOS positions are excluded by default
    for key, kind in roles.items():
        assert cached[key].shape == (int(keep.sum()), 32)
        torch.testing.assert_close(cached[key], reference[kind][keep], rtol=1e-5, atol=1e-5, msg=f"{family} {kind}")


@pytest.mark.parametrize("kind", HOOK_KINDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_cached_gradients_match_autograd_of_summed_cross_entropy(family, kind, tiny_root, tmp_path):
    request = DataRequest(reads={"x": kind}, gradients=True)
    dm = datamodule(save_model(family, tiny_root), write_text(tiny_root), tmp_path / "cache", request, num_tokens=16 * 12)
    dm.prepare_data()
    dm.setup("fit")
    cached, tokens = _cached(dm, ["x", "grad"])
    model = load_model(str(save_model(family, tiny_root)), device="cpu")
    reference, grad = _reference(model, family, tokens, leaf_kind=kind)
    keep = tokens != 1
    torch.testing.assert_close(cached["x"], reference[kind][keep], rtol=1e-5, atol=1e-5)
    assert grad[keep].abs().max() > 0
    torch.testing.assert_close(cached["grad"], grad[keep], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_mlp_module_maps_cached_mlp_in_to_mlp_out(family, tiny_root, tmp_path):
    request = DataRequest(reads={"x": "mlp_in", "y": "mlp_out"})
    dm = datamodule(save_model(family, tiny_root), write_text(tiny_root), tmp_path / "cache", request)
    dm.prepare_data()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    mlp = mlp_module(dm.load_language_model(), LAYER)
    assert not any(p.requires_grad for p in mlp.parameters())
    torch.testing.assert_close(mlp(batch["x"]), batch["y"], rtol=1e-5, atol=1e-5)
    assert mlp_family(dm.load_language_model()) == {"llama": "swiglu", "neox": "gelu", "gpt2": "gelu_new"}[family]


def test_transformer_lens_names():
    assert [transformer_lens_name(3, kind) for kind in HOOK_KINDS] == [
        "blocks.3.hook_resid_pre",
        "blocks.3.ln2.hook_normalized",
        "blocks.3.hook_mlp_out",
        "blocks.3.hook_resid_post",
    ]


def test_unknown_hook_or_layer_lists_the_valid_ones(tiny_root, tmp_path):
    model = load_model(str(save_model("gpt2", tiny_root)), device="cpu")
    with pytest.raises(ValueError, match=r"valid hooks are \['resid_pre', 'mlp_in', 'mlp_out', 'resid_post'\]"):
        hook_point(model, 0, "attn_out")
    with pytest.raises(ValueError, match=r"layers 0\.\.2"):
        hook_point(model, 3, "resid_post")
    with pytest.raises(ValueError, match=r"hook point 'layers.1.resid_mid' names no module .* Valid hooks are"):
        datamodule(save_model("gpt2", tiny_root), write_text(tiny_root), tmp_path / "c", hook="resid_mid").prepare_data()
    with pytest.raises(ValueError, match="Valid hooks are"):
        dm = datamodule(save_model("gpt2", tiny_root), write_text(tiny_root), tmp_path / "c",
                        DataRequest(reads={"x": "attn_out"}))
        dm.prepare_data()
    with pytest.raises(ValueError, match=r"layers 0\.\.2"):
        datamodule(save_model("gpt2", tiny_root), write_text(tiny_root), tmp_path / "c", DataRequest(), layer=9).prepare_data()


@pytest.mark.parametrize("family", FAMILIES)
def test_replace_and_zero_ablate_splice_into_the_forward(family, tiny_root):
    model = load_model(str(save_model(family, tiny_root)), device="cpu")
    tokens = torch.randint(3, 60, (2, 12))
    kinds = ["mlp_out", "resid_post"]
    with torch.no_grad(), ActivationRecorder(model, LAYER, kinds) as clean:
        logits = model(input_ids=tokens).logits
    with torch.no_grad(), zero_ablate_hook(model, LAYER, "mlp_out"), ActivationRecorder(model, LAYER, kinds) as ablated:
        model(input_ids=tokens)
    assert ablated.values["mlp_out"].abs().max() == 0
    # The MLP output enters the residual stream additively, in every family.
    torch.testing.assert_close(ablated.values["resid_post"], clean.values["resid_post"] - clean.values["mlp_out"], rtol=1e-5, atol=1e-5)
    with torch.no_grad(), replace_hook(model, LAYER, "mlp_out", lambda a: 2 * a), ActivationRecorder(model, LAYER, kinds) as doubled:
        model(input_ids=tokens)
    torch.testing.assert_close(doubled.values["resid_post"], clean.values["resid_post"] + clean.values["mlp_out"], rtol=1e-5, atol=1e-5)
    # resid_post of a layer and resid_pre of the next are the same tensor: splicing either is equivalent.
    shift = torch.randn(32)
    with torch.no_grad(), replace_hook(model, LAYER, "resid_post", lambda a: a + shift):
        via_post = model(input_ids=tokens).logits
    with torch.no_grad(), replace_hook(model, LAYER + 1, "resid_pre", lambda a: a + shift):
        via_pre = model(input_ids=tokens).logits
    torch.testing.assert_close(via_post, via_pre)
    assert not torch.allclose(via_post, logits)
    with torch.no_grad(), replace_hook(model, LAYER, "mlp_in", torch.zeros_like), ActivationRecorder(model, LAYER, ["mlp_out"]) as zero_in:
        model(input_ids=tokens)
    torch.testing.assert_close(zero_in.values["mlp_out"], mlp_module(model, LAYER)(torch.zeros(2, 12, 32)))
    with torch.no_grad():  # hooks are gone after their blocks
        torch.testing.assert_close(model(input_ids=tokens).logits, logits)
