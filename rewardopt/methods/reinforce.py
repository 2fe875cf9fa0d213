"""REINFORCE for autoregressive token LMs: the RL baseline that uses the same reward as DiffRO but
no relaxation — the reward is a number per sampled sequence, not a gradient.

Per step: sample ``samples_per_prompt`` sequences per condition free-running (no grad), score
them, and minimise  −Σ_b (r_b − mean_prompt(r)) · log π_θ(y_b | c_b) / B + β · KL(π_θ || π_ref),
with the KL at the sampled prefixes (``kl_to_reference`` over the tokens each sample drew) and
the per-prompt mean as the baseline (needs ``samples_per_prompt`` ≥ 2; with 1 the batch mean).

log π_θ(y | c) is the log-probability under the distribution the samples were drawn from — the
generator's ``log_probs`` (forbidden tokens, top-k / top-p filtering, temperature), the one ``step``
draws from — so the score-function gradient is that of the sampler's own expected reward. Both it
and the KL come from one teacher-forced pass with grad over the sampled tokens (one grad NFE per
sequence); the frozen reference adds one pass without grad. Our reading: the KL compares the
unfiltered policies (``policy_log_probs``), as DiffRO's does.
"""

from __future__ import annotations

import torch

from rewardopt.generators.autoregressive import AutoregressiveGenerator
from rewardopt.methods.base import RewardFineTuning
from rewardopt.rewards.base import Reward


class Reinforce(RewardFineTuning):
    """Args:
        generator: an ``AutoregressiveGenerator`` (``full_finetune`` when kl_weight > 0).
        reward: any reward (black-box is fine).
        samples_per_prompt: sequences per condition (the baseline is their mean).
        kl_weight: β. seed, lr, weight_decay: as ``DiffRO``.

    Training batches may be conditions or ``(condition, targets)`` pairs (targets are ignored:
    REINFORCE learns from its own samples).
    """

    def __init__(self, generator: AutoregressiveGenerator, reward: Reward, samples_per_prompt: int = 2,
                 kl_weight: float = 0.1, seed: int = 0, lr: float = 1e-5, weight_decay: float = 0.0,
                 eval_seed: int = 1234, output_dir: str | None = None) -> None:
        super().__init__(generator, reward, lr=lr, weight_decay=weight_decay, eval_seed=eval_seed,
                         output_dir=output_dir)
        if not isinstance(generator, AutoregressiveGenerator):
            raise TypeError(f"Reinforce here trains autoregressive token LMs; got {type(generator).__name__} "
                            "(diffusion: DDPO)")
        if kl_weight > 0 and not generator.has_base_model:
            raise ValueError("kl_weight > 0 needs the frozen reference policy: "
                             "set full_finetune: true on the generator")
        if not generator.stochastic:
            raise ValueError("REINFORCE learns from sampled sequences: set generator.temperature > 0 (got 0: greedy)")
        if samples_per_prompt < 1:
            raise ValueError(f"samples_per_prompt must be >= 1, got {samples_per_prompt}")
        self.samples_per_prompt, self.kl_weight, self.seed = samples_per_prompt, kl_weight, seed

    def sequence_log_probs(self, cond, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One teacher-forced pass over sampled ``ids`` (B, N) with grad. Returns (Σ over ``mask`` of
        log p_sampler(y_i | c, y_<i), (B,); the unfiltered policy's log-probs (B, N, V), for the KL)."""
        g = self.generator
        logits = g._forward(cond, g.from_tokens(ids[:, :-1]))[:, -ids.shape[1]:]
        per_token = g.log_probs(logits).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
        return per_token.masked_fill(mask == 0, 0.0).sum(-1), g.policy_log_probs(logits)

    def training_step(self, batch: list, batch_idx: int) -> torch.Tensor:
        g, k = self.generator, self.samples_per_prompt
        raw = [b[0] if isinstance(b, (tuple, list)) and len(b) == 2 else b for b in batch]
        raw = [c for c in raw for _ in range(k)]
        cond = g.encode_condition(raw)
        with torch.no_grad():
            x = g.sample(cond, generator=self.training_rng())
            r = self.reward(g.decode(x), raw).total.float()
        ids, mask = g.sampled_targets(x)
        logp, policy = self.sequence_log_probs(cond, ids, mask)  # one pass with grad
        grouped = r.view(-1, k)
        baseline = grouped.mean(1, keepdim=True) if k > 1 else r.mean().expand(len(batch), 1)
        adv = (grouped - baseline).reshape(-1)
        loss = -(adv * logp).mean()
        kl = torch.zeros_like(r)
        if self.kl_weight > 0:
            kl = g.kl_to_reference(cond, ids, policy, mask)
            loss = loss + self.kl_weight * kl.mean()
        g.counter.samples += len(raw)
        self._last_train_reward = float(r.mean())
        self.log("train/reward", r.mean(), prog_bar=True, batch_size=len(raw), sync_dist=True)
        self.log("train/kl", kl.mean(), prog_bar=True, batch_size=len(raw))
        self.log("train/loss", loss, batch_size=len(raw))
        self.log_compute()
        return loss
