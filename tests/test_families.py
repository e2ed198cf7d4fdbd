"""Every decoder family of lightning_sae.data.families, on tiny random models built from transformers'
config classes (nothing from the hub): the four hook kinds against the family's own forward, dL/dx
against autograd, the JSAE MLP reader against the model's own MLP module, and the spliced CE
against a computation that splices by wrapping a module's forward instead of hooking it.

The test's knowledge of each family (`ANATOMY`) is written here from the transformers source, not
read from the library's table, so a wrong table entry fails."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import Tensor, nn

from eval_helpers import wrapped

from lightning_sae.data import families
from lightning_sae.data.cache import Extractor
from lightning_sae.data.hooks import HOOK_KINDS, hook_point, mlp_family, mlp_module
from lightning_sae.spliced import spliced_metrics
from lightning_sae_jsae import mlp_from_model

LAYER, VOCAB, BOS, D, D_MLP = 1, 64, 1, 32, 48


# model_type -> (config class, model class, extra config, decoder layers path, the norm whose output
# the MLP reads (None: the raw residual), the norm after the MLP (None: none), down projection
# under the MLP, expected mlp_family)
ANATOMY: dict[str, tuple] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}, "model.layers", "post_attention_layernorm", None, "down_proj", "swiglu"),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", {"rotary_pct": 0.5}, "gpt_neox.layers",
                 "post_attention_layernorm", None, "dense_4h_to_h", "gelu"),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", {}, "transformer.h", "ln_2", None, "c_proj", "gelu_new"),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {"head_dim": 8}, "model.layers", "post_attention_layernorm", None,
              "down_proj", "gated_gelu_pytorch_tanh"),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 8, "query_pre_attn_scalar": 8, "sliding_window": 4},
               "model.layers", "pre_feedforward_layernorm", "post_feedforward_layernorm", "down_proj",
               "gated_gelu_pytorch_tanh"),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"head_dim": 8, "query_pre_attn_scalar": 8, "sliding_window": 4},
                    "model.layers", "pre_feedforward_layernorm", "post_feedforward_layernorm", "down_proj",
                    "gated_gelu_pytorch_tanh"),
    "gemma3": ("Gemma3Config", "Gemma3ForConditionalGeneration", {}, "model.language_model.layers",
               "pre_feedforward_layernorm", "post_feedforward_layernorm", "down_proj", "gated_gelu_pytorch_tanh"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}, "model.layers", "post_attention_layernorm", None, "down_proj", "swiglu"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 8}, "model.layers", "post_attention_layernorm", None,
              "down_proj", "swiglu"),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}, "model.layers", "post_attention_layernorm", None, "down_proj", "swiglu"),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}, "model.layers", "post_attention_layernorm", None, "down_proj", "swiglu"),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}, "model.layers", None, "post_feedforward_layernorm", "down_proj", "swiglu"),
    # Outside the table: resolved by looking (model.layers / mlp / c_fc,c_proj or fc1,fc2).
    "starcoder2": ("Starcoder2Config", "Starcoder2ForCausalLM", {}, "model.layers", "post_attention_layernorm", None,
                   "c_proj", "gelu_pytorch_tanh"),
    "phi": ("PhiConfig", "PhiForCausalLM", {}, "model.layers", "input_layernorm", None, "fc2", "gelu_new"),
}
IN_TABLE = [t for t in ANATOMY if t not in ("starcoder2", "phi")]
_GPT2_NAMES = {"hidden_size": "n_embd", "num_hidden_layers": "n_layer", "num_attention_heads": "n_head",
               "max_position_embeddings": "n_positions", "intermediate_size": "n_inner"}
_MODELS: dict[str, nn.Module] = {}


def _at(root: object, path: str) -> object:
    for part in path.split("."):
        root = root[int(part)] if part.isdigit() else getattr(root, part)
    return root


def tiny_model(model_type: str) -> nn.Module:
    """A 3-layer random model of the family in float32, eval mode, frozen; norms perturbed so that
    mlp_in really tests their affine part, weights large enough that the splice changes the loss."""
    if model_type not in _MODELS:
        config_class, model_class, extra = ANATOMY[model_type][:3]
        options = dict(hidden_size=D, intermediate_size=D_MLP, num_hidden_layers=3, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=64, vocab_size=VOCAB, bos_token_id=BOS,
                       eos_token_id=2, pad_token_id=0, initializer_range=0.2, **extra)
        if model_type == "gpt2":
            options = {_GPT2_NAMES.get(k, k): v for k, v in options.items() if k != "num_key_value_heads"}
        if model_type == "gemma3":  # Gemma 3 4B-27B: the text model inside an image-text model
            text = transformers.Gemma3TextConfig(**{**options, **ANATOMY["gemma3_text"][2], "vocab_size": VOCAB + 8})
            vision = transformers.SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                     num_attention_heads=2, image_size=28, patch_size=14)
            options = dict(text_config=text, vision_config=vision, mm_tokens_per_image=4, boi_token_index=VOCAB + 5,
                           eoi_token_index=VOCAB + 6, image_token_index=VOCAB + 7, initializer_range=0.2)
        config = getattr(transformers, config_class)(**options)
        assert config.model_type == model_type
        torch.manual_seed(0)
        model = getattr(transformers, model_class)(config)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "norm" in name or "ln" in name:
                    parameter.add_(0.2 * torch.randn_like(parameter))
        _MODELS[model_type] = model.float().eval().requires_grad_(False)
    return _MODELS[model_type]


def tokens(seed: int = 0) -> Tensor:
    ids = torch.randint(3, VOCAB, (3, 12), generator=torch.Generator().manual_seed(seed))
    ids[:, 0] = BOS
    return ids


def _hidden(value):
    return value[0] if isinstance(value, tuple) else value


def reference_modules(model: nn.Module, model_type: str) -> dict[str, tuple[nn.Module, str]]:
    """Per hook kind, a module and side ("in"/"out") of the family's own anatomy carrying it, to
    splice at or take gradients from. Phi-2's input_layernorm also feeds attention, so its MLP's
    own input is used there."""
    _, _, _, layers, norm, _, down, _ = ANATOMY[model_type]
    block = _at(model, f"{layers}.{LAYER}")
    own_norm = norm is not None and model_type != "phi"
    return {
        "resid_pre": (block, "in"),
        "mlp_in": (getattr(block, norm), "out") if own_norm else (block.mlp, "in"),
        "mlp_out": (getattr(block.mlp, down), "out"),
        "resid_post": (block, "out"),
    }


def reference_activations(model: nn.Module, model_type: str, ids: Tensor) -> dict[str, Tensor]:
    """The four tensors from output_hidden_states and the family's own submodules; for the families
    with a post-attention norm on the attention output (Gemma 2/3, OLMo 2) also resid_mid."""
    _, _, _, layers, norm, post_norm, down, _ = ANATOMY[model_type]
    block = _at(model, f"{layers}.{LAYER}")
    seen: dict[str, Tensor] = {}

    def record(key: str):
        return lambda module, args, out: seen.__setitem__(key, out)

    handles = [getattr(block.mlp, down).register_forward_hook(record("mlp_out"))]
    if norm:
        handles.append(getattr(block, norm).register_forward_hook(record("mlp_in")))
    if post_norm:  # the attention output goes through post_attention_layernorm into the residual
        handles.append(block.post_attention_layernorm.register_forward_hook(record("attn")))
    try:
        with torch.no_grad():
            hidden = model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
    finally:
        for handle in handles:
            handle.remove()
    if post_norm:
        seen["resid_mid"] = hidden[LAYER] + seen.pop("attn")
    if not norm:  # OLMo 2: the MLP reads resid_mid itself
        seen["mlp_in"] = seen["resid_mid"]
    return {"resid_pre": hidden[LAYER], "resid_post": hidden[LAYER + 1], **seen}


# ---- the table --------------------------------------------------------------------------------------
def test_table_covers_the_families_researchers_use():
    names = {family.name for family in families.FAMILIES}
    assert {"Llama", "GPT-NeoX", "GPT-2", "Gemma", "Gemma 2", "Gemma 3", "Gemma 3 with vision", "Qwen2", "Qwen3", "Mistral",
            "Phi-3", "OLMo 2"} <= names
    for model_type in IN_TABLE:
        assert families.family_of(tiny_model(model_type)) is not None, model_type
    for model_type in ANATOMY.keys() - set(IN_TABLE):
        assert families.family_of(tiny_model(model_type)) is None, model_type


@pytest.mark.parametrize("model_type", IN_TABLE)
def test_table_entry_matches_the_model(model_type):
    """The table's norms and projections are the family's real submodules, and its activation
    attribute holds the activation the MLP runs."""
    model = tiny_model(model_type)
    family = families.family_of(model)
    _, _, _, layers, norm, post_norm, down, expected = ANATOMY[model_type]
    block = _at(model, f"{layers}.{LAYER}")
    assert (family.mlp_norm, family.post_mlp_norm, family.projections[-1]) == (norm, post_norm, down)
    config = getattr(model.config, "text_config", model.config)
    assert getattr(config, family.activation_config) == family.activation
    assert mlp_family(model, LAYER) == expected
    assert families.decoder_layers(model) is _at(model, layers)
    assert mlp_module(model, LAYER) is block.mlp


def test_docs_table_agrees_with_the_code():
    """docs/models.md's family table states, per family, what the code does."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "models.md").read_text()
    rows = {}
    for line in text.splitlines():
        cells = [c.strip().strip("`") for c in line.strip().strip("|").split("|")]
        if len(cells) >= 7 and cells[1] and re.fullmatch(r"[a-z0-9_, ]+", cells[1]):
            rows[cells[0]] = cells
    for family in families.FAMILIES:
        name, model_types, kind, activation, norm, post_norm = rows[family.name][:6]
        assert model_types.replace(" ", "").split(",") == list(family.model_types)
        assert kind.split(":")[0] == family.mlp_kind.replace("_", " "), family.name
        assert activation.startswith(family.activation), family.name
        assert norm.startswith(family.mlp_norm or "none"), family.name
        assert post_norm.startswith(family.post_mlp_norm or "none"), family.name


