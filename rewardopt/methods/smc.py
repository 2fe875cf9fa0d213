"""Sequential Monte Carlo with Feynman-Kac steering potentials (SMC / TDS / FK-steering: Wu et al.
arXiv 2306.17775; Singhal et al., "A General Framework for Inference-time Scaling and Steering of
Diffusion Models", arXiv 2501.06848; code zacharyhorvitz/Fk-Diffusion-Steering).

k interacting particles per output sample. After each step every particle gets the posterior-mean
value r_t = r(decode(x̂0(x_t))) and its log-weight grows by a log-potential log G_t (λ = 1/α):

* ``max`` (FK): λ·max(r_t, max of the particle's earlier r);
* ``sum`` (FK): λ·(r_t + sum of the particle's earlier r);
* ``difference`` (FK): λ·(r_t − r_{t+1}) (r of the previous, noisier state; 0 before the first);
* ``instant``: λ·r_t (our former ``cumulative``);
* ``max_increment``: λ·(max_{s≤t} r_s − max_{s<t} r_s), λ·r_t at the first step (our former ``max``).

The running max / sum / previous value follow each particle through resampling (they are path
functions). With ``final_correction`` (default, as FK-steering) the last step's potential is
exp(λ r(x_0)) / ∏ G over the particle's path, so whatever the intermediate potentials, the
weighted particles target p(x_0)·exp(r(x_0)/α); ``difference`` telescopes to that already. Without
it the target is p·∏G (FK's ``max`` and ``sum`` then tilt far more than exp(r/α)). ``sum`` tilts the
intermediate particles far more than the target, so after resampling its correction weights are
degenerate at small k: on the random-walk toy the output's mean is 1.40 instead of 1.0 at k = 256
when resampling every step (an independent numpy replay agrees); ``max`` and ``difference`` are on
target at k = 32. For ``output="best"`` this matters less: the weights only guide the search.

A particle whose value is excluded (a black-box failure under ``on_failure="exclude"``) is dead
from then on: its log-weight is -inf, its excluded value never enters the path state (which would
otherwise cancel ±1e30 in the final correction and leave it weight exp(0), the largest of its group
for a negative reward), it is never a parent at resampling (the flag follows the particle) and never
the output. A group whose particles all died keeps going (resampled and output uniformly; ``best``:
the highest final reward among them), counted in summary.json ``smc_all_dead_outputs`` (deaths:
``smc_dead_particles``).

Particles are resampled (multinomial, within each output's group) every ``resample_every`` steps
or, with ``resample="ess"``, when the effective sample size falls below ``ess_frac``·k; weights
reset after resampling. The output is the particle with the highest final reward
(``output="best"``, as FK-steering reports) or one drawn by final weight (``output="sample"``: a
draw from the target as k grows). Cost per output: k·T NFE (the value's model output drives the
next step), k·T reward calls and k·T decodes (+1 for the output). Resampling collapses diversity,
as the SVDD paper notes.
"""

from __future__ import annotations

import torch

from rewardopt.generators.base import Condition, Generator
from rewardopt.methods.steering import InferenceTimeSteering, group_argmax, group_sample, is_excluded
from rewardopt.rewards.base import Reward

POTENTIALS = ("difference", "max", "sum", "instant", "max_increment")
#: per-particle path state a potential carries: previous value, running max, running sum, Σ log G
PathState = dict[str, torch.Tensor]


def log_potential(potential: str, v: torch.Tensor, state: PathState | None, lam: float,
                  valid: torch.Tensor | None = None) -> tuple[torch.Tensor, PathState]:
    """log G_t for values ``v`` (k,) given each particle's path ``state`` (None before the first
    step); returns (log G_t, the updated state). ``state["logG"]`` is Σ log G along the path.
    ``valid`` (k,) bool: where False (an excluded value), log G_t is -inf and the state is kept as it
    was, so no excluded value ever enters a running max / sum or Σ log G."""
    if state is None:
        zero = torch.zeros_like(v)
        state = {"prev": zero, "max": torch.full_like(v, float("-inf")), "sum": zero, "logG": zero}
    if valid is not None:
        new_lg, new_state = log_potential(potential, v, state, lam)
        return (new_lg.masked_fill(~valid, float("-inf")),
                {key: torch.where(valid, t, state[key]) for key, t in new_state.items()})
    running_max = torch.maximum(state["max"], v)
    if potential == "difference":
        lg = lam * (v - state["prev"])
    elif potential == "max":
        lg = lam * running_max
    elif potential == "sum":
        lg = lam * (v + state["sum"])
    elif potential == "instant":
        lg = lam * v
    elif potential == "max_increment":
        first = torch.isinf(state["max"])
        lg = torch.where(first, lam * v, lam * (running_max - state["max"].masked_fill(first, 0.0)))
    else:
        raise ValueError(f"potential must be one of {POTENTIALS}, got {potential!r}")
    return lg, {"prev": v, "max": running_max, "sum": state["sum"] + v, "logG": state["logG"] + lg}


