"""Run by tests/test_ddp.py as `python tests/ddp_fit.py OUT_DIR DEVICES`: fit then validate.

Lightning's ddp strategy relaunches this script once per extra process (gloo on CPU).
Rank zero writes what the test compares to OUT_DIR/result_<devices>.json.
"""

import json
import sys
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist

from lightning_sae.module import SAEModule
from lightning_sae.tensor_data import SyntheticActivations, TensorDataModule


def main(out_dir: Path, devices: int) -> None:
    L.seed_everything(0)
    data = TensorDataModule(
        synthetic=SyntheticActivations(num_tokens=16_640, d_in=16, num_features=64, active=3),
        batch_size=256 // devices, validation_fraction=1024 / 16_640,
    )
    module = SAEModule(k=3, d_sae=64, lr=1e-3, dead_tokens=3_000)
    trainer = L.Trainer(
        max_epochs=1, accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, data)
    weights = torch.cat([p.detach().flatten() for p in module.parameters()])
    replicas_equal = True
    if devices > 1:
        gathered = [torch.empty_like(weights) for _ in range(devices)]
        dist.all_gather(gathered, weights)
        replicas_equal = all(torch.equal(gathered[0], g) for g in gathered)
    if trainer.is_global_zero:
        torch.save(module.sae.state_dict(), out_dir / "weights.pt")

    # Validate one fixed set of weights (those of the single-process run, when present).
    fixed = out_dir / "weights.pt" if devices == 1 else out_dir / "reference_weights.pt"
    if trainer.world_size > 1:
        dist.barrier()
    module.sae.load_state_dict(torch.load(fixed, weights_only=True))
    metrics = trainer.validate(module, data, verbose=False)[0]
    if trainer.is_global_zero:
        result = {
            "replicas_equal": replicas_equal,
            "tokens_seen": module.sae_activity.tokens_seen,
            "dead_fraction": float(module.sae_activity.dead_fraction()),
            "metrics": {k: float(v) for k, v in metrics.items()},
        }
        (out_dir / f"result_{devices}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
