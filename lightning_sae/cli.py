"""The `lightning-sae` command: LightningCLI over every registered variant and DataModule."""

from __future__ import annotations

import os
from typing import Any

import lightning as L
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_sae.module import SAETrainingModule
from lightning_sae.registry import load_all_plugins


class SAECLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.set_defaults({"trainer.gradient_clip_val": 1.0})

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        # Lightning's default logger, but without its placeholder hp_metric: TensorBoard keeps a
        # run's first hyperparameter record, and ours is written at fit end with the final metrics.
        config = self._get(self.config_init, "trainer", default={})
        if config.get("logger") in (None, True) and "logger" not in kwargs:
            root = config.get("default_root_dir") or os.getcwd()
            kwargs["logger"] = TensorBoardLogger(save_dir=root, default_hp_metric=False)
        return super().instantiate_trainer(**kwargs)


def main(args: list[str] | None = None) -> LightningCLI:
    load_all_plugins()
    return SAECLI(
        SAETrainingModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


if __name__ == "__main__":
    main()
