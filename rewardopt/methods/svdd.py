"""SVDD — soft value-based decoding (Li, Uehara et al., "Derivative-Free Guidance in Continuous and
Discrete Diffusion Models with Soft Value-Based Decoding", arXiv 2408.08252; code masa-ue/SVDD).

Target: p_pre(x)·exp(r(x)/α). At every step each chain draws M children from the pretrained
transition, weighs them by exp(v/α) and keeps one (α = 0: the argmax, which all public code uses).

* SVDD-PM (``value="posterior_mean"``): v(x_{t-1}) = r(decode(x̂0(x_{t-1}))). No training. The model
  output computed for a child's x̂0 is the one its next step needs, so a step costs M NFE per chain:
  1 + M·(T-1) NFE, M·T reward calls and M·T + 1 decodes per sample.
* SVDD-MC (``value=<ValueFunction>``): v from a value network regressed on rollout rewards
  (``rewardopt.values``; ``recipes/images/svdd_mc_value_fit_tiny.yaml``). T NFE, 0 reward calls,
  M·T value calls per sample. It has no NFE knob, so it takes no ``budget``.
* A step that draws no noise (``Generator.step_is_deterministic``: the last step of DDPM, or of
  DDIM with ``set_alpha_to_one``) has M identical children: it draws and values one (M·(T-1) + 1
  reward calls then).
* SVDD-R (``replace_frac`` > 0; paper 3-5%): after each step, among the ``num_samples`` chains of a
  condition, the worst ceil(frac·n) chains are replaced by copies of the best (reduces diversity).

Paper defaults: M = 20 for images, 10 elsewhere; α 0.01-0.05 reported, argmax in code.
"""

from __future__ import annotations

import torch

from rewardopt.generators.base import Condition, Generator
from rewardopt.methods.steering import InferenceTimeSteering, group_argmax, group_sample, replace_worst
from rewardopt.rewards.base import Reward
from rewardopt.values import ValueFunction


class SVDD(InferenceTimeSteering):
    """Args:
        num_children: M children per chain per step (the width a ``budget`` sets).
        alpha: temperature of exp(v/α) selection; 0 = argmax.
        value: "posterior_mean" (SVDD-PM) or a trained ``ValueFunction`` (SVDD-MC).
        replace_frac: SVDD-R fraction of chains replaced by copies of the best each step (0: off).
        Other args: ``InferenceTimeSteering``.
    """

    width_name = "num_children"

    def __init__(self, generator: Generator, reward: Reward, num_children: int = 20, alpha: float = 0.0,
                 value: str | ValueFunction = "posterior_mean", replace_frac: float = 0.0, budget: int | None = None,
                 num_samples: int = 1, seed: int = 0, eval_reward: Reward | None = None, output_dir: str | None = None,
                 save_samples: bool = True, trace: bool = False) -> None:
        super().__init__(generator, reward, budget, num_samples, seed, eval_reward, output_dir, save_samples, trace)
        if num_children < 1 or alpha < 0 or not 0 <= replace_frac < 1:
            raise ValueError(f"need num_children >= 1, alpha >= 0, 0 <= replace_frac < 1; "
                             f"got {num_children}, {alpha}, {replace_frac}")
        if isinstance(value, str) and value != "posterior_mean":
            raise ValueError(f"value must be 'posterior_mean' or a ValueFunction, got {value!r}")
        self.num_children, self.alpha, self.value_fn, self.replace_frac = num_children, alpha, value, replace_frac
        if isinstance(value, ValueFunction):
            self.value_net = value.eval().requires_grad_(False)
            if budget is not None:
                raise ValueError("SVDD-MC spends T NFE at any num_children (values come from the value network); "
                                 "set num_children instead of budget")
        self.fit_budget()

    @property
    def learned(self) -> bool:
        return not isinstance(self.value_fn, str)

    def expected_cost(self) -> dict[str, int]:
        T = self.T
        m = [self.branching(i, self.num_children) for i in range(T)]
        if self.learned:
            return self.cost(nfe=T, value_calls=sum(m), decodes=1)
        nfe = 1 + sum(m[i] for i in range(T - 1)) + sum(self.x0_cost(i + 1, m[i]) for i in range(T))
        return self.cost(nfe=nfe, reward_calls=sum(m), decodes=sum(m) + 1)

    def select(self, v: torch.Tensor, m: int, select_rng: torch.Generator) -> torch.Tensor:
        return group_argmax(v, m) if self.alpha == 0 else group_sample(v, m, self.alpha, select_rng)

    def search(self, cond: Condition, rng: torch.Generator, select_rng: torch.Generator) -> torch.Tensor:
        g = self.generator
        x = g.init_state(cond, rng)
        out = g.model_output(x, 0, cond)
        for i in range(self.T):
            M = self.branching(i, self.num_children)
            cond_m = cond.repeat_interleave(M)
            kids = self.expand(x, i, cond, out, M, rng)
            if self.learned:
                v = self.value_net(kids, i + 1, cond_m).detach().float()
                self.value_calls += kids.shape[0]
                kid_out = None
            else:
                v, kid_out = self.value(kids, i + 1, cond_m, group=M)
            sel = self.select(v, M, select_rng)
            self.record(step=i, values=v, chosen=sel)
            x, v = kids[sel], v[sel]
            out = kid_out[sel] if kid_out is not None else self.next_output(x, i + 1, cond) if self.learned else None
            if self.replace_frac > 0 and i + 1 < self.T:
                idx = replace_worst(v, self.num_samples, self.replace_frac)
                x, out = x[idx], None if out is None else out[idx]
        return x