# ---- hook points ------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_type", list(ANATOMY))
def test_four_hooks_are_the_tensors_the_forward_computes(model_type):
    from lightning_sae.data.hooks import ActivationRecorder

    model, ids = tiny_model(model_type), tokens()
    want = reference_activations(model, model_type, ids)
    with torch.no_grad(), ActivationRecorder(model, LAYER, list(HOOK_KINDS)) as recorder:
        model(input_ids=ids, use_cache=False)
    for kind in HOOK_KINDS:
        torch.testing.assert_close(recorder.values[kind], want[kind], rtol=1e-5, atol=1e-6, msg=f"{model_type} {kind}")
    # mlp_out is the MLP module's output; where a norm follows it (Gemma 2/3, OLMo 2), what joins
    # the residual stream is that norm of it, and mlp_out itself is not.
    post_norm = ANATOMY[model_type][5]
    if post_norm:
        block = _at(model, f"{ANATOMY[model_type][3]}.{LAYER}")
        added = getattr(block, post_norm)(recorder.values["mlp_out"])
        torch.testing.assert_close(want["resid_post"], want["resid_mid"] + added, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(added, recorder.values["mlp_out"], atol=1e-2)


@pytest.mark.parametrize("model_type", list(ANATOMY))
@pytest.mark.parametrize("kind", HOOK_KINDS)
def test_cached_gradients_match_autograd(model_type, kind):
    """Extractor's dL/dx (L the summed next-token CE) against autograd through the test's own leaf."""
    model, ids = tiny_model(model_type), tokens(1)
    got = Extractor(model, LAYER, {"x": kind}, gradients=True)(ids)
    module, side = reference_modules(model, model_type)[kind]
    leaf = {}

    def make_leaf(hidden: Tensor) -> Tensor:
        leaf["x"] = hidden.detach().requires_grad_(True)
        return leaf["x"]

    with torch.enable_grad(), wrapped(module, side, make_leaf):
        logits = model(input_ids=ids, use_cache=False).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
        (want,) = torch.autograd.grad(loss, leaf["x"])
    torch.testing.assert_close(got["x"], leaf["x"].detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got["grad"], want, rtol=1e-4, atol=1e-6)
    assert want.abs().max() > 1e-3  # a gradient that is really there


@pytest.mark.parametrize("model_type", list(ANATOMY))
@pytest.mark.parametrize("kind", HOOK_KINDS)
def test_spliced_ce_equals_an_independent_splice(model_type, kind):
    model, ids = tiny_model(model_type), tokens(2)
    generator = torch.Generator().manual_seed(3)
    mix = torch.eye(D) + 0.3 * torch.randn(D, D, generator=generator)  # a stand-in reconstruction

    def reconstruct(rows: Tensor, grad: Tensor | None) -> Tensor:
        return rows @ mix

    got = spliced_metrics(model, ids, LAYER, kind, reconstruct, bos_token_id=BOS)

    module, side = reference_modules(model, model_type)[kind]
    keep = (ids == BOS)[..., None]

    # SAELens's conventions (lightning_sae/spliced.py): the spliced forward keeps BOS positions
    # clean, the zero-ablated one zeroes every position; predictions made at BOS are dropped; CE
    # over positions 0..T-2, KL over 0..T-1.
    def log_probs(fn: Callable[[Tensor], Tensor] | None, clean_bos: bool = True) -> Tensor:
        with torch.no_grad():
            if fn is None:
                logits = model(input_ids=ids).logits
            else:
                with wrapped(module, side, lambda h: torch.where(keep, h, fn(h)) if clean_bos else fn(h)):
                    logits = model(input_ids=ids).logits
        return F.log_softmax(logits.double(), -1)

    counted = ids != BOS
    clean, spliced = log_probs(None), log_probs(lambda h: h @ mix)
    zero = log_probs(torch.zeros_like, clean_bos=False)

    def mean_ce(lp: Tensor) -> float:
        nll = -lp[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
        return nll[counted[:, :-1]].mean().item()

    ce = {name: mean_ce(lp) for name, lp in (("clean", clean), ("spliced", spliced), ("zero", zero))}
    kl_spliced = (clean.exp() * (clean - spliced)).sum(-1)[counted].mean().item()
    assert abs(ce["zero"] - ce["clean"]) > 1e-3 and abs(ce["spliced"] - ce["clean"]) > 1e-4  # the splice matters
    assert got["ce_loss_without_sae"] == pytest.approx(ce["clean"], rel=1e-5)
    assert got["ce_loss_with_sae"] == pytest.approx(ce["spliced"], rel=1e-5)
    assert got["ce_loss_with_ablation"] == pytest.approx(ce["zero"], rel=1e-5)
    assert got["ce_loss_score"] == pytest.approx((ce["zero"] - ce["spliced"]) / (ce["zero"] - ce["clean"]), rel=1e-3, abs=1e-4)
    assert got["kl_div_with_sae"] == pytest.approx(kl_spliced, rel=1e-3, abs=1e-6)


# ---- the JSAE MLP reader ---------------------------------------------------------------------------
@pytest.mark.parametrize("model_type", list(ANATOMY))
def test_jsae_reader_reproduces_the_model_mlp_and_its_jacobian(model_type):
    model = tiny_model(model_type)
    module = _at(model, f"{ANATOMY[model_type][3]}.{LAYER}.mlp")
    mlp = mlp_from_model(model, LAYER)
    assert mlp.family == ANATOMY[model_type][7]
    x = 2.0 * torch.randn(20, D, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), module(x), rtol=1e-5, atol=1e-5)
    # The Jacobian the JSAE builds from the reader's slopes: dy = W_out fold(c * (W_in dx)).
    mlp64, module64, point = mlp.double(), module.double(), x[0].double()
    coefficients = mlp64.slopes(point[None])[0]
    ours = mlp64.W_out @ mlp64.fold((coefficients[:, None] * mlp64.W_in).T).T
    want = torch.autograd.functional.jacobian(module64, point)
    module.float()
    torch.testing.assert_close(ours, want, rtol=1e-9, atol=1e-10)


# ---- models outside the table -----------------------------------------------------------------------
def test_model_without_an_mlp_submodule_keeps_its_residual_hooks():
    """OPT's decoder layer holds fc1/fc2 itself: resid_pre/resid_post work, mlp_in names what is missing."""
    config = transformers.OPTConfig(hidden_size=D, ffn_dim=D_MLP, num_hidden_layers=3, num_attention_heads=4,
                                    vocab_size=VOCAB, word_embed_proj_dim=D, max_position_embeddings=64)
    model = transformers.OPTForCausalLM(config).eval()
    ids = tokens()
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
        values = Extractor(model, LAYER, {"x": "resid_pre", "y": "resid_post"}, gradients=False)(ids)
    torch.testing.assert_close(values["x"], hidden[LAYER])
    torch.testing.assert_close(values["y"], hidden[LAYER + 1])
    message = r"cannot resolve the MLP of layer 1 of OPTForCausalLM \(model_type 'opt', not in the family table\).*OPTDecoderLayer.*'fc1'.*resid_pre and resid_post"
    with pytest.raises(ValueError, match=message):
        hook_point(model, LAYER, "mlp_in")


def test_mixture_of_experts_keeps_mlp_hooks_but_is_not_read_as_one_mlp():
    config = transformers.Qwen3MoeConfig(hidden_size=D, intermediate_size=D_MLP, moe_intermediate_size=16, num_experts=4,
                                         num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, head_dim=8, vocab_size=VOCAB)
    model = transformers.Qwen3MoeForCausalLM(config).eval()
    point = hook_point(model, LAYER, "mlp_out")
    assert point.module is model.model.layers[LAYER].mlp and not point.on_input
    with pytest.raises(ValueError, match="Qwen3MoeForCausalLM.*none of the projection sets.*mixture of experts"):
        mlp_from_model(model, LAYER)


def test_model_without_findable_layers_says_where_it_looked():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.stack = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))

    with pytest.raises(ValueError, match=r"cannot find the decoder layers of Odd: no ModuleList.*'layers', 'h'.*children are \['stack'\]"):
        families.decoder_layers(Odd())


def test_transformer_lens_names_say_which_mlp_output_it_is():
    from lightning_sae.data.hooks import hookpoint_transformer_lens_name

    llama, gemma = tiny_model("llama"), tiny_model("gemma2")
    assert hookpoint_transformer_lens_name("layers.1.mlp_out", llama) == "blocks.1.hook_mlp_out"
    # Gemma 2 norms the MLP's output: TransformerLens's hook_mlp_out is that norm's output.
    assert hookpoint_transformer_lens_name("layers.1.mlp_out", gemma) == "layers.1.mlp_out"
    assert hookpoint_transformer_lens_name("layers.1.post_feedforward_layernorm", gemma) == "blocks.1.hook_mlp_out"
    assert hookpoint_transformer_lens_name("layers.1", gemma) == "blocks.1.hook_resid_post"
