"""The ``rewardopt`` command: LightningCLI over any method (model) and data module.

    rewardopt fit --config recipes/images/draft_lv_tiny.yaml
    rewardopt predict --config recipes/images/...yaml
    rewardopt fit --config recipes/images/draft_lv_tiny.yaml --trainer.devices 2 --trainer.strategy ddp

Recipes name their classes with ``class_path``; that is the registry — there is no other.
"""

from __future__ import annotations

import os
import sys

import lightning as L
from lightning.pytorch.cli import LightningCLI


class RewardOptCLI(LightningCLI):
    """LightningCLI with rewardopt's defaults: any LightningModule / DataModule via class_path,
    seed 0 unless the recipe says otherwise, and the resolved config saved into the run folder."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("seed_everything_default", 0)
        kwargs.setdefault("auto_configure_optimizers", False)
        super().__init__(L.LightningModule, L.LightningDataModule, *args, **kwargs)


def main(args: list[str] | None = None) -> None:
    # The repository root holds the `domains` package; make it importable when run from a clone.
    cwd = os.getcwd()
    if os.path.isdir(os.path.join(cwd, "domains")) and cwd not in sys.path:
        sys.path.insert(0, cwd)
    RewardOptCLI(args=args)


if __name__ == "__main__":
    main()
