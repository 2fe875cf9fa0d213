"""Sequential Monte Carlo with Feynman-Kac steering potentials (SMC / TDS / FK-steering: Wu et al.
arXiv 2306.17775; Singhal et al. arXiv 2501.06848).

k interacting particles per output sample. After each step every particle gets the posterior-mean
value v_i = r(decode(x̂0(x_i))) and its log-weight grows by a potential increment:

* ``difference``: (v_i - v_{i-1}) / α  (weights telescope to the current value: exp(v_i/α));
* ``max``: (max_{s<=i} v_s - max_{s<i} v_s) / α;
* ``cumulative``: v_i / α.

Particles are resampled (multinomial, within each output's group) every ``resample_every`` steps
or, with ``resample="ess"``, when the effective sample size falls below ``ess_frac``·k; weights
reset after resampling. The output is the particle with the highest final reward
(``output="best"``, as FK-steering reports) or one drawn by final weight (``output="sample"``).
Cost per output: k·T NFE (the value's model output drives the next step) and k·T reward calls.
Resampling collapses diversity, as the SVDD paper notes.
"""

from __future__ import annotations

import torch

from rewardopt.generators.base import Condition, Generator
from rewardopt.methods.steering import InferenceTimeSteering, group_argmax, group_sample
from rewardopt.rewards.base import Reward

POTENTIALS = ("difference", "max", "cumulative")


class SMC(InferenceTimeSteering):
    """Args:
        num_particles: k (the width a ``budget`` sets).
        potential: "difference" | "max" | "cumulative".
        alpha: temperature of the potentials exp(·/α).
        resample: "ess" (when ESS < ess_frac·k) or an interval in steps.
        ess_frac: ESS threshold as a fraction of k (FK-steering: 0.5).
        output: "best" (highest final reward) or "sample" (by final weight).
        Other args: ``InferenceTimeSteering``.
    """

    width_name = "num_particles"

    def __init__(self, generator: Generator, reward: Reward, num_particles: int = 4, potential: str = "difference",
                 alpha: float = 0.1, resample: str | int = "ess", ess_frac: float = 0.5, output: str = "best",
                 budget: int | None = None, num_samples: int = 1, seed: int = 0, eval_reward: Reward | None = None,
                 output_dir: str | None = None, save_samples: bool = True, trace: bool = False) -> None:
        super().__init__(generator, reward, budget, num_samples, seed, eval_reward, output_dir, save_samples, trace)
        if potential not in POTENTIALS:
            raise ValueError(f"potential must be one of {POTENTIALS}, got {potential!r}")
        if resample != "ess" and not (isinstance(resample, int) and resample >= 1):
            raise ValueError(f"resample must be 'ess' or an interval >= 1, got {resample!r}")
        if output not in ("best", "sample") or alpha <= 0 or num_particles < 1:
            raise ValueError(f"need output in (best, sample), alpha > 0, num_particles >= 1; got {output!r}, {alpha}, {num_particles}")
        self.num_particles, self.potential, self.alpha = num_particles, potential, alpha
        self.resample, self.ess_frac, self.output = resample, ess_frac, output
        self.resamples = 0
        self.fit_budget()

    def expected_cost(self) -> dict[str, int]:
        k, T = self.num_particles, self.T
        return {"nfe": k * T + sum(self.x0_cost(i + 1, k) for i in range(T)), "reward_calls": k * T, "value_calls": 0}

    def _increment(self, v: torch.Tensor, prev: torch.Tensor | None, vmax: torch.Tensor | None) -> torch.Tensor:
        if self.potential == "difference":
            return (v - (prev if prev is not None else 0.0)) / self.alpha
        if self.potential == "max":
            return (torch.maximum(v, vmax) - vmax) / self.alpha if vmax is not None else v / self.alpha
        return v / self.alpha

    def _should_resample(self, logw: torch.Tensor, i: int) -> torch.Tensor:
        """(groups,) bool: which groups resample after step i."""
        k = self.num_particles
        lw = logw.view(-1, k)
        if self.resample == "ess":
            w = torch.softmax(lw, dim=1)
            return 1.0 / (w**2).sum(1) < self.ess_frac * k
        return torch.full((lw.shape[0],), (i + 1) % self.resample == 0, dtype=torch.bool)

    def search(self, cond: Condition, rng: torch.Generator, select_rng: torch.Generator) -> torch.Tensor:
        g, k = self.generator, self.num_particles
        c = cond.repeat_interleave(k)
        x = g.init_state(c, rng)
        out = g.model_output(x, 0, c)
        logw = torch.zeros(x.shape[0])
        prev = vmax = None
        for i in range(self.T):
            x = g.step(x, i, c, generator=rng, out=out)
            v, out = self.value(x, i + 1, c, group=k)
            v = v.cpu()
            logw = logw + self._increment(v, prev, vmax)
            prev, vmax = v, v if vmax is None else torch.maximum(vmax, v)
            if k > 1 and i + 1 < self.T:
                do = self._should_resample(logw, i)
                if do.any():
                    idx = group_sample(logw, k, 1.0, select_rng, k=k).view(-1, k).cpu()
                    keep = torch.arange(x.shape[0]).view(-1, k)
                    idx = torch.where(do[:, None], idx, keep).flatten()
                    self.resamples += int(do.sum())
                    x, out, prev, vmax = x[idx.to(x.device)], out[idx.to(out.device)], prev[idx], vmax[idx]
                    logw = torch.where(do.repeat_interleave(k), torch.zeros_like(logw), logw)
            self.record(step=i, values=v, log_weights=logw.clone())
        if k == 1:
            return x
        sel = group_argmax(prev, k) if self.output == "best" else group_sample(logw, k, 1.0, select_rng)
        return x[sel.to(x.device)]
