"""VARD — Dai, Zhuang, Huang, Huang, Liao, Wang, Yuan, "VARD: Efficient and Dense Fine-Tuning for
Diffusion Models with Value-based RL" (arXiv 2505.15791; no public code).

Learn a value function V(x_t, t, c) ≈ E[r(x_0) | x_t] by regressing the final rewards of sampled
trajectories on the states they pass through (a process reward model), then fine-tune the generator by
backpropagating through V at intermediate steps, with a KL to the pretrained model. The supervision is
dense (every step, not only x_0) and only V needs gradients, so the reward may be black-box (JPEG size,
RDKit QED, a judge). Each training step here does both phases on one batch of on-policy rollouts:

* value phase (every ``value_every`` steps): roll out the current model without grad, score x_0 with the
  reward, put the trajectories in a buffer of the ``buffer_size`` most recent ones, and take
  ``value_updates`` AdamW steps of ``rewardopt.values.value_mse`` (the loss ``ValueRegression`` fits for
  SVDD-MC) on (state, level, final reward) triples drawn from the buffer. V's calibration — R² of V
  against the realised reward, per level — is logged on the fresh trajectories before V trains on them;
* policy phase: for each sample, ``steps_per_rollout`` step indices i are drawn; from the detached
  on-policy state x_t of the rollout, one differentiable step x_{t-1}(θ) (one denoiser call with grad),
  loss = −V(x_{t-1}(θ), t-1, c) + β·KL, with V frozen. Continuous diffusion: the reparameterised
  Gaussian step, KL = ε-MSE of that step to the frozen base (``draft.eps_penalty``). Masked diffusion:
  the Gumbel-softmax relaxed step (``MaskedDiffusionGenerator.relaxed_step``), KL = the transition KL
  to the frozen copy (``kl_to_base``).

Our reading, where the text we could read leaves a choice (each is a knob):

* Levels: V(x, level) takes the number of steps x has taken (0: x_T, T: x_0), so the state after step i
  is valued at level i + 1. The buffer keeps every visited state x_{T-1}..x_0 of a trajectory
  (``levels_per_rollout=None``; an int keeps that many random levels, for smaller checkpoints).
* Targets are Monte-Carlo (the trajectory's own final reward; no bootstrapping), standardised by the
  first batch's mean and std, kept fixed afterwards (so neither V's scale nor the policy loss drifts as
  rewards rise). A value loaded from a ``ValueRegression`` checkpoint keeps its scale.
* The policy maximises the standardised value (V − μ)/σ, so ``kl_weight`` (β) and ``lr`` do not depend on
  the reward's units. The KL between equal-variance Gaussian steps is a per-step constant times
  ||ε_θ − ε_base||²; we drop the constant, as DRaFT+ does. The differentiable step draws fresh noise.
* Step indices are drawn per sample, uniformly without repeats (DDPO's timestep subsets); the loss
  averages over the (sample, step) pairs.
* ``warmup_steps``: the first steps fit V only (the paper learns V first, then fine-tunes); off by
  default. ``hybrid``: at the last step use the exact reward instead of V when it is differentiable
  (V(x_0) only approximates r(x_0)); off by default. Masked diffusion's step is straight-through
  (one-hot forward: the states V was fitted on) unless ``relaxation: soft``.
* The dropped per-step constant of the Gaussian KL (1 / (2σ_t²) times the ε-to-mean factor) varies a lot over
  the schedule (on SD's schedule at T = 20 the last step's is ~15x the others'), so the ε-MSE weights steps
  equally where the true KL does not; ``benchmarks/vard.py`` measures the true path KL.
* V takes the condition only through ``ConvValue(cond_key=...)``; the shipped image recipes leave it
  unconditional (their rewards — JPEG size, p(blue), aesthetics — do not read the prompt).
* Multi-process: V's gradients are averaged across ranks and its scale set from every rank's first
  rewards, so ranks keep one V; each rank's buffer travels in the checkpoint (not yet tested under DDP).

The paper's hyperparameters are not used as defaults (we could not check them); the defaults are ours,
sized for the tiny recipes. Counted compute: NFE and grad NFE (``generator.counter``), reward calls
(``reward.calls``: one per rollout sample; hybrid adds the last step's), value-net rows
(``value_calls``: fitting, calibration and the policy's queries).
"""

