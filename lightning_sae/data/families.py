"""The decoder families the hook points know, in one table, and how a model is resolved against it.

Every hook kind is the input or output of a module (see hooks.py), so what differs between
families is only where those modules are and how the MLP computes:

    resid_pre   input of decoder layer L
    mlp_in      input of layer L's MLP module: the output of the norm before it (`mlp_norm`),
                or the raw residual stream where the family has no such norm (OLMo 2)
    mlp_out     output of layer L's MLP module (after the down projection, bias included), in
                every family BEFORE any norm applied to it on its way into the residual stream
                (`post_mlp_norm`: Gemma 2, Gemma 3, OLMo 2), so that mlp_out = MLP(mlp_in) exactly
    resid_post  output of decoder layer L

A model whose `config.model_type` is not in the table is resolved by looking: the usual places of
the decoder layers, the usual names of the MLP submodule and of its projections, and the
activation module the MLP actually calls. Each hook kind that resolves works; one that does not
raises an error naming what was looked for and what the model has instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

# MLP kinds: how the input projection(s) feed the activation.
GATED = "gated"  # down(act(gate(x)) * up(x)), two input projections
GATED_FUSED = "gated_fused"  # one projection whose first half of outputs is the gate, second the up
PLAIN = "plain"  # out(act(in(x)))


@dataclass(frozen=True)
class Family:
    """Where one decoder family keeps what the hook points and the MLP reader need.

    Args:
        name: the family's usual name.
        model_types: the `config.model_type` values it covers.
        layers: path of the decoder layers' ModuleList under `model.base_model`.
        mlp: attribute of a decoder layer holding the MLP module.
        mlp_kind: GATED, GATED_FUSED or PLAIN.
        projections: the MLP's linear submodules: (gate, up, down), (gate_up, down) or (in, out).
        activation_config: the config attribute naming the activation (the reader trusts the
            activation module the MLP calls first, since that is what runs).
        activation: that attribute's default, for the documentation.
        mlp_norm: the decoder layer's norm whose output the MLP receives; None: the MLP reads the
            residual stream itself.
        post_mlp_norm: a norm applied to the MLP's output before it is added to the residual
            stream (mlp_out is before it); None where the output is added as it is.
        parallel: attention and MLP both read resid_pre (GPT-NeoX's `use_parallel_residual`,
            on by default), so mlp_in is mlp_norm(resid_pre), not a norm of attention's result.
    """

    name: str
    model_types: tuple[str, ...]
    layers: str
    mlp: str
    mlp_kind: str
    projections: tuple[str, ...]
    activation_config: str
    activation: str
    mlp_norm: str | None
    post_mlp_norm: str | None = None
    parallel: bool = False


_LLAMA_GATED = dict(layers="layers", mlp="mlp", mlp_kind=GATED, projections=("gate_proj", "up_proj", "down_proj"))

FAMILIES: tuple[Family, ...] = (
    Family("Llama", ("llama",), **_LLAMA_GATED, activation_config="hidden_act", activation="silu",
           mlp_norm="post_attention_layernorm"),
    Family("GPT-NeoX", ("gpt_neox",), layers="layers", mlp="mlp", mlp_kind=PLAIN,
           projections=("dense_h_to_4h", "dense_4h_to_h"), activation_config="hidden_act", activation="gelu",
           mlp_norm="post_attention_layernorm", parallel=True),
    Family("GPT-2", ("gpt2",), layers="h", mlp="mlp", mlp_kind=PLAIN, projections=("c_fc", "c_proj"),
           activation_config="activation_function", activation="gelu_new", mlp_norm="ln_2"),
    Family("Gemma", ("gemma",), **_LLAMA_GATED, activation_config="hidden_act", activation="gelu_pytorch_tanh",
           mlp_norm="post_attention_layernorm"),
    Family("Gemma 2", ("gemma2",), **_LLAMA_GATED, activation_config="hidden_activation",
           activation="gelu_pytorch_tanh", mlp_norm="pre_feedforward_layernorm",
           post_mlp_norm="post_feedforward_layernorm"),
    Family("Gemma 3", ("gemma3_text",), **_LLAMA_GATED, activation_config="hidden_activation",
           activation="gelu_pytorch_tanh", mlp_norm="pre_feedforward_layernorm",
           post_mlp_norm="post_feedforward_layernorm"),
    Family("Gemma 3 with vision", ("gemma3",), layers="language_model.layers", mlp="mlp", mlp_kind=GATED,
           projections=("gate_proj", "up_proj", "down_proj"), activation_config="hidden_activation",
           activation="gelu_pytorch_tanh", mlp_norm="pre_feedforward_layernorm",
           post_mlp_norm="post_feedforward_layernorm"),
    Family("Qwen2", ("qwen2",), **_LLAMA_GATED, activation_config="hidden_act", activation="silu",
           mlp_norm="post_attention_layernorm"),
    Family("Qwen3", ("qwen3",), **_LLAMA_GATED, activation_config="hidden_act", activation="silu",
           mlp_norm="post_attention_layernorm"),
    Family("Mistral", ("mistral",), **_LLAMA_GATED, activation_config="hidden_act", activation="silu",
           mlp_norm="post_attention_layernorm"),
    Family("Phi-3", ("phi3",), layers="layers", mlp="mlp", mlp_kind=GATED_FUSED, projections=("gate_up_proj", "down_proj"),
           activation_config="hidden_act", activation="silu", mlp_norm="post_attention_layernorm"),
    Family("OLMo 2", ("olmo2",), **_LLAMA_GATED, activation_config="hidden_act", activation="silu",
           mlp_norm=None, post_mlp_norm="post_feedforward_layernorm"),
)

_BY_MODEL_TYPE = {model_type: family for family in FAMILIES for model_type in family.model_types}

# What is tried for a model outside the table.
_LAYER_PATHS = ("layers", "h", "blocks", "decoder.layers", "language_model.layers", "transformer.h")
_MLP_NAMES = ("mlp", "feed_forward", "ffn", "mlp_block")
_LAYOUTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (GATED, ("gate_proj", "up_proj", "down_proj")),
    (GATED_FUSED, ("gate_up_proj", "down_proj")),
    (PLAIN, ("dense_h_to_4h", "dense_4h_to_h")),
    (PLAIN, ("c_fc", "c_proj")),
    (PLAIN, ("fc1", "fc2")),
    (PLAIN, ("fc_in", "fc_out")),
)
_ACTIVATION_CONFIGS = ("hidden_activation", "hidden_act", "activation_function")
_ACTIVATION_ATTRIBUTES = ("act_fn", "act", "activation_fn", "activation")
# The class of the activation module an MLP calls -> transformers' ACT2FN name of the function.
_ACTIVATION_CLASSES = {
    "GELUActivation": "gelu",
    "GELUTanh": "gelu_pytorch_tanh",
    "PytorchGELUTanh": "gelu_pytorch_tanh",
    "NewGELUActivation": "gelu_new",
    "FastGELUActivation": "gelu_fast",
    "SiLUActivation": "silu",
    "SiLU": "silu",
    "ReLU": "relu",
}


@dataclass(frozen=True)
class MLPLayout:
    """How one MLP module computes, read from the module itself."""

    kind: str
    projections: tuple[str, ...]
    activation: str

    @property
    def gated(self) -> bool:
        return self.kind in (GATED, GATED_FUSED)

    @property
    def family(self) -> str:
        """The JSAE reader's name for it: "swiglu" (gated SiLU), "gated_<act>", or "<act>"."""
        if self.gated:
            return "swiglu" if self.activation in ("silu", "swish") else f"gated_{self.activation}"
        return self.activation


