"""The DataModule under a real Lightning Trainer, and used on its own."""

from __future__ import annotations

import lightning as L
import torch
from data_fixtures import _isolated_caches, save_model, tiny_root, write_text  # noqa: F401

from lightning_sae.data import ActivationDataModule
from lightning_sae.data.cache import read_manifest
from lightning_sae.data_request import DataRequest


class PairModule(L.LightningModule):
    """Asks for an (mlp_in, mlp_out) pair with gradients and fits a linear map between them."""

    def __init__(self):
        super().__init__()
        self.map = torch.nn.Linear(32, 32)
        self.batches: list[dict[str, torch.Tensor]] = []

    def data_request(self) -> DataRequest:
        return DataRequest(reads={"x": None, "y": "mlp_out"}, gradients=True)

    def training_step(self, batch, batch_index):
        self.batches.append(batch)
        return torch.nn.functional.mse_loss(self.map(batch["x"]), batch["y"])

    def validation_step(self, batch, batch_index):
        self.log("val_mse", torch.nn.functional.mse_loss(self.map(batch["x"]), batch["y"]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _datamodule(tiny_root, tmp_path, **kwargs) -> ActivationDataModule:
    options = dict(model=str(save_model("gpt2", tiny_root)), dataset=str(write_text(tiny_root)), layer=2, hook="mlp_in",
                   context_size=16, num_tokens=16 * 40, shard_tokens=128, batch_size=32, device="cpu",
                   cache_dir=str(tmp_path / "cache"), validation_fraction=0.1)
    return ActivationDataModule(**{**options, **kwargs})


def test_fit_caches_what_the_module_requests(tiny_root, tmp_path):
    module, dm = PairModule(), _datamodule(tiny_root, tmp_path)
    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1,
                        val_check_interval=2, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=dm)
    assert set(module.batches[0]) == {"x", "y", "grad"} and module.batches[0]["x"].shape == (32, 32)
    assert dm.widths == {"x": 32, "y": 32}
    assert dm.metadata == {
        "model_name": str(save_model("gpt2", tiny_root)),
        "hook_name": "blocks.2.ln2.hook_normalized",
        "hook_names": {"x": "blocks.2.ln2.hook_normalized", "y": "blocks.2.hook_mlp_out"},
        "hookpoints": {"x": "layers.2.mlp_in", "y": "layers.2.mlp_out"},
        "sites": ["layers.2.mlp_in"],
        "source": "cache",
        "layer": 2,
        "hook": "mlp_in",
        "context_size": 16,
        "dataset_path": str(write_text(tiny_root)),
        "prepend_bos": True,
        "cache_dir": str(tmp_path / "cache"),
    }
    assert read_manifest(tmp_path / "cache")["settings"]["gradients"] == {"grad": "x"}
    assert "val_mse" in trainer.callback_metrics


def test_standalone_use_builds_the_default_request(tiny_root, tmp_path):
    dm = _datamodule(tiny_root, tmp_path, hook="resid_post")
    dm.setup("fit")  # no trainer: builds the cache itself, for DataRequest()
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"x"} and dm.metadata["hook_name"] == "blocks.2.hook_resid_post"
    model = dm.load_language_model()
    assert model is dm.load_language_model() and not model.training
    contexts = dm.validation_contexts(3)
    assert contexts.shape == (3, 16) and (contexts[:, 0] == dm.tokenizer.bos_token_id).all()