from __future__ import annotations

from collections import deque
from typing import Any

import torch

from rewardopt.generators.base import Condition
from rewardopt.generators.diffusion import DiffusionGenerator
from rewardopt.generators.masked import MaskedDiffusionGenerator
from rewardopt.methods.base import RewardFineTuning, micro_batch_index
from rewardopt.methods.ddpo import sample_timestep_mask
from rewardopt.methods.draft import eps_penalty
from rewardopt.rewards.base import Reward, require_gradient
from rewardopt.values import ValueFunction, calibrate_targets, r2_by_level, value_mse


class VARD(RewardFineTuning):
    """Value-based dense fine-tuning with a KL to the base model; works with black-box rewards.

    Args:
        generator: a ``DiffusionGenerator`` (LoRA or full fine-tuning) or a ``MaskedDiffusionGenerator``.
        reward: any reward (only its values train V; ``hybrid`` also needs its gradient).
        value: the ``ValueFunction`` to fit (``ConvValue`` for images/latents, ``SequenceValue`` for token
            sequences); its ``num_steps`` is taken from the generator when left out. A ``checkpoint`` from
            a ``ValueRegression`` run starts it pre-fitted.
        kl_weight: β, the weight of the per-step KL to the frozen base (needs one: LoRA or full_finetune).
        steps_per_rollout: differentiable steps per sample per training step (1 to T).
        value_every: run the value phase every this many training steps (micro-batches).
        value_updates: value-net optimiser steps per value phase.
        value_batch: (state, level) pairs per value-net step, drawn from the buffer without repeats.
        buffer_size: trajectories kept (the most recent).
        levels_per_rollout: visited states kept per trajectory, at most (None: all T of them).
        warmup_steps: first training steps that fit V only (no policy update).
        hybrid: exact (differentiable) reward instead of V at the last step.
        relaxation: masked diffusion's differentiable step: "straight_through" or "soft" (DRAKES's).
        samples_per_prompt: rollouts per prompt in a batch.
        value_lr, value_weight_decay: the value net's AdamW.
        seed: training noise seed (with the micro-batch index and rank: exact resumes).
        lr, weight_decay: the generator's AdamW.
    """

    RELAXATIONS = ("straight_through", "soft")

    def __init__(self, generator: DiffusionGenerator | MaskedDiffusionGenerator, reward: Reward,
                 value: ValueFunction, kl_weight: float = 0.1, steps_per_rollout: int = 1, value_every: int = 1,
                 value_updates: int = 1, value_batch: int = 64, buffer_size: int = 64,
                 levels_per_rollout: int | None = None, warmup_steps: int = 0, hybrid: bool = False,
                 relaxation: str = "straight_through", samples_per_prompt: int = 1, value_lr: float = 1e-3,
                 value_weight_decay: float = 0.0, seed: int = 0, lr: float = 1e-4, weight_decay: float = 0.0,
                 eval_seed: int = 1234, output_dir: str | None = None) -> None:
        super().__init__(generator, reward, lr=lr, weight_decay=weight_decay, eval_seed=eval_seed,
                         output_dir=output_dir)
        if not isinstance(generator, (DiffusionGenerator, MaskedDiffusionGenerator)):
            raise TypeError(f"VARD takes one differentiable step of continuous diffusion (DiffusionGenerator) or "
                            f"masked diffusion (MaskedDiffusionGenerator); got {type(generator).__name__} "
                            "(token LMs: DiffRO or Reinforce)")
        T = generator.num_steps
        value.bind_steps(T, "model.init_args.value.init_args.num_steps")
        if not 1 <= steps_per_rollout <= T:
            raise ValueError(f"steps_per_rollout must be in [1, {T}] (the sampler's steps), got {steps_per_rollout}")
        if kl_weight > 0 and not generator.has_base_model:
            raise ValueError("kl_weight > 0 needs a frozen base model: set lora_rank or full_finetune: true on the "
                             "generator (or kl_weight: 0)")
        if relaxation not in self.RELAXATIONS:
            raise ValueError(f"relaxation must be one of {self.RELAXATIONS}, got {relaxation!r}")
        if min(value_every, value_updates, value_batch, buffer_size) < 1 or warmup_steps < 0:
            raise ValueError("value_every, value_updates, value_batch and buffer_size must be >= 1, warmup_steps >= 0")
        if levels_per_rollout is not None and levels_per_rollout < 1:
            raise ValueError(f"levels_per_rollout must be >= 1 or null (all), got {levels_per_rollout}")
        self.grad_reward = require_gradient("VARD with hybrid: true", reward) if hybrid else None
        self.value = value.requires_grad_(False)
        self.kl_weight, self.steps_per_rollout, self.hybrid, self.relaxation = kl_weight, steps_per_rollout, hybrid, \
            relaxation
        self.value_every, self.value_updates, self.value_batch = value_every, value_updates, value_batch
        self.levels_per_rollout, self.warmup_steps = levels_per_rollout, warmup_steps
        self.samples_per_prompt, self.seed = samples_per_prompt, seed
        self.value_optimizer = torch.optim.AdamW(value.parameters(), lr=value_lr, weight_decay=value_weight_decay)
        self._value_optimizer_state: dict | None = None  # loaded from a checkpoint, applied on first use
        self.buffer: deque[dict[str, Any]] = deque(maxlen=buffer_size)
        self.value_calls = 0
        self.value_updates_done = 0
        self._calibrated = value.has_checkpoint

    # ------------------------------------------------------------------ value phase
    @torch.no_grad()
    def rollout(self, cond: Condition, rng: torch.Generator) -> list[torch.Tensor]:
        """The current model's trajectory x_T..x_0 (T + 1 detached (B, ...) states), without grad."""
        return self.generator.sample(cond, generator=rng, grad_last_k=0, return_trajectory=True)[1]

    def remember(self, traj: list[torch.Tensor], rewards: torch.Tensor, raw: list[Any], rng: torch.Generator) -> None:
        """Add scored trajectories to the buffer (their states at levels 1..T, or ``levels_per_rollout`` of
        them drawn with ``rng``); samples whose reward is not finite (excluded by the reward) are left out.
        The first rewards set V's output scale (all ranks' rewards under DDP)."""
        rewards = rewards.detach().float().cpu()
        ok = torch.isfinite(rewards)
        if not self._calibrated:  # every rank gathers (a collective), whatever its own rewards
            all_rewards = torch.tensor([v for part in self.gather(rewards[ok].tolist()) for v in part])
            if len(all_rewards):
                calibrate_targets(self.value, all_rewards)
                self._calibrated = True
        T = len(traj) - 1
        for b in ok.nonzero().flatten().tolist():
            if self.levels_per_rollout is None:
                levels = torch.arange(1, T + 1)
            else:
                levels = torch.randperm(T, generator=rng)[:self.levels_per_rollout].sort().values + 1
            states = torch.stack([traj[lvl][b] for lvl in levels.tolist()]).detach().cpu()
            self.buffer.append({"states": states, "levels": levels, "reward": float(rewards[b]), "cond": raw[b]})

    def _encode(self, raw: list[Any]) -> Condition:
        with torch.no_grad():
            return self.generator.encode_condition(raw)

    def fit_value(self, rng: torch.Generator) -> float:
        """``value_updates`` AdamW steps of the standardised value MSE on minibatches of the buffer; the
        mean loss. V is trainable only inside this call."""
        pairs = [(e, j) for e, entry in enumerate(self.buffer) for j in range(len(entry["levels"]))]
        if not pairs:
            return float("nan")
        if self._value_optimizer_state is not None:  # now that the value net is on its device
            self.value_optimizer.load_state_dict(self._value_optimizer_state)
            self._value_optimizer_state = None
        device = self.value.target_std.device
        losses = []
        self.value.requires_grad_(True)
        try:
            for _ in range(self.value_updates):
                pick = [pairs[k] for k in torch.randperm(len(pairs), generator=rng)[:self.value_batch].tolist()]
                entries = [self.buffer[e] for e, _ in pick]
                states = torch.stack([en["states"][j] for en, (_, j) in zip(entries, pick)]).to(device)
                levels = torch.stack([en["levels"][j] for en, (_, j) in zip(entries, pick)])
                targets = torch.tensor([en["reward"] for en in entries])
                with torch.enable_grad():
                    loss = value_mse(self.value, states, levels, targets, self._encode([en["cond"] for en in entries]))
                    self.value_optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                self._average_value_grads()
                self.value_optimizer.step()
                self.value_optimizer.zero_grad(set_to_none=True)
                self.value_calls += len(pick)
                self.value_updates_done += 1
                losses.append(float(loss.detach()))
        finally:
            self.value.requires_grad_(False)
        return sum(losses) / len(losses)

    def _average_value_grads(self) -> None:
        """Under DDP the value net is outside the wrapped gradients: average its gradients here."""
        world = self.rank_and_world()[1]
        if world <= 1 or not torch.distributed.is_initialized():
            return
        for p in self.value.parameters():
            if p.grad is not None:
                torch.distributed.all_reduce(p.grad)
                p.grad /= world

    @torch.no_grad()
    def calibration(self, traj: list[torch.Tensor], rewards: torch.Tensor, cond: Condition) -> dict[int, float]:
        """R² of V against the realised rewards (B,) at each level 1..T of these trajectories."""
        T = len(traj) - 1
        ok = torch.isfinite(rewards.float().cpu())
        if ok.sum() < 2:
            return {}
        rows = ok.nonzero().flatten().repeat(T)
        levels = torch.arange(1, T + 1).repeat_interleave(int(ok.sum()))
        states = torch.stack([traj[lvl][b] for lvl, b in zip(levels.tolist(), rows.tolist())])
        pred = self.value(states, levels, cond.index(rows))
        self.value_calls += len(rows)
        return r2_by_level(pred.cpu(), rewards.float().cpu()[rows], levels)

    # ------------------------------------------------------------------ policy phase
    def differentiable_step(self, x_t: torch.Tensor, i: int, cond: Condition,
                            rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """One step x_t -> x_{t-1}(θ) with grad (one denoiser call) and its KL to the frozen base summed
        over the rows (0 without a KL term; the base call is counted NFE without grad)."""
        g = self.generator
        kl = x_t.new_zeros(())
        if isinstance(g, MaskedDiffusionGenerator):
            logp = g.model_output(x_t, i, cond)
            x_prev = g.relaxed_step(x_t, i, cond, generator=rng, out=logp, soft=self.relaxation == "soft")
            if self.kl_weight > 0:
                kl = g.kl_to_base(x_t, i, cond, logp).sum()
            return x_prev, kl
        x_prev, out = g.step_with_output(x_t, i, cond, generator=rng)
        if self.kl_weight > 0:
            kl = eps_penalty(g, x_t, i, out, g.base_model_output(x_t, i, cond)) * x_t.shape[0]
        return x_prev, kl

    def policy_loss(self, traj: list[torch.Tensor], cond: Condition,
                    rng: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        """Mean over the drawn (sample, step) pairs of −(V(x_{t-1}(θ)) − μ)/σ + β·KL (V frozen), and the
        mean standardised value and KL of those pairs."""
        g = self.generator
        T, B, k = g.num_steps, len(cond), self.steps_per_rollout
        mask = sample_timestep_mask(B, T, k, rng)  # (B, T): which k steps each sample trains
        mu, sigma = self.value.target_mean, self.value.target_std
        v_sum, kl_sum = torch.zeros((), device=self.device), torch.zeros((), device=self.device)
        for i in range(T):
            rows = mask[:, i].nonzero().flatten()
            if len(rows) == 0:
                continue
            c = cond.index(rows)
            x_t = traj[i][rows.to(traj[i].device)].detach()
            x_prev, kl = self.differentiable_step(x_t, i, c, rng)
            if self.hybrid and i == T - 1:
                v = self.grad_reward(g.decode(x_prev), c.raw).total.float()
            else:
                v = self.value(x_prev, i + 1, c)
                self.value_calls += len(rows)
            v_sum = v_sum + ((v - mu) / sigma).sum()
            kl_sum = kl_sum + kl
        n = B * k
        loss = (-v_sum + self.kl_weight * kl_sum) / n
        return loss, {"value": float(v_sum.detach()) / n, "kl": float(kl_sum.detach()) / n}

    # ------------------------------------------------------------------ training
    def training_step(self, batch: list, batch_idx: int) -> torch.Tensor | None:
        g = self.generator
        raw = [p for p in batch for _ in range(self.samples_per_prompt)]
        cond = g.encode_condition(raw)
        rng = self.training_rng()
        step = micro_batch_index(self)
        traj = self.rollout(cond, rng)
        with torch.no_grad():
            r = self.reward(g.decode(traj[-1]), raw)
        g.counter.samples += len(raw)
        rewards = r.total.detach().float()
        refresh = step % self.value_every == 0
        if refresh:  # V has not seen these trajectories yet: an honest calibration
            for lvl, r2 in self.calibration(traj, rewards, cond).items():
                self.log(f"value/r2_level_{lvl:03d}", r2, batch_size=len(raw))
        self.remember(traj, rewards, raw, rng)
        if refresh:
            self.log("value/mse", self.fit_value(rng), prog_bar=True, batch_size=len(raw))
        ok = torch.isfinite(rewards)
        self._last_train_reward = float(rewards[ok].mean()) if ok.any() else None
        self.log("train/reward", rewards[ok].mean() if ok.any() else rewards.new_zeros(()), prog_bar=True,
                 batch_size=len(raw), sync_dist=True)
        self.log("compute/value_calls", float(self.value_calls), on_step=True, on_epoch=False)
        if step < self.warmup_steps:  # value only: no loss, so no policy update
            self.log_compute()
            return None
        loss, stats = self.policy_loss(traj, cond, rng)
        self.log("train/loss", loss, batch_size=len(raw))
        self.log("train/value", stats["value"], batch_size=len(raw))
        if self.kl_weight > 0:
            self.log("train/kl", stats["kl"], batch_size=len(raw))
        self.log_compute()
        return loss

    # ------------------------------------------------------------------ checkpoints and summary
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """The value net, its optimiser, the counters and every rank's buffer (each rank resumes its own)."""
        super().on_save_checkpoint(checkpoint)
        opt = self._value_optimizer_state or self.value_optimizer.state_dict()
        checkpoint["vard"] = {
            "value": {k: v.detach().cpu() for k, v in self.value.state_dict().items()}, "value_optimizer": opt,
            "value_calls": self.value_calls, "value_updates": self.value_updates_done, "calibrated": self._calibrated,
            "buffer_per_rank": self.gather(list(self.buffer)),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("vard")
        if state is None:
            raise KeyError("the checkpoint has no VARD state (value net, buffer): it was not written by VARD")
        self.value.load_state_dict(state["value"])
        self._value_optimizer_state = state["value_optimizer"]
        self.value_calls, self.value_updates_done = int(state["value_calls"]), int(state["value_updates"])
        self._calibrated = bool(state["calibrated"])
        rank = self.rank_and_world()[0]
        per_rank = state["buffer_per_rank"]
        self.buffer.clear()
        self.buffer.extend(per_rank[rank if rank < len(per_rank) else 0])

    def write_summary(self, summary: dict[str, Any], name: str = "summary.json"):
        if name == "summary.json":
            summary = {**summary, "value_calls": self.value_calls, "value_updates": self.value_updates_done}
        return super().write_summary(summary, name)