def _config(model: nn.Module) -> Any:
    return getattr(model, "config", None)


def family_of(model: nn.Module) -> Family | None:
    """The table's entry for this model, by `config.model_type`; None for a model outside it."""
    return _BY_MODEL_TYPE.get(getattr(_config(model), "model_type", None))


def _describe_model(model: nn.Module) -> str:
    model_type = getattr(_config(model), "model_type", None)
    if model_type is None:
        return type(model).__name__
    where = "" if model_type in _BY_MODEL_TYPE else ", not in the family table"
    return f"{type(model).__name__} (model_type '{model_type}'{where})"


def _at(root: nn.Module, path: str) -> Any:
    found: Any = root
    for part in path.split("."):
        found = getattr(found, part, None)
    return found


def _layer_count(model: nn.Module) -> int | None:
    config = _config(model)
    for name in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(getattr(config, name, None), int):
            return getattr(config, name)
    return None


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a causal LM: the family's place for them, else the usual places, else
    the one ModuleList as long as the config's layer count."""
    base = getattr(model, "base_model", model)
    family = family_of(model)
    paths = ((family.layers,) if family else ()) + _LAYER_PATHS
    for path in dict.fromkeys(paths):
        found = _at(base, path)
        if isinstance(found, nn.ModuleList):
            return found
    count = _layer_count(model)
    candidates = [m for m in base.modules() if isinstance(m, nn.ModuleList) and len(m) == count]
    if count and len(candidates) == 1:
        return candidates[0]
    raise ValueError(
        f"cannot find the decoder layers of {_describe_model(model)}: no ModuleList at base_model.<path> for "
        f"<path> in {list(dict.fromkeys(paths))}, nor a single ModuleList of config's {count} layers; "
        f"its base model's children are {[name for name, _ in base.named_children()]}"
    )


