"""DDPO — Black, Janner, Du, Kostrikov, Levine, "Training Diffusion Models with Reinforcement
Learning" (arXiv 2305.13301; reference code kvablack/ddpo-pytorch). The policy-gradient baseline.

Each DDIM step with eta > 0 is a Gaussian policy over the next latent. Sample trajectories without
grad (recording each step's log-probability), score the final images with any reward — black-box
is fine — normalise rewards per prompt into advantages, then take PPO-clipped steps on the ratio of
new to old log-probabilities of the recorded transitions, summed over timesteps.

Reading of the reference code we follow (``scripts/train.py``, ``config/base.py``): log-probabilities
are averaged over latent dimensions; rewards and prompts are gathered from every process before the
per-prompt statistics, and each process keeps the advantages of its own samples; advantages are
normalised per prompt from a running buffer (falling back to the statistics of the whole gathered
batch until a prompt has ``min_count`` rewards) and clipped to ±``adv_clip``; each pass over the
sampled batch (``num_inner_epochs`` of them) reshuffles the samples and, per sample, the timesteps,
and trains on the first ``int(T * timestep_fraction)`` of them; one optimiser step per minibatch,
accumulating over its timesteps. Defaults from the reference config: PPO clip 1e-4, advantage clip
5, lr 3e-4, buffer 16, min count 16, every timestep, one inner epoch.

Our reading, where we differ in form but not in result: the reference makes one denoiser call per
timestep *column* (sample j's k-th shuffled timestep); we make one per timestep, over the rows that
drew it. Both sum the same per-(sample, timestep) losses scaled by 1/(minibatch size x k) before the
minibatch's optimiser step, so the gradient is the same. Steps whose transition has zero variance
(DDPM's last) carry no policy gradient and are never trained. The training forwards run without the
generator's gradient checkpointing: each is followed at once by its backward, so recomputing it would
cost a forward and lower no peak memory. Samples a black-box reward excluded (``on_failure:
exclude``, total -inf) get advantage 0 and stay out of the statistics.

Masked diffusion (``MaskedDiffusionGenerator``; not in the paper, the RL baseline for VARD on molecules):
each unmasking step is a categorical policy over the next sequence; its log-probability
(``transition_log_prob``) sums log q over the positions masked before the step and, like the Gaussian
one, is averaged over all L positions. Only the positions that unmask at that step (about L/T of them)
depend on θ — carried tokens contribute log 1 and staying masked has the schedule's probability — so the
ratio is diluted about T-fold and a clip ε allows roughly ε·T per newly unmasked token, varying with how
many unmask: the clip does not mean what it means on images, and its value for masked diffusion is untuned.
"""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from functools import partial

import numpy as np
import torch
from lightning.pytorch.strategies import ParallelStrategy

from rewardopt.generators.capabilities import TransitionLogProbs, require
from rewardopt.generators.diffusion import DiffusionGenerator, gaussian_log_prob
from rewardopt.generators.flow import FlowMatchingGenerator
from rewardopt.generators.masked import MaskedDiffusionGenerator
from rewardopt.methods.base import RewardFineTuning
from rewardopt.rewards.base import Reward


def normalize_per_prompt(prompts: list[str], rewards: np.ndarray, buffers: dict[str, deque],
                         min_count: int) -> np.ndarray:
    """Advantages (r - mean_p) / (std_p + 1e-6) per prompt p, using each prompt's recent rewards once
    it has ``min_count`` of them, the whole batch's statistics before. ``buffers`` is updated in
    place. Non-finite rewards (excluded samples) get advantage 0 and enter no statistic.
    Shapes: ``prompts`` and ``rewards`` (N,); returns (N,) float64."""
    rewards = np.asarray(rewards, dtype=np.float64)
    ok = np.isfinite(rewards)
    adv = np.zeros_like(rewards)
    for p in dict.fromkeys(prompts):
        buffers[p].extend(rewards[[q == p for q in prompts] & ok].tolist())
    batch = rewards[ok]
    for i, p in enumerate(prompts):
        if ok[i]:
            ref = np.asarray(buffers[p]) if len(buffers[p]) >= min_count else batch
            adv[i] = (rewards[i] - ref.mean()) / (ref.std() + 1e-6)
    return adv


