"""Best-of-N: draw N full samples per condition from the plain sampler and keep the highest-reward
one. The fair-compute reference every inference-time table needs (N·T NFE, N reward calls, N + 1
decodes: the N candidates and the output)."""

from __future__ import annotations

import torch

from rewardopt.generators.base import Condition, Generator
from rewardopt.methods.steering import InferenceTimeSteering, group_argmax
from rewardopt.rewards.base import Reward


class BestOfN(InferenceTimeSteering):
    """Args: n: samples per output (the width a ``budget`` sets). Other args: ``InferenceTimeSteering``."""

    width_name = "n"
    needs_stochastic = False  # independent x_T draws differ even for a deterministic sampler

    def __init__(self, generator: Generator, reward: Reward, n: int = 4, budget: int | None = None,
                 num_samples: int = 1, seed: int = 0, eval_reward: Reward | None = None, output_dir: str | None = None,
                 save_samples: bool = True, trace: bool = False) -> None:
        super().__init__(generator, reward, budget, num_samples, seed, eval_reward, output_dir, save_samples, trace)
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        self.n = n
        self.fit_budget()

    def expected_cost(self) -> dict[str, int]:
        if self.n == 1:  # the plain sampler: nothing to choose, nothing to score
            return self.cost(nfe=self.T, decodes=1)
        return self.cost(nfe=self.n * self.T, reward_calls=self.n, decodes=self.n + 1)

    def search(self, cond: Condition, rng: torch.Generator, select_rng: torch.Generator) -> torch.Tensor:
        c = cond.repeat_interleave(self.n)
        x = self.generator.sample(c, generator=rng)
        if self.n == 1:
            return x
        v = self.score(self.generator.decode(x), c, group=self.n)
        best = group_argmax(v, self.n)
        self.record(step=self.T, values=v, chosen=best)
        return x[best]
