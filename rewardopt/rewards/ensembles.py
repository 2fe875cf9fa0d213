"""Reward ensembles whose value depends on the batch they score (Free²Guide's ensembling of an LVLM
judge with CLIP / ImageReward): a min-max normalised weighted sum and rank consensus.

They set ``batch_relative = True``: methods that choose among candidates score each decision's
candidates together (Free2Guide does), so normalisation never mixes different chains. The plain
weighted sum is ``rewardopt.rewards.base.WeightedSum`` (Free²Guide: β = 0.75 on the LVLM).
Members are logged unnormalised as terms. A sample excluded by a member (``on_failure="exclude"``)
is excluded from the ensemble (total -inf) and left out of every member's normalisation.
"""

from __future__ import annotations

import torch

from rewardopt.rewards.base import RewardOutput, WeightedSum


class MinMaxSum(WeightedSum):
    """sum_k w_k · (r_k - min_batch r_k) / (max_batch r_k - min_batch r_k); a constant member scores 0."""

    batch_relative = True
    differentiable = False

    def __init__(self, rewards, weights=None, name: str | None = None) -> None:
        super().__init__(rewards, weights, name or "MinMaxSum")
        self.differentiable = False

    @staticmethod
    def normalise(v: torch.Tensor) -> torch.Tensor:
        span = v.max() - v.min()
        return (v - v.min()) / span if span > 0 else torch.zeros_like(v)

    def score(self, samples, cond):
        raw = super().score(samples, cond)
        exc = raw.excluded
        if exc is None or not exc.any():
            total = sum(self.weights[k] * self.normalise(v.detach().float()) for k, v in raw.terms.items())
            return RewardOutput(total, raw.terms, excluded=exc)
        keep = ~exc  # normalise over the valid samples only
        total = torch.full_like(raw.total.detach().float(), float("-inf"))
        if keep.any():
            total[keep] = sum(self.weights[k] * self.normalise(v.detach().float()[keep]) for k, v in raw.terms.items())
        return RewardOutput(total, raw.terms, excluded=exc)

    def differentiable_part(self):
        return None


class RankConsensus(MinMaxSum):
    """sum_k w_k · rank_k / (B - 1): each member's ranks within the batch (0 = worst, ties averaged)."""

    def __init__(self, rewards, weights=None, name: str | None = None) -> None:
        super().__init__(rewards, weights, name or "RankConsensus")

    @staticmethod
    def normalise(v: torch.Tensor) -> torch.Tensor:
        n = v.numel()
        if n == 1:
            return torch.zeros_like(v)
        less = (v[None, :] < v[:, None]).sum(1).float()
        equal = (v[None, :] == v[:, None]).sum(1).float()
        return (less + (equal - 1) / 2) / (n - 1)
