"""Shuffled, rank-sharded, resumable batches over any table of rows.

Both DataModules (in-memory tensors and the on-disk activation cache) read through this one
piece, so shuffling, DDP sharding, worker splitting and mid-epoch resume behave identically.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

RowFetcher = Callable[[Tensor], dict[str, Tensor]]


def _rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class ShuffledBatches(IterableDataset):
    """Yields dict batches of at most `batch_size` rows; row order is a permutation fixed by
    (seed, epoch).

    Every rank gets the same number of batches so that DDP ranks never wait on one another at the
    end of an epoch. With `drop_remainder` (training) every batch has exactly `batch_size` rows
    and the epoch's remainder is dropped; without it (evaluation) every row is used once: the
    rows are split evenly across ranks and each rank's share into equal-as-possible batches.
    Rows inside a batch are sorted before fetching, which turns random access into mostly-forward
    reads on memory-mapped shards.
    """

    def __init__(self, num_rows: int, fetch: RowFetcher, batch_size: int, seed: int = 0, shuffle: bool = True, drop_remainder: bool = True):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.num_rows = num_rows
        self.fetch = fetch
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_remainder = drop_remainder
        self.epoch = 0
        self.skip_batches = 0  # batches of this epoch already consumed before a resume

    def batches_per_rank(self) -> int:
        _, world = _rank_and_world()
        if self.drop_remainder:
            return self.num_rows // (self.batch_size * world)
        smallest_share = self.num_rows // world  # every batch of every rank must have a row
        return min(smallest_share, math.ceil(self.num_rows / (self.batch_size * world)))

    def __len__(self) -> int:
        return self.batches_per_rank()

    def _rank_batches(self) -> list[Tensor] | Tensor:
        rank, world = _rank_and_world()
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.num_rows, generator=generator)
        else:
            order = torch.arange(self.num_rows)
        batches = self.batches_per_rank()
        if self.drop_remainder:
            per_rank = batches * self.batch_size
            return order[rank * per_rank : (rank + 1) * per_rank].view(-1, self.batch_size)
        if batches == 0:
            return []
        return list(torch.tensor_split(torch.tensor_split(order, world)[rank], batches))

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        batches = self._rank_batches()
        worker = get_worker_info()
        first, step = (0, 1) if worker is None else (worker.id, worker.num_workers)
        # Workers interleave batches; DataLoader yields them round-robin, so the global order holds.
        for index in range(self.skip_batches + first, len(batches), step):
            yield self.fetch(batches[index].sort().values)


class ResumableLoader(DataLoader):
    """A DataLoader over ShuffledBatches that advances the epoch itself and can resume mid-epoch.

    Lightning saves `state_dict()` of stateful loaders in its checkpoints, so a resumed fit
    continues with exactly the batches an uninterrupted run would have seen.

    Every pass (every `iter()` that is started) is a new epoch. The epoch cannot advance when a
    pass runs out: Lightning knows the loader's length and never asks past the last batch, so
    the generator is left suspended, not exhausted. The state is (epoch of the pass under way,
    batches it has handed out); a pass saved complete resumes at the next epoch.
    """

    def __init__(self, dataset: ShuffledBatches, num_workers: int = 0, pin_memory: bool = False):
        super().__init__(
            dataset,
            batch_size=None,
            num_workers=num_workers,
            pin_memory=pin_memory,
            persistent_workers=False,
        )
        self._epoch = 0
        self._batches_done = 0
        self._started = False
        self._resume: tuple[int, int] | None = None

    def __iter__(self) -> Iterator[Any]:
        # A generator: this runs at the first next(), so an iterator made and dropped unused
        # (Lightning makes some) starts no epoch.
        dataset: ShuffledBatches = self.dataset  # type: ignore[assignment]
        if self._resume is not None:
            epoch, skip = self._resume
            self._resume = None
            if skip >= len(dataset):  # saved after the last batch of its epoch
                epoch, skip = epoch + 1, 0
        else:
            epoch, skip = (self._epoch + 1 if self._started else 0), 0
        self._epoch, self._batches_done, self._started = epoch, skip, True
        dataset.epoch, dataset.skip_batches = epoch, skip
        for batch in super().__iter__():
            self._batches_done += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        if self._resume is not None:  # loaded, not yet iterated: still the loaded position
            return {"epoch": self._resume[0], "batches_done": self._resume[1]}
        return {"epoch": self._epoch, "batches_done": self._batches_done}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume = (int(state["epoch"]), int(state["batches_done"]))


class LoaderPosition:
    """Carries a DataModule's training-loader position through checkpoints, via the DataModule's
    own `state_dict`/`load_state_dict` (which Lightning checkpoints).

    Lightning also saves the loader's state in its fit loop, but (Lightning issue #20550, open in
    2.6) drops it on resume when `configure_optimizers` reads `trainer.estimated_stepping_batches`,
    as ours does: that builds the loader before the checkpoint is restored, and the loop never
    hands it the saved state. The DataModule's state is restored before the loader is built (or,
    with strategies that restore after setup, is applied to the loader already built); loading
    the same state twice is harmless, so this keeps working once Lightning is fixed.
    """

    def __init__(self) -> None:
        self.loader: ResumableLoader | None = None
        self._pending: dict[str, int] | None = None

    def track(self, loader: ResumableLoader) -> ResumableLoader:
        self.loader = loader
        if self._pending is not None:
            loader.load_state_dict(self._pending)
            self._pending = None
        return loader

    def state_dict(self) -> dict[str, dict[str, int]]:
        return {"train_loader": self.loader.state_dict()} if self.loader is not None else {}

    def load_state_dict(self, state: dict[str, dict[str, int]]) -> None:
        if "train_loader" not in state:
            return
        if self.loader is not None:
            self.loader.load_state_dict(state["train_loader"])
        else:
            self._pending = dict(state["train_loader"])
