"""Named hook points inside a transformers decoder, and forward hooks to read or replace them.

Four kinds per layer L, each the input or the output of a module, so one mechanism serves all
model families (Llama-like, GPT-NeoX/Pythia, GPT-2):

    resid_pre   input of decoder layer L             (TransformerLens blocks.L.hook_resid_pre)
    mlp_in      input of layer L's MLP module         (blocks.L.ln2.hook_normalized)
    mlp_out     output of layer L's MLP module        (blocks.L.hook_mlp_out)
    resid_post  output of decoder layer L             (blocks.L.hook_resid_post)

Taking the MLP's own input makes `mlp_in` exactly what the MLP receives: the output of the
norm feeding it, affine included (for GPT-NeoX with parallel attention, post_attention_layernorm
applied to the block input). `mlp_out` is after the down projection, bias included.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

from lightning_sae.data import families
from lightning_sae.data_request import HookKind

HOOK_KINDS = tuple(kind.value for kind in HookKind)  # in the order a forward pass meets them
_TL_NAMES = {
    "resid_pre": "blocks.{layer}.hook_resid_pre",
    "mlp_in": "blocks.{layer}.ln2.hook_normalized",
    "mlp_out": "blocks.{layer}.hook_mlp_out",
    "resid_post": "blocks.{layer}.hook_resid_post",
}


class StopForward(Exception):
    """Raised from a hook once everything wanted is captured, to skip the rest of the model."""


def transformer_lens_name(layer: int, kind: str) -> str:
    check_kind(kind)
    return _TL_NAMES[kind].format(layer=layer)


def check_kind(kind: str) -> None:
    if kind not in HOOK_KINDS:
        raise ValueError(f"unknown hook '{kind}'; valid hooks are {list(HOOK_KINDS)}")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder blocks of a causal LM (model.model.layers, transformer.h, ...); see families.py."""
    return families.decoder_layers(model)


def num_layers(model: nn.Module) -> int:
    return len(decoder_layers(model))


def check_layer(model: nn.Module, layer: int) -> None:
    count = num_layers(model)
    if not 0 <= layer < count:
        raise ValueError(f"layer {layer} does not exist: {type(model).__name__} has layers 0..{count - 1}")


def mlp_module(model: nn.Module, layer: int) -> nn.Module:
    """Layer `layer`'s MLP (frozen like the rest of the model), e.g. for a Jacobian SAE to run it."""
    check_layer(model, layer)
    return families.mlp_module(model, layer)


def mlp_family(model: nn.Module, layer: int = 0) -> str:
    """How the MLP computes: "swiglu" (gated SiLU, Llama), "gelu" (GPT-NeoX), "gelu_new" (GPT-2),
    "gated_gelu_pytorch_tanh" (Gemma), in general "gated_<act>" or "<act>"; see families.py."""
    check_layer(model, layer)
    return families.mlp_family(model, layer)


@dataclass(frozen=True)
class HookPoint:
    module: nn.Module
    on_input: bool  # True: the module's first input (hidden states); False: its output


def hook_point(model: nn.Module, layer: int | None, kind: str) -> HookPoint:
    """The module and side that carries `kind` of `layer`, or the hook point named `kind` when
    `layer` is None (see `resolve_hookpoint`); errors list what is valid."""
    if layer is None:
        return resolve_hookpoint(model, kind)
    check_kind(kind)
    check_layer(model, layer)
    if kind in ("resid_pre", "resid_post"):
        return HookPoint(decoder_layers(model)[layer], on_input=kind == "resid_pre")
    return HookPoint(mlp_module(model, layer), on_input=kind == "mlp_in")


# ---- hook points by name --------------------------------------------------------------------------
# A hook point name is family-independent where it can be:
#     layers.L                 output of decoder layer L (resid_post; sparsify's name for it)
#     layers.L.<kind>          one of HOOK_KINDS of layer L (layers.L.resid_post is written layers.L)
#     layers.L.<path>          output of a submodule of decoder layer L, e.g. layers.9.self_attn.o_proj
#     <path>                   output of any module of the model, e.g. model.norm
#     <name>:input             the module's first input instead of its output
# Module paths through the decoder-layer list (model.layers.9.mlp, transformer.h.9.mlp, h.9.mlp)
# are written layers.9.mlp, so names agree across families and with sparsify's.
INPUT_SUFFIX = ":input"
_LAYER_NAME = re.compile(r"^layers\.(\d+)(?:\.(.+))?$")


def _layers_path(model: nn.Module) -> list[str]:
    """Qualified names of the decoder-layer list, from the model root and from its base model."""
    layers = decoder_layers(model)
    names = [name for name, module in model.named_modules() if module is layers]
    base = getattr(model, "base_model", model)
    names += [name for name, module in base.named_modules() if module is layers and base is not model]
    return [name for name in names if name]


