"""What a training module asks of its DataModule: which tensors, under which batch keys."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from torch import nn


@dataclass(frozen=True)
class DataRequest:
    """`roles` maps a batch key to where it is read: None means the site itself (the hook point
    the user chose), a hook kind ("resid_post", "mlp_in", ...) that kind of the site's layer, any
    other string a hook point name. With `gradients`, batches also carry key "grad": the
    gradient of the model's next-token cross-entropy with respect to the tensor of role "x".

    `check_model(model, roles)` runs on the language model's modules (without weights: on the
    meta device) with the resolved {batch key: hook point} before any model pass, so that a
    model the module cannot work with fails in seconds, not after hours of caching.
    """

    roles: dict[str, str | None] = field(default_factory=lambda: {"x": None})
    gradients: bool = False
    check_model: Callable[[nn.Module, dict[str, str]], None] | None = field(default=None, compare=False)


def request_of(trainer) -> DataRequest:
    """The DataRequest of the module a trainer is fitting, or the default one without either."""
    module = trainer.lightning_module if trainer is not None else None
    return module.data_request() if module is not None and hasattr(module, "data_request") else DataRequest()
