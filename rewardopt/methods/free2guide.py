"""Free²Guide — gradient-free path-integral control (Kim, Kim, Ye, arXiv 2411.17041).

The optimal control is an exp(r/α)-weighted average of candidate moves; with α -> 0 it becomes:
at each guided step, draw n stochastic children of x_t (DDIM with η = 1 in the paper), decode
each child's x̂0, score it with a (black-box) reward — an LVLM judge, CLIP, ImageReward or an
ensemble (``rewardopt.rewards.ensembles``) — and keep the best (α = 0) or sample by exp(r/α).
Only the first steps are guided (paper: the first 5 of 50, i.e. 10%); n = 5 (LaVie) or 10
(VideoCrafter2). Cost per output: T + (n-1)·(guided steps before the last) NFE and n·(guided
steps) reward calls.

Batch-relative ensembles (min-max normalised sum, rank consensus) are scored over each chain's n
candidates together, so normalisation never mixes chains (as in every method here).
"""

from __future__ import annotations

import torch

from rewardopt.generators.base import Condition, Generator
from rewardopt.methods.steering import InferenceTimeSteering, group_argmax, group_sample
from rewardopt.rewards.base import Reward


class Free2Guide(InferenceTimeSteering):
    """Args:
        num_candidates: n children per guided step (the width a ``budget`` sets).
        guide_steps: how many first steps are guided (an int), or a list of step indices;
            None: the first 10% of T (5 of 50), at least one.
        alpha: temperature; 0 = keep the best candidate.
        Other args: ``InferenceTimeSteering``.
    """

    width_name = "num_candidates"

    def __init__(self, generator: Generator, reward: Reward, num_candidates: int = 5, guide_steps: int | list[int] | None = None,
                 alpha: float = 0.0, budget: int | None = None, num_samples: int = 1, seed: int = 0,
                 eval_reward: Reward | None = None, output_dir: str | None = None, save_samples: bool = True,
                 trace: bool = False) -> None:
        super().__init__(generator, reward, budget, num_samples, seed, eval_reward, output_dir, save_samples, trace)
        T = generator.num_steps
        if guide_steps is None:
            guide_steps = max(1, round(0.1 * T))
        steps = list(range(guide_steps)) if isinstance(guide_steps, int) else sorted(set(guide_steps))
        if not steps or steps[0] < 0 or steps[-1] >= T:
            raise ValueError(f"guide_steps must name steps in [0, {T}), got {guide_steps!r}")
        if num_candidates < 1 or alpha < 0:
            raise ValueError(f"need num_candidates >= 1 and alpha >= 0, got {num_candidates}, {alpha}")
        self.guided = steps
        self.num_candidates, self.alpha = num_candidates, alpha
        self.fit_budget()

    def expected_cost(self) -> dict[str, int]:
        n, T = self.num_candidates, self.T
        before_last = sum(1 for s in self.guided if s < T - 1)
        x0 = sum(self.x0_cost(s + 1, n) for s in self.guided)
        return {"nfe": T + (n - 1) * before_last + x0, "reward_calls": n * len(self.guided), "value_calls": 0}

    def search(self, cond: Condition, rng: torch.Generator, select_rng: torch.Generator) -> torch.Tensor:
        g, n = self.generator, self.num_candidates
        x = g.init_state(cond, rng)
        out = g.model_output(x, 0, cond)
        cond_n = cond.repeat_interleave(n)
        guided = set(self.guided)
        for i in range(self.T):
            if i in guided:
                kids = self.expand(x, i, cond, out, n, rng)
                v, kid_out = self.value(kids, i + 1, cond_n, group=n)
                sel = group_argmax(v, n) if self.alpha == 0 else group_sample(v, n, self.alpha, select_rng)
                self.record(step=i, values=v, chosen=sel)
                x, out = kids[sel], None if kid_out is None else kid_out[sel]
            else:
                x = g.step(x, i, cond, generator=rng, out=out)
                out = self.next_output(x, i + 1, cond)
        return x
