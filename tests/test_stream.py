"""The stream source and many hook points (issue 12): streamed rows equal cached rows, ranks read
disjoint text, N sites train exactly like N single-site fits, hook points by module path."""

from __future__ import annotations

import itertools

import lightning as L
import pytest
import torch
from data_fixtures import _isolated_caches, datamodule, save_model, tiny_root, write_text  # noqa: F401

from lightning_sae.cli import main
from lightning_sae.data import load_model
from lightning_sae.data.cache import ShardReader, read_manifest
from lightning_sae.data.extract import Extractor
from lightning_sae.data.hooks import expand_hookpoints, mlp_module, resolve_hookpoint
from lightning_sae.data_request import DataRequest
from lightning_sae.module import SAEModule
from lightning_sae.registry import create_selector

PAIR_WITH_GRAD = DataRequest(reads={"x": None, "y": "mlp_out"}, gradients=True)


def _sorted_rows(rows: torch.Tensor) -> torch.Tensor:
    """Rows in a canonical order (lexicographic on the first columns), to compare multisets."""
    order = torch.arange(len(rows))
    for column in reversed(range(4)):
        order = order[torch.sort(rows[order, column], stable=True).indices]
    return rows[order]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_streamed_batches_hold_the_cached_rows(family, tiny_root, tmp_path):
    """Same text, hooks and gradients: each fill of the shuffle buffer holds exactly the next
    rows of the cache, in some order (the buffer's permutation)."""
    model, text = save_model(family, tiny_root), write_text(tiny_root)
    cached = datamodule(model, text, tmp_path / "cache", PAIR_WITH_GRAD)
    cached.prepare_data()
    cached.setup("fit")
    reader = ShardReader(tmp_path / "cache", read_manifest(tmp_path / "cache"), "train", ["x", "y", "grad"])
    streamed = datamodule(model, text, None, PAIR_WITH_GRAD, source="stream", buffer_tokens=64)
    streamed.setup("fit")
    batches = list(itertools.islice(iter(streamed.train_dataloader()), 6))  # three fills of two batches
    assert all(set(batch) == {"x", "y", "grad"} and batch["x"].shape == (32, 32) for batch in batches)
    rows = reader(torch.arange(6 * 32))
    for fill in range(3):
        for key in ("x", "y", "grad"):
            mine = torch.cat([batches[2 * fill][key], batches[2 * fill + 1][key]])
            theirs = rows[key][fill * 64 : (fill + 1) * 64]
            torch.testing.assert_close(_sorted_rows(mine), _sorted_rows(theirs), rtol=1e-5, atol=1e-6, msg=f"{key} fill {fill}")
        assert not torch.equal(mine, theirs)  # really shuffled
    assert streamed.widths == cached.widths == {"x": 32, "y": 32}


def test_ranks_read_disjoint_contexts_and_never_the_validation_ones(tiny_root, tmp_path):
    dm = datamodule(save_model("gpt2", tiny_root), write_text(tiny_root), None, DataRequest(), source="stream")
    plan = dm.context_plan()
    everything = [tuple(c.tolist()) for c in plan.training(0, 1)]
    shares = [[tuple(c.tolist()) for c in plan.training(rank, 3)] for rank in range(3)]
    assert sorted(sum(shares, [])) == sorted(everything) and len(everything) == plan.training_contexts
    assert not set(shares[0]) & set(shares[1]) and not set(shares[1]) & set(shares[2])
    held_out = {tuple(c.tolist()) for c in plan.validation()}
    assert len(held_out) == plan.validation_contexts and not held_out & set(everything)
    equal = [list(plan.validation(rank, 3, equal_shares=True)) for rank in range(3)]
    assert len({len(share) for share in equal}) == 1
    # A stream that runs past the end of its share reads the text again (and says so).
    unlimited = dm.context_plan(limit_training=False)
    first_pass = [tuple(c.tolist()) for c in unlimited.training(0, 1)]
    again = [tuple(c.tolist()) for c in itertools.islice(unlimited.training(0, 1, cycle=True), 2 * len(first_pass))]
    assert again == first_pass + first_pass


def _fit(dm, root, selector: str = "topk", **trainer_args) -> SAEModule:
    L.seed_everything(0)
    module = SAEModule(k=4, d_sae=64, selector=create_selector(selector), lr=1e-3, dead_tokens=200, spliced_eval_contexts=2)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=root,
                        **{"max_epochs": 2, **trainer_args})
    trainer.fit(module, dm)
    return module


