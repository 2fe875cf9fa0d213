"""Condition data for reward fine-tuning and steering: batches are lists of prompts (or any raw
condition the generator's ``encode_condition`` accepts)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch

from rewardopt.run import seeded_generator


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, items: Sequence) -> None:
        self.items = list(items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


class ResumableEpochSampler(torch.utils.data.DistributedSampler):
    """Epoch e visits a permutation seeded by (seed, e); rank r of w takes every w-th item of it
    (the first w·⌊n/w⌋, so ranks get equal shares), starting ``start`` of its own items in.

    A run killed mid-epoch and resumed from its checkpoint continues, on every rank, with the items
    the uninterrupted run would have seen next. The sampler shards itself (it is a
    ``DistributedSampler``, so Lightning does not wrap it in a re-shuffling one — which made a
    resumed DDP run see other items than an uninterrupted one).
    """

    def __init__(self, n: int, seed: int = 0, epoch: int = 0, start: int = 0, rank: int = 0, world: int = 1) -> None:
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in [0, {world})")
        # no super().__init__: it would look up the process group; everything it sets is set here
        self.n, self.seed, self.epoch, self.start = n, seed, epoch, start
        self.rank, self.num_replicas = rank, world
        self.shuffle, self.drop_last = True, True

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.start = epoch, 0

    def __iter__(self):
        perm = torch.randperm(self.n, generator=seeded_generator(self.seed, self.epoch))
        mine = perm[: (self.n // self.num_replicas) * self.num_replicas][self.rank::self.num_replicas]
        return iter(mine[self.start:].tolist())

    def __len__(self) -> int:
        return max(0, self.n // self.num_replicas - self.start)


def read_prompts(source: Sequence[str] | str) -> list[str]:
    """A list of prompts, or a path to a text file with one prompt per line."""
    if isinstance(source, str):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"prompt file {source!r} does not exist (pass a list of prompts or a file path)")
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return list(source)


class PromptDataModule(L.LightningDataModule):
    """Training prompts (shuffled, repeated to ``epoch_size`` per epoch) and held-out prompts
    (fixed order, each repeated ``val_repeats`` times) for the before/after evaluation.

    Args:
        train_prompts / val_prompts: lists, or text files with one prompt per line.
        batch_size: prompts per training step (per device).
        val_batch_size: prompts per evaluation batch.
        val_repeats: samples drawn per held-out prompt at evaluation.
        epoch_size: training prompts per epoch (the prompt list is cycled).
    """

    def __init__(self, train_prompts: list[str] | str, val_prompts: list[str] | str, batch_size: int = 4,
                 val_batch_size: int = 16, val_repeats: int = 2, epoch_size: int = 1024, seed: int = 0) -> None:
        super().__init__()
        self.train_prompts, self.val_prompts = read_prompts(train_prompts), read_prompts(val_prompts)
        if not self.train_prompts or not self.val_prompts:
            raise ValueError("PromptDataModule needs at least one training and one held-out prompt")
        self.batch_size, self.val_batch_size, self.val_repeats = batch_size, val_batch_size, val_repeats
        self.epoch_size, self.seed = epoch_size, seed

    def train_dataloader(self):
        reps = -(-self.epoch_size // len(self.train_prompts))
        items = (self.train_prompts * reps)[: self.epoch_size]
        epoch, start, rank, world = 0, 0, 0, 1
        trainer = getattr(self, "trainer", None)
        if trainer is not None:  # on resume: skip what this epoch already consumed, on every rank
            epoch, rank, world = trainer.current_epoch, trainer.global_rank, trainer.world_size
            # checkpoints are written after a batch is processed but before it counts as completed
            start = trainer.fit_loop.epoch_loop.batch_progress.current.processed * self.batch_size  # per rank
        sampler = ResumableEpochSampler(len(items), self.seed, epoch, min(start, len(items) // world), rank, world)
        return torch.utils.data.DataLoader(ListDataset(items), batch_size=self.batch_size, sampler=sampler,
                                           collate_fn=list, drop_last=True)

    def val_dataloader(self):
        items = [p for p in self.val_prompts for _ in range(self.val_repeats)]
        return torch.utils.data.DataLoader(ListDataset(items), batch_size=self.val_batch_size, collate_fn=list)

    def predict_dataloader(self):
        return self.val_dataloader()


class UnconditionalDataModule(PromptDataModule):
    """``None`` conditions: ``batch_size`` samples per training step, ``num_eval`` for evaluation
    and prediction (in batches of ``val_batch_size``)."""

    def __init__(self, batch_size: int = 16, num_eval: int = 64, val_batch_size: int = 32,
                 epoch_size: int = 1024) -> None:
        super().__init__([None], [None] * num_eval, batch_size=batch_size, val_batch_size=val_batch_size,
                         val_repeats=1, epoch_size=epoch_size)


class TokenDataModule(L.LightningDataModule):
    """(N, L) token tensors split into training and held-out sets, for pretraining sequence models.
    Subclasses build ``data`` (molecules, DNA) and call ``super().__init__``.

    Args:
        data: (N, L) long tensor. batch_size: sequences per step. val_fraction: held-out share.
        seed: split seed. permute: shuffle before splitting (False: the first rows are held out).
    """

    def __init__(self, data: torch.Tensor, batch_size: int = 64, val_fraction: float = 0.05, seed: int = 0,
                 permute: bool = True) -> None:
        super().__init__()
        n = len(data)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if permute else torch.arange(n)
        n_val = max(1, int(val_fraction * len(data)))
        self.val, self.train = data[order[:n_val]], data[order[n_val:]]
        self.batch_size = batch_size

    def train_dataloader(self):
        return torch.utils.data.DataLoader(self.train, batch_size=self.batch_size, shuffle=True, drop_last=True,
                                           generator=torch.Generator().manual_seed(0))

    def val_dataloader(self):
        return torch.utils.data.DataLoader(self.val, batch_size=256)


class StepsDataModule(L.LightningDataModule):
    """One empty item per training step, for methods that draw their own inputs (score distillation renders its
    own random views): ``trainer.max_steps`` ends the run."""

    def __init__(self, length: int = 10 ** 7) -> None:
        super().__init__()
        self.length = int(length)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(range(self.length), batch_size=1, collate_fn=list)  # a range: lazy
