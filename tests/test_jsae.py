"""JSAE plugin: the efficient Jacobian block against autograd, the MLP readers, lambda = 0 as two
independent SAEs, and a fit with its metrics, pictures, export and checkpoint."""

from __future__ import annotations

import math
from pathlib import Path
import xml.etree.ElementTree as ET

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from safetensors.torch import save_file
from transformers import GPT2Config, GPTNeoXConfig, LlamaConfig
from transformers.models.gpt2.modeling_gpt2 import GPT2MLP
from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXMLP
from transformers.models.llama.modeling_llama import LlamaMLP

from lightning_sae.module import SAEModule
from lightning_sae.sae import TopKSAE
from lightning_sae.tensor_data import TensorDataModule
from lightning_sae_jsae import FrozenMLP, JSAEModule, JacobianStats, active_jacobian, active_jacobian_l1, mlp_from_model
from lightning_sae_jsae.analysis import classify_response, linearity_sweep, on_the_line
from lightning_sae_jsae.svg import bar_chart, scatter_plot

D, D_MLP = 12, 40


@pytest.fixture(autouse=True)
def one_thread():
    """These tensors are tiny: a second thread only adds synchronisation, which on a busy machine
    costs a scheduler time slice per operation."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def hf_mlp(family: str) -> tuple[torch.nn.Module, str]:
    """A randomly initialised transformers MLP module of each family, in float64."""
    torch.manual_seed(0)
    if family == "gelu":  # GPT-NeoX / Pythia
        module = GPTNeoXMLP(GPTNeoXConfig(hidden_size=D, intermediate_size=D_MLP, hidden_act="gelu", num_attention_heads=2))
    elif family == "gelu_new":  # GPT-2 (Conv1D weights)
        module = GPT2MLP(D_MLP, GPT2Config(n_embd=D, n_head=2, activation_function="gelu_new"))
        for p in module.parameters():  # GPT-2 initialises biases to zero; make them matter
            torch.nn.init.normal_(p, std=0.3)
    else:  # Llama SwiGLU
        module = LlamaMLP(LlamaConfig(hidden_size=D, intermediate_size=D_MLP, hidden_act="silu", num_attention_heads=2))
    return module.double().eval(), family


def random_sae(d_sae: int, k: int, seed: int) -> TopKSAE:
    sae = TopKSAE(D, d_sae, k, seed=seed).double()
    generator = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(d_sae, D, generator=generator, dtype=torch.float64) / math.sqrt(D))
        sae.b_enc.copy_(0.3 * torch.randn(d_sae, generator=generator, dtype=torch.float64) - 0.2)
        sae.b_dec.copy_(0.1 * torch.randn(D, generator=generator, dtype=torch.float64))
    return sae


@pytest.mark.parametrize("family", ["gelu", "gelu_new", "swiglu"])
def test_frozen_mlp_reproduces_transformers_module(family):
    module, family = hf_mlp(family)
    mlp = FrozenMLP.from_module(module, family).double()
    x = torch.randn(7, D, dtype=torch.float64)
    torch.testing.assert_close(mlp(x), module(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("family", ["gelu", "gelu_new", "swiglu"])
def test_active_block_equals_autograd_jacobian_of_composed_function(family):
    """J = d (encoder_out o MLP o decoder_in) / d z on the active latents, at z's reconstruction."""
    module, family = hf_mlp(family)
    mlp = FrozenMLP.from_module(module, family).double()
    sae_in, sae_out = random_sae(48, 6, seed=1), random_sae(56, 5, seed=2)
    x = 1.5 * torch.randn(9, D, dtype=torch.float64)
    code_in = sae_in.encode(x)
    xhat = sae_in.decode(code_in).detach()
    with torch.no_grad():  # about 4 of 56 positive per token: some tokens have fewer than k = 5
        sae_out.b_enc.fill_(-torch.quantile((module(xhat) - sae_out.b_dec) @ sae_out.W_enc.T, 0.93).item())
    code_out = sae_out.encode(module(xhat))
    assert (code_out.values <= 0).any(), "want some selected-but-inactive output latents to exercise relu'"
    J = active_jacobian(mlp, xhat, sae_in.W_dec, code_in.indices, sae_out.W_enc, code_out.indices, code_out.values > 0, chunk_tokens=4)
    for n in range(x.shape[0]):
        I_in, I_out = code_in.indices[n], code_out.indices[n]

        def f_s(z_active):
            x_rec = z_active @ sae_in.W_dec[I_in] + sae_in.b_dec
            y = module(x_rec[None])[0]
            return torch.relu((y - sae_out.b_dec) @ sae_out.W_enc[I_out].T + sae_out.b_enc[I_out])

        expected = torch.autograd.functional.jacobian(f_s, code_in.values[n].detach())
        torch.testing.assert_close(J[n].detach(), expected, rtol=1e-10, atol=1e-12)


