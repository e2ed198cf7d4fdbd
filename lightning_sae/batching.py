"""Shuffled, rank-sharded, resumable batches over any table of rows.

Both DataModules (in-memory tensors and the on-disk activation cache) read through this one
piece, so shuffling, DDP sharding, worker splitting and mid-epoch resume behave identically.
"""

from __future__ import annotations

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
    """Yields dict batches of `batch_size` rows; row order is a permutation fixed by (seed, epoch).

    Every rank gets the same number of batches (the remainder of an epoch is dropped) so that
    DDP ranks never wait on one another at the end of an epoch. Rows inside a batch are sorted
    before fetching, which turns random access into mostly-forward reads on memory-mapped shards.
    """

    def __init__(self, num_rows: int, fetch: RowFetcher, batch_size: int, seed: int = 0, shuffle: bool = True):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.num_rows = num_rows
        self.fetch = fetch
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.skip_batches = 0  # batches of this epoch already consumed before a resume

    def batches_per_rank(self) -> int:
        _, world = _rank_and_world()
        return self.num_rows // (self.batch_size * world)

    def __len__(self) -> int:
        return self.batches_per_rank()

    def _rank_rows(self) -> Tensor:
        rank, world = _rank_and_world()
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.num_rows, generator=generator)
        else:
            order = torch.arange(self.num_rows)
        per_rank = self.batches_per_rank() * self.batch_size
        return order[rank * per_rank : (rank + 1) * per_rank]

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        rows = self._rank_rows().view(-1, self.batch_size)
        worker = get_worker_info()
        first, step = (0, 1) if worker is None else (worker.id, worker.num_workers)
        # Workers interleave batches; DataLoader yields them round-robin, so the global order holds.
        for index in range(self.skip_batches + first, rows.shape[0], step):
            yield self.fetch(rows[index].sort().values)


class ResumableLoader(DataLoader):
    """A DataLoader over ShuffledBatches that advances the epoch itself and can resume mid-epoch.

    Lightning saves `state_dict()` of stateful loaders in its checkpoints, so a resumed fit
    continues with exactly the batches an uninterrupted run would have seen.
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
        self._pending_skip = 0

    def __iter__(self) -> Iterator[Any]:
        dataset: ShuffledBatches = self.dataset  # type: ignore[assignment]
        dataset.epoch, dataset.skip_batches = self._epoch, self._pending_skip
        self._batches_done, self._pending_skip = self._pending_skip, 0
        for batch in super().__iter__():
            self._batches_done += 1
            yield batch
        self._epoch += 1
        self._batches_done = 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._epoch, "batches_done": self._batches_done}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._epoch = int(state["epoch"])
        self._pending_skip = int(state["batches_done"])
