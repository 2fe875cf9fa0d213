"""AlignProp — Prabhudesai, Goyal, Pathak, Fragkiadaki, "Aligning Text-to-Image Diffusion Models
with Reward Backpropagation" (arXiv 2310.03739).

Full backprop through DDIM sampling with LoRA (rank 4) and per-step gradient checkpointing, plus
*randomized truncated backpropagation*: each rollout draws a truncation point once, and only the
steps after it carry gradient.

Which reading this implements. The original code redrew a threshold at *every* step and detached
that step's noise prediction — a random per-step mask, not a window. The later rewrite draws the
truncation once per rollout, from ``gaussian`` (mean 42, sd 5, in units of a 50-step sampler),
``uniform`` (0..50) or ``fixed`` (49, i.e. K=1). We implement the once-per-rollout schedules,
scaling thresholds to ``T`` steps as ``round(threshold * T / 50)`` and clamping K = T - threshold
to [1, T].

Which tensor is detached. AlignProp detaches the noise prediction of early steps while the latent
chain keeps its graph through the scheduler's affine update. Since x_T is noise (no parameters
upstream) and the detached predictions carry no parameter gradient, that graph contributes nothing
to the LoRA gradient; we therefore run early steps under ``no_grad`` (same gradient, no memory).
Paper defaults: lr 1e-3, weight decay 0.1, grad clip 5 (trainer.gradient_clip_val), LoRA rank 4.
"""

from __future__ import annotations

import torch

from rewardopt.generators.diffusion import DiffusionGenerator
from rewardopt.methods.draft import DRaFT
from rewardopt.rewards.base import Reward

PAPER_STEPS = 50


class AlignProp(DRaFT):
    """DRaFT with a truncation point drawn once per rollout.

    Args:
        truncation: "gaussian", "uniform" or "fixed".
        threshold_mean, threshold_std: gaussian threshold in 50-step units (paper: 42, 5).
        fixed_threshold: threshold for "fixed" (49 = K=1 at T=50).
        Other arguments: see ``DRaFT`` (``k`` and ``lv_samples`` are not used).
    """

    def __init__(self, generator: DiffusionGenerator, reward: Reward, truncation: str = "gaussian",
                 threshold_mean: float = 42.0, threshold_std: float = 5.0, fixed_threshold: int = 49,
                 kl_weight: float = 0.0, samples_per_prompt: int = 1, seed: int = 0, lr: float = 1e-3,
                 weight_decay: float = 0.1, eval_seed: int = 1234, output_dir: str | None = None) -> None:
        if truncation not in ("gaussian", "uniform", "fixed"):
            raise ValueError(f"truncation must be 'gaussian', 'uniform' or 'fixed', got {truncation!r}")
        super().__init__(generator, reward, k=None, lv_samples=None, kl_weight=kl_weight,
                         samples_per_prompt=samples_per_prompt, seed=seed, lr=lr, weight_decay=weight_decay,
                         eval_seed=eval_seed, output_dir=output_dir)
        self.truncation, self.threshold_mean, self.threshold_std = truncation, threshold_mean, threshold_std
        self.fixed_threshold = fixed_threshold
        self.last_k: int | None = None

    def choose_k(self, rng: torch.Generator) -> int:
        T = self.generator.num_steps
        if self.truncation == "fixed":
            thr = float(self.fixed_threshold)
        elif self.truncation == "uniform":
            thr = float(torch.randint(0, PAPER_STEPS + 1, (1,), generator=rng))
        else:
            thr = self.threshold_mean + self.threshold_std * float(torch.randn((), generator=rng))
        k = T - round(thr * T / PAPER_STEPS)
        self.last_k = max(1, min(T, k))
        if self._trainer is not None:
            self.log("train/k", float(self.last_k))
        return self.last_k