def naive_jacobian(mlp: FrozenMLP, x, W_dec, I_in, W_enc, I_out):
    """Per token, dense in the MLP width, straight from the formula (what the reference does)."""
    c = mlp.slopes(x)
    A = W_enc[I_out] @ mlp.W_out  # [N, k_out, d_mlp]
    B = W_dec[I_in] @ mlp.W_in.T  # [N, k_in, R]
    return torch.einsum("nbm,nam->nba", A, mlp.fold(B * c[:, None]))


def block_problem(family: str):
    """A float64 MLP of transformers' own module, decoder/encoder rows that need gradients, and
    8 tokens with 4 input and 5 output active latents each."""
    module, family = hf_mlp(family)
    mlp = FrozenMLP.from_module(module, family).double()
    W_dec = torch.randn(30, D, dtype=torch.float64, requires_grad=True)
    W_enc = torch.randn(25, D, dtype=torch.float64, requires_grad=True)
    x = torch.randn(8, D, dtype=torch.float64)
    I_in = torch.stack([torch.randperm(30)[:4] for _ in range(8)])
    I_out = torch.stack([torch.randperm(25)[:5] for _ in range(8)])
    return mlp, W_dec, W_enc, x, I_in, I_out


@pytest.mark.parametrize("family", ["gelu", "swiglu"])
@pytest.mark.parametrize("chunk", [1, 3, 1000])
def test_block_gradients_match_naive_autograd(family, chunk):
    mlp, W_dec, W_enc, x, I_in, I_out = block_problem(family)
    weights = torch.randn(8, 5, 4, dtype=torch.float64)
    fast = (active_jacobian(mlp, x, W_dec, I_in, W_enc, I_out, chunk_tokens=chunk) * weights).sum()
    grads = torch.autograd.grad(fast, (W_dec, W_enc))
    slow = (naive_jacobian(mlp, x, W_dec, I_in, W_enc, I_out) * weights).sum()
    expected = torch.autograd.grad(slow, (W_dec, W_enc))
    torch.testing.assert_close(fast, slow, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("family", ["gelu", "swiglu"])
@pytest.mark.parametrize("chunk", [1, 3, 1000])
def test_fused_l1_value_and_gradients_match_naive_autograd(family, chunk):
    """The training penalty mean |J * active| and its gradients, computed in one pass, against
    autograd through the naive per-token formula."""
    mlp, W_dec, W_enc, x, I_in, I_out = block_problem(family)
    active = torch.rand(8, 5) > 0.2
    fast = active_jacobian_l1(mlp, x, W_dec, I_in, W_enc, I_out, active, chunk_tokens=chunk)
    (3.0 * fast).backward()  # a non-unit upstream gradient must scale the table gradients
    slow = (naive_jacobian(mlp, x, W_dec, I_in, W_enc, I_out) * active.unsqueeze(-1)).abs().mean()
    expected = torch.autograd.grad(3.0 * slow, (W_dec, W_enc))
    torch.testing.assert_close(fast, slow, rtol=1e-12, atol=1e-12)
    for got, want in zip((W_dec.grad, W_enc.grad), expected):
        torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-12)


def test_fused_l1_reuses_its_buffers_safely_across_steps_and_within_one_graph():
    """Step after step the table gradients come from reused buffers; two penalties in one graph
    (both forwards before one backward) must not share one."""
    module, family = hf_mlp("gelu")
    mlp = FrozenMLP.from_module(module, family).double()
    generator = torch.Generator().manual_seed(5)
    W_dec = torch.randn(40, D, dtype=torch.float64, generator=generator, requires_grad=True)
    W_enc = torch.randn(40, D, dtype=torch.float64, generator=generator, requires_grad=True)

    def batch():
        x = torch.randn(6, D, dtype=torch.float64, generator=generator)
        I_in = torch.stack([torch.randperm(40, generator=generator)[:4] for _ in range(6)])
        I_out = torch.stack([torch.randperm(40, generator=generator)[:4] for _ in range(6)])
        return x, I_in, I_out

    def naive(x, I_in, I_out):
        return naive_jacobian(mlp, x, W_dec, I_in, W_enc, I_out).abs().mean()

    for _ in range(3):  # consecutive steps
        args = batch()
        fast = torch.autograd.grad(active_jacobian_l1(mlp, args[0], W_dec, args[1], W_enc, args[2]), (W_dec, W_enc))
        slow = torch.autograd.grad(naive(*args), (W_dec, W_enc))
        for got, want in zip(fast, slow):
            torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-12)
    first, second = batch(), batch()
    both = active_jacobian_l1(mlp, first[0], W_dec, first[1], W_enc, first[2]) + 2 * active_jacobian_l1(mlp, second[0], W_dec, second[1], W_enc, second[2])
    fast = torch.autograd.grad(both, (W_dec, W_enc))
    slow = torch.autograd.grad(naive(*first) + 2 * naive(*second), (W_dec, W_enc))
    for got, want in zip(fast, slow):
        torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-12)


