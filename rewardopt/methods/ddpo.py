"""DDPO — Black, Janner, Du, Kostrikov, Levine, "Training Diffusion Models with Reinforcement
Learning" (arXiv 2305.13301; reference code kvablack/ddpo-pytorch). The policy-gradient baseline.

Each DDIM step with eta > 0 is a Gaussian policy over the next latent. Sample trajectories without
grad (recording each step's log-probability), score the final images with any reward — black-box
is fine — normalise rewards per prompt into advantages, then take PPO-clipped steps on the ratio of
new to old log-probabilities of the recorded transitions, summed over timesteps.

Reading of the reference code we follow: log-probabilities are averaged over latent dimensions;
advantages are normalised per prompt from a running buffer (falling back to batch statistics
until a prompt has ``min_count`` rewards) and clipped to ±``adv_clip``; one optimiser step per
minibatch, accumulating over all its timesteps. Steps whose transition has zero variance are
skipped (they carry no policy gradient). Defaults from the reference config: PPO clip 1e-4,
advantage clip 5, lr 3e-4.
"""

from __future__ import annotations

from collections import defaultdict, deque

import numpy as np
import torch

from rewardopt.generators.diffusion import DiffusionGenerator, gaussian_log_prob
from rewardopt.methods.base import RewardFineTuning
from rewardopt.rewards.base import Reward


def normalize_per_prompt(prompts: list[str], rewards: np.ndarray, buffers: dict[str, deque], min_count: int) -> np.ndarray:
    """Advantages (r - mean_p) / (std_p + 1e-6) per prompt p, using each prompt's recent rewards once
    it has ``min_count`` of them, batch statistics before. ``buffers`` is updated in place."""
    rewards = np.asarray(rewards, dtype=np.float64)
    adv = np.empty_like(rewards)
    for p in set(prompts):
        buffers[p].extend(rewards[[q == p for q in prompts]].tolist())
    for i, p in enumerate(prompts):
        ref = np.asarray(buffers[p]) if len(buffers[p]) >= min_count else rewards
        adv[i] = (rewards[i] - ref.mean()) / (ref.std() + 1e-6)
    return adv


class DDPO(RewardFineTuning):
    """PPO on the denoising MDP; works with black-box rewards.

    Args:
        generator: a diffusion generator with ``eta > 0`` (DDIM) or DDPM, with LoRA enabled.
        reward: any reward (only values are used).
        clip_range: PPO ratio clip ε (reference: 1e-4).
        adv_clip: advantage clip (reference: 5).
        samples_per_prompt: samples per prompt per step (grouped for per-prompt statistics).
        num_minibatches: optimiser steps per sampled batch (later ones are off-policy, hence PPO).
        buffer_size, min_count: per-prompt reward buffer length and the count before it is used.
        grad_clip: max gradient norm (manual optimisation clips here, not in the trainer).
    """

    def __init__(self, generator: DiffusionGenerator, reward: Reward, clip_range: float = 1e-4, adv_clip: float = 5.0,
                 samples_per_prompt: int = 4, num_minibatches: int = 2, buffer_size: int = 32, min_count: int = 16,
                 grad_clip: float = 1.0, seed: int = 0, lr: float = 3e-4, weight_decay: float = 1e-4,
                 eval_seed: int = 1234, output_dir: str | None = None) -> None:
        super().__init__(generator, reward, lr=lr, weight_decay=weight_decay, eval_seed=eval_seed, output_dir=output_dir)
        stochastic = getattr(generator, "eta", 0.0) > 0 or type(generator.scheduler).__name__ == "DDPMScheduler"
        if not stochastic:
            raise ValueError("DDPO needs a stochastic sampler: set generator eta > 0 (reference: eta=1) or scheduler='ddpm'")
        self.automatic_optimization = False
        self.clip_range, self.adv_clip = clip_range, adv_clip
        self.samples_per_prompt, self.num_minibatches = samples_per_prompt, num_minibatches
        self.buffer_size, self.min_count, self.grad_clip, self.seed = buffer_size, min_count, grad_clip, seed
        self.buffers: dict[str, deque] = defaultdict(lambda: deque(maxlen=self.buffer_size))

    @torch.no_grad()
    def sample_trajectories(self, cond, rng):
        """States x_T..x_0 (T+1 tensors) and per-step (B,) old log-probs; zero-variance steps -> None."""
        g = self.generator
        x = g.init_state(cond, rng)
        states, logps = [x], []
        for i in range(g.num_steps):
            mean, std, _ = g.transition(x, i, cond)
            if float(std) > 0:
                noise = torch.randn(x.shape, generator=rng, device=rng.device).to(x)
                x = mean + std * noise
                logps.append(gaussian_log_prob(x, mean, std))
            else:
                x = mean
                logps.append(None)
            states.append(x)
        return states, logps

    def training_step(self, batch: list[str], batch_idx: int) -> None:
        g = self.generator
        opt = self.optimizers()
        prompts = [p for p in batch for _ in range(self.samples_per_prompt)]
        cond = g.encode_condition(prompts)
        rng = self.training_rng()
        states, old_logps = self.sample_trajectories(cond, rng)
        with torch.no_grad():
            r = self.reward(g.decode(states[-1]), prompts)
        g.counter.samples += len(prompts)
        adv = normalize_per_prompt(prompts, r.total.cpu().numpy(), self.buffers, self.min_count)
        adv = torch.as_tensor(adv, dtype=torch.float32, device=self.device).clamp(-self.adv_clip, self.adv_clip)

        steps = [i for i, lp in enumerate(old_logps) if lp is not None]
        order = torch.randperm(len(prompts), generator=rng)
        clipped_frac, losses = [], []
        for mb in order.chunk(self.num_minibatches):
            sub = cond.index(mb)
            mb_dev = mb.to(self.device)
            opt.zero_grad()
            for i in steps:
                mean, std, _ = g.transition(states[i][mb_dev], i, sub)
                logp = gaussian_log_prob(states[i + 1][mb_dev], mean, std)
                ratio = torch.exp(logp - old_logps[i][mb_dev])
                a = adv[mb_dev]
                loss = torch.maximum(-a * ratio, -a * ratio.clamp(1 - self.clip_range, 1 + self.clip_range)).mean()
                self.manual_backward(loss / len(steps))
                losses.append(loss.detach())
                clipped_frac.append(((ratio - 1).abs() > self.clip_range).float().mean())
            self.clip_gradients(opt, gradient_clip_val=self.grad_clip, gradient_clip_algorithm="norm")
            opt.step()
        self._last_train_reward = float(r.total.detach().mean())
        self.log("train/reward", r.total.mean(), prog_bar=True, batch_size=len(prompts), sync_dist=True)
        self.log("train/loss", torch.stack(losses).mean(), batch_size=len(prompts))
        self.log("train/clipfrac", torch.stack(clipped_frac).mean(), batch_size=len(prompts))
        if "failed" in r.info:
            self.log("reward/failed", float(r.info["failed"]), reduce_fx="sum")
        self.log_compute()

    def on_save_checkpoint(self, checkpoint) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["ddpo_buffers"] = {p: list(b) for p, b in self.buffers.items()}

    def on_load_checkpoint(self, checkpoint) -> None:
        super().on_load_checkpoint(checkpoint)
        for p, values in checkpoint.get("ddpo_buffers", {}).items():
            self.buffers[p].extend(values)
