"""Run by tests/test_batch_topk.py as `python tests/ddp_batch_topk.py OUT_DIR`: two gloo processes
each feed their own batches to a BatchTopK selector in training mode; rank r writes its batches
(OUT_DIR/pre_<r>_<step>.pt) and its threshold after every step (OUT_DIR/rank<r>.json)."""

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_sae import TopKSAE
from lightning_sae_batch_topk import BatchTopK

STEPS, WORLD = 4, 2


def run(rank: int, out_dir: Path, port: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    selector = BatchTopK(threshold_lr=0.3).train()
    sae = TopKSAE(8, 40, 3, selector=selector)
    generator = torch.Generator().manual_seed(100 + rank)
    thresholds = []
    for step in range(STEPS):
        pre = torch.randn(16, 40, generator=generator).mul_(1 + rank + step).relu_()
        if step == 2 and rank == 1:
            pre.zero_()  # this rank keeps nothing positive: only the other one counts
        torch.save(pre, out_dir / f"pre_{rank}_{step}.pt")
        selector.select(pre, sae, None)
        thresholds.append(float(selector.threshold))
    result = {"thresholds": thresholds, "updates": int(selector.threshold_updates)}
    (out_dir / f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free_port = str(probe.getsockname()[1])
    mp.spawn(run, args=(Path(sys.argv[1]), free_port), nprocs=WORLD, join=True)
