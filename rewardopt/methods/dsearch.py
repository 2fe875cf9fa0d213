"""DSearch — dynamic search over the denoising tree (Li et al., "Dynamic Search for Inference-Time
Alignment in Diffusion Models", arXiv 2503.02039).

Each output sample runs a beam search of total width W = beams × children:

* Before ``search_start`` (a fraction of T; expansion is concentrated at low noise) the W beams
  run as independent chains: no values, no selection.
* From then on, at step i with progress p ∈ [0, 1] through the search phase, the beam width b(p)
  shrinks from W to 1 by a schedule — ``exponential`` W^(1-p), ``quadratic`` W-(W-1)p²,
  ``linear`` W-(W-1)p, ``sigmoid`` — while each beam grows c = ⌊W/b⌋ children, so b·c stays near W.
  Children are valued by a K-step look-ahead (``lookahead``): K steps of the generator's
  deterministic sampler (``DeterministicStep.deterministic_step``: DDIM with η = 0 for continuous
  diffusion; greedy unmasking of the most confident positions for masked diffusion; greedy tokens
  for token LMs) followed by x̂0 (Tweedie), scored by the reward (K = 0: plain x̂0, as SVDD-PM).
  Our reading: "deterministic" is the η = 0 sampler, not the stochastic step with its noise set to
  zero — that is the step's mean, which keeps only part of the noise variance (37-52% at T = 10,
  η = 1), and on masked diffusion never unmasks. The best b(next step) children of the whole beam
  set survive (α = 0), or are drawn without replacement by exp(v/α) (Gumbel-top-k).
* DSearch-R (``replace_frac`` > 0): after each search step, among the ``num_samples`` searches of a
  condition, the worst ceil(frac·n) searches take over copies of the best searches' beams.

Cost per output is the sum over steps of the beams/children plan (``plan()``): each child costs
1 + K' NFE (K' = the look-ahead that fits before the end), one reward call and one decode; the
model output at a kept child drives its next step. A step that draws no noise
(``Generator.step_is_deterministic``) grows only the children its kept beams need. W = 1
reproduces the plain sampler.
"""

from __future__ import annotations

import math

import torch

from rewardopt.generators.base import Condition, Generator
from rewardopt.generators.capabilities import DeterministicStep, require
from rewardopt.methods.steering import InferenceTimeSteering, group_sample, group_topk, replace_worst
from rewardopt.rewards.base import Reward

SCHEDULES = ("exponential", "quadratic", "linear", "sigmoid")


def beam_width(p: float, W: int, schedule: str) -> int:
    """Beams at progress p ∈ [0, 1] of the search phase: W at p = 0, 1 at p = 1."""
    if schedule == "exponential":
        b = W ** (1 - p)
    elif schedule == "quadratic":
        b = W - (W - 1) * p * p
    elif schedule == "linear":
        b = W - (W - 1) * p
    elif schedule == "sigmoid":
        s = lambda q: 1 / (1 + math.exp(12 * (q - 0.5)))  # noqa: E731
        b = 1 + (W - 1) * (s(p) - s(1)) / (s(0) - s(1))
    else:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    return int(min(W, max(1, round(b))))


