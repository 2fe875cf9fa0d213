"""What every reward fine-tuning method shares: held-out evaluation before/after, compute counters,
small checkpoints (trainable weights only), the run summary and the adapter export (the output
folder, per-rank noise and the gather across ranks come from ``rewardopt.run.RunMixin``).

A subclass implements ``training_step`` (or ``loss``) and sets its own knobs; see ``draft.py``.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

from rewardopt.generators.base import Generator
from rewardopt.generators.capabilities import Trainable, require
from rewardopt.rewards.base import Reward
from rewardopt.run import RunMixin, derived_seed


def params_checksum(params: list[torch.Tensor]) -> str:
    """A hash of parameter values (to check that DDP ranks hold identical weights)."""
    h = hashlib.sha256()
    for p in params:
        h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def micro_batch_index(module: L.LightningModule) -> int:
    """The index of the training micro-batch being run, counted over epochs: Lightning's
    ``fit_loop.epoch_loop.total_batch_idx``, restored from the checkpoint's loop progress on resume.
    (``global_step`` counts optimiser steps, so it repeats over ``accumulate_grad_batches``
    micro-batches.) 0 outside a fit."""
    trainer = module._trainer
    return max(int(trainer.fit_loop.epoch_loop.total_batch_idx), 0) if trainer is not None else 0


class RewardFineTuning(RunMixin, L.LightningModule):
    """Base LightningModule for methods that fine-tune a generator toward a reward.

    Args:
        generator: the model to fine-tune (its ``trainable_parameters`` are optimised).
        reward: the reward to maximise.
        lr, weight_decay, betas: AdamW settings.
        eval_seed: seed of the fixed noise used for held-out evaluation and sample grids.
        output_dir: where summary.json and the adapter go (default: the trainer's ``log_dir``, the
            logger's folder or ``default_root_dir`` without one; ``RunMixin``).
    """

    #: checkpoints hold only trainable weights, so they load non-strictly
    strict_loading = False

    def __init__(self, generator: Generator, reward: Reward, lr: float = 1e-4, weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.999), eval_seed: int = 1234,
                 output_dir: str | None = None) -> None:
        super().__init__()
        require(generator, Trainable, type(self).__name__)
        generator.setup_trainable()  # the one place a fine-tuning run opens the trainable weights (idempotent)
        self.generator, self.reward = generator, reward
        self.lr, self.weight_decay, self.betas = lr, weight_decay, tuple(betas)
        self.eval_seed, self._output_dir = eval_seed, output_dir
        self.reward_before: float | None = None
        self.history: list[dict[str, float]] = []  # (samples seen, held-out reward) along training
        self._wall_offset = 0.0  # wall time of earlier (resumed-from) runs
        self._t0: float | None = None
        self._last_train_reward: float | None = None  # this rank's last batch mean (DDP check)

    # ------------------------------------------------------------------ compute accounting
    @property
    def samples_seen(self) -> int:
        return self.generator.counter.samples

    def wall_time(self) -> float:
        return self._wall_offset + (time.perf_counter() - self._t0 if self._t0 is not None else 0.0)

    def log_compute(self) -> None:
        c = self.generator.counter
        self.log_dict({"compute/nfe": float(c.nfe), "compute/nfe_grad": float(c.nfe_grad),
                       "compute/reward_calls": float(self.reward.calls), "compute/samples": float(c.samples),
                       "compute/wall_s": self.wall_time()}, on_step=True, on_epoch=False)

    def training_rng(self, stream: int | None = None) -> torch.Generator:
        """The noise of this micro-batch on this rank (``rank_generator`` of ``micro_batch_index``): a
        resumed run draws exactly what an uninterrupted one would, ranks and accumulated micro-batches
        draw different noise. ``stream``: another independent stream of the same micro-batch (a salt of the seed),
        for a draw that must not share the sampler noise's generator state."""
        seed = getattr(self, "seed", 0)
        return self.rank_generator(seed if stream is None else derived_seed(seed, stream), micro_batch_index(self))

    # ------------------------------------------------------------------ evaluation
    def sample_decoded(self, prompts: list[Any], seed: int, grad: bool = False) -> Any:
        """Decoded samples (images, molecules, speech, ...: ``generator.decode``) for ``prompts`` from
        fixed noise; no compute is charged to training."""
        g = self.generator
        saved = g.counter.state_dict()
        try:
            with torch.set_grad_enabled(grad):
                cond = g.encode_condition(prompts)
                rng = torch.Generator().manual_seed(seed)
                return g.decode(g.sample(cond, generator=rng, grad_last_k=None if grad else 0))
        finally:
            g.counter.load_state_dict(saved)

    @torch.no_grad()
    def evaluate(self, loader=None) -> float:
        """Mean reward on the held-out prompts (all ranks; averaged across ranks)."""
        loader = loader if loader is not None else self.trainer.datamodule.val_dataloader()
        calls = self.reward.calls
        total, n = torch.zeros((), device=self.device), torch.zeros((), device=self.device)
        rank, world = self.rank_and_world()
        for b, prompts in enumerate(loader):
            if b % world != rank:  # ranks share the held-out batches; batch b keeps seed eval_seed + b
                continue
            r = self.reward(self.sample_decoded(prompts, self.eval_seed + b), prompts).total
            total += r.sum()
            n += r.numel()
        self.reward.calls = calls
        if world > 1:
            reduce = self.trainer.strategy.reduce
            total, n = reduce(total, reduce_op="sum"), reduce(n, reduce_op="sum")
        return float(total / n.clamp(min=1))

    def on_train_start(self) -> None:
        self._t0 = time.perf_counter()
        if self.reward_before is not None and self.trainer.is_global_zero:  # resuming
            for logger in self.trainer.loggers:  # drop rows the killed run logged after its checkpoint
                truncate = getattr(logger.experiment, "truncate_from", None)
                if truncate is not None:
                    truncate(self.global_step)
        if self.reward_before is None:  # not on resume: it is in the checkpoint
            self.reward_before = self.evaluate()
            self.history.append({"samples": 0, "reward": self.reward_before})
            self.print(f"[rewardopt] held-out reward before fine-tuning: {self.reward_before:.4f}")

    def validation_step(self, batch: list[str], batch_idx: int) -> None:
        with torch.no_grad():
            samples = self.sample_decoded(batch, self.eval_seed + batch_idx)
            calls = self.reward.calls
            r = self.reward(samples, batch).total
            self.reward.calls = calls
        self.log("val/reward", r.mean(), sync_dist=True, batch_size=len(batch), prog_bar=True)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        v = self.trainer.callback_metrics.get("val/reward")
        if v is not None and self.global_step > 0:
            self.history.append({"samples": self.samples_seen * self.trainer.world_size, "reward": float(v)})

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        params = self.generator.trainable_parameters()
        if not params:
            raise ValueError(f"{type(self.generator).__name__} has no trainable parameters; "
                             "set lora_rank or full_finetune")
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay, betas=self.betas)

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        keep = {n for n, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint["rewardopt"] = {
            "counter": self.generator.counter.state_dict(), "reward_calls": self.reward.calls,
            "reward_before": self.reward_before, "history": self.history, "wall": self.wall_time(),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore counters and history; check that the checkpoint holds every trainable weight (loading
        is non-strict because checkpoints hold only those, so a renamed key would otherwise load nothing
        silently). Keys an older release wrote under other names are renamed first."""
        weights = checkpoint.get("state_dict")
        if weights is not None:
            for old, new in self.generator.legacy_state_prefixes.items():
                old, new = f"generator.{old}", f"generator.{new}"
                for k in [k for k in weights if k.startswith(old)]:
                    weights[new + k[len(old):]] = weights.pop(k)
            missing = [n for n, p in self.named_parameters() if p.requires_grad and n not in weights]
            if missing:
                raise KeyError(f"the checkpoint lacks {len(missing)} of this run's trainable weights (e.g. "
                               f"{missing[:3]}): it was written by a differently configured generator (LoRA rank "
                               "and targets, full_finetune) or method")
        state = checkpoint.get("rewardopt", {})
        if "counter" in state:
            self.generator.counter.load_state_dict(state["counter"])
            self.reward.calls = state["reward_calls"]
            self.reward_before = state["reward_before"]
            self.history = list(state["history"])
            self._wall_offset = float(state["wall"])

    # ------------------------------------------------------------------ outputs
    def on_train_end(self) -> None:
        reward_after = self.evaluate()  # on every rank (averaged across ranks)
        per_rank = self.gather((params_checksum(self.generator.trainable_parameters()), self._last_train_reward))
        if self.is_global_zero():
            self.write_run_summary(reward_after, per_rank, self.export_trained())

    def export_trained(self) -> Path | None:
        """Write the trained weights in the model family's format (``save_trained``: a LoRA adapter, or
        the whole model) to ``<output_dir>/adapter``; the path, or None when nothing was written."""
        out = self.output_dir
        out.mkdir(parents=True, exist_ok=True)
        return self.generator.save_trained(out / "adapter")

    def write_run_summary(self, reward_after: float, per_rank: list[tuple[str, float | None]],
                          adapter: Path | None = None) -> Path:
        """Write summary.json (rank 0): held-out reward before/after, the counters, and every rank's
        weight checksum and last training reward (``per_rank``, gathered in rank order)."""
        checksums, rank_rewards = [p[0] for p in per_rank], [p[1] for p in per_rank]
        reduced = self.trainer.callback_metrics.get("train/reward")
        world = self.rank_and_world()[1]
        c = self.generator.counter
        summary = {
            "method": type(self).__name__,
            "reward": self.reward.name,
            "reward_before": self.reward_before,
            "reward_after": reward_after,
            "steps": int(self.global_step),
            "world_size": int(world),
            # counters are per rank; multiply by world_size for the whole job
            # nfe_grad: denoiser evaluations with autograd (each backpropagated once); decodes: rows through
            # generator.decode (a VAE pass for latent diffusion), decodes_grad those with autograd
            "nfe": c.nfe, "nfe_grad": c.nfe_grad, "decodes": c.decodes, "decodes_grad": c.decodes_grad,
            "reward_calls": self.reward.calls, "samples": c.samples,
            "wall_time_s": round(self.wall_time(), 2),
            "param_checksums": checksums,
            "ranks_in_sync": len(set(checksums)) == 1,
            # last training batch: each rank's own mean reward, and the value logged (reduced over ranks)
            "last_train_reward_per_rank": rank_rewards,
            "last_train_reward_reduced": float(reduced) if reduced is not None else None,
            "history": self.history + [{"samples": c.samples * world, "reward": reward_after}],
        }
        if adapter is not None:
            summary["adapter"] = str(adapter)
        self.print(f"[rewardopt] held-out reward: before {self.reward_before:.4f} -> after {reward_after:.4f} "
                   f"({summary['steps']} steps, {c.samples} samples, NFE {c.nfe}, {summary['wall_time_s']} s)")
        return self.write_summary(summary)