def sample_timestep_mask(n: int, num_steps: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """(n, num_steps) bool: which k of the trainable steps each of n samples trains on — a fresh
    uniform random subset per sample (the reference's per-sample timestep shuffle, first k kept)."""
    if k >= num_steps:
        return torch.ones(n, num_steps, dtype=torch.bool)
    order = torch.rand(n, num_steps, generator=generator).argsort(dim=1)  # a random permutation per row
    mask = torch.zeros(n, num_steps, dtype=torch.bool)
    mask.scatter_(1, order[:, :k], True)
    return mask


@contextmanager
def single_step_graphs(generator: DiffusionGenerator | MaskedDiffusionGenerator) -> Iterator[None]:
    """Denoiser calls without the generator's whole-call gradient checkpointing: a graph of one call
    whose backward follows at once holds no more at its peak than the recomputation would."""
    if not isinstance(generator, DiffusionGenerator):  # masked diffusion: no whole-call checkpointing
        yield
        return
    saved = generator.gradient_checkpointing
    generator.gradient_checkpointing = False
    try:
        yield
    finally:
        generator.gradient_checkpointing = saved


class DDPO(RewardFineTuning):
    """PPO on the denoising MDP; works with black-box rewards.

    Args:
        generator: a diffusion generator with ``eta > 0`` (DDIM) or DDPM, with LoRA enabled.
        reward: any reward (only values are used).
        clip_range: PPO ratio clip ε (reference: 1e-4).
        adv_clip: advantage clip (reference: 5).
        samples_per_prompt: samples per prompt per step (grouped for per-prompt statistics).
        num_minibatches: optimiser steps per pass over the sampled batch (later ones are off-policy,
            hence PPO).
        num_inner_epochs: passes over each sampled batch (reference: 1); trainer.max_steps counts
            ``num_minibatches * num_inner_epochs`` optimiser steps per sampled batch.
        timestep_fraction: the fraction of each trajectory's timesteps trained on, drawn per sample
            (reference: 1.0; less is cheaper and noisier).
        buffer_size, min_count: per-prompt reward buffer length and the count before it is used
            (reference: 16 and 16). Under DDP the buffers see every process's rewards.
        grad_clip: max gradient norm (manual optimisation clips here, not in the trainer).
        eval_sde: on a flow model (``FlowMatchingGenerator``), draw held-out samples with its SDE (True) or with
            the deterministic ODE (False, the default: as Flow-GRPO's reference evaluates and DRaFT on the same model
            samples, so flow pages compare like with like). Other generators evaluate with their own sampler either
            way.
    """

    def __init__(self, generator: DiffusionGenerator, reward: Reward, clip_range: float = 1e-4, adv_clip: float = 5.0,
                 samples_per_prompt: int = 4, num_minibatches: int = 2, num_inner_epochs: int = 1,
                 timestep_fraction: float = 1.0, buffer_size: int = 16, min_count: int = 16, grad_clip: float = 1.0,
                 seed: int = 0, lr: float = 3e-4, weight_decay: float = 1e-4, eval_seed: int = 1234,
                 output_dir: str | None = None, eval_sde: bool = False) -> None:
        super().__init__(generator, reward, lr=lr, weight_decay=weight_decay, eval_seed=eval_seed,
                         output_dir=output_dir)
        self.eval_sde = bool(eval_sde)
        require(generator, TransitionLogProbs, "DDPO")
        if not isinstance(generator, (DiffusionGenerator, MaskedDiffusionGenerator)):
            raise TypeError(f"DDPO's likelihood ratio is over denoising steps (DiffusionGenerator, "
                            f"MaskedDiffusionGenerator); got {type(generator).__name__} (token LMs: Reinforce)")
        if isinstance(generator, DiffusionGenerator) and not generator.stochastic:
            raise ValueError("DDPO needs a stochastic sampler: set generator eta > 0 (reference: eta=1) or "
                             "scheduler='ddpm'")
        if not 0.0 < timestep_fraction <= 1.0 or int(generator.num_steps * timestep_fraction) < 1:
            raise ValueError(f"timestep_fraction={timestep_fraction} must be in (0, 1] and leave at least one of the "
                             f"{generator.num_steps} timesteps (int(num_steps * timestep_fraction) >= 1)")
        if num_inner_epochs < 1 or num_minibatches < 1:
            raise ValueError(f"num_inner_epochs={num_inner_epochs} and num_minibatches={num_minibatches} must be >= 1")
        self.automatic_optimization = False
        self.clip_range, self.adv_clip = clip_range, adv_clip
        self.samples_per_prompt, self.num_minibatches = samples_per_prompt, num_minibatches
        self.num_inner_epochs, self.timestep_fraction = num_inner_epochs, timestep_fraction
        self.buffer_size, self.min_count, self.grad_clip, self.seed = buffer_size, min_count, grad_clip, seed
        self.buffers: dict[str, deque] = defaultdict(partial(deque, maxlen=buffer_size))

    def sample_decoded(self, prompts, seed: int, grad: bool = False):
        """Held-out samples; a flow model's with the ODE (noise level 0 for the call) unless ``eval_sde``."""
        g = self.generator
        ode = isinstance(g, FlowMatchingGenerator) and not self.eval_sde
        with g.ode_sampling() if ode else nullcontext():
            return super().sample_decoded(prompts, seed, grad)

    @torch.no_grad()
    def sample_trajectories(self, cond, rng):
        """States x_T..x_0 (T+1 tensors) and per-step (B,) old log-probs; zero-variance steps -> None.
        Masked diffusion: the sampler's categorical step and its log-probability from the same denoiser call."""
        g = self.generator
        x = g.init_state(cond, rng)
        states, logps = [x], []
        for i in range(g.num_steps):
            if isinstance(g, MaskedDiffusionGenerator):
                out = g.model_output(x, i, cond)
                x_next = g.step(x, i, cond, generator=rng, out=out)
                logps.append(g.transition_log_prob(x, i, x_next, out))
                x = x_next
                states.append(x)
                continue
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

    def advantages(self, prompts: list[str], rewards: torch.Tensor) -> torch.Tensor:
        """(B,) clipped advantages of this process's samples. Every process's (prompt, reward) pairs
        are gathered in rank order and normalised together (so every process updates the same
        buffers), and each keeps its own slice — as the reference's gather/ungather."""
        values = rewards.detach().float().cpu().numpy()  # float: bf16 has no numpy dtype
        rank, world = self.rank_and_world()
        all_prompts, all_values, start = list(prompts), values, 0
        if world > 1:
            gathered = self.gather((list(prompts), values.tolist()))
            all_prompts = [p for ps, _ in gathered for p in ps]
            all_values = np.concatenate([np.asarray(v, dtype=np.float64) for _, v in gathered])
            start = sum(len(ps) for ps, _ in gathered[:rank])
        adv = self.normalise(all_prompts, all_values)[start:start + len(prompts)]
        return torch.as_tensor(adv, dtype=torch.float32, device=self.device).clamp(-self.adv_clip, self.adv_clip)

    def normalise(self, prompts: list[str], rewards: np.ndarray) -> np.ndarray:
        """Advantages of every gathered sample: DDPO's per-prompt running statistics (``normalize_per_prompt``)."""
        return normalize_per_prompt(prompts, rewards, self.buffers, self.min_count)

    def _backward_sync(self, sync: bool):
        """Under DDP, all-reduce gradients only at a minibatch's last backward (they accumulate)."""
        strategy = self.trainer.strategy
        return strategy.block_backward_sync() if not sync and isinstance(strategy, ParallelStrategy) else nullcontext()

    def step_loss(self, x: torch.Tensor, i: int, x_next: torch.Tensor, cond, old_logp: torch.Tensor,
                  adv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The PPO-clipped loss summed over the rows of one step i (states ``x`` -> ``x_next``), with the log-ratio
        and ratio per row (for the statistics)."""
        return self.ppo_loss(self.generator.log_prob(x, i, x_next, cond), old_logp, adv)

    def ppo_loss(self, logp: torch.Tensor, old_logp: torch.Tensor,
                 adv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """PPO's clipped surrogate, summed over rows: max(−A·r, −A·clip(r, 1 ± ε)), r = exp(logp − old_logp) (old_logp
        from sampling, without grad); at r = 1 its gradient is −A·∇logp. The loss, the log-ratio and the ratio."""
        diff = logp - old_logp
        ratio = torch.exp(diff)
        loss = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - self.clip_range, 1 + self.clip_range)).sum()
        return loss, diff, ratio

    def train_minibatch(self, states, old_logps, adv, cond, rows: torch.Tensor, mask: torch.Tensor,
                        steps: list[int], k: int) -> dict[str, torch.Tensor]:
        """Backward of the PPO loss of minibatch ``rows`` (indices into the sampled batch) over the
        timesteps ``mask`` (len(rows), len(steps)) selects, k per row. Returns summed statistics
        (0-dim tensors, read once per batch so that no step waits for the device)."""
        g = self.generator
        work = [(i, rows[mask[:, s]]) for s, i in enumerate(steps) if mask[:, s].any()]
        scale = 1.0 / (len(rows) * k)
        zero = torch.zeros((), device=self.device)
        stats = {"loss": zero, "clipped": zero, "kl": zero, "pairs": zero + int(mask.sum())}
        with single_step_graphs(g):
            for j, (i, r) in enumerate(work):
                r_dev = r.to(self.device)
                with self._backward_sync(j == len(work) - 1):
                    loss, diff, ratio = self.step_loss(states[i][r_dev], i, states[i + 1][r_dev], cond.index(r),
                                                       old_logps[i][r_dev], adv[r_dev])
                    self.manual_backward(loss * scale)
                stats["loss"] = stats["loss"] + loss.detach() * scale
                stats["clipped"] = stats["clipped"] + ((ratio.detach() - 1).abs() > self.clip_range).sum()
                stats["kl"] = stats["kl"] + 0.5 * (diff.detach() ** 2).sum()
        return stats

    def training_step(self, batch: list[str], batch_idx: int) -> None:
        g = self.generator
        opt = self.optimizers()
        prompts = [p for p in batch for _ in range(self.samples_per_prompt)]
        cond = g.encode_condition(list(batch)).repeat_interleave(self.samples_per_prompt)  # each prompt encoded once
        rng = self.training_rng()
        states, old_logps = self.sample_trajectories(cond, rng)
        with torch.no_grad():
            r = self.reward(g.decode(states[-1]), prompts)
        g.counter.samples += len(prompts)
        rewards = r.total.detach().float()
        adv = self.advantages(prompts, rewards)

        steps = [i for i, lp in enumerate(old_logps) if lp is not None]
        k = max(1, int(len(steps) * self.timestep_fraction))
        losses, totals = [], defaultdict(lambda: torch.zeros((), device=self.device))
        for _ in range(self.num_inner_epochs):
            order = torch.randperm(len(prompts), generator=rng)
            mask = sample_timestep_mask(len(prompts), len(steps), k, rng)
            for mb in order.chunk(self.num_minibatches):
                opt.zero_grad()
                stats = self.train_minibatch(states, old_logps, adv, cond, mb, mask[mb], steps, k)
                self.clip_gradients(opt, gradient_clip_val=self.grad_clip, gradient_clip_algorithm="norm")
                opt.step()
                losses.append(stats.pop("loss"))
                for key, v in stats.items():
                    totals[key] += v
        ok = torch.isfinite(rewards)
        self._last_train_reward = float(rewards[ok].mean()) if ok.any() else None
        self.log("train/reward", rewards[ok].mean() if ok.any() else rewards.new_zeros(()), prog_bar=True,
                 batch_size=len(prompts), sync_dist=True)
        pairs = totals["pairs"].clamp(min=1)
        self.log("train/loss", torch.stack(losses).mean(), batch_size=len(prompts))
        self.log("train/clipfrac", totals["clipped"] / pairs, batch_size=len(prompts))
        self.log("train/approx_kl", totals["kl"] / pairs, batch_size=len(prompts))
        if "failed" in r.info:
            self.log("reward/failed", float(r.info["failed"]), reduce_fx="sum")
        self.log_compute()

    def on_save_checkpoint(self, checkpoint) -> None:
        """Every process's reward buffers (identical when statistics are gathered, but each process
        resumes from its own), so a multi-process resume continues exactly."""
        super().on_save_checkpoint(checkpoint)
        own = {p: list(b) for p, b in self.buffers.items()}
        checkpoint["ddpo_buffers"] = own
        checkpoint["ddpo_buffers_per_rank"] = self.gather(own)

    def on_load_checkpoint(self, checkpoint) -> None:
        super().on_load_checkpoint(checkpoint)
        rank, _ = self.rank_and_world()
        per_rank = checkpoint.get("ddpo_buffers_per_rank") or [checkpoint.get("ddpo_buffers", {})]
        self.buffers.clear()
        for p, values in per_rank[rank if rank < len(per_rank) else 0].items():
            self.buffers[p].extend(values)