def test_mlp_from_model_reads_each_architecture():
    from transformers import GPT2LMHeadModel, GPTNeoXForCausalLM, LlamaForCausalLM

    small = dict(vocab_size=50, num_attention_heads=2)
    models = [
        (LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_key_value_heads=2, **small)), "swiglu", lambda m: m.model.layers[1].mlp),
        (GPTNeoXForCausalLM(GPTNeoXConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=2, **small)), "gelu", lambda m: m.gpt_neox.layers[1].mlp),
        (GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=50)), "gelu_new", lambda m: m.transformer.h[1].mlp),
    ]
    for model, family, block in models:
        mlp = mlp_from_model(model.eval(), 1)
        assert mlp.family == family
        x = torch.randn(5, 16)
        torch.testing.assert_close(mlp(x), block(model)(x), rtol=1e-5, atol=1e-5)


def test_mlp_save_load_round_trip(tmp_path):
    module, family = hf_mlp("swiglu")
    mlp = FrozenMLP.from_module(module, family)
    mlp.save(tmp_path / "mlp.safetensors")
    loaded = FrozenMLP.load(tmp_path / "mlp.safetensors")
    assert loaded.family == "swiglu" and loaded.gated
    x = torch.randn(3, D)
    torch.testing.assert_close(loaded(x), mlp(x))


def test_jacobian_stats_counts_and_fractions():
    J = torch.tensor([[[0.001, -0.02], [0.012, 0.5]], [[0.0, 0.0], [0.0, -0.007]]])
    stats = JacobianStats((0.005, 0.01)).to(torch.float64)
    stats.update(J)
    out = stats.compute()
    assert out["jacobian_count_above_0.005"].item() == pytest.approx((3 + 1) / 2)
    assert out["jacobian_count_above_0.01"].item() == pytest.approx(3 / 2)
    assert out["jacobian_fraction_above_0.01"].item() == pytest.approx(3 / 8)
    assert out["jacobian_l1"].item() == pytest.approx(J.abs().sum().item() / 8)


# ---- training --------------------------------------------------------------------------------------
def pair_data(tmp_path, mlp: FrozenMLP, tokens: int = 1200, seed: int = 0) -> str:
    """x with a sparse structure, y = MLP(x); also x-only and y-as-x files for single-SAE runs."""
    generator = torch.Generator().manual_seed(seed)
    directions = torch.randn(64, mlp.d_in, generator=generator)
    codes = torch.rand(tokens, 64, generator=generator) * (torch.rand(tokens, 64, generator=generator) < 0.08)
    x = codes @ directions + 0.05 * torch.randn(tokens, mlp.d_in, generator=generator)
    with torch.no_grad():
        y = mlp(x)
    save_file({"x": x, "y": y}, str(tmp_path / "pair.safetensors"))
    save_file({"x": y}, str(tmp_path / "y_as_x.safetensors"))
    return str(tmp_path / "pair.safetensors")


def small_mlp(family: str = "swiglu") -> FrozenMLP:
    module, family = hf_mlp(family)
    return FrozenMLP.from_module(module.float(), family)


def fit(module, path, steps: int, logger=False, val: bool = False, root=None):
    data = TensorDataModule(path=path, batch_size=100, validation_fraction=0.1 if val else 0.0, seed=3)
    trainer = L.Trainer(
        max_steps=steps, accelerator="cpu", logger=logger, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=2 if val else 0, default_root_dir=root,
    )
    trainer.fit(module, data)
    return trainer


