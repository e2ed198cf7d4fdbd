"""What a training module asks of its DataModule: which tensors, read at which hooks, under which
batch keys.

A variant says where each of its batch keys is read with a `Hook`:

    Hook.site()                 the hook point the user chose (`--data.hook`, `--data.hookpoints`)
    Hook.kind(HookKind.MLP_IN)  that kind of the site's layer (a transcoder's input, JSAE's pair)
    Hook.point("layers.3.mlp")  an explicit hook point name

An SAE encodes its spec's `input` key and predicts its `target` key (module.SAESpec); the
spliced evaluation reads the input's hook and writes the reconstruction in place of the target's
(`Splice`): one hook for an autoencoder, mlp_in -> mlp_out for a transcoder.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Callable

from torch import nn


class HookKind(str, Enum):
    """The hook kinds every model family of the family table resolves in each decoder layer
    (lightning_sae/data/hooks.py; docs/models.md says what each means per family)."""

    RESID_PRE = "resid_pre"
    MLP_IN = "mlp_in"
    MLP_OUT = "mlp_out"
    RESID_POST = "resid_post"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Hook:
    """Where a batch key is read: the site itself (both fields None), a kind of the site's layer,
    or an explicit hook point name. Build it with `Hook.site()`, `Hook.kind(...)`, `Hook.point(...)`."""

    layer_kind: HookKind | None = None
    hookpoint: str | None = None

    def __post_init__(self) -> None:
        if self.layer_kind is not None and self.hookpoint is not None:
            raise ValueError("a Hook is a kind of the site's layer or an explicit hook point, not both")
        if self.layer_kind is not None:
            object.__setattr__(self, "layer_kind", HookKind(self.layer_kind))
        if self.hookpoint is not None and not self.hookpoint:
            raise ValueError("an explicit hook point needs a name")

    @classmethod
    def site(cls) -> "Hook":
        return cls()

    @classmethod
    def kind(cls, kind: HookKind | str) -> "Hook":
        return cls(layer_kind=HookKind(kind))

    @classmethod
    def point(cls, name: str) -> "Hook":
        return cls(hookpoint=name)

    @classmethod
    def parse(cls, value: "Hook | HookKind | str | None") -> "Hook":
        """The older spelling: None is the site, a hook kind's name that kind, any other string a
        hook point name."""
        if isinstance(value, Hook):
            return value
        if value is None:
            return cls.site()
        if isinstance(value, HookKind) or value in HookKind._value2member_map_:
            return cls.kind(value)
        return cls.point(value)

    @property
    def is_site(self) -> bool:
        return self.layer_kind is None and self.hookpoint is None

    def spelled(self) -> str | None:
        """The older spelling (see `parse`), e.g. for logs and hparams."""
        if self.layer_kind is not None:
            return self.layer_kind.value
        return self.hookpoint


@dataclass(frozen=True)
class Splice:
    """How an SAE is spliced into the language model: its code is computed from the tensor at
    batch key `read`'s hook, and its output replaces the tensor at batch key `write`'s hook."""

    read: str
    write: str


@dataclass(frozen=True)
class DataRequest:
    """`reads` maps a batch key to the `Hook` it is read at (values may also be written in the
    older spelling that `Hook.parse` reads). With `gradients`, batches also carry key "grad": the
    gradient of the model's next-token cross-entropy with respect to the tensor of key "x".

    `check_model(model, hookpoints)` runs on the language model's modules (without weights: on the
    meta device) with the resolved {batch key: hook point} before any model pass, so that a
    model the module cannot work with fails in seconds, not after hours of caching.
    """

    reads: Mapping[str, Hook] = field(default_factory=lambda: {"x": Hook.site()})
    gradients: bool = False
    check_model: Callable[[nn.Module, dict[str, str]], None] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "reads", {key: Hook.parse(hook) for key, hook in dict(self.reads).items()})

    @property
    def roles(self) -> dict[str, str | None]:
        """{batch key: hook in the older spelling}: None for the site, a kind's name, a hook point."""
        return {key: hook.spelled() for key, hook in self.reads.items()}


def request_of(trainer) -> DataRequest:
    """The DataRequest of the module a trainer is fitting, or the default one without either."""
    module = trainer.lightning_module if trainer is not None else None
    return module.data_request() if module is not None and hasattr(module, "data_request") else DataRequest()