class DSearch(InferenceTimeSteering):
    """Args:
        width: W = beams × children (the width a ``budget`` sets).
        schedule: how beams shrink (and children grow): exponential | quadratic | linear | sigmoid.
        search_start: fraction of T after which the search runs (0: from the first step).
        lookahead: K steps of the deterministic sampler before x̂0 when valuing a child (needs
            the ``DeterministicStep`` capability).
        alpha: 0 = keep the top beams; > 0 = draw them by exp(v/α) without replacement.
        replace_frac: DSearch-R replacement among a condition's ``num_samples`` searches (0: off).
        Other args: ``InferenceTimeSteering``.
    """

    width_name = "width"

    def __init__(self, generator: Generator, reward: Reward, width: int = 8, schedule: str = "exponential",
                 search_start: float = 0.5, lookahead: int = 0, alpha: float = 0.0, replace_frac: float = 0.0,
                 budget: int | None = None, num_samples: int = 1, seed: int = 0, eval_reward: Reward | None = None,
                 output_dir: str | None = None, save_samples: bool = True, trace: bool = False) -> None:
        super().__init__(generator, reward, budget, num_samples, seed, eval_reward, output_dir, save_samples, trace)
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        if width < 1 or not 0 <= search_start <= 1 or lookahead < 0 or alpha < 0 or not 0 <= replace_frac < 1:
            raise ValueError("need width >= 1, 0 <= search_start <= 1, lookahead >= 0, alpha >= 0, "
                             "0 <= replace_frac < 1")
        if lookahead > 0:
            require(generator, DeterministicStep,
                    f"DSearch lookahead={lookahead} (set lookahead: 0 to search without it)")
        self.width, self.schedule, self.search_start = width, schedule, search_start
        self.lookahead, self.alpha, self.replace_frac = lookahead, alpha, replace_frac
        self.fit_budget()

    def plan(self) -> list[tuple[int, int, int, bool]]:
        """Per step i: (beams entering, children per beam, beams kept after, searched?)."""
        T, W = self.T, self.width
        s = min(int(round(self.search_start * T)), T - 1)
        beams = [W] * (s + 1)
        for i in range(s + 1, T + 1):
            beams.append(beam_width((i - s) / (T - s), W, self.schedule) if i < T else 1)
        steps = []
        for i in range(T):
            if i < s:
                steps.append((W, 1, W, False))
            else:
                b = beams[i]
                need = -(-beams[i + 1] // b)  # children per beam so that the kept beams exist
                c = need if self.generator.step_is_deterministic(i) else max(1, W // b, need)
                steps.append((b, c, beams[i + 1], True))
        return steps

    def _k(self, level: int) -> int:
        return max(0, min(self.lookahead, self.T - 1 - level))

    def expected_cost(self) -> dict[str, int]:
        T = self.T
        plan = self.plan()
        nfe, calls = plan[0][0], 0  # model outputs at the W initial states
        for i, (b, c, _, searched) in enumerate(plan):
            if not searched:
                nfe += b if i + 1 < T else 0
                continue
            calls += b * c
            if i + 1 < T:
                nfe += b * c * (1 + self._k(i + 1)) + self.x0_cost(i + 1 + self._k(i + 1), b * c)
        return self.cost(nfe=nfe, reward_calls=calls, decodes=calls + 1)

    def lookahead_value(self, kids: torch.Tensor, level: int, cond: Condition,
                        group: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Value of children at ``level`` after K deterministic look-ahead steps; returns the model
        output at the children themselves (for their next real step)."""
        g = self.generator
        K = self._k(level)
        if level >= self.T or K == 0:
            return self.value(kids, level, cond, group=group)
        out0 = g.model_output(kids, level, cond)
        y, o = kids, out0
        for j in range(K):
            y = g.deterministic_step(y, level + j, cond, out=o)
            o = g.model_output(y, level + j + 1, cond)
        v, _ = self.value(y, level + K, cond, out=o, group=group)
        return v, out0

    def search(self, cond: Condition, rng: torch.Generator, select_rng: torch.Generator) -> torch.Tensor:
        g = self.generator
        plan = self.plan()
        W0 = plan[0][0]
        B = len(cond)
        cw = cond.repeat_interleave(W0)
        x = g.init_state(cw, rng)
        out = g.model_output(x, 0, cw)
        for i, (b, c, keep, searched) in enumerate(plan):
            cb = cond.repeat_interleave(b)
            if not searched:
                x = g.step(x, i, cb, generator=rng, out=out)
                out = self.next_output(x, i + 1, cb)
                continue
            kids = self.expand(x, i, cb, out, c, rng)
            ckids = cond.repeat_interleave(b * c)
            n = b * c
            v, kid_out = self.lookahead_value(kids, i + 1, ckids, group=n)
            if self.alpha == 0:
                sel = group_topk(v, n, keep)
            else:
                sel = group_sample(v, n, self.alpha, select_rng, k=keep, replacement=False)
            self.record(step=i, values=v, chosen=sel, beams=b, children=c, keep=keep)
            x, out, v = kids[sel], None if kid_out is None else kid_out[sel], v[sel]
            if self.replace_frac > 0 and i + 1 < self.T and self.num_samples > 1:
                best_per_search = v.view(B, keep).max(1).values
                src = replace_worst(best_per_search, self.num_samples, self.replace_frac)
                idx = (src[:, None] * keep + torch.arange(keep, device=src.device)).flatten()
                x, out = x[idx], None if out is None else out[idx]
        return x
