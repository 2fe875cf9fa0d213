"""AlignProp — Prabhudesai, Goyal, Pathak, Fragkiadaki, "Aligning Text-to-Image Diffusion Models
with Reward Backpropagation" (arXiv 2310.03739).

Full backprop through DDIM sampling with LoRA (rank 4) and per-step gradient checkpointing, plus
*randomized truncated backpropagation*: each rollout draws a truncation point once, and only the
steps after it carry gradient.

Which reading this implements. The original code redrew a threshold at *every* step and detached
that step's noise prediction — a random per-step mask, not a window. The later rewrite
(mihirp1998/AlignProp, ``sd_pipeline.py`` / ``config/alignprop_config.py``) draws the truncation once
per rollout, as a threshold in units of its 50-step sampler, and backpropagates through the steps
from the threshold on, so K = 50 - threshold:

* ``gaussian``: threshold = int(N(42, 5)) (truncated toward zero), K mean ≈ 9.1, sd ≈ 4.5;
* ``uniform``: threshold = randint(30, 50), i.e. 30..49 — K from 1 to 20, never full backprop;
* ``fixed``: threshold 49, i.e. K = 1.

As there, a threshold outside [1, 49] is redrawn (never clamped), so K is in [1, 49]. Our reading for
other step counts: the drawn threshold is scaled to ``T`` steps as ``round(threshold * T / 50)`` and
K = T - that, clamped to [1, T] (at T = 50 exactly the reference's K).

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
        threshold_mean, threshold_std: gaussian threshold in 50-step units (reference: 42, 5).
        uniform_min, uniform_max: uniform threshold range ``[min, max)`` in 50-step units (reference: 30, 50,
            i.e. K from 1 to 20 of 50).
        fixed_threshold: threshold for "fixed" (49 = K=1).
        Other arguments: see ``DRaFT`` (``k`` and ``lv_samples`` are not used).
    """

    max_redraws = 1000  # a gaussian that keeps missing [1, 49] is a configuration error

    def __init__(self, generator: DiffusionGenerator, reward: Reward, truncation: str = "gaussian",
                 threshold_mean: float = 42.0, threshold_std: float = 5.0, uniform_min: int = 30,
                 uniform_max: int = PAPER_STEPS, fixed_threshold: int = 49,
                 kl_weight: float = 0.0, samples_per_prompt: int = 1, seed: int = 0, lr: float = 1e-3,
                 weight_decay: float = 0.1, eval_seed: int = 1234, output_dir: str | None = None) -> None:
        if truncation not in ("gaussian", "uniform", "fixed"):
            raise ValueError(f"truncation must be 'gaussian', 'uniform' or 'fixed', got {truncation!r}")
        if not 1 <= fixed_threshold < PAPER_STEPS:
            raise ValueError(f"fixed_threshold must be in [1, {PAPER_STEPS - 1}] (50-step units; 49 = K=1), "
                             f"got {fixed_threshold}")
        if not 1 <= uniform_min < uniform_max <= PAPER_STEPS:
            raise ValueError(f"need 1 <= uniform_min < uniform_max <= {PAPER_STEPS} (thresholds in 50-step units, max "
                             f"exclusive; reference 30, 50), got uniform_min={uniform_min}, uniform_max={uniform_max}")
        if threshold_std < 0:
            raise ValueError(f"threshold_std must be >= 0, got {threshold_std}")
        super().__init__(generator, reward, k=None, lv_samples=None, kl_weight=kl_weight,
                         samples_per_prompt=samples_per_prompt, seed=seed, lr=lr, weight_decay=weight_decay,
                         eval_seed=eval_seed, output_dir=output_dir)
        self.truncation, self.threshold_mean, self.threshold_std = truncation, threshold_mean, threshold_std
        self.uniform_min, self.uniform_max, self.fixed_threshold = uniform_min, uniform_max, fixed_threshold
        self.last_k: int | None = None

    def draw_threshold(self, rng: torch.Generator) -> int:
        """A threshold in [1, 49] (50-step units) from the configured schedule, redrawn until in range."""
        if self.truncation == "fixed":
            return int(self.fixed_threshold)
        for _ in range(self.max_redraws):
            if self.truncation == "uniform":
                thr = int(torch.randint(self.uniform_min, self.uniform_max, (1,), generator=rng))
            else:
                thr = int(self.threshold_mean + self.threshold_std * float(torch.randn((), generator=rng)))
            if 1 <= thr < PAPER_STEPS:
                return thr
        raise ValueError(f"threshold_mean={self.threshold_mean}, threshold_std={self.threshold_std} almost never "
                         f"gives a threshold in [1, {PAPER_STEPS - 1}] (50-step units); reference: 42, 5")

    def choose_k(self, rng: torch.Generator) -> int:
        T = self.generator.num_steps
        k = T - round(self.draw_threshold(rng) * T / PAPER_STEPS)
        self.last_k = max(1, min(T, k))
        if self._trainer is not None:
            self.log("train/k", float(self.last_k))
        return self.last_k