@pytest.mark.parametrize("source", ["stream", "cache"])
def test_many_hook_points_in_one_pass_train_the_same_saes_as_one_fit_each(source, tiny_root, tmp_path):
    model, text = save_model("llama", tiny_root), write_text(tiny_root)
    options = dict(source=source, buffer_tokens=64, num_tokens=16 * 24, request=None)
    sites = ["layers.0", "layers.2.mlp_out", "layers.1.self_attn.o_proj"]
    joint = _fit(datamodule(model, text, tmp_path / "joint", hookpoints=sites, **options), tmp_path / "joint_run",
                 selector="gradient_topk")
    assert joint.scopes == sites
    metrics = joint.trainer.callback_metrics
    for site in sites:
        assert f"train/{site}/fvu" in metrics and f"val/{site}/explained_variance" in metrics
        assert f"val/{site}/ce_loss_score" in metrics and f"val/{site}/plain_topk/explained_variance" in metrics
        alone = _fit(datamodule(model, text, tmp_path / site, hookpoints=[site], **options), tmp_path / f"{site}_run",
                     selector="gradient_topk")
        assert alone.scopes == [""] and "train/fvu" in alone.trainer.callback_metrics
        for name, value in alone.get_sae("sae").state_dict().items():
            torch.testing.assert_close(joint.get_sae(f"{site}/sae").state_dict()[name], value, rtol=0, atol=1e-6,
                                       msg=f"{site} {name}")
        assert float(alone.trainer.callback_metrics["val/explained_variance"]) == pytest.approx(
            float(metrics[f"val/{site}/explained_variance"]), abs=1e-5)


def test_a_multi_site_fit_exports_each_sae_in_both_layouts(tiny_root, tmp_path):
    from lightning_sae.formats import load_saelens, load_sparsify

    model, text = save_model("gpt2", tiny_root), write_text(tiny_root)
    dm = datamodule(model, text, None, None, source="stream", layer=[0, 2], buffer_tokens=64, num_tokens=16 * 16)
    module = SAEModule(k=4, d_sae=64, spliced_eval_contexts=0)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", default_root_dir=tmp_path, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, dm)
    root = tmp_path / "lightning_logs" / "version_0"
    for site in ("layers.0", "layers.2"):
        sae, metadata = load_saelens(root / "sae" / site)
        assert metadata["hook_name"] == f"blocks.{site[-1]}.hook_resid_post" and metadata["hookpoint"] == site
        twin, _ = load_sparsify(root / "sparsify", site)
        assert torch.equal(sae.W_enc, module.get_sae(f"{site}/sae").W_enc.detach()) and torch.equal(twin.W_dec, sae.W_dec)


def test_hook_points_by_module_path_and_glob(tiny_root):
    model = load_model(str(save_model("llama", tiny_root)), device="cpu")
    assert expand_hookpoints(model, ["layers.*.mlp"]) == ["layers.0.mlp", "layers.1.mlp", "layers.2.mlp"]
    assert expand_hookpoints(model, ["model.layers.1.mlp:input", "layers.1.resid_post", "model.norm"]) == [
        "layers.1.mlp:input", "layers.1", "model.norm"]
    assert resolve_hookpoint(model, "layers.1.mlp.down_proj").module is mlp_module(model, 1).down_proj
    tokens = torch.randint(3, 200, (2, 16))
    roles = {"a": "layers.1.mlp:input", "b": "layers.1.mlp_in", "c": "layers.1.mlp.down_proj", "d": "layers.1.mlp_out",
             "e": "layers.1", "f": "layers.2:input"}
    out = Extractor(model, None, roles)(tokens)
    assert torch.equal(out["a"], out["b"]) and torch.equal(out["c"], out["d"]) and torch.equal(out["e"], out["f"])
    hidden = model(input_ids=tokens, output_hidden_states=True).hidden_states
    torch.testing.assert_close(out["e"], hidden[2])


def test_gradients_at_several_hook_points_from_one_backward(tiny_root):
    model = load_model(str(save_model("gpt2", tiny_root)), device="cpu")
    tokens = torch.randint(3, 200, (2, 16))
    roles = {"early": "layers.0", "late": "layers.2.mlp_in"}
    out = Extractor(model, None, roles, {"g_early": "early", "g_late": "late"})(tokens)
    for role in roles:
        alone = Extractor(model, None, {"x": roles[role]}, True)(tokens)
        torch.testing.assert_close(out[f"g_{role}"], alone["grad"], rtol=1e-5, atol=1e-7)
        assert alone["grad"].abs().max() > 0


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--data.hookpoints=[layers.*.mlpp]"], "hook point pattern 'layers.*.mlpp' matches no module of LlamaForCausalLM; close names: ["),
        (["--data.source=stream", "--data.buffer_tokens=16"], "buffer_tokens (16) is smaller than one batch (32)"),
        (["--data.layer=[0,1]", "--data.hook=self_attn.nope"], "hook point 'layers.0.self_attn.nope' names no module"),
    ],
)
def test_bad_hook_patterns_and_buffers_are_one_line_errors(extra, message, tiny_root, tmp_path, capsys):
    args = ["fit", "--model=sae", "--model.k=4", "--model.d_sae=64", "--data=lightning_sae.data.ActivationDataModule",
            f"--data.model={save_model('llama', tiny_root)}", f"--data.dataset={write_text(tiny_root)}",
            "--data.context_size=16", "--data.num_tokens=640", "--data.batch_size=32", "--data.device=cpu",
            f"--data.cache_dir={tmp_path / 'c'}", "--trainer.accelerator=cpu", "--trainer.logger=false", *extra]
    with pytest.raises(SystemExit) as stopped:
        main(args)
    assert stopped.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("lightning-sae: error:")]
    assert len(lines) == 1 and message in lines[0], lines
    assert not (tmp_path / "c").exists()  # failed before any model pass


