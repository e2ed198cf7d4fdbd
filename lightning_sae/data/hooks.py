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

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

from lightning_sae.data import families

HOOK_KINDS = ("resid_pre", "mlp_in", "mlp_out", "resid_post")  # in the order a forward pass meets them
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


def hook_point(model: nn.Module, layer: int, kind: str) -> HookPoint:
    """The module and side that carries hook `kind` of `layer`; errors list what is valid."""
    check_kind(kind)
    check_layer(model, layer)
    if kind in ("resid_pre", "resid_post"):
        return HookPoint(decoder_layers(model)[layer], on_input=kind == "resid_pre")
    return HookPoint(mlp_module(model, layer), on_input=kind == "mlp_in")


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
def replace_hook(model: nn.Module, layer: int, kind: str, fn: Callable[[Tensor], Tensor]) -> Iterator[None]:
    """Inside the block, the activation [B, T, D] at (layer, kind) is replaced by fn(activation),
    e.g. an SAE reconstruction spliced into the model."""
    handle = _register(hook_point(model, layer, kind), fn)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def zero_ablate_hook(model: nn.Module, layer: int, kind: str) -> Iterator[None]:
    """Inside the block, the activation at (layer, kind) is replaced by zeros."""
    with replace_hook(model, layer, kind, torch.zeros_like):
        yield


class ActivationRecorder:
    """Captures the activations of several hook kinds of one layer during a forward pass.

    `leaf` names a kind whose activation becomes a fresh autograd leaf (detached, requires_grad),
    so a backward pass runs only through the layers after it, never into frozen parameters or
    earlier layers. `stop` raises StopForward once every kind is captured (no later layer runs).
    """

    def __init__(self, model: nn.Module, layer: int, kinds: list[str], leaf: str | None = None, stop: bool = False):
        self.points = {kind: hook_point(model, layer, kind) for kind in dict.fromkeys(kinds)}
        if leaf is not None and leaf not in self.points:
            raise ValueError(f"leaf '{leaf}' must be one of the recorded kinds {list(self.points)}")
        self.leaf, self.stop = leaf, stop
        self.values: dict[str, Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def _capture(self, kind: str) -> Callable[[Tensor], Tensor | None]:
        def fn(hidden: Tensor) -> Tensor | None:
            replacement = None
            if kind == self.leaf:
                hidden = replacement = hidden.detach().requires_grad_(True)
            self.values[kind] = hidden
            if self.stop and len(self.values) == len(self.points):
                raise StopForward
            return replacement

        return fn

    def __enter__(self) -> "ActivationRecorder":
        self.values = {}
        self._handles = [_register(point, self._capture(kind)) for kind, point in self.points.items()]
        return self

    def __exit__(self, *exc) -> bool:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        return exc[0] is StopForward  # swallow our own early stop, nothing else
