"""A DataModule over activations already in memory or in a safetensors file, or synthetic ones.

For training without a language model: a file of activations someone else produced, or data
with a known ground truth (sparse combinations of known unit directions) to check that an SAE
recovers it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from safetensors.torch import load_file
from torch import Tensor

from lightning_sae.batching import LoaderPosition, ResumableLoader, ShuffledBatches
from lightning_sae.data_request import DataRequest, request_of


@dataclass
class SyntheticActivations:
    """x = sum over `active` random features f of a_f * direction_f + noise, directions unit norm.

    Feature frequencies follow a power law (as real features do), magnitudes are uniform in
    [0.5, 1.5].
    """

    num_tokens: int = 200_000
    d_in: int = 64
    num_features: int = 512
    active: int = 8
    noise: float = 0.0
    frequency_exponent: float = 0.5
    seed: int = 0

    def generate(self) -> tuple[Tensor, Tensor]:
        """Returns (activations [num_tokens, d_in], true directions [num_features, d_in])."""
        generator = torch.Generator().manual_seed(self.seed)
        directions = torch.randn(self.num_features, self.d_in, generator=generator)
        directions /= directions.norm(dim=1, keepdim=True)
        frequency = torch.arange(1, self.num_features + 1, dtype=torch.float64).pow(-self.frequency_exponent)
        features = torch.multinomial(frequency.expand(self.num_tokens, -1), self.active, generator=generator)
        magnitudes = 0.5 + torch.rand(self.num_tokens, self.active, generator=generator)
        x = torch.nn.functional.embedding_bag(features, directions, per_sample_weights=magnitudes, mode="sum")
        if self.noise:
            x += self.noise * torch.randn(x.shape, generator=generator)
        return x, directions


class TensorDataModule(L.LightningDataModule):
    """Serves rows of named tensors: each batch key of the module's DataRequest is a tensor name.

    Args:
        path: a .safetensors file of [num_tokens, width] tensors (e.g. "x", "y", "grad").
        synthetic: generate ground-truth data instead of reading a file.
        batch_size: tokens per batch (per rank under DDP).
        validation_fraction: rows held out, from the end, for validation.
        seed: shuffling seed.
        num_workers: DataLoader worker processes.
    """

    def __init__(
        self,
        path: str | None = None,
        synthetic: SyntheticActivations | None = None,
        batch_size: int = 4096,
        validation_fraction: float = 0.05,
        seed: int = 0,
        num_workers: int = 0,
    ):
        super().__init__()
        if (path is None) == (synthetic is None):
            raise ValueError("give exactly one of `path` (a safetensors file of activations) or `synthetic`")
        if not 0 <= validation_fraction < 1:
            raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction}")
        self.path, self.synthetic = path, synthetic
        self.batch_size, self.validation_fraction = batch_size, validation_fraction
        self.seed, self.num_workers = seed, num_workers
        self.tensors: dict[str, Tensor] = {}
        self.true_directions: Tensor | None = None
        self.widths: dict[str, int] = {}
        self.metadata: dict = {}
        self._train_position = LoaderPosition()

    def state_dict(self) -> dict:
        return self._train_position.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self._train_position.load_state_dict(state)

    def _request(self) -> DataRequest:
        return request_of(self.trainer)

    def _load(self) -> dict[str, Tensor]:
        if self.synthetic is not None:
            x, self.true_directions = self.synthetic.generate()
            self.metadata = {"dataset_path": "synthetic", "hook_name": "synthetic"}
            return {"x": x}
        path = Path(self.path)
        if not path.is_file():
            raise FileNotFoundError(f"activation file not found: {path}")
        self.metadata = {"dataset_path": str(path)}
        return load_file(path)

    def setup(self, stage: str | None = None) -> None:
        if self.tensors:
            return
        tensors = self._load()
        request = self._request()
        keys = list(request.reads) + (["grad"] if request.gradients else [])
        missing = [key for key in keys if key not in tensors]
        if missing:
            source = "synthetic data" if self.synthetic is not None else str(self.path)
            raise ValueError(f"{source} has no tensor named {missing}; it has {sorted(tensors)}")
        rows = {tensors[key].shape[0] for key in keys}
        if len(rows) != 1 or any(tensors[key].ndim != 2 for key in keys):
            raise ValueError(f"tensors {keys} must all be 2-D with the same number of rows")
        self.tensors = {key: tensors[key].float() for key in keys}
        source = "synthetic data" if self.synthetic is not None else str(self.path)
        for key, value in self.tensors.items():
            finite = torch.isfinite(value).all(dim=1)
            if not finite.all():
                bad = (~finite).nonzero().flatten()
                raise ValueError(
                    f"tensor '{key}' of {source} holds NaN or inf in {bad.numel()} of {len(finite)} rows "
                    f"(first: row {int(bad[0])}); SAEs cannot be trained on them: clean or regenerate the activations"
                )
        self.widths = {key: self.tensors[key].shape[1] for key in request.reads}
        total = rows.pop()
        self.num_validation = int(total * self.validation_fraction)
        self.num_train = total - self.num_validation
        if self.num_train < self.batch_size:
            raise ValueError(
                f"only {self.num_train} training tokens, fewer than one batch of {self.batch_size}: "
                "lower batch_size or validation_fraction, or give more activations"
            )

    def _fetch(self, offset: int):
        return lambda rows: {key: value[rows + offset] for key, value in self.tensors.items()}

    def train_dataloader(self) -> ResumableLoader:
        dataset = ShuffledBatches(self.num_train, self._fetch(0), self.batch_size, seed=self.seed, shuffle=True)
        return self._train_position.track(ResumableLoader(dataset, num_workers=self.num_workers))

    def val_dataloader(self) -> ResumableLoader:
        dataset = ShuffledBatches(self.num_validation, self._fetch(self.num_train), self.batch_size, shuffle=False, drop_remainder=False)
        return ResumableLoader(dataset, num_workers=self.num_workers)
