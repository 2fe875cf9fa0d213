"""DiffRO — Gao, Du, Zhang, "Differentiable Reward Optimization for LLM based TTS system"
(arXiv 2507.05911).

Fine-tune an autoregressive token LM on a differentiable reward of its *tokens* (not of decoded
audio): one teacher-forced pass with the ground-truth prefix gives the logits at every position;
each position's token is drawn by Gumbel-softmax (straight-through: one-hot forward, soft
backward) and the soft one-hots go into frozen reward models through their embedding tables
(a Token2Text recogniser scoring log P(text | tokens), attribute heads scoring log P(attribute |
tokens)). Loss = −R(soft tokens) + β · Σ_t KL(π_θ(·|prefix_t) || π_ref(·|prefix_t)).

Paper defaults: β = 0.1, lr 1e-5, τ = 1, reward models frozen. Our reading: the KL is summed over
the target's real positions (its tokens and the closing EOS; padding excluded) and averaged over
the batch; the
reward is the batch mean of the reward's ``total``.
"""

from __future__ import annotations

from typing import Any

import torch

from rewardopt.generators.autoregressive import AutoregressiveGenerator
from rewardopt.methods.base import RewardFineTuning
from rewardopt.rewards.base import Reward, require_gradient


class DiffRO(RewardFineTuning):
    """Args:
        generator: an ``AutoregressiveGenerator`` with ``full_finetune`` (its frozen copy is π_ref).
        reward: a differentiable reward of (B, N, V) soft one-hot tokens and the raw conditions.
        kl_weight: β (paper: 0.1).
        tau: Gumbel-softmax temperature (paper: 1).
        seed: training noise seed (with step and rank: exact resumes).
        lr, weight_decay: AdamW (paper lr: 1e-5; tiny models need more).

    Training batches are lists of ``(condition, target token ids)`` pairs — the ground-truth
    prefixes; evaluation batches are conditions, sampled free-running.
    """

    def __init__(self, generator: AutoregressiveGenerator, reward: Reward, kl_weight: float = 0.1, tau: float = 1.0,
                 seed: int = 0, lr: float = 1e-5, weight_decay: float = 0.0, eval_seed: int = 1234,
                 output_dir: str | None = None) -> None:
        super().__init__(generator, reward, lr=lr, weight_decay=weight_decay, eval_seed=eval_seed,
                         output_dir=output_dir)
        if not isinstance(generator, AutoregressiveGenerator):
            raise TypeError(f"DiffRO fine-tunes autoregressive token LMs; got {type(generator).__name__} "
                            "(masked diffusion: DRAKES; continuous diffusion: DRaFT / AlignProp)")
        self.grad_reward = require_gradient("DiffRO", reward)
        if kl_weight > 0 and not generator.has_base_model:
            raise ValueError("kl_weight > 0 needs the frozen reference policy: "
                             "set full_finetune: true on the generator")
        if tau <= 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        self.kl_weight, self.tau, self.seed = kl_weight, tau, seed

    def targets(self, batch: list[tuple[Any, Any]]) -> tuple[list[Any], torch.Tensor, torch.Tensor]:
        """Raw conditions, (B, N) target ids and (B, N) mask of real positions (``pad_targets``)."""
        if not batch or not all(isinstance(b, (tuple, list)) and len(b) == 2 for b in batch):
            raise ValueError("DiffRO trains on (condition, target token ids) pairs; the datamodule gave "
                             f"{type(batch[0]).__name__ if batch else 'an empty batch'}")
        ids, mask = self.generator.pad_targets([t for _, t in batch], append_eos=True)
        return [c for c, _ in batch], ids, mask

    def loss_terms(self, batch: list[tuple[Any, Any]], rng: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        g = self.generator
        raw, ids, mask = self.targets(batch)
        cond = g.encode_condition(raw)
        soft, logp = g.teacher_forced(cond, ids, generator=rng, tau=self.tau)
        soft = soft * mask[..., None]  # positions past the target are no tokens (zero rows)
        r = self.grad_reward(g.decode(soft), raw).total
        kl = g.kl_to_reference(cond, ids, logp, mask) if self.kl_weight > 0 else torch.zeros_like(r)
        g.counter.samples += len(raw)
        return {"reward": r, "kl": kl, "loss": -r.mean() + self.kl_weight * kl.mean()}

    def training_step(self, batch: list, batch_idx: int) -> torch.Tensor:
        t = self.loss_terms(batch, self.training_rng())
        n = len(batch)
        self._last_train_reward = float(t["reward"].detach().mean())
        self.log("train/reward", t["reward"].mean(), prog_bar=True, batch_size=n, sync_dist=True)
        self.log("train/kl", t["kl"].mean(), prog_bar=True, batch_size=n)
        self.log("train/loss", t["loss"], batch_size=n)
        self.log_compute()
        return t["loss"]
