"""DRaFT, DRaFT-K and DRaFT-LV — Clark, Vicol, Swersky, Fleet, "Directly Fine-Tuning Diffusion
Models on Differentiable Rewards", ICLR 2024 (arXiv 2309.17400).

Sample x_T ~ N(0, I), run the whole sampler with autograd on, and minimise -r(x_0, c) with respect
to the LoRA weights only, checkpointing every denoiser call so memory stays flat in T.

* DRaFT-K (``k=K``): gradients flow through the last K steps only. Our reading: the first T-K steps
  run under ``torch.no_grad()`` (no graph is built and nothing is stored, so their cost is a plain
  forward each) and the latent entering step T-K is a leaf — the same as the paper's stop-gradient.
  ``k=None`` is full DRaFT (backprop through all T steps). The paper finds K=1 best.
* DRaFT-LV (``k=1, lv_samples=n``; paper n=2): produce x_0 without grad, then n times re-noise x_0
  to the last sampling timestep with fresh noise, take one differentiable denoising step and score
  it; the loss averages the n rewards (a lower-variance estimate of the K=1 gradient). Extra cost:
  n denoiser + n reward passes per sample.
* ``kl_weight`` > 0 adds the DRaFT+ (NeMo-Aligner) regulariser: mean ||ε_θ - ε_base||² at every
  differentiable step, with ε_base from the frozen model (adapters disabled). Off by default. It is
  on ε whatever the model predicts: v- and x0-prediction outputs are converted to ε with the
  scheduler's ᾱ_t first (``eps_penalty``; for v, ||ε_θ - ε_base||² = ᾱ_t ||v_θ - v_base||²).
* ``denoising_weight`` > 0 adds the generator's own supervised loss on paired data (a
  ``PairedDenoisingLoss`` generator, e.g. super-resolution: ε-MSE on (LR, ground truth) pairs), and
  ``reward_weight`` is the λ on the reward term: loss = w_d·L_denoise − λ·r (+ KL). This is the
  fine-tuning of Ren et al. (Hallucination Score, arXiv 2507.14367): "denoising loss + λ·proxy".
  With ``reward_weight=0`` no rollout is drawn (the plain supervised fine-tuning control).
Paper defaults (SD 1.4): DDIM 50 steps, CFG 7.5, LoRA rank 8, AdamW lr 4e-4, weight decay 0.1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rewardopt.generators.base import Condition
from rewardopt.generators.capabilities import PairedDenoisingLoss, require
from rewardopt.generators.diffusion import DiffusionGenerator
from rewardopt.methods.base import RewardFineTuning
from rewardopt.rewards.base import Reward, RewardOutput, require_gradient


def eps_penalty(g: DiffusionGenerator, x_t: torch.Tensor, i: int, out: torch.Tensor,
                out_base: torch.Tensor) -> torch.Tensor:
    """DRaFT+'s mean ||ε_θ - ε_base||² at step i from the two (guided) model outputs, whatever the
    scheduler's prediction_type (ε, v or x0: converted with ᾱ_t as diffusers does). x_t, out,
    out_base: (B, ...) -> scalar."""
    t = g.timesteps[i]
    return F.mse_loss(g._split(x_t, out, t)[1], g._split(x_t, out_base, t)[1])


class DRaFT(RewardFineTuning):
    """Backprop through sampling into the generator's trainable (LoRA) weights.

    Args:
        generator: a continuous-diffusion generator with LoRA or full fine-tuning enabled.
        reward: a differentiable reward (for an ensemble, its differentiable members are used).
        k: differentiate through the last k steps (None: all steps).
        lv_samples: DRaFT-LV re-noisings n (requires k=1); None disables LV.
        kl_weight: DRaFT+ ε-MSE to the frozen base model (0 = off).
        reward_weight: λ, the weight of the reward term (1: plain DRaFT; 0: no rollout, supervised only).
        denoising_weight: weight of the generator's ``denoising_loss`` on the batch's paired data (0 = off;
            needs a ``PairedDenoisingLoss`` generator).
        samples_per_prompt: samples drawn per prompt in a batch.
        seed: seed of the training noise (combined with step and rank, so resumes are exact).
        lr, weight_decay: AdamW (paper: 4e-4, 0.1).
    """

    def __init__(self, generator: DiffusionGenerator, reward: Reward, k: int | None = 1, lv_samples: int | None = None,
                 kl_weight: float = 0.0, samples_per_prompt: int = 1, seed: int = 0, lr: float = 4e-4,
                 weight_decay: float = 0.1, eval_seed: int = 1234, output_dir: str | None = None,
                 reward_weight: float = 1.0, denoising_weight: float = 0.0) -> None:
        super().__init__(generator, reward, lr=lr, weight_decay=weight_decay, eval_seed=eval_seed,
                         output_dir=output_dir)
        self.grad_reward = require_gradient(type(self).__name__, reward)
        if k is not None and not 1 <= k <= generator.num_steps:
            raise ValueError(f"k must be in [1, {generator.num_steps}] (the number of sampling steps) or None, got {k}")
        if lv_samples is not None:
            if k != 1:
                raise ValueError(f"DRaFT-LV (lv_samples={lv_samples}) is defined for k=1 only; got k={k}")
            if lv_samples < 1:
                raise ValueError(f"lv_samples must be >= 1, got {lv_samples}")
        if not isinstance(generator, DiffusionGenerator):
            raise TypeError(f"{type(self).__name__} backpropagates through continuous diffusion (DiffusionGenerator); "
                            f"got {type(generator).__name__} (masked diffusion: DRAKES; token LMs: DiffRO)")
        if kl_weight > 0 and not generator.has_base_model:
            raise ValueError("kl_weight > 0 needs a frozen base model: enable LoRA or full_finetune on the generator")
        if reward_weight < 0 or denoising_weight < 0:
            raise ValueError(f"reward_weight and denoising_weight must be >= 0, got {reward_weight}, "
                             f"{denoising_weight}")
        if reward_weight == 0 and denoising_weight == 0:
            raise ValueError("reward_weight and denoising_weight are both 0: nothing to train")
        if denoising_weight > 0:
            require(generator, PairedDenoisingLoss, f"{type(self).__name__}(denoising_weight > 0)")
        self.k, self.lv_samples, self.kl_weight = k, lv_samples, kl_weight
        self.reward_weight, self.denoising_weight = float(reward_weight), float(denoising_weight)
        self.samples_per_prompt, self.seed = samples_per_prompt, seed

    # ------------------------------------------------------------------ sampling with gradients
    def choose_k(self, rng: torch.Generator) -> int | None:
        """How many final steps carry gradient in this rollout (AlignProp overrides this)."""
        return self.k

    def rollout(self, cond: Condition, rng: torch.Generator, k: int | None,
                x_T: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x_0 with gradient through the last k steps, and the summed KL (ε-MSE) over those steps."""
        g = self.generator
        x = g.init_state(cond, rng) if x_T is None else x_T
        T = g.num_steps
        first_grad = 0 if k is None else T - k
        kl = x.new_zeros(())
        for i in range(T):
            if i < first_grad:
                with torch.no_grad():
                    x = g.step(x, i, cond, generator=rng)
                continue
            x_in = x
            x, out = g.step_with_output(x_in, i, cond, generator=rng)
            if self.kl_weight > 0:
                kl = kl + eps_penalty(g, x_in, i, out, g.base_model_output(x_in, i, cond))
        return x, kl

    def lv_rewards(self, cond: Condition, prompts: list[str],
                   rng: torch.Generator) -> tuple[RewardOutput, torch.Tensor]:
        """DRaFT-LV: n one-step re-noised reconstructions of a no-grad x_0, rewards averaged."""
        g = self.generator
        with torch.no_grad():
            x0 = g.sample(cond, generator=rng, grad_last_k=0)
        last = g.num_steps - 1
        t_last = g.timesteps[last]
        totals, kl = [], x0.new_zeros(())
        terms: dict[str, list[torch.Tensor]] = {}
        for _ in range(self.lv_samples):
            noise = torch.randn(x0.shape, generator=rng, device=rng.device).to(x0)
            x_t = g.add_noise(x0, t_last, noise)
            x0_j, out = g.step_with_output(x_t, last, cond, generator=rng)
            if self.kl_weight > 0:
                kl = kl + eps_penalty(g, x_t, last, out, g.base_model_output(x_t, last, cond))
            r = self.grad_reward(g.decode(x0_j), prompts)
            totals.append(r.total)
            for name, v in r.terms.items():
                terms.setdefault(name, []).append(v)
        mean = lambda vs: torch.stack(vs).mean(0)  # noqa: E731
        return RewardOutput(mean(totals), {k: mean(v) for k, v in terms.items()}), kl / self.lv_samples

    # ------------------------------------------------------------------ training
    def training_step(self, batch: list[str], batch_idx: int) -> torch.Tensor:
        g = self.generator
        prompts = [p for p in batch for _ in range(self.samples_per_prompt)]
        rng = self.training_rng()
        loss = torch.zeros((), device=self.device)
        if self.denoising_weight > 0:  # on the batch's own pairs, before the rollout consumes rng
            denoise = g.denoising_loss(list(batch), generator=rng)
            loss = loss + self.denoising_weight * denoise
            self.log("train/denoising_loss", denoise, batch_size=len(batch))
        if self.reward_weight == 0:
            self.log("train/loss", loss, batch_size=len(batch))
            self.log_compute()
            return loss
        cond = g.encode_condition(prompts)
        if self.lv_samples:
            r, kl = self.lv_rewards(cond, prompts, rng)
        else:
            x0, kl = self.rollout(cond, rng, self.choose_k(rng))
            r = self.grad_reward(g.decode(x0), prompts)
        g.counter.samples += len(prompts)
        loss = loss - self.reward_weight * r.total.mean() + self.kl_weight * kl
        self._last_train_reward = float(r.total.detach().mean())
        self.log("train/reward", r.total.mean(), prog_bar=True, batch_size=len(prompts), sync_dist=True)
        if self.kl_weight > 0:
            self.log("train/kl", kl, batch_size=len(prompts))
        self.log("train/loss", loss, batch_size=len(prompts))
        self.log_compute()
        return loss