def test_jsae_pairs_at_several_layers_train_like_one_fit_each(tiny_root, tmp_path):
    from lightning_sae_jsae import JSAEModule

    model, text = save_model("llama", tiny_root), write_text(tiny_root)

    def fit(layers, root):
        L.seed_everything(0)
        dm = datamodule(model, text, None, None, source="stream", layer=layers, buffer_tokens=64, num_tokens=16 * 16)
        module = JSAEModule(k=4, d_sae=64, jacobian_coefficient=0.5, jacobian_warmup_fraction=0, lr=1e-3,
                            spliced_eval_contexts=2)
        trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=root)
        trainer.fit(module, dm)
        return module

    joint = fit([0, 2], tmp_path / "joint")
    metrics = joint.trainer.callback_metrics
    for layer in (0, 2):
        site = f"layers.{layer}"
        assert f"val/{site}/jacobian_at_x/l1" in metrics and f"val/{site}/sae_in/explained_variance" in metrics
        assert f"train/{site}/jacobian_l1" in metrics
        alone = fit([layer], tmp_path / site)
        assert float(alone.trainer.callback_metrics["val/jacobian_at_xhat/l1"]) == pytest.approx(
            float(metrics[f"val/{site}/jacobian_at_xhat/l1"]), rel=1e-5)
        for name in ("sae_in", "sae_out"):
            for key, value in alone.get_sae(name).state_dict().items():
                torch.testing.assert_close(joint.get_sae(f"{site}/{name}").state_dict()[key], value, rtol=0, atol=1e-6)
        with joint.site_scope(site):
            assert torch.equal(joint.current_mlp().W_in, alone.mlp.W_in)
    assert (tmp_path / "joint" / "sae" / "layers.2" / "sae_out" / "cfg.json").is_file()
    assert (tmp_path / "joint" / "sae" / "layers.2" / "mlp.safetensors").is_file()


@pytest.mark.parametrize("family", ["opt", "qwen3_moe"])
def test_a_jsae_on_a_model_without_a_readable_mlp_fails_before_any_model_pass(family, tiny_root, tmp_path, capsys):
    """OPT keeps fc1/fc2 in its decoder layer (no MLP module: the pair's hooks do not resolve);
    Qwen3-MoE has an MLP module of experts (the hooks resolve, the MLP cannot be read as one).
    Either way the fit must say so at once, not after building a cache (issue 20)."""
    import transformers

    from data_fixtures import make_tokenizer

    folder = tmp_path / family
    common = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, vocab_size=256, bos_token_id=1,
                  eos_token_id=2, pad_token_id=0)
    if family == "opt":
        model_class = transformers.OPTForCausalLM
        config = transformers.OPTConfig(ffn_dim=64, max_position_embeddings=64, word_embed_proj_dim=32, **common)
        message = "cannot resolve the MLP of layer 1 of OPTForCausalLM"
    else:
        model_class = transformers.Qwen3MoeForCausalLM
        config = transformers.Qwen3MoeConfig(intermediate_size=64, moe_intermediate_size=16, num_experts=4,
                                             num_experts_per_tok=2, num_key_value_heads=2, head_dim=8, **common)
        message = "mixture of experts"
    model_class(config).save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    args = ["fit", "--model=jsae", "--model.k=4", "--model.d_sae=64", "--data=lightning_sae.data.ActivationDataModule",
            f"--data.model={folder}", f"--data.dataset={write_text(tiny_root)}", "--data.layer=1",
            "--data.context_size=16", "--data.num_tokens=640", "--data.batch_size=32", "--data.device=cpu",
            f"--data.cache_dir={tmp_path / 'c'}", "--trainer.accelerator=cpu", "--trainer.logger=false"]
    forwards = []
    forward = model_class.forward
    model_class.forward = lambda *a, **k: (forwards.append(1), forward(*a, **k))[1]
    try:
        with pytest.raises(SystemExit) as stopped:
            main(args)
    finally:
        model_class.forward = forward
    assert stopped.value.code == 2 and not forwards and not (tmp_path / "c").exists()
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("lightning-sae: error:")]
    assert len(lines) == 1 and message in lines[0], lines