def canonical_hookpoint(model: nn.Module, name: str) -> str:
    """`name` written the canonical way (see above); does not check that it exists."""
    path, suffix = (name[: -len(INPUT_SUFFIX)], INPUT_SUFFIX) if name.endswith(INPUT_SUFFIX) else (name, "")
    for prefix in _layers_path(model):
        if path.startswith(prefix + "."):
            path = "layers." + path[len(prefix) + 1 :]
            break
    match = _LAYER_NAME.match(path)
    if match and match.group(2) == "resid_post" and not suffix:
        path = f"layers.{match.group(1)}"
    return path + suffix


def hookpoint_layer(name: str) -> int | None:
    """The decoder layer a canonical hook point name lies in, None if it lies outside every layer."""
    match = _LAYER_NAME.match(name.removesuffix(INPUT_SUFFIX))
    return int(match.group(1)) if match else None


def resolve_hookpoint(model: nn.Module, name: str) -> HookPoint:
    """The module and side a hook point name denotes; a clear error, with close names, if none."""
    canonical = canonical_hookpoint(model, name)
    path, on_input = (canonical[: -len(INPUT_SUFFIX)], True) if canonical.endswith(INPUT_SUFFIX) else (canonical, False)
    match = _LAYER_NAME.match(path)
    if match:
        layer, rest = int(match.group(1)), match.group(2)
        check_layer(model, layer)
        if rest is None:
            return HookPoint(decoder_layers(model)[layer], on_input=on_input)
        if rest in HOOK_KINDS:
            if on_input:
                raise ValueError(f"hook point '{name}': {INPUT_SUFFIX} applies to module paths, not to the hook kind '{rest}'")
            return hook_point(model, layer, rest)
        module = _submodule(decoder_layers(model)[layer], rest)
    else:
        module = _submodule(model, path)
        if module is None and getattr(model, "base_model", model) is not model:
            module = _submodule(model.base_model, path)
    if module is None:
        close = difflib.get_close_matches(canonical, hookpoint_names(model), n=5, cutoff=0.6)
        hint = f"; close names: {close}" if close else ""
        raise ValueError(
            f"hook point '{name}' names no module of {type(model).__name__}{hint}. Valid hooks are "
            f"{list(HOOK_KINDS)} or a module path (layers.N.<path inside a layer>, or any module's path; "
            f"'{INPUT_SUFFIX}' for its input)"
        )
    return HookPoint(module, on_input=on_input)


def _submodule(root: nn.Module, path: str) -> nn.Module | None:
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def hookpoint_names(model: nn.Module) -> list[str]:
    """Every hook point name a model offers (outputs; add ":input" for inputs), in forward order
    as far as module registration tells it."""
    names = []
    layers = decoder_layers(model)
    for layer, block in enumerate(layers):
        names.append(f"layers.{layer}")
        names += [f"layers.{layer}.{kind}" for kind in HOOK_KINDS if kind != "resid_post"]
        names += [f"layers.{layer}.{sub}" for sub, _ in block.named_modules() if sub]
    inside = set(_layers_path(model))
    for sub, _ in model.named_modules():
        if sub and not any(sub == p or sub.startswith(p + ".") for p in inside):
            names.append(sub)
    return names


def expand_hookpoints(model: nn.Module, patterns: list[str]) -> list[str]:
    """Canonical hook point names matching `patterns` (names or globs such as layers.*.mlp), in
    the order given, each once. A pattern that matches nothing is an error naming close names."""
    found: list[str] = []
    available = hookpoint_names(model)
    for pattern in patterns:
        if not isinstance(pattern, str) or not pattern:
            raise ValueError(f"hook points must be non-empty strings, got {pattern!r}")
        suffix = INPUT_SUFFIX if pattern.endswith(INPUT_SUFFIX) else ""
        if any(ch in pattern for ch in "*?["):
            target = canonical_hookpoint(model, pattern.removesuffix(INPUT_SUFFIX))
            matches = sorted((n for n in available if fnmatch.fnmatchcase(n, target)), key=_natural_key)
            if not matches:
                close = difflib.get_close_matches(target.replace("*", "0"), available, n=5, cutoff=0.6)
                raise ValueError(f"hook point pattern '{pattern}' matches no module of {type(model).__name__}"
                                 + (f"; close names: {close}" if close else ""))
            names = [canonical_hookpoint(model, m + suffix) for m in matches]
        else:
            resolve_hookpoint(model, pattern)
            names = [canonical_hookpoint(model, pattern)]
        found += [n for n in names if n not in found]
    return found


