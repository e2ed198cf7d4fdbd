"""What a training module asks of its DataModule: which tensors, under which batch keys."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class DataRequest:
    """`roles` maps a batch key to a hook kind ("resid_post", "mlp_in", ...); None means the
    DataModule's own configured hook. With `gradients`, batches also carry key "grad": the
    gradient of the model's next-token cross-entropy with respect to the tensor of role "x".
    """

    roles: dict[str, str | None] = field(default_factory=lambda: {"x": None})
    gradients: bool = False


def request_of(trainer) -> DataRequest:
    """The DataRequest of the module a trainer is fitting, or the default one without either."""
    module = trainer.lightning_module if trainer is not None else None
    return module.data_request() if module is not None and hasattr(module, "data_request") else DataRequest()
