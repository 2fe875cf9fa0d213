"""DRAKES — Wang, Uehara et al., "Fine-Tuning Discrete Diffusion Models via Reward Optimization
with Applications to DNA and Protein Design" (arXiv 2410.13643).

Fine-tune a masked diffusion model on a differentiable reward by backprop through its sampler:
each reverse-step categorical draw is a Gumbel-softmax sample (``MaskedDiffusionGenerator``), the
final sequence is straight-through (one-hot forward, soft backward) into the reward network, and
gradients flow only through the last ``truncate`` steps (earlier steps run under ``no_grad``).
The loss is  -r(x_0) + α · Σ_steps KL(q_θ(x_s | x_t) || q_pre(x_s | x_t)),  the per-step KL between
the fine-tuned and the frozen pretrained reverse transitions at the sampled states.

Our reading: the KL sum runs over the differentiable (last ``truncate``) steps — the steps whose
graph is built; including earlier steps would need a graph at every step and give up the memory
truncation buys. By default each step is straight-through (the forward pass is exactly the
model's sampler); ``soft_steps`` on the generator feeds soft Gumbel-softmax samples forward instead.
Paper defaults: 128 steps, truncate 50, α = 1e-3, τ = 1, lr 1e-4, all weights trained.
"""

from __future__ import annotations

import torch

from rewardopt.generators.base import Condition
from rewardopt.generators.masked import MaskedDiffusionGenerator
from rewardopt.methods.base import RewardFineTuning
from rewardopt.rewards.base import Reward, require_gradient


class DRAKES(RewardFineTuning):
    """Args:
        generator: a ``MaskedDiffusionGenerator`` with ``full_finetune`` (its frozen copy is the KL anchor).
        reward: a differentiable reward of (B, L, V) one-hot sequences (e.g. a surrogate network).
        truncate: backprop through the last ``truncate`` steps (None: all).
        kl_weight: α.
        samples_per_prompt: sequences per batch entry.
        seed: training noise seed (with step and rank: exact resumes).
        lr, weight_decay: AdamW.
    """

    def __init__(self, generator: MaskedDiffusionGenerator, reward: Reward, truncate: int | None = 50,
                 kl_weight: float = 1e-3, samples_per_prompt: int = 1, seed: int = 0, lr: float = 1e-4,
                 weight_decay: float = 0.0, eval_seed: int = 1234, output_dir: str | None = None) -> None:
        super().__init__(generator, reward, lr=lr, weight_decay=weight_decay, eval_seed=eval_seed, output_dir=output_dir)
        self.grad_reward = require_gradient("DRAKES", reward)
        if not isinstance(generator, MaskedDiffusionGenerator):
            raise TypeError(f"DRAKES fine-tunes masked discrete diffusion; got {type(generator).__name__} "
                            "(for continuous diffusion use DRaFT or AlignProp)")
        if truncate is not None and truncate < 1:
            raise ValueError(f"truncate must be >= 1 or None, got {truncate}")
        if kl_weight > 0 and not generator.full_finetune:
            raise ValueError("kl_weight > 0 needs the frozen pretrained copy: set full_finetune: true on the generator")
        self.truncate, self.kl_weight, self.samples_per_prompt, self.seed = truncate, kl_weight, samples_per_prompt, seed
        if generator.full_finetune and not generator._frozen:
            generator.setup_trainable()

    def rollout(self, cond: Condition, rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """x_0 (straight-through one-hots) and the summed per-step KL over the differentiable steps."""
        g = self.generator
        T = g.num_steps
        first = 0 if self.truncate is None else max(0, T - self.truncate)
        x = g.init_state(cond, rng)
        kl = x.new_zeros(len(cond))
        for i in range(T):
            if i < first:
                with torch.no_grad():
                    x = g.step(x, i, cond, generator=rng)
                continue
            logp = g.model_output(x, i, cond)
            if self.kl_weight > 0:
                kl = kl + g.kl_to_base(x, i, cond, logp)
            x = g.step(x, i, cond, generator=rng, out=logp)
        return x, kl

    def training_step(self, batch: list, batch_idx: int) -> torch.Tensor:
        g = self.generator
        raw = [c for c in batch for _ in range(self.samples_per_prompt)]
        cond = g.encode_condition(raw)
        x0, kl = self.rollout(cond, self.training_rng())
        r = self.grad_reward(g.decode(x0), raw)
        g.counter.samples += len(raw)
        loss = -r.total.mean() + self.kl_weight * kl.mean()
        self._last_train_reward = float(r.total.detach().mean())
        self.log("train/reward", r.total.mean(), prog_bar=True, batch_size=len(raw), sync_dist=True)
        self.log("train/kl", kl.mean(), batch_size=len(raw))
        self.log("train/loss", loss, batch_size=len(raw))
        self.log_compute()
        return loss