def mlp_module(model: nn.Module, layer: int) -> nn.Module:
    """Layer `layer`'s MLP module. The caller checks `layer` is in range."""
    block = decoder_layers(model)[layer]
    family = family_of(model)
    names = ((family.mlp,) if family else ()) + _MLP_NAMES
    for name in dict.fromkeys(names):
        if isinstance(getattr(block, name, None), nn.Module):
            return getattr(block, name)
    raise ValueError(
        f"cannot resolve the MLP of layer {layer} of {_describe_model(model)}: its {type(block).__name__} has no "
        f"submodule named any of {list(dict.fromkeys(names))} (it has {[n for n, _ in block.named_children()]}), "
        "so the hooks mlp_in and mlp_out do not exist for it; resid_pre and resid_post need no MLP"
    )


def _activation_of_module(mlp: nn.Module) -> str | None:
    for attribute in _ACTIVATION_ATTRIBUTES:
        act = getattr(mlp, attribute, None)
        if act is None:
            continue
        if isinstance(act, nn.GELU):
            return "gelu_pytorch_tanh" if act.approximate == "tanh" else "gelu"
        name = _ACTIVATION_CLASSES.get(type(act).__name__)
        if name is not None:
            return name
    return None


def mlp_activation(model: nn.Module, mlp: nn.Module) -> str:
    """The activation's ACT2FN name: from the activation module the MLP calls (what really runs,
    whatever the config calls it), else from the config attribute the family names, else from
    the first of hidden_activation / hidden_act / activation_function the config sets."""
    found = _activation_of_module(mlp)
    if found is not None:
        return found
    family, config = family_of(model), _config(model)
    names = ((family.activation_config,) if family else ()) + _ACTIVATION_CONFIGS
    for name in dict.fromkeys(names):
        value = getattr(config, name, None)
        if isinstance(value, str):
            return value
    raise ValueError(
        f"cannot tell the activation function of {type(mlp).__name__} in {_describe_model(model)}: none of its "
        f"attributes {list(_ACTIVATION_ATTRIBUTES)} is a known activation module, and its config sets none of "
        f"{list(dict.fromkeys(names))}"
    )


def mlp_projections(mlp: nn.Module, family: Family | None = None) -> tuple[str, tuple[str, ...]]:
    """(kind, projection submodule names) of an MLP module: the family's, else the first known
    layout whose submodules it has."""
    layouts = (((family.mlp_kind, family.projections),) if family else ()) + _LAYOUTS
    for kind, projections in dict.fromkeys(layouts):
        if all(isinstance(getattr(mlp, name, None), nn.Module) for name in projections):
            return kind, projections
    raise ValueError(
        f"cannot tell how {type(mlp).__name__} computes: it has none of the projection sets "
        f"{[list(p) for _, p in dict.fromkeys(layouts)]} (it has {[n for n, _ in mlp.named_children()]}); "
        "a mixture of experts is not one MLP. Its hooks mlp_in and mlp_out still work; only reading it "
        "as one MLP (JSAE) does not"
    )


def mlp_layout(model: nn.Module, layer: int) -> MLPLayout:
    """How layer `layer`'s MLP computes: its kind, projection submodules and activation."""
    mlp = mlp_module(model, layer)
    try:
        kind, projections = mlp_projections(mlp, family_of(model))
    except ValueError as error:
        raise ValueError(f"layer {layer} of {_describe_model(model)}: {error}") from None
    return MLPLayout(kind, projections, mlp_activation(model, mlp))


def mlp_family(model: nn.Module, layer: int = 0) -> str:
    """"swiglu" (gated SiLU: Llama, Qwen, Mistral, Phi-3, OLMo 2), "gated_gelu_pytorch_tanh"
    (Gemma 1-3), "gelu" (GPT-NeoX), "gelu_new" (GPT-2), or in general "gated_<act>" / "<act>"."""
    return mlp_layout(model, layer).family