def _natural_key(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def hookpoint_transformer_lens_name(name: str, model: nn.Module | None = None) -> str:
    """The TransformerLens name of a hook point where one exists (SAELens metadata), else the name.

    In families that norm the MLP's output before adding it (Gemma 2/3, OLMo 2; see
    docs/models.md), TransformerLens's hook_mlp_out is after that norm: there it is the output of
    module layers.L.<post-MLP norm>, and our mlp_out (before it) has no TransformerLens name.
    """
    from lightning_sae.data.families import family_of

    match = _LAYER_NAME.match(name)
    if not match:
        return name
    layer, rest = int(match.group(1)), match.group(2)
    post_norm = getattr(family_of(model), "post_mlp_norm", None) if model is not None else None
    if post_norm is not None and rest == "mlp_out":
        return name
    if post_norm is not None and rest == post_norm:
        return transformer_lens_name(layer, "mlp_out")
    if rest is None or rest in HOOK_KINDS:
        return transformer_lens_name(layer, rest or "resid_post")
    return name


def _register(point: HookPoint, fn: Callable[[Tensor], Tensor | None]) -> torch.utils.hooks.RemovableHandle:
    """Calls fn on the hidden states at `point`; a tensor it returns replaces them downstream."""
    if point.on_input:

        def pre_hook(module, args, kwargs):
            if args:
                new = fn(args[0])
                return None if new is None else ((new, *args[1:]), kwargs)
            new = fn(kwargs["hidden_states"])
            return None if new is None else (args, {**kwargs, "hidden_states": new})

        return point.module.register_forward_pre_hook(pre_hook, with_kwargs=True)

    def post_hook(module, args, output):
        # Decoder layers of older transformers versions return tuples (hidden, ...).
        hidden = output[0] if isinstance(output, tuple) else output
        new = fn(hidden)
        if new is None:
            return None
        return (new, *output[1:]) if isinstance(output, tuple) else new

    return point.module.register_forward_hook(post_hook)


@contextmanager
def replace_hook(model: nn.Module, layer: int | None, kind: str, fn: Callable[[Tensor], Tensor]) -> Iterator[None]:
    """Inside the block, the activation [B, T, D] at (layer, kind), or at the hook point named
    `kind` when `layer` is None, is replaced by fn(activation), e.g. an SAE's reconstruction."""
    handle = _register(hook_point(model, layer, kind), fn)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def zero_ablate_hook(model: nn.Module, layer: int | None, kind: str) -> Iterator[None]:
    """Inside the block, the activation at (layer, kind) (or hook point `kind`) is replaced by zeros."""
    with replace_hook(model, layer, kind, torch.zeros_like):
        yield


class ActivationRecorder:
    """Captures activations at several hook points during a forward pass: hook kinds of `layer`,
    or hook point names (see `resolve_hookpoint`) when `layer` is None.

    `leaves` (or the single `leaf`) are hooks whose gradient will be taken. The first of them the
    forward reaches becomes a fresh autograd leaf (detached, requires_grad), so a backward pass
    runs only through what follows it, never into frozen parameters or earlier layers; later
    ones already depend on it and are recorded as they are (a gradient with respect to them is
    still exact), unless they do not depend on it, in which case they become leaves too.
    `stop` raises StopForward once every hook is captured (no later layer runs).
    """

    def __init__(
        self,
        model: nn.Module,
        layer: int | None,
        kinds: list[str],
        leaf: str | None = None,
        stop: bool = False,
        leaves: list[str] | None = None,
    ):
        self.points = {kind: hook_point(model, layer, kind) for kind in dict.fromkeys(kinds)}
        self.leaves = set(leaves or []) | ({leaf} if leaf is not None else set())
        unknown = sorted(self.leaves - set(self.points))
        if unknown:
            raise ValueError(f"leaves {unknown} must be among the recorded hooks {list(self.points)}")
        self.stop = stop
        self.values: dict[str, Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def _capture(self, kind: str) -> Callable[[Tensor], Tensor | None]:
        def fn(hidden: Tensor) -> Tensor | None:
            replacement = None
            if kind in self.leaves and (not hidden.requires_grad or not self._made_leaf):
                hidden = replacement = hidden.detach().requires_grad_(True)
                self._made_leaf = True
            self.values[kind] = hidden
            if self.stop and len(self.values) == len(self.points):
                raise StopForward
            return replacement

        return fn

    def __enter__(self) -> "ActivationRecorder":
        self.values, self._made_leaf = {}, False
        self._handles = [_register(point, self._capture(kind)) for kind, point in self.points.items()]
        return self

    def __exit__(self, *exc) -> bool:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        return exc[0] is StopForward  # swallow our own early stop, nothing else