@pytest.mark.parametrize("reconstruction", ["fvu", "mse"])
def test_lambda_zero_trains_like_two_independent_saes(tmp_path, reconstruction):
    mlp = small_mlp()
    path = pair_data(tmp_path, mlp)
    common = dict(k=4, d_sae=48, lr=3e-3, dead_tokens=300, warmup_steps=2, seed=5)
    pair = JSAEModule(jacobian_coefficient=0.0, reconstruction_loss=reconstruction, mlp=mlp, **common)
    fit(pair, path, steps=12, root=tmp_path / "pair_run")

    class SingleSAE(SAEModule):
        """SAEModule with the pair's reconstruction loss (FVU is SAEModule's own)."""

        def training_loss(self, batch):
            step = self.sae_step("sae", batch["x"], self.selector)
            x = batch["x"]
            scale = 1.0 if reconstruction == "fvu" else (x - x.mean(0)).pow(2).mean().detach()
            return scale * step.loss

    # The pair seeds its SAEs seed and seed + 1; single runs use the same data order.
    alone_in = SingleSAE(**common)
    fit(alone_in, str(tmp_path / "pair.safetensors"), steps=12, root=tmp_path / "in_run")
    alone_out = SingleSAE(**{**common, "seed": common["seed"] + 1})
    fit(alone_out, str(tmp_path / "y_as_x.safetensors"), steps=12, root=tmp_path / "out_run")
    for name, alone in (("sae_in", alone_in), ("sae_out", alone_out)):
        for key, value in alone.get_sae("sae").state_dict().items():
            torch.testing.assert_close(pair.get_sae(name).state_dict()[key], value, rtol=1e-6, atol=1e-7)


def test_mse_reconstruction_is_elementwise_mse():
    pair = JSAEModule(k=4, d_sae=48, mlp=small_mlp(), widths={"x": D, "y": D})
    x = torch.randn(50, D)
    step = pair.sae_step("sae_in", x)  # nothing is dead yet, so AuxK is 0
    torch.testing.assert_close(pair.reconstruction_loss(step, x), torch.nn.functional.mse_loss(step.xhat, x))


def test_fit_logs_metrics_pictures_exports_and_reloads(tmp_path):
    mlp = small_mlp("gelu")
    path = pair_data(tmp_path, mlp)
    logger = TensorBoardLogger(str(tmp_path), name="tb", default_hp_metric=False)
    pair = JSAEModule(k=4, d_sae=48, lr=3e-3, jacobian_coefficient=0.5, jacobian_warmup_fraction=0.5, mlp=mlp, dead_tokens=300)
    trainer = fit(pair, path, steps=10, logger=logger, val=True, root=str(tmp_path))
    metrics = trainer.callback_metrics
    for name in ["val/jacobian_at_x/l1", "val/jacobian_at_x/count_above_0.01", "val/jacobian_at_x/fraction_above_0.02",
                 "val/jacobian_at_xhat/l1", "val/jacobian_at_xhat/count_above_0.005",
                 "val/sae_in/explained_variance", "val/sae_out/explained_variance", "val/sae_in/l0",
                 "val/sae_out/dead_fraction", "train/jacobian_l1"]:
        assert name in metrics, name
    assert pair.jacobian_coefficient_now() == pytest.approx(0.5)  # warm-up (5 steps) is over
    exported = tmp_path / "tb" / "version_0" / "sae"
    assert (exported / "sae_in" / "cfg.json").is_file() and (exported / "sae_out" / "cfg.json").is_file()
    assert FrozenMLP.load(exported / "mlp.safetensors").family == "gelu"

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb" / "version_0"), size_guidance={"images": 0, "histograms": 0}).Reload()
    assert "val/jacobian_at_xhat/abs" in events.Tags()["histograms"]
    assert "val/jacobian_at_xhat/example_0" in events.Tags()["images"]

    checkpoint = tmp_path / "pair.ckpt"
    trainer.save_checkpoint(checkpoint)
    reloaded = JSAEModule.load_from_checkpoint(checkpoint)
    x = torch.randn(4, D)
    torch.testing.assert_close(reloaded.mlp(x), mlp(x))
    assert "mlp" not in reloaded.hparams


def test_jacobian_penalty_makes_the_jacobian_sparser(tmp_path):
    mlp = small_mlp("gelu")
    path = pair_data(tmp_path, mlp, tokens=2000)
    l1 = {}
    for lam in (0.0, 50.0):
        pair = JSAEModule(k=4, d_sae=48, lr=3e-3, jacobian_coefficient=lam, mlp=mlp, dead_tokens=10_000)
        trainer = fit(pair, path, steps=40, val=True)
        l1[lam] = float(trainer.callback_metrics["val/jacobian_at_x/l1"])
    assert l1[50.0] < 0.8 * l1[0.0]


