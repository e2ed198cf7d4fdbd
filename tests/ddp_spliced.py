"""Run by tests/test_spliced_ddp.py as `python tests/ddp_spliced.py ROOT DEVICES`: validates the
tiny setup's saved SAE (tests/eval_helpers.py, already built under ROOT) with spliced CE on
DEVICES CPU processes. Rank zero writes the metrics to ROOT/spliced_<devices>.json."""

import json
import sys
from pathlib import Path

import lightning as L

sys.path.insert(0, str(Path(__file__).parent))
from eval_helpers import paths  # noqa: E402
from lightning_sae.data import ActivationDataModule  # noqa: E402
from lightning_sae.module import SAEModule  # noqa: E402


def main(root: Path, devices: int) -> None:
    tiny = paths(root)
    module = SAEModule(init_from=str(tiny.sae_dir), spliced_eval_contexts=6)
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    metrics = trainer.validate(module, ActivationDataModule(**tiny.datamodule_kwargs()), verbose=False)[0]
    if trainer.is_global_zero:
        (root / f"spliced_{devices}.json").write_text(json.dumps({k: float(v) for k, v in metrics.items()}))


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
