"""Value functions V(x_t, level, cond) ≈ E[r(x_0) | x_t] — one reusable component: SVDD-MC steers
with one now; VARD and DSearch look-aheads can reuse it.

``ValueRegression`` (``rewardopt fit``) trains a value network by regression on rollouts of the
frozen generator: sample trajectories, score the final samples, and regress V(x at a random level)
onto the final reward (the Monte-Carlo target SVDD-MC uses). The weights go to
``<output_dir>/value.pt``; a ``ValueFunction`` built with ``checkpoint=<that file>`` loads them.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from rewardopt.fitting import NetworkFit
from rewardopt.generators.base import Condition, Generator
from rewardopt.rewards.base import Reward
from rewardopt.run import derived_seed


class ValueFunction(nn.Module):
    """V(x, level, cond) -> (B,). ``level`` is how many sampling steps x has taken (0: x_T, T: x_0)."""

    def __init__(self, num_steps: int, checkpoint: str | None = None) -> None:
        super().__init__()
        self.num_steps = num_steps
        self._checkpoint = checkpoint
        # targets are standardised for training; the network's output is mapped back with these
        self.register_buffer("target_mean", torch.zeros(()))
        self.register_buffer("target_std", torch.ones(()))

    def load_checkpoint(self) -> None:
        if self._checkpoint is None:
            return
        path = Path(self._checkpoint)
        if not path.is_file():
            raise FileNotFoundError(f"value checkpoint {path} does not exist; train one with a ValueRegression recipe "
                                    "(rewardopt fit --config recipes/images/svdd_mc_value_fit_tiny.yaml)")
        self.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))

    def level_embedding(self, level: int | torch.Tensor, n: int, dim: int, device) -> torch.Tensor:
        """Sinusoidal features of level / num_steps, (n, dim)."""
        s = torch.as_tensor(level, dtype=torch.float32, device=device).expand(n) / self.num_steps
        freqs = torch.exp(torch.arange(dim // 2, device=device) * (-math.log(100.0) / max(dim // 2 - 1, 1)))
        ang = s[:, None] * freqs[None] * math.pi
        return torch.cat([ang.sin(), ang.cos()], dim=1)


class ConvValue(ValueFunction):
    """A small CNN for (B, C, H, W) states with level conditioning (FiLM) and, optionally, the mean
    of a condition tensor (``cond_key``, e.g. "encoder_hidden_states") projected into the same space.

    Args:
        in_channels: state channels (3 for pixels, 4 for SD latents).
        num_steps: the sampler's T (levels are normalised by it).
        width: channels of the conv stack.
        cond_key / cond_dim: condition tensor to use and its last dimension (None: unconditional).
        checkpoint: ``value.pt`` written by ``ValueRegression``.
    """

    def __init__(self, in_channels: int, num_steps: int, width: int = 32, cond_key: str | None = None,
                 cond_dim: int | None = None, checkpoint: str | None = None) -> None:
        super().__init__(num_steps, checkpoint)
        self.width, self.cond_key = width, cond_key
        self.convs = nn.ModuleList([nn.Conv2d(in_channels, width, 3, padding=1),
                                    nn.Conv2d(width, width, 3, stride=2, padding=1),
                                    nn.Conv2d(width, width, 3, stride=2, padding=1)])
        self.film = nn.Linear(32, 2 * width)
        self.cond_proj = nn.Linear(cond_dim, 2 * width) if cond_key is not None and cond_dim else None
        self.head = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, 1))
        self.load_checkpoint()

    def forward(self, x: torch.Tensor, level: int | torch.Tensor, cond: Condition | None = None) -> torch.Tensor:
        if x.ndim != 4:
            raise ValueError(f"ConvValue expects (B, C, H, W) states, got {tuple(x.shape)}")
        film = self.film(self.level_embedding(level, x.shape[0], 32, x.device))
        if self.cond_proj is not None:
            if cond is None or self.cond_key not in cond.tensors:
                raise ValueError(f"ConvValue was built with cond_key={self.cond_key!r}; the condition does not have it")
            film = film + self.cond_proj(cond.tensors[self.cond_key].float().mean(1))
        scale, shift = film.chunk(2, dim=1)
        h = x.float()
        for conv in self.convs:
            h = F.silu(conv(h))
        h = h * (1 + scale[:, :, None, None]) + shift[:, :, None, None]
        return self.head(h.mean((2, 3))).squeeze(1) * self.target_std + self.target_mean


class ValueRegression(NetworkFit):
    """Fit a value network on Monte-Carlo rollouts of the frozen generator (SVDD-MC's value).

    Each training step draws ``batch`` trajectories, scores their final samples with ``reward``, and
    regresses V at ``levels_per_rollout`` random levels of each trajectory onto that reward (MSE in
    standardised units: the first batch's reward mean and std become the value's output scale).

    Args:
        generator: the frozen generator whose rollouts define the value.
        reward: the reward to predict.
        value: the ``ValueFunction`` to train.
        levels_per_rollout: states per trajectory used as training inputs.
        lr, weight_decay: AdamW.
        seed: rollout noise seed (with the step, so resumes are exact).
        output_dir: where value.pt and value_fit.json (first and last MSE) go (default: the trainer's
            log folder, ``default_root_dir`` without a logger).
    """

    fit_name = "value"

    def __init__(self, generator: Generator, reward: Reward, value: ValueFunction, levels_per_rollout: int = 4,
                 lr: float = 1e-3, weight_decay: float = 0.01, seed: int = 0, output_dir: str | None = None) -> None:
        super().__init__(lr, weight_decay, output_dir=output_dir)
        self.generator, self.reward, self.value = generator.requires_grad_(False), reward, value
        self.levels_per_rollout, self.seed = levels_per_rollout, seed
        self.losses: list[float] = []
        self._scaled = False

    def fit_parameters(self):
        return self.value.parameters()

    def training_step(self, batch: list, batch_idx: int) -> torch.Tensor:
        g = self.generator
        rng = torch.Generator().manual_seed(derived_seed(self.seed, self.global_step))
        with torch.no_grad():
            cond = g.encode_condition(list(batch))
            x0, traj = g.sample(cond, generator=rng, return_trajectory=True)
            r = self.reward(g.decode(x0), cond.raw).total.float()
            if self.global_step == 0 and batch_idx == 0 and not self._scaled:
                self.value.target_mean.fill_(r.mean())
                self.value.target_std.fill_(r.std().clamp(min=1e-6) if len(r) > 1 else 1.0)
                self._scaled = True
        T, B = g.num_steps, len(batch)
        levels = torch.randint(0, T + 1, (self.levels_per_rollout, B), generator=rng)
        loss = 0.0
        for row in levels:
            for lvl in row.unique().tolist():
                idx = (row == lvl).nonzero().flatten()
                pred = self.value(traj[lvl][idx], lvl, cond.index(idx))
                std = self.value.target_std
                loss = loss + F.mse_loss(pred / std, r[idx] / std, reduction="sum")
        loss = loss / levels.numel()
        self.log("train/value_mse", loss, prog_bar=True, batch_size=B)
        self.log("train/reward", r.mean(), batch_size=B)
        self.losses.append(float(loss.detach()))
        return loss

    def fit_report(self) -> dict[str, float]:
        """The mean training MSE over the first and the last tenth of the steps."""
        if not self.losses:
            return {}
        k = max(1, len(self.losses) // 10)
        first, last = self.losses[:k], self.losses[-k:]
        return {"mse_first": sum(first) / len(first), "mse_last": sum(last) / len(last)}

    def save_weights(self, folder: Path) -> Path:
        torch.save(self.value.state_dict(), folder / "value.pt")
        return folder / "value.pt"
