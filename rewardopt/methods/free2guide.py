"""Free²Guide — gradient-free path-integral control (Kim, Kim, Ye, arXiv 2411.17041; code
kjm981995/free2guide_code).

The optimal control is an exp(r/α)-weighted average of candidate moves; with α -> 0 it becomes:
at each guided step, draw n stochastic children of x_t (DDIM with η = 1 in the paper), decode
each child's x̂0, score it with a (black-box) reward — an LVLM judge, CLIP, ImageReward or an
ensemble (``rewardopt.rewards.ensembles``) — and keep the best (α = 0) or sample by exp(r/α).
Only the first steps are guided: the default is the public code's, steps 0-5 of its 50 DDIM steps
(``if i >= 0 and i <= 5`` in path_integral_video.py), i.e. the first 12%, scaled to T as
max(1, round(0.12·T)) (the paper's text says the first 5 of 50, 10%: ``guide_steps: 5`` for T = 50);
n = 5 (LaVie) or 10 (VideoCrafter2; the public code's ``repeat = 10``).

Our reading of the public code's step 0 (``first_step="initial_noises"``, the default): the n
candidates are n distinct initial noises x_T, each valued by r(decode(x̂0(x_T))) with its step-0
model output, and the best one takes step 0 — not n children of one x_T (``first_step="children"``,
our former behaviour). Generators whose x_T is fixed (masked diffusion, token LMs:
``Generator.random_init`` False) use children at step 0 either way. At later guided steps the code
evaluates each child's model output for its x̂0 and then again for its next step; here it is
computed once and reused (``out=``), which changes no result.

Cost per output: T NFE, plus n - 1 for each guided step whose n candidates need their own model
output (the initial noises at step 0, children before the last step), n reward calls per guided
step and as many decodes, plus the output's decode. A guided step that draws no noise
(``Generator.step_is_deterministic``) has one candidate.

Batch-relative ensembles (min-max normalised sum, rank consensus) are scored over each chain's n
candidates together, so normalisation never mixes chains (as in every method here).
"""

from __future__ import annotations

import torch

from rewardopt.generators.base import Condition, Generator
from rewardopt.methods.steering import InferenceTimeSteering, group_argmax, group_sample
from rewardopt.rewards.base import Reward

FIRST_STEPS = ("initial_noises", "children")
#: the public code guides steps 0..5 of 50 (path_integral_video.py: ``i >= 0 and i <= 5``)
GUIDED_FRACTION = 6 / 50


class Free2Guide(InferenceTimeSteering):
    """Args:
        num_candidates: n candidates per guided step (the width a ``budget`` sets).
        guide_steps: how many first steps are guided (an int), or a list of step indices;
            None: the public code's steps 0-5 of 50, i.e. the first max(1, round(0.12·T)).
        alpha: temperature; 0 = keep the best candidate.
        first_step: "initial_noises" (the public code: step 0 picks among n x_T) or "children"
            (n children of one x_T, as at later steps).
        Other args: ``InferenceTimeSteering``.
    """

    width_name = "num_candidates"

    def __init__(self, generator: Generator, reward: Reward, num_candidates: int = 5,
                 guide_steps: int | list[int] | None = None, alpha: float = 0.0, first_step: str = "initial_noises",
                 budget: int | None = None, num_samples: int = 1, seed: int = 0, eval_reward: Reward | None = None,
                 output_dir: str | None = None, save_samples: bool = True, trace: bool = False) -> None:
        super().__init__(generator, reward, budget, num_samples, seed, eval_reward, output_dir, save_samples, trace)
        T = generator.num_steps
        if guide_steps is None:
            guide_steps = max(1, round(GUIDED_FRACTION * T))
        steps = list(range(guide_steps)) if isinstance(guide_steps, int) else sorted(set(guide_steps))
        if not steps or steps[0] < 0 or steps[-1] >= T:
            raise ValueError(f"guide_steps must name steps in [0, {T}), got {guide_steps!r}")
        if num_candidates < 1 or alpha < 0:
            raise ValueError(f"need num_candidates >= 1 and alpha >= 0, got {num_candidates}, {alpha}")
        if first_step not in FIRST_STEPS:
            raise ValueError(f"first_step must be one of {FIRST_STEPS}, got {first_step!r}")
        self.guided = steps
        self.num_candidates, self.alpha, self.first_step = num_candidates, alpha, first_step
        self.fit_budget()

    @property
    def noises_at_step_0(self) -> bool:
        return 0 in self.guided and self.first_step == "initial_noises" and self.generator.random_init

    def expected_cost(self) -> dict[str, int]:
        T = self.T
        nfe, calls = T, 0
        for s in self.guided:
            if s == 0 and self.noises_at_step_0:
                n = self.num_candidates
                nfe += n - 1 + self.x0_cost(0, n)
            else:
                n = self.branching(s, self.num_candidates)
                nfe += (n - 1 if s < T - 1 else 0) + self.x0_cost(s + 1, n)
            calls += n
        return self.cost(nfe=nfe, reward_calls=calls, decodes=calls + 1)

    def select(self, v: torch.Tensor, n: int, select_rng: torch.Generator) -> torch.Tensor:
        return group_argmax(v, n) if self.alpha == 0 else group_sample(v, n, self.alpha, select_rng)

    def search(self, cond: Condition, rng: torch.Generator, select_rng: torch.Generator) -> torch.Tensor:
        g = self.generator
        guided = set(self.guided)
        if self.noises_at_step_0:
            n = self.num_candidates
            xs = g.init_state(cond.repeat_interleave(n), rng)  # the candidates of a chain are adjacent
            v, outs = self.value(xs, 0, cond.repeat_interleave(n), group=n)
            sel = self.select(v, n, select_rng)
            self.record(step=0, values=v, chosen=sel)
            x, out = xs[sel], outs[sel]
            guided.discard(0)
        else:
            x = g.init_state(cond, rng)
            out = g.model_output(x, 0, cond)
        for i in range(self.T):
            if i in guided:
                n = self.branching(i, self.num_candidates)
                kids = self.expand(x, i, cond, out, n, rng)
                v, kid_out = self.value(kids, i + 1, cond.repeat_interleave(n), group=n)
                sel = self.select(v, n, select_rng)
                self.record(step=i, values=v, chosen=sel)
                x, out = kids[sel], None if kid_out is None else kid_out[sel]
            else:
                x = g.step(x, i, cond, generator=rng, out=out)
                out = self.next_output(x, i + 1, cond)
        return x
