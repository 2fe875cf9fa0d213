"""The resumable, self-sharding prompt sampler."""

from __future__ import annotations

import pytest
import torch

from rewardopt.data import ResumableEpochSampler


def test_sampler_shards_one_permutation_across_ranks_without_overlap():
    shards = [list(ResumableEpochSampler(10, seed=3, rank=r, world=3)) for r in range(3)]
    assert [len(s) for s in shards] == [3, 3, 3]  # equal shares (the 10th item is dropped)
    flat = [i for s in shards for i in s]
    assert len(set(flat)) == 9
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(3 * 1_000_003)).tolist()
    assert shards[1] == perm[:9][1::3]


def test_resumed_sampler_continues_each_ranks_own_sequence():
    for r in range(2):
        full = list(ResumableEpochSampler(16, seed=1, epoch=2, rank=r, world=2))
        resumed = ResumableEpochSampler(16, seed=1, epoch=2, start=3, rank=r, world=2)
        assert list(resumed) == full[3:] and len(resumed) == len(full) - 3
        resumed.set_epoch(3)  # a new epoch starts from its beginning
        assert len(resumed) == 8


def test_sampler_is_a_distributed_sampler_so_lightning_does_not_rewrap_it():
    # Lightning replaces any sampler that is not a DistributedSampler with a re-shuffling wrapper under DDP,
    # which made a resumed run see other prompts than an uninterrupted one
    assert isinstance(ResumableEpochSampler(4), torch.utils.data.DistributedSampler)
    with pytest.raises(ValueError, match="rank 2"):
        ResumableEpochSampler(4, rank=2, world=2)
