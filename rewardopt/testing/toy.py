"""A toy generator whose values are known in closed form, for testing methods exactly.

``RandomWalkGenerator``: the state is (B, D); each step adds ``std``·noise (x_{i+1} = x_i + std·ε),
``predict_x0`` is the state itself (E[x_0 | x_i] of the walk), ``decode`` is the identity. With
``SumReward`` (r(x) = sum of x) a child's value is its own sum, so the child a method must pick can
be computed by hand from the same noise stream. With x_T ~ N(0, I), x_0 ~ N(0, (1 + T·std²) I), so
targets such as p(x_0)·exp(sum(x_0)/α) are Gaussians in closed form.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from rewardopt.generators.base import Condition, Generator
from rewardopt.generators.capabilities import DeterministicStep
from rewardopt.rewards.base import Reward


class RandomWalkGenerator(DeterministicStep, Generator):
    def __init__(self, num_steps: int = 4, dim: int = 2, std: float = 1.0) -> None:
        super().__init__()
        self.register_buffer("_t", torch.arange(num_steps, 0, -1), persistent=False)
        self.dim, self.std = dim, std
        self.weight = torch.nn.Parameter(torch.ones(()))  # so the contract's gradient check has something

    @property
    def timesteps(self) -> torch.Tensor:
        return self._t

    @property
    def stochastic(self) -> bool:
        return self.std > 0

    def encode_condition(self, raw: Sequence[Any]) -> Condition:
        return Condition(list(raw))

    def init_state(self, cond, generator=None):
        return torch.randn((len(cond), self.dim), generator=generator)

    def model_output(self, x_t, i, cond):
        self.counter.nfe += x_t.shape[0]
        if torch.is_grad_enabled():
            self.counter.nfe_grad += x_t.shape[0]
        return x_t * self.weight

    def step(self, x_t, i, cond, noise=None, generator=None, out=None):
        out = self.model_output(x_t, i, cond) if out is None else out
        if noise is None:
            noise = torch.randn(x_t.shape, generator=generator)
        return out + self.std * noise

    def deterministic_step(self, x_t, i, cond, out=None):
        """The walk without its noise: x_{i+1} = x_i."""
        return self.model_output(x_t, i, cond) if out is None else out

    def predict_x0(self, x_t, i, cond, out=None):
        return self.model_output(x_t, i, cond) if out is None else out

    def decode(self, x0):
        self.counter.count_decodes(x0.shape[0])
        return x0


class SumReward(Reward):
    """r(x) = sum of the state's entries (differentiable)."""

    differentiable = True

    def score(self, samples, cond):
        return samples.sum(dim=tuple(range(1, samples.ndim)))
