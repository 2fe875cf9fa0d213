"""Value functions V(x_t, level, cond) ≈ E[r(x_0) | x_t] — one reusable component: SVDD-MC steers
with one, VARD fine-tunes through one (``methods/vard.py``); DSearch look-aheads can reuse it.

``ValueRegression`` (``rewardopt fit``) trains a value network by regression on rollouts of the
frozen generator: sample trajectories, score the final samples, and regress V(x at a random level)
onto the final reward (the Monte-Carlo target SVDD-MC uses). The weights go to
``<output_dir>/value.pt``; a ``ValueFunction`` built with ``checkpoint=<that file>`` loads them.
VARD refits the same loss (``value_mse``) on its own on-policy rollouts while it trains.

Networks: ``ConvValue`` for (B, C, H, W) states (pixels, latents), ``SequenceValue`` for (B, L, V)
one-hot (or relaxed, soft) token sequences of masked diffusion.
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


def value_mse(value: "ValueFunction", states: torch.Tensor, levels: torch.Tensor | int, targets: torch.Tensor,
              cond: Condition | None = None) -> torch.Tensor:
    """The value regression loss: mean squared error in standardised units (both sides divided by the
    value's ``target_std``), one forward over every row. states: (N, ...) at ``levels`` (an int, or (N,)
    ints, each row's level); targets: (N,) final rewards; cond: N rows (or None) -> scalar."""
    std = value.target_std
    return F.mse_loss(value(states, levels, cond) / std, targets.to(std.device).float() / std)


@torch.no_grad()
def calibrate_targets(value: "ValueFunction", rewards: torch.Tensor) -> None:
    """Set the value's output scale from rewards (N,): their mean and std (1 for a single reward)."""
    rewards = rewards.float()
    value.target_mean.fill_(rewards.mean())
    value.target_std.fill_(rewards.std().clamp(min=1e-6) if len(rewards) > 1 else 1.0)


def r2_by_level(predictions: torch.Tensor, targets: torch.Tensor, levels: torch.Tensor) -> dict[int, float]:
    """Calibration: R² = 1 - Σ(r - V)² / Σ(r - r̄)² of predictions against realised rewards, per level
    (levels whose rewards do not vary are left out). All (N,)."""
    out = {}
    for lvl in levels.unique().tolist():
        rows = levels == lvl
        r, v = targets[rows].float(), predictions[rows].float()
        var = ((r - r.mean()) ** 2).sum()
        if rows.sum() > 1 and float(var) > 0:
            out[int(lvl)] = float(1 - ((r - v) ** 2).sum() / var)
    return out


class ValueFunction(nn.Module):
    """V(x, level, cond) -> (B,). ``level`` is how many sampling steps x has taken (0: x_T, T: x_0),
    an int or one per row ((B,) ints). ``num_steps`` (the sampler's T, which levels are normalised by)
    may be left None for a method to bind to its generator's (``bind_steps``)."""

    def __init__(self, num_steps: int | None = None, checkpoint: str | None = None) -> None:
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

    @property
    def has_checkpoint(self) -> bool:
        """Whether the weights (and output scale) were loaded from a ``value.pt``."""
        return self._checkpoint is not None

    def bind_steps(self, num_steps: int, key: str = "value.init_args.num_steps") -> None:
        """Take the paired generator's T when ``num_steps`` is None; a ValueError naming ``key`` when it
        is set to another T (levels would be normalised wrongly)."""
        if self.num_steps is None:
            self.num_steps = int(num_steps)
        elif self.num_steps != num_steps:
            raise ValueError(f"{key}={self.num_steps} but the generator samples {num_steps} steps; set it to "
                             f"{num_steps} (or leave it out: it is then taken from the generator)")

    def level_embedding(self, level: int | torch.Tensor, n: int, dim: int, device) -> torch.Tensor:
        """Sinusoidal features of level / num_steps, (n, dim)."""
        if self.num_steps is None:
            raise ValueError(f"{type(self).__name__}.num_steps is not set: give the sampler's T, or pair the value "
                             "with a method that binds it (VARD)")
        s = torch.as_tensor(level, dtype=torch.float32, device=device).expand(n) / self.num_steps
        freqs = torch.exp(torch.arange(dim // 2, device=device) * (-math.log(100.0) / max(dim // 2 - 1, 1)))
        ang = s[:, None] * freqs[None] * math.pi
        return torch.cat([ang.sin(), ang.cos()], dim=1)


class ConvValue(ValueFunction):
    """A small CNN for (B, C, H, W) states with level conditioning (FiLM) and, optionally, the mean
    of a condition tensor (``cond_key``, e.g. "encoder_hidden_states") projected into the same space.

    Args:
        in_channels: state channels (3 for pixels, 4 for SD latents).
        num_steps: the sampler's T (levels are normalised by it; None: bound by the method, VARD).
        width: channels of the conv stack.
        cond_key / cond_dim: condition tensor to use and its last dimension (None: unconditional).
        checkpoint: ``value.pt`` written by ``ValueRegression``.
    """

    def __init__(self, in_channels: int, num_steps: int | None = None, width: int = 32, cond_key: str | None = None,
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


class SequenceValue(ValueFunction):
    """A small 1-D CNN for (B, L, V) one-hot or soft token sequences (masked diffusion states, [MASK]
    included in V) with level conditioning (FiLM): linear token embedding, residual convolutions, mean
    and max pooling, an MLP head. Unconditional (masked-diffusion conditions carry no tensors).

    Args:
        vocab_size: V (the generator's vocabulary, [MASK] included).
        num_steps: the sampler's T (None: bound by the method, VARD).
        width: channels. checkpoint: ``value.pt`` written by ``ValueRegression``.
    """

    def __init__(self, vocab_size: int, num_steps: int | None = None, width: int = 64,
                 checkpoint: str | None = None) -> None:
        super().__init__(num_steps, checkpoint)
        self.vocab_size = vocab_size
        self.embed = nn.Linear(vocab_size, width, bias=False)
        self.convs = nn.ModuleList([nn.Conv1d(width, width, 5, padding=2) for _ in range(3)])
        self.film = nn.Linear(32, 2 * width)
        self.head = nn.Sequential(nn.Linear(2 * width, width), nn.SiLU(), nn.Linear(width, 1))
        self.load_checkpoint()

    def forward(self, x: torch.Tensor, level: int | torch.Tensor, cond: Condition | None = None) -> torch.Tensor:
        if x.ndim != 3 or x.shape[-1] != self.vocab_size:
            raise ValueError(f"SequenceValue expects one-hot sequences (B, L, {self.vocab_size}), got {tuple(x.shape)}")
        scale, shift = self.film(self.level_embedding(level, x.shape[0], 32, x.device)).chunk(2, dim=1)
        h = self.embed(x.float()).transpose(1, 2)  # (B, width, L)
        for conv in self.convs:
            h = h + F.silu(conv(h))
        h = h * (1 + scale[:, :, None]) + shift[:, :, None]
        return self.head(torch.cat([h.mean(-1), h.amax(-1)], dim=1)).squeeze(1) * self.target_std + self.target_mean


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
                calibrate_targets(self.value, r)
                self._scaled = True
        T, B = g.num_steps, len(batch)
        levels = torch.randint(0, T + 1, (self.levels_per_rollout, B), generator=rng).flatten()  # row-major (K, B)
        rows = torch.arange(B).repeat(self.levels_per_rollout)
        states = torch.stack([traj[lvl][b] for lvl, b in zip(levels.tolist(), rows.tolist())])
        loss = value_mse(self.value, states, levels, r[rows], cond.index(rows))
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