def test_registered_and_yaml_configs_parse():
    from lightning_sae.cli import SAECLI
    from lightning_sae.registry import VARIANTS, load_all_plugins, load_plugins

    load_all_plugins()
    assert load_plugins(VARIANTS)["jsae"] is JSAEModule
    repo = Path(__file__).resolve().parents[1]
    for config in (repo / "configs/jsae.yaml", repo / "configs/jsae_pythia70m.yaml", repo / "configs/jsae_pythia410m.yaml"):
        cli = SAECLI(
            __import__("lightning_sae.module", fromlist=["SAETrainingModule"]).SAETrainingModule,
            L.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True, run=False,
            args=["--config", str(config), "--trainer.logger=false"],
        )
        assert isinstance(cli.model, JSAEModule)
        assert cli.model.data_request().roles == {"x": "mlp_in", "y": "mlp_out"}


# ---- analyses ---------------------------------------------------------------------------------------
def test_on_the_line_agrees_for_small_steps():
    module, family = hf_mlp("gelu")
    mlp = FrozenMLP.from_module(module, family).double()
    sae_in, sae_out = random_sae(48, 4, seed=1), random_sae(48, 4, seed=2)
    x = torch.randn(20, D, dtype=torch.float64)
    result = on_the_line(mlp, sae_in, sae_out, x, step=1e-5)  # tiny steps: first order is exact
    assert result.J.shape == result.delta.shape
    assert result.agreement(1e-3) == pytest.approx(1.0)
    assert sum(count for _, count, _ in result.table()) == result.J.numel()


def test_linearity_classes():
    t = torch.linspace(0, 2, 100, dtype=torch.float64)
    assert classify_response(t, 3 * t + 1) == "linear"
    assert classify_response(t, torch.relu(2 * (t - 0.7)) + 0.5 * (t > 0.7)) == "jumprelu"
    assert classify_response(t, torch.sin(5 * t)) == "other"
    module, family = hf_mlp("swiglu")
    mlp = FrozenMLP.from_module(module, family).double()
    sae_in, sae_out = random_sae(48, 4, seed=1), random_sae(48, 4, seed=2)
    sweep = linearity_sweep(mlp, sae_in, sae_out, torch.randn(6, D, dtype=torch.float64), max_pairs=10, min_abs_jacobian=0.0)
    assert sweep.responses.shape == (len(sweep.classes), 100)
    assert set(sweep.classes) <= {"linear", "jumprelu", "other"}


def test_svg_plots_are_wellformed(tmp_path):
    scatter_plot(tmp_path / "s.svg", [0.1, -0.2, 0.3], [0.1, -0.1, 0.25], "J", "-delta", "title", diagonal=True)
    bar_chart(tmp_path / "b.svg", {"linear": 0.5, "jumprelu": 0.3, "other": 0.2}, "title")
    for name in ("s.svg", "b.svg"):
        assert ET.parse(tmp_path / name).getroot().tag.endswith("svg")


def test_analysis_tools_run_on_an_exported_pair(tmp_path, monkeypatch, capsys):
    import importlib.util
    import sys
    from pathlib import Path

    pair = JSAEModule(k=4, d_sae=48, mlp=small_mlp("gelu"), widths={"x": D, "y": D})
    pair.save_saes(tmp_path / "sae")
    save_file({"x": torch.randn(40, D)}, str(tmp_path / "x.safetensors"))
    tools = Path(__file__).resolve().parent.parent / "tools"
    for tool, extra, outputs in (
        ("jsae_on_the_line", ["--out", str(tmp_path / "line.svg")], ["line.svg"]),
        ("jsae_linearity", ["--out", str(tmp_path / "lin"), "--min-abs-jacobian", "0"], ["lin_classes.svg", "lin_examples.svg"]),
    ):
        spec = importlib.util.spec_from_file_location(tool, tools / f"{tool}.py")
        script = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(script)
        monkeypatch.setattr(sys, "argv", [tool, "--pair", str(tmp_path / "sae"), "--inputs", str(tmp_path / "x.safetensors"), *extra])
        script.main()
        assert "|---|" in capsys.readouterr().out
        for name in outputs:
            assert ET.parse(tmp_path / name).getroot().tag.endswith("svg")


def test_mlp_weights_missing_a_tensor_is_one_clear_error(tmp_path):
    from safetensors.torch import save_file

    from lightning_sae_jsae.mlp import FrozenMLP

    path = tmp_path / "mlp.safetensors"
    save_file({"W_in": torch.randn(8, 4), "b_in": torch.zeros(8), "b_out": torch.zeros(4)}, str(path), metadata={"family": "gelu"})
    with pytest.raises(ValueError, match=r"mlp.safetensors lacks the MLP tensors \['W_out'\]; write it with FrozenMLP.save"):
        FrozenMLP.load(path)
