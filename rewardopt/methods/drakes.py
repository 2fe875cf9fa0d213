"""DRAKES — Wang, Uehara et al., "Fine-Tuning Discrete Diffusion Models via Reward Optimization
with Applications to DNA and Protein Design" (arXiv 2410.13643; code ChenyuWang-Monica/DRAKES).

Fine-tune a masked diffusion model on a differentiable reward by backprop through its sampler:
each reverse-step categorical draw is relaxed with Gumbel-softmax (``MaskedDiffusionGenerator.
relaxed_step``), the final sequence is straight-through (one-hot forward, soft backward) into the
reward network, and gradients through the sampling chain flow only through the last ``truncate``
steps (earlier steps are sampled under ``no_grad``). The loss is
-r(x_0) + α · Σ_{all T steps} KL(q_θ(x_s | x_t) || q_pre(x_s | x_t)), the per-step KL between the
fine-tuned and the frozen pretrained reverse transitions at the sampled states.

* KL over every step (the reference's default ``truncate_kl=False``): an early step's term is a
  forward of both models at its detached state — no graph through the chain, only through the
  fine-tuned model at that state (one forward with grad per step, kept until backward).
  ``truncate_kl: true`` sums the last ``truncate`` steps only (less memory).
* Intermediate steps (``intermediate``): "soft" (the paper's relaxation and the reference code's):
  each differentiable step passes the soft Gumbel-softmax sample to the next denoiser call, mixed
  by the soft mask probability; "straight_through": one-hot states forward (the exact sampler's
  states), Gumbel-softmax gradients backward.

Reference-code note (``drakes_dna/finetune_reward_bp.py``, read at its public HEAD): its per-step KL
is multiplied by ``copy_flag`` (1 where the state is *not* [MASK]) and by the state's non-[MASK]
one-hot entries, i.e. evaluated at already-unmasked positions — where the SUBS parameterisation
carries the token over in both models, so both x̂0 are the same one-hot and the integrand is exactly
0. At every step sampled without grad (one-hot states; with ``truncate_kl=False`` that is the first
T - truncate steps) its KL is therefore identically zero; only in the relaxed steps, where soft
states leak weight onto tokens at still-masked positions, is it non-zero. We compute the KL at the
masked positions instead (where the two transitions differ), so our KL is the transition KL at
every step. Our reading, documented rather than copied.

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
        truncate: backprop through the sampling chain over the last ``truncate`` steps (None: all).
        kl_weight: α.
        truncate_kl: sum the KL over the last ``truncate`` steps only (the reference's flag; default:
            all steps).
        intermediate: "soft" (paper: soft Gumbel-softmax states) or "straight_through" (one-hot states
            forward); decides for DRAKES whatever the generator's ``soft_steps`` says.
        samples_per_prompt: sequences per batch entry.
        seed: training noise seed (with the micro-batch index and rank: exact resumes).
        lr, weight_decay: AdamW.
    """

    INTERMEDIATE = ("soft", "straight_through")

    def __init__(self, generator: MaskedDiffusionGenerator, reward: Reward, truncate: int | None = 50,
                 kl_weight: float = 1e-3, truncate_kl: bool = False, intermediate: str = "soft",
                 samples_per_prompt: int = 1, seed: int = 0, lr: float = 1e-4, weight_decay: float = 0.0,
                 eval_seed: int = 1234, output_dir: str | None = None) -> None:
        super().__init__(generator, reward, lr=lr, weight_decay=weight_decay, eval_seed=eval_seed,
                         output_dir=output_dir)
        self.grad_reward = require_gradient("DRAKES", reward)
        if not isinstance(generator, MaskedDiffusionGenerator):
            raise TypeError(f"DRAKES fine-tunes masked discrete diffusion; got {type(generator).__name__} "
                            "(for continuous diffusion use DRaFT or AlignProp)")
        if truncate is not None and truncate < 1:
            raise ValueError(f"truncate must be >= 1 or None, got {truncate}")
        if intermediate not in self.INTERMEDIATE:
            raise ValueError(f"intermediate must be one of {self.INTERMEDIATE}, got {intermediate!r}")
        if kl_weight > 0 and not generator.has_base_model:
            raise ValueError("kl_weight > 0 needs the frozen pretrained copy: set full_finetune: true on the generator")
        self.truncate, self.kl_weight = truncate, kl_weight
        self.samples_per_prompt, self.seed = samples_per_prompt, seed
        self.truncate_kl, self.intermediate = truncate_kl, intermediate

    def rollout(self, cond: Condition, rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """x_0 (straight-through one-hots, (B, L, V)) and the summed per-step KL, (B,)."""
        g = self.generator
        T = g.num_steps
        first = 0 if self.truncate is None else max(0, T - self.truncate)
        soft = self.intermediate == "soft"
        x = g.init_state(cond, rng)
        kl = x.new_zeros(len(cond))
        for i in range(T):
            if i < first:  # sampled without a graph through the chain
                logp = None
                if self.kl_weight > 0 and not self.truncate_kl:  # its KL: the fine-tuned model at the fixed state
                    logp = g.model_output(x, i, cond)
                    kl = kl + g.kl_to_base(x, i, cond, logp)
                    logp = logp.detach()
                with torch.no_grad():
                    x = g.relaxed_step(x, i, cond, generator=rng, out=logp, soft=soft)
                continue
            logp = g.model_output(x, i, cond)
            if self.kl_weight > 0:
                kl = kl + g.kl_to_base(x, i, cond, logp)
            x = g.relaxed_step(x, i, cond, generator=rng, out=logp, soft=soft)
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
