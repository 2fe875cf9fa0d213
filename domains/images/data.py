"""Prompt data for the image domain."""

from __future__ import annotations

from domains.images.shapes import split_prompts
from rewardopt.data import PromptDataModule


class ShapePromptDataModule(PromptDataModule):
    """The shapes prompts split into 42 training and 12 held-out prompts (seeded, fixed)."""

    def __init__(self, batch_size: int = 4, val_batch_size: int = 24, val_repeats: int = 2, epoch_size: int = 1024,
                 seed: int = 0, split_seed: int = 0) -> None:
        train, val = split_prompts(split_seed)
        super().__init__(train, val, batch_size=batch_size, val_batch_size=val_batch_size, val_repeats=val_repeats,
                         epoch_size=epoch_size, seed=seed)
