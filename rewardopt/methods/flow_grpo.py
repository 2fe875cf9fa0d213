"""Flow-GRPO — Liu et al., "Flow-GRPO: Training Flow Matching Models via Online RL" (arXiv 2505.05470; reference
code yifan123/flow_grpo). GRPO on a rectified flow made stochastic by its marginal-preserving SDE.

The flow's deterministic ODE sampler becomes an SDE with the same marginals (``FlowMatchingGenerator`` with
``sde_noise_level`` a > 0; paper 0.7), so each step is a Gaussian policy N(μ_θ(x_t), σ_t²) with a closed-form
log-probability. For each prompt, G samples are drawn (``group_size``); their rewards are turned into group-relative
advantages A = (r − mean_group) / (std + 1e-4) — the std over the whole gathered batch with ``global_std`` (the
reference's default), else over the group — clipped to ±``adv_clip``; then the PPO-clipped objective on the ratio of
new to old step log-probabilities is minimised, plus β times a KL term per trained step: ‖μ_θ − μ_ref‖² / (2 g_σ²)
averaged over dimensions, μ the step's Gaussian mean, g_σ² = a² σ / (1 − σ) its diffusion coefficient (the step's
std is g_σ·sqrt(|dσ|), so this is the two steps' Gaussian KL times |dσ|, exactly the reference's form, so that its
β values carry over), the reference model being the base (LoRA switched off; β = 0 by default, as the reference
config and its issues advise for a new model).

"Fast" (Flow-GRPO-Fast / MixGRPO): ``sde_window_size`` = w draws, per sampled batch, a window of w consecutive steps
inside ``sde_window_range``; only those steps are SDE steps (the others follow the ODE, so they carry no policy
gradient) and only they are trained — the cost of training falls from T steps to w.

Everything else is DDPO's (``rewardopt.methods.ddpo``): sampling without grad while recording log-probs, one
optimiser step per minibatch over its trained (sample, step) pairs, the timestep subset ``timestep_fraction``,
gradients all-reduced once per minibatch under DDP, and prompts and rewards gathered from every process before the
group statistics (each process keeps its own samples' advantages), so groups split across processes are pooled.

Our reading where the reference is silent or differs in form: the group statistic is computed from the current
sampled batch only (the reference's per-prompt tracker is cleared every epoch: the same thing); with
``timestep_fraction`` < 1 each sample trains a random subset of its steps (DDPO's), where the reference trains the
first int(T·fraction) in order (the same at 1.0, the default); ``cfg_training`` = False samples and trains the
unguided model (guidance 1, the reference's "nocfg" configs) while held-out evaluation keeps the generator's
guidance; a group whose rewards are all equal has advantage 0 (the reference also drops such samples from the
minibatches; we keep them, contributing nothing but their KL term).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager

import numpy as np
import torch

from rewardopt.generators.diffusion import gaussian_log_prob
from rewardopt.generators.flow import FlowMatchingGenerator
from rewardopt.methods.ddpo import DDPO
from rewardopt.rewards.base import Reward

#: the salt of the SDE window's random stream ("Fast"), apart from the sampler noise's
WINDOW_STREAM = 2**20 + 17


def group_relative_advantages(prompts: Sequence[str], rewards: np.ndarray, global_std: bool = True,
                              eps: float = 1e-4) -> np.ndarray:
    """(r − mean of r's prompt group) / (std + eps), the std over every finite reward (``global_std``) or over the
    group. Non-finite rewards (samples a black-box reward excluded) get 0 and enter no statistic. (N,) float64."""
    rewards = np.asarray(rewards, dtype=np.float64)
    ok = np.isfinite(rewards)
    adv = np.zeros_like(rewards)
    if not ok.any():
        return adv
    keys = np.asarray(list(prompts), dtype=object)
    std_all = rewards[ok].std()
    for p in dict.fromkeys(prompts):
        members = (keys == p) & ok
        if not members.any():
            continue
        group = rewards[members]
        std = std_all if global_std else group.std()
        adv[members] = (group - group.mean()) / (std + eps)
    return adv


class FlowGRPO(DDPO):
    """GRPO on the flow's SDE steps; black-box rewards are fine.

    Args:
        generator: a ``FlowMatchingGenerator`` with ``sde_noise_level`` > 0 (paper: 0.7) and LoRA.
        reward: any reward (values only).
        group_size: G samples per prompt per sampled batch (the group; paper: 24 on SD3.5-M).
        clip_range: PPO ratio clip (reference: 1e-4). adv_clip: advantage clip (reference: 5).
        beta: KL weight to the reference (base) model (reference default 0; 0.04 in some of its configs).
        global_std: normalise by the std of the whole gathered batch (reference default) instead of the group's.
        sde_window_size: "Fast": w consecutive SDE steps per batch, drawn inside ``sde_window_range`` ([start, end)
            step indices; reference: 2 inside the first 10 of its steps); None: the generator's own window.
        cfg_training: sample and train with the generator's CFG (reference default), or unguided (guidance 1: the
            CFG-free option; evaluation keeps the generator's guidance).
        eval_sde: evaluate held-out samples with the SDE (True) or with the ODE, the deterministic sampler the
            reference evaluates with and every other method on the same flow model samples with (default).
        Other arguments: see ``DDPO`` (num_minibatches, num_inner_epochs, timestep_fraction, lr, grad_clip, ...).
    """

    def __init__(self, generator: FlowMatchingGenerator, reward: Reward, group_size: int = 4,
                 clip_range: float = 1e-4, adv_clip: float = 5.0, beta: float = 0.0, global_std: bool = True,
                 sde_window_size: int | None = None, sde_window_range: Sequence[int] | None = None,
                 cfg_training: bool = True, eval_sde: bool = False, num_minibatches: int = 2, num_inner_epochs: int = 1,
                 timestep_fraction: float = 1.0, grad_clip: float = 1.0, seed: int = 0, lr: float = 3e-4,
                 weight_decay: float = 1e-4, eval_seed: int = 1234, output_dir: str | None = None) -> None:
        if not isinstance(generator, FlowMatchingGenerator):
            raise TypeError(f"FlowGRPO trains a flow model's SDE steps (a FlowMatchingGenerator); got "
                            f"{type(generator).__name__} (DDIM/DDPM models: DDPO)")
        if generator.sde_noise_level <= 0:
            raise ValueError("FlowGRPO needs the SDE: set the generator's sde_noise_level > 0 (paper: 0.7)")
        if group_size < 2:
            raise ValueError(f"group_size={group_size}: group-relative advantages need at least 2 samples per prompt")
        if beta < 0:
            raise ValueError(f"beta must be >= 0, got {beta}")
        super().__init__(generator, reward, clip_range=clip_range, adv_clip=adv_clip, samples_per_prompt=group_size,
                         num_minibatches=num_minibatches, num_inner_epochs=num_inner_epochs,
                         timestep_fraction=timestep_fraction, buffer_size=1, min_count=1, grad_clip=grad_clip,
                         seed=seed, lr=lr, weight_decay=weight_decay, eval_seed=eval_seed, output_dir=output_dir,
                         eval_sde=eval_sde)
        T = generator.num_steps
        self.window_range: tuple[int, int] | None = None
        if sde_window_size is None and sde_window_range is not None:
            raise ValueError(f"sde_window_range={list(sde_window_range)} needs sde_window_size (the window's length; "
                             "Flow-GRPO-Fast: 2); without it every SDE step of the generator is trained")
        if sde_window_size is not None:
            lo, hi = (0, T) if sde_window_range is None else (int(v) for v in sde_window_range)
            if not 0 <= lo < hi <= T or not 1 <= sde_window_size <= hi - lo:
                raise ValueError(f"sde_window_size={sde_window_size} must fit in sde_window_range=[{lo}, {hi}) "
                                 f"within the generator's {T} steps")
            self.window_range = (lo, hi)
        self.sde_window_size = sde_window_size
        self.beta, self.global_std, self.cfg_training = float(beta), bool(global_std), bool(cfg_training)
        self.group_size = group_size

    # ------------------------------------------------------------------ advantages
    def normalise(self, prompts: list[str], rewards: np.ndarray) -> np.ndarray:
        """Group-relative advantages of every gathered sample (DDPO's ``advantages`` gathers them across
        processes in rank order and keeps this process's slice)."""
        return group_relative_advantages(prompts, rewards, self.global_std)

    # ------------------------------------------------------------------ the SDE window ("Fast")
    def draw_window(self, rng: torch.Generator) -> tuple[int, int] | None:
        """This batch's SDE window [start, start + w) (None: the generator's own)."""
        if self.window_range is None:
            return None
        lo, hi = self.window_range
        start = lo + int(torch.randint(0, hi - lo - self.sde_window_size + 1, (1,), generator=rng))
        return (start, start + self.sde_window_size)

    @contextmanager
    def sde_window(self, window: tuple[int, int] | None):
        g = self.generator
        saved = g.sde_window
        if window is not None:
            g.sde_window = window
        try:
            yield
        finally:
            g.sde_window = saved

    @contextmanager
    def training_guidance(self):
        g = self.generator
        saved = g.guidance_scale
        if not self.cfg_training:
            g.guidance_scale = 1.0
        try:
            yield
        finally:
            g.guidance_scale = saved

    def training_step(self, batch: list[str], batch_idx: int) -> None:
        # the window's own stream, not the sampler noise's: the two draws must not share a generator state
        with self.sde_window(self.draw_window(self.training_rng(WINDOW_STREAM))), self.training_guidance():
            super().training_step(batch, batch_idx)

    # ------------------------------------------------------------------ the loss
    def step_loss(self, x, i, x_next, cond, old_logp, adv):
        """DDPO's PPO-clipped loss plus β times the reference's KL term to the base model, per row (the base call
        costs one NFE): ‖μ_θ − μ_base‖² / (2 g_σ²) averaged over dimensions, g_σ the step's diffusion coefficient
        (std = g_σ·sqrt(|dσ|)) — the Gaussian KL of the two steps times |dσ|, as the reference computes it, so its
        β values carry over."""
        g = self.generator
        mean, std, _ = g.transition(x, i, cond)
        loss, diff, ratio = self.ppo_loss(gaussian_log_prob(x_next, mean, std), old_logp, adv)
        if self.beta > 0:
            with torch.no_grad(), g.base_model():
                ref_mean, _, _ = g.transition(x, i, cond)
            g2 = g.sde_coefficient(i)  # g_σ² (std² = g_σ² |dσ|)
            kl = ((mean - ref_mean) ** 2).flatten(1).mean(1) / (2 * g2)
            loss = loss + self.beta * kl.sum()
            self._kl_sum = self._kl_sum + kl.detach().sum()
            self._kl_pairs += kl.shape[0]
        return loss, diff, ratio

    def train_minibatch(self, *args, **kwargs):
        self._kl_sum, self._kl_pairs = torch.zeros((), device=self.device), 0
        stats = super().train_minibatch(*args, **kwargs)
        if self.beta > 0:
            self.log("train/kl_to_reference", self._kl_sum / max(self._kl_pairs, 1))
        return stats
