"""Faults that tests/test_fault_matrix.py injects into a CLI run in another process, named by
class path (`--trainer.callbacks+=fault_callbacks.DieOnRank`, tests/ on PYTHONPATH)."""

import os

import lightning as L


class DieOnRank(L.Callback):
    """Rank `rank` dies at once (as if killed: no exception, no cleanup) before `step` runs."""

    def __init__(self, rank: int = 1, step: int = 2):
        self.rank, self.step = rank, step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            os._exit(9)
