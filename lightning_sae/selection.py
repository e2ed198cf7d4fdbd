"""The selection plugin contract: which latents fire for each token.

A selector sees the encoder's relu pre-activations of a batch (and, if it asks for them, the
gradient of the language model's loss with respect to the SAE input) and says which latents
fire; the kept latents always take the encoder's values, never the scores.

A selector is an `nn.Module` that belongs to one SAE (`sae.selector`). So it may hold state:
parameters and buffers are checkpointed and resumed with the SAE, moved to its device, and
`self.training` says whether the SAE is training or being evaluated (validation, spliced
scores and inference run in eval mode). Plugins register a subclass under the entry-point
group `lightning_sae.selectors`; docs/plugins.md is the author's guide.
"""

from __future__ import annotations

import copy
import importlib
import inspect
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

import torch.distributed as dist
from torch import Tensor, nn

if TYPE_CHECKING:
    from lightning_sae.sae import TopKSAE


class Selection(NamedTuple):
    """A selection whose tokens keep different numbers of latents, flat and token-major: token
    n's latents are indices[offsets[n]:offsets[n + 1]] (CSR row pointers, offsets[0] = 0,
    offsets[N] = indices.numel()). The decoder and the sparse backward consume it directly."""

    indices: Tensor  # [nnz] latent ids, int64
    offsets: Tensor  # [N + 1] int64


class SAELensExport(NamedTuple):
    """How SAELens runs an SAE with this selector at inference: its cfg.json "architecture", the
    architecture's own cfg.json keys, weights besides W_enc/b_enc/W_dec/b_dec, and entries merged
    into cfg.json's "metadata" (SAELens keeps training-only settings there)."""

    architecture: str
    cfg: dict[str, Any]
    tensors: dict[str, Tensor]
    metadata: dict[str, Any]


class Selector(nn.Module):
    """Base class of selection plugins. Override `score` for "the k best of a score per token";
    override `select` for anything else (a variable number per token returns a `Selection`).

    Construction arguments are recorded (`config()`), so a checkpoint rebuilds the selector from
    its class path and arguments exactly; subclasses need not call `super().__init__()` first
    (older plugins did not), though new ones should.
    """

    needs_gradients: ClassVar[bool] = False
    """True makes the DataModule provide dL/dx beside the activations, passed as `grad`."""

    def __new__(cls, *args: Any, **kwargs: Any) -> "Selector":
        self = super().__new__(cls)
        nn.Module.__init__(self)
        try:  # copy.deepcopy and unpickling call __new__ without arguments: nothing to record
            bound = inspect.signature(cls.__init__).bind(None, *args, **kwargs)
        except TypeError:
            return self
        bound.apply_defaults()
        arguments = dict(list(bound.arguments.items())[1:])
        # A **kwargs parameter binds as one dict; it is spread back out.
        for name, parameter in inspect.signature(cls.__init__).parameters.items():
            if parameter.kind is inspect.Parameter.VAR_KEYWORD:
                arguments.update(arguments.pop(name, {}))
            elif parameter.kind is inspect.Parameter.VAR_POSITIONAL:
                arguments.pop(name, None)
        object.__setattr__(self, "_init_args", copy.deepcopy(arguments))
        return self

    def __init__(self) -> None:
        super().__init__()

    def setup(self, sae: "TopKSAE") -> None:
        """Called when `sae` takes this selector (at its construction, before a checkpoint's state
        is loaded into it): where state sized by the SAE (one entry per latent, say) is made.
        Must keep state that is already there, since a loaded selector is handed over whole."""

    def score(self, pre: Tensor, sae: "TopKSAE", grad: Tensor | None) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} must override score() or select()")

    def select(self, pre: Tensor, sae: "TopKSAE", grad: Tensor | None) -> Tensor | Selection:
        """Indices [N, k] of the latents that fire (or a `Selection` if the count varies per
        token). `grad` is None when gradients are unavailable (e.g. at inference); selectors
        must then fall back to a rule that needs none."""
        return self.score(pre, sae, grad).topk(sae.k, dim=1, sorted=False).indices

    def config(self) -> dict[str, Any]:
        """{"class_path", "init_args"}: what LightningCLI and checkpoints rebuild it from."""
        cls = type(self)
        # jsonargparse may hand us a registry alias (lightning_sae.registered.<entry point>) whose
        # only base is the real class: record the real one.
        if cls.__module__ == "lightning_sae.registered" and len(cls.__bases__) == 1:
            cls = cls.__bases__[0]
        return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": copy.deepcopy(getattr(self, "_init_args", {}))}

    @staticmethod
    def all_reduce(value: Tensor, op: str = "mean") -> Tensor:
        """`value` reduced over the ranks of a distributed run ("mean", "sum", "min", "max"),
        unchanged in a single process: for statistics every replica must agree on."""
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return value
        reduce_op = {"mean": dist.ReduceOp.SUM, "sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op]
        value = value.clone()
        dist.all_reduce(value, op=reduce_op)
        return value / dist.get_world_size() if op == "mean" else value

    # ---- export -------------------------------------------------------------------------------
    saelens_architectures: ClassVar[tuple[str, ...]] = ()
    """SAELens architectures (besides "topk") that `from_saelens` reads back into this selector:
    the SAELens loader looks through the registered selectors for the one naming a file's."""

    def saelens_export(self, sae: "TopKSAE") -> SAELensExport:
        """This SAE as SAELens should run it. The default is SAELens's "topk" (k per token, the
        rule an inference-time TopK applies whatever picked the latents in training); a selector
        whose inference rule differs (a threshold, ...) overrides it."""
        # rescale_acts_by_decoder_norm false: the decoder rows are unit-norm and selection uses
        # the raw pre-activations, as SAELens does when it is false.
        return SAELensExport("topk", {"k": sae.k, "rescale_acts_by_decoder_norm": False}, {}, {})

    @classmethod
    def from_saelens(cls, cfg: dict[str, Any], tensors: dict[str, Tensor]) -> "tuple[Selector, int]":
        """The selector (with its state) and k of a SAELens directory of one of
        `saelens_architectures`; `tensors` are the weights besides the four every SAE has.
        Raise ValueError for a file this selector cannot represent."""
        raise NotImplementedError(f"{cls.__name__} does not read SAELens directories")

    def extra_repr(self) -> str:
        return ", ".join(f"{name}={value!r}" for name, value in getattr(self, "_init_args", {}).items())


class TopK(Selector):
    """score = pre: the k-sparse autoencoder of OpenAI and EleutherAI sparsify. The default
    selector, and the rule the other selectors fall back to."""

    def select(self, pre: Tensor, sae: "TopKSAE", grad: Tensor | None) -> Tensor:
        return pre.topk(sae.k, dim=1, sorted=False).indices


def selector_from_config(config: dict[str, Any] | Selector | None) -> Selector:
    """A selector from `config()`'s dict (a checkpoint's hparams), an instance, or None (TopK)."""
    if config is None:
        return TopK()
    if isinstance(config, Selector):
        return config
    if not (isinstance(config, dict) and "class_path" in config):
        raise TypeError(f"a selector must be a Selector, None or {{'class_path': ..., 'init_args': ...}}, got {config!r}")

    module_name, _, class_name = config["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, Selector)):
        raise TypeError(f"{config['class_path']} is not a Selector subclass")
    return cls(**(config.get("init_args") or {}))

