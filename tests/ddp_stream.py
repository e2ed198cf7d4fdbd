"""Run by tests/test_stream_ddp.py as `python tests/ddp_stream.py OUT_DIR SOURCE MODEL TEXT`: a
2-process DDP fit (gloo on CPU) whose data come from the stream or from a cache both ranks write.
Every rank saves the rows it trained and validated on to OUT_DIR/rows_<rank>.pt."""

import sys
from pathlib import Path

import lightning as L
import torch

from lightning_sae.data import ActivationDataModule
from lightning_sae.module import SAEModule


class RecordRows(L.Callback):
    def __init__(self):
        self.train, self.val = [], []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.train.append(batch["x"].detach().clone())

    def on_validation_batch_start(self, trainer, module, batch, batch_idx, dataloader_idx=0):
        self.val.append(batch["x"].detach().clone())


def main(out_dir: Path, source: str, model: str, text: str) -> None:
    L.seed_everything(0)
    data = ActivationDataModule(
        model=model, dataset=text, layer=1, context_size=16, num_tokens=16 * 40, validation_fraction=0.1,
        source=source, buffer_tokens=64, batch_size=32, model_batch_size=4, shard_tokens=16 * 8, device="cpu", model_dtype="float32",
        cache_dir=str(out_dir / "cache") if source == "cache" else None,
    )
    record = RecordRows()
    trainer = L.Trainer(
        max_epochs=1, accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, callbacks=[record],
        default_root_dir=out_dir,
    )
    trainer.fit(SAEModule(k=4, d_sae=64, spliced_eval_contexts=0), data)
    torch.save({"train": record.train, "val": record.val}, out_dir / f"rows_{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4])
