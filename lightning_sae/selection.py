"""The selection plugin contract: which latents fire for each token.

A selector sees the encoder's relu pre-activations of a batch (and, if it asks for them, the
gradient of the language model's loss with respect to the SAE input) and says which latents
fire; the kept latents always take the encoder's values, never the scores.

A learned rule (JumpReLU, an L1 penalty) also may (docs/plugins.md, "Learned rules"):
- own trainable parameters (`nn.Parameter`s; the SAE's optimizer trains them) and gate the
  kept values in `activate`, through `jump_relu` / `heaviside`, whose backward is the
  pseudo-derivative the rule declares with a kernel and bandwidth;
- add named loss terms (`loss_terms`), each weighted by its `coefficients()` entry with a
  linear warm-up, summed into the loss and logged as `train/<name>` by the training module;
- ask for the encoder's raw pre-activations (`relu_pre = False`) and free decoder row norms
  (`unit_norm_decoder = False`).

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
from typing import TYPE_CHECKING, Any, Callable, ClassVar, NamedTuple

import torch
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

    @classmethod
    def from_mask(cls, mask: Tensor) -> "Selection":
        """The entries where the [N, M] boolean `mask` is True (e.g. `pre > threshold`)."""
        tokens, latents = mask.nonzero(as_tuple=True)
        offsets = torch.zeros(mask.shape[0] + 1, dtype=torch.long, device=mask.device)
        offsets[1:] = torch.bincount(tokens, minlength=mask.shape[0]).cumsum(0)
        return cls(latents, offsets)


class Encoding(NamedTuple):
    """What a learned rule's `loss_terms` sees of one encoded batch.

    `latents` and `offsets` are the selection (indices [N, k] with offsets None, or flat [nnz]
    with CSR offsets [N + 1]); `pre_values` are the encoder's pre-activations at those entries
    and `values` the code's values (after `activate`), both carrying the autograd graph to the
    encoder (and, for `values`, to the selector's parameters). `pre` is the dense [N, d_sae]
    pre-activation without a graph; it is valid only during the call (the SAE reuses its memory
    afterwards for AuxK), so a selector must not keep it."""

    pre: Tensor
    latents: Tensor
    offsets: Tensor | None
    pre_values: Tensor
    values: Tensor

    @property
    def num_tokens(self) -> int:
        return self.pre.shape[0]


class Coefficient(NamedTuple):
    """A loss term's weight: `value`, warmed up linearly over the first `warm_up_steps` optimizer
    steps as SAELens's CoefficientScheduler does (0 at step 0, value * step / warm_up_steps
    until then, `value` from step warm_up_steps on). `warm_up_fraction` instead gives the
    warm-up as a fraction of the fit's optimizer steps (Anthropic's L1 recipe: 5%)."""

    value: float
    warm_up_steps: int = 0
    warm_up_fraction: float = 0.0

    def at(self, step: int, total_steps: int | None = None) -> float:
        warm_up = self.warm_up_steps
        if not warm_up and self.warm_up_fraction and total_steps:
            warm_up = max(1, round(self.warm_up_fraction * total_steps))
        if warm_up <= 0:
            return float(self.value)
        return float(self.value) * min(1.0, step / warm_up)


# ---- pseudo-derivatives ---------------------------------------------------------------------------


def rectangle(u: Tensor) -> Tensor:
    """The rectangle kernel K(u) = 1[|u| < 1/2] (JumpReLU's; support half-width 1/2)."""
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


Kernel = Callable[[Tensor], Tensor]


class _Jump(torch.autograd.Function):
    """z = v * H(v - t) (or H(v - t) alone with `gate_only`), with the straight-through
    pseudo-derivatives of Rajamanoharan et al. 2024: dz/dt = -(t / eps) K((v - t) / eps)
    (-(1 / eps) K(...) for H), dz/dv = H(v - t) (plus the STE term when `to_input`)."""

    @staticmethod
    def forward(ctx, values: Tensor, threshold: Tensor, bandwidth: float, kernel: Kernel, to_input: bool, gate_only: bool) -> Tensor:
        ctx.save_for_backward(values, threshold)
        ctx.bandwidth, ctx.kernel, ctx.to_input, ctx.gate_only = bandwidth, kernel, to_input, gate_only
        gate = (values > threshold).to(values.dtype)
        return gate if gate_only else values * gate

    @staticmethod
    def backward(ctx, grad: Tensor):
        values, threshold = ctx.saved_tensors
        window = ctx.kernel((values - threshold) / ctx.bandwidth) / ctx.bandwidth * grad
        ste = window if ctx.gate_only else threshold * window
        grad_values = None
        if ctx.needs_input_grad[0]:
            terms = [] if ctx.gate_only else [(values > threshold).to(grad.dtype) * grad]
            if ctx.to_input:  # z depends on v through v - t too: the negation of dz/dt
                terms.append(ste)
            grad_values = sum(terms[1:], terms[0]) if terms else None
        grad_threshold = None
        if ctx.needs_input_grad[1]:  # a broadcast threshold (one per latent, say) gets the sum
            grad_threshold = (-ste).sum_to_size(threshold.shape)
        return grad_values, grad_threshold, None, None, None, None


def jump_relu(values: Tensor, threshold: Tensor, bandwidth: float, kernel: Kernel = rectangle, straight_through_to_input: bool = False) -> Tensor:
    """JumpReLU z = v * H(v - t), elementwise (`threshold` broadcast to `values`, e.g. a
    per-latent parameter indexed by the selection's latents). Backward: dz/dv = H(v - t), and
    dz/dt = -(t / bandwidth) K((v - t) / bandwidth), the declared pseudo-derivative; with
    `straight_through_to_input` that term also reaches v (Anthropic's variant)."""
    return _Jump.apply(values, threshold, float(bandwidth), kernel, bool(straight_through_to_input), False)


def heaviside(values: Tensor, threshold: Tensor, bandwidth: float, kernel: Kernel = rectangle, straight_through_to_input: bool = False) -> Tensor:
    """H(v - t) elementwise, with dH/dt = -(1 / bandwidth) K((v - t) / bandwidth) (and that
    term's negation to v with `straight_through_to_input`): the L0 penalty's pseudo-derivative."""
    return _Jump.apply(values, threshold, float(bandwidth), kernel, bool(straight_through_to_input), True)


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

    relu_pre: ClassVar[bool] = True
    """False gives `select` (and `Encoding.pre`) the raw pre-activation W_enc (x - b_dec) + b_enc:
    for a rule that looks at values below zero (JumpReLU's pseudo-derivative window around a
    small threshold). The selected entries' values are then the raw pre-activations, and their
    gradient reaches the encoder whatever their sign (SAELens's hidden_pre)."""

    unit_norm_decoder: ClassVar[bool] = True
    """False: the SAE's decoder rows are neither renormalised after each step nor have the
    gradient parallel to them removed (SAELens's "standard" L1 SAE, whose penalty weighs each
    latent by its decoder row norm)."""

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

    # ---- learned rules (all optional) --------------------------------------------------------
    def activate(self, values: Tensor, latents: Tensor, sae: "TopKSAE") -> Tensor:
        """The code's values from the encoder's `values` at the selected `latents` (same shape:
        [N, k], or flat [nnz]). Both carry the autograd graph, so a gate written with
        `jump_relu` / `heaviside` on a per-latent parameter (`self.threshold[latents]`) trains
        it. An entry gated to 0 fires nowhere (not in L0, not in the decoder's output), but the
        decoder's backward still gives its value a gradient: a rule selects entries just below
        its threshold (the kernel's window) to let the threshold learn from them. Default: the
        values unchanged (and the core skips the call)."""
        return values

    def loss_terms(self, encoding: Encoding, sae: "TopKSAE") -> dict[str, Tensor]:
        """Named scalar penalties of a training forward (e.g. {"l0": ...}), unweighted: the
        training module multiplies each by `coefficients()[name].at(step)`, adds it to the loss
        and logs the term as `train/<name>`. `sae` gives `k`, `d_sae` and `decoder_norms()`
        (graph-carrying [d_sae] decoder row norms). Default: none."""
        return {}

    def coefficients(self) -> dict[str, Coefficient]:
        """The weight of each loss term (a missing name weighs 1, without warm-up)."""
        return {}

    def encode(self, pre: Tensor, sae: "TopKSAE", grad: Tensor | None, values_at: Callable[["Tensor | Selection"], Tensor]) -> Encoding:
        """The whole rule on one batch, for any encoder: `select` on `pre`, `values_at(selection)`
        (the caller's graph-carrying pre-activations at the selected entries: [N, k] for indices,
        flat [nnz] for a `Selection`), then `activate`. TopKSAE encodes through this; a variant
        with its own encoder (a cross-layer transcoder) calls it the same way, then
        `loss_terms(encoding, sae)`."""
        selection = self.select(pre, sae, grad)
        pre_values = values_at(selection)
        if isinstance(selection, Selection):
            latents, offsets = selection.indices, selection.offsets
        else:
            latents, offsets = selection, None
        values = self.activate(pre_values, latents, sae) if self.has_activation() else pre_values
        return Encoding(pre, latents, offsets, pre_values, values)

    @classmethod
    def has_activation(cls) -> bool:
        return cls.activate is not Selector.activate

    @classmethod
    def has_loss_terms(cls) -> bool:
        return cls.loss_terms is not Selector.loss_terms

    def class_name(self) -> str:
        """The plugin's own class name (not jsonargparse's registry alias), for messages."""
        cls = type(self)
        if cls.__module__ == "lightning_sae.registered" and len(cls.__bases__) == 1:
            cls = cls.__bases__[0]
        return cls.__qualname__

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

    saelens_training_architectures: ClassVar[tuple[str, ...]] = ()
    """The cfg metadata's `training_architecture` values this selector's exports carry (e.g.
    "batchtopk"): when several selectors read one architecture, the loader first asks the one
    the file's metadata names (`metadata.selector`, then `training_architecture`)."""

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

