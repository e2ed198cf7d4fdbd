"""The `lightning-sae` command: LightningCLI over every registered variant and DataModule."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.cli import LightningCLI

from lightning_sae.module import SAETrainingModule
from lightning_sae.registry import load_all_plugins


class SAECLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.set_defaults({"trainer.gradient_clip_val": 1.0})


def main(args: list[str] | None = None) -> None:
    load_all_plugins()
    SAECLI(
        SAETrainingModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


if __name__ == "__main__":
    main()