class SMC(InferenceTimeSteering):
    """Args:
        num_particles: k (the width a ``budget`` sets).
        potential: "difference" | "max" | "sum" (FK-steering's) | "instant" | "max_increment".
        alpha: temperature α of the potentials exp(·/α) (FK's λ = 1/α).
        final_correction: make the last potential exp(λ r(x_0))/∏G so the target is p·exp(r/α)
            whatever the potential (FK-steering); False: the target is p·∏G (our former behaviour).
        resample: "ess" (when ESS < ess_frac·k) or an interval in steps.
        ess_frac: ESS threshold as a fraction of k (FK-steering: 0.5).
        output: "best" (highest final reward) or "sample" (by final weight).
        Other args: ``InferenceTimeSteering``.
    """

    width_name = "num_particles"

    def __init__(self, generator: Generator, reward: Reward, num_particles: int = 4, potential: str = "difference",
                 alpha: float = 0.1, final_correction: bool = True, resample: str | int = "ess", ess_frac: float = 0.5,
                 output: str = "best", budget: int | None = None, num_samples: int = 1, seed: int = 0,
                 eval_reward: Reward | None = None, output_dir: str | None = None, save_samples: bool = True,
                 trace: bool = False) -> None:
        super().__init__(generator, reward, budget, num_samples, seed, eval_reward, output_dir, save_samples, trace)
        if potential == "cumulative":
            raise ValueError("potential 'cumulative' is gone: FK-steering's running sum λ(r_t + Σ earlier r) is "
                             "'sum'; the former per-step λ·r_t is 'instant'")
        if potential not in POTENTIALS:
            raise ValueError(f"potential must be one of {POTENTIALS}, got {potential!r}")
        if resample != "ess" and not (isinstance(resample, int) and resample >= 1):
            raise ValueError(f"resample must be 'ess' or an interval >= 1, got {resample!r}")
        if output not in ("best", "sample") or alpha <= 0 or num_particles < 1:
            raise ValueError(f"need output in (best, sample), alpha > 0, num_particles >= 1; "
                             f"got {output!r}, {alpha}, {num_particles}")
        self.num_particles, self.potential, self.alpha = num_particles, potential, alpha
        self.final_correction = final_correction
        self.resample, self.ess_frac, self.output = resample, ess_frac, output
        self.resamples = self.dead_particles = self.all_dead_outputs = 0
        self.fit_budget()

    def expected_cost(self) -> dict[str, int]:
        k, T = self.num_particles, self.T
        return self.cost(nfe=k * T + sum(self.x0_cost(i + 1, k) for i in range(T)), reward_calls=k * T,
                         decodes=k * T + 1)

    def _should_resample(self, logw: torch.Tensor, i: int) -> torch.Tensor:
        """(groups,) bool: which groups resample after step i."""
        k = self.num_particles
        lw = logw.view(-1, k)
        if self.resample == "ess":
            w = torch.softmax(lw, dim=1)
            return 1.0 / (w**2).sum(1) < self.ess_frac * k
        return torch.full((lw.shape[0],), (i + 1) % self.resample == 0, dtype=torch.bool)

    def extra_counts(self) -> dict[str, int]:
        return {"smc_resamples": self.resamples, "smc_dead_particles": self.dead_particles,
                "smc_all_dead_outputs": self.all_dead_outputs}

    def search(self, cond: Condition, rng: torch.Generator, select_rng: torch.Generator) -> torch.Tensor:
        g, k, lam = self.generator, self.num_particles, 1.0 / self.alpha
        c = cond.repeat_interleave(k)
        x = g.init_state(c, rng)
        out = g.model_output(x, 0, c)
        logw = torch.zeros(x.shape[0], dtype=torch.float64)
        dead = torch.zeros(x.shape[0], dtype=torch.bool)  # excluded once: weight 0 from then on
        state: PathState | None = None
        v = None
        for i in range(self.T):
            x = g.step(x, i, c, generator=rng, out=out)
            v, out = self.value(x, i + 1, c, group=k)
            v = v.cpu().double()
            exc = is_excluded(v)
            self.dead_particles += int((exc & ~dead).sum())
            dead |= exc
            lg, state = log_potential(self.potential, v, state, lam, valid=~exc)
            if i + 1 == self.T and self.final_correction:  # exp(λ r(x_0)) / ∏ G over the path
                lg = lam * v - (state["logG"] - lg)
            logw = (logw + lg).masked_fill(dead, float("-inf"))
            if k > 1 and i + 1 < self.T:
                do = self._should_resample(logw, i)
                if do.any():  # a dead particle is never a parent (unless its whole group is dead: uniform)
                    idx = group_sample(logw, k, 1.0, select_rng, k=k).view(-1, k).cpu()
                    keep = torch.arange(x.shape[0]).view(-1, k)
                    idx = torch.where(do[:, None], idx, keep).flatten()
                    self.resamples += int(do.sum())
                    x, out = x[idx.to(x.device)], out[idx.to(out.device)]
                    state = {key: t[idx] for key, t in state.items()}
                    dead = dead[idx]
                    logw = torch.where(do.repeat_interleave(k), torch.zeros_like(logw), logw)
                    logw = logw.masked_fill(dead, float("-inf"))
            self.record(step=i, values=v, log_weights=logw.clone())
        all_dead = dead.view(-1, k).all(1)
        self.all_dead_outputs += int(all_dead.sum())
        if k == 1:
            return x
        if self.output == "best":  # the best final reward among the living (among all in an all-dead group)
            sel = group_argmax(torch.where(all_dead.repeat_interleave(k), v, v.masked_fill(dead, float("-inf"))), k)
        else:  # an all-dead group (log-weights all -inf) is drawn uniformly
            sel = group_sample(logw, k, 1.0, select_rng)
        return x[sel.to(x.device)]
