"""DPS-style gradient guidance (Chung et al., arXiv 2209.14687, with a reward in place of the
measurement likelihood): at every step add ρ·∇_{x_t} r(decode(x̂0(x_t))) to the sampler's update.
The classic differentiable baseline of the SVDD paper's tables; needs a differentiable reward.

``num_chains`` > 1 runs that many guided chains per output and keeps the highest final reward (so
that DPS can be given the same NFE budget as the search methods). Cost per output: c·T NFE — all
with autograd (``nfe_grad``), each followed by a backward pass through the reward, the decoder and
the denoiser (``backward``) — c·T differentiable decodes and reward calls, plus c of each for the
final pick when c > 1, and the output's decode.
"""

from __future__ import annotations

import torch

from rewardopt.generators.base import Condition, Generator
from rewardopt.methods.steering import InferenceTimeSteering, group_argmax
from rewardopt.rewards.base import Reward, require_gradient


class DPS(InferenceTimeSteering):
    """Args:
        scale: guidance strength ρ.
        normalize: divide each sample's gradient by its RMS (so ρ is a step size in state units).
        num_chains: guided chains per output (the width a ``budget`` sets).
        Other args: ``InferenceTimeSteering``.
    """

    width_name = "num_chains"
    needs_stochastic = False

    def __init__(self, generator: Generator, reward: Reward, scale: float = 1.0, normalize: bool = False,
                 num_chains: int = 1, budget: int | None = None, num_samples: int = 1, seed: int = 0,
                 eval_reward: Reward | None = None, output_dir: str | None = None, save_samples: bool = True,
                 trace: bool = False) -> None:
        super().__init__(generator, reward, budget, num_samples, seed, eval_reward, output_dir, save_samples, trace)
        self.grad_reward = require_gradient("DPS", reward)
        if num_chains < 1:
            raise ValueError(f"num_chains must be >= 1, got {num_chains}")
        self.scale, self.normalize, self.num_chains = scale, normalize, num_chains
        self.fit_budget()

    def expected_cost(self) -> dict[str, int]:
        c, T = self.num_chains, self.T
        pick = c if c > 1 else 0
        return self.cost(nfe=c * T, nfe_grad=c * T, backward=c * T, decodes=c * T + pick + 1,
                         reward_calls=c * T + pick)

    def guidance(self, x: torch.Tensor, i: int, cond: Condition) -> tuple[torch.Tensor, torch.Tensor]:
        """(∇_x r(decode(x̂0(x))), model output at x) — one NFE with autograd."""
        g = self.generator
        # Lightning predicts under inference_mode; guidance needs a graph, so leave it and use
        # ordinary copies of the (inference-mode) state and condition tensors.
        with torch.inference_mode(False), torch.enable_grad():
            xg = x.detach().clone().requires_grad_(True)
            cond = Condition(cond.raw, {k: v.clone() for k, v in cond.tensors.items()})
            out = g.model_output(xg, i, cond)
            r = self.grad_reward(g.decode(g.predict_x0(xg, i, cond, out=out)), cond.raw).total
            grad, = torch.autograd.grad(r.sum(), xg)
            g.counter.backward += x.shape[0]
        if self.normalize:
            rms = grad.flatten(1).pow(2).mean(1).sqrt().clamp(min=1e-12)
            grad = grad / rms.view(-1, *([1] * (grad.ndim - 1)))
        return grad, out.detach()

    def search(self, cond: Condition, rng: torch.Generator, select_rng: torch.Generator) -> torch.Tensor:
        g, c = self.generator, self.num_chains
        cc = cond.repeat_interleave(c)
        x = g.init_state(cc, rng)
        for i in range(self.T):
            grad, out = self.guidance(x, i, cc)
            x = g.step(x, i, cc, generator=rng, out=out) + self.scale * grad
        if c == 1:
            return x
        v = self.score(g.decode(x), cc, group=c)
        best = group_argmax(v, c)
        self.record(step=self.T, values=v, chosen=best)
        return x[best]
