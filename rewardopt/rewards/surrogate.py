"""Differentiable surrogates of black-box oracles for discrete sequences (DRAKES needs a reward
it can backprop into): a small 1-D CNN on one-hot sequences (B, L, V), regressed onto oracle
labels by ``SurrogateFit`` (``rewardopt fit``), saved as ``surrogate.pt``.

The surrogate is only as good as its data: over-optimising it drifts away from the oracle. Report
the oracle (and a separate evaluation oracle) next to the surrogate, as DRAKES does.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from rewardopt.fitting import NetworkFit
from rewardopt.rewards.base import Reward


class SequenceSurrogate(Reward):
    """r(x) for one-hot sequences (B, L, V): conv stack -> mean+max pooling -> MLP.

    Args:
        vocab_size, seq_len: the generator's V and L.
        width: channels. checkpoint: ``surrogate.pt`` from ``SurrogateFit`` (None: random weights).
    """

    differentiable = True

    def __init__(self, vocab_size: int, seq_len: int, width: int = 64, checkpoint: str | None = None,
                 name: str | None = None) -> None:
        super().__init__(name or "surrogate")
        self.vocab_size, self.seq_len = vocab_size, seq_len
        self.embed = nn.Linear(vocab_size, width, bias=False)
        self.convs = nn.ModuleList([nn.Conv1d(width, width, 5, padding=2) for _ in range(3)])
        self.head = nn.Sequential(nn.Linear(2 * width, width), nn.SiLU(), nn.Linear(width, 1))
        self.register_buffer("target_mean", torch.zeros(()))
        self.register_buffer("target_std", torch.ones(()))
        if checkpoint is not None:
            path = Path(checkpoint)
            if not path.is_file():
                raise FileNotFoundError(f"surrogate checkpoint {path} does not exist; "
                                        "train one with a SurrogateFit recipe")
            self.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        self.requires_grad_(False)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 3 or x.shape[-1] != self.vocab_size:
            raise ValueError(f"{self.name} expects one-hot sequences (B, L, {self.vocab_size}); got {tuple(x.shape)}")
        h = self.embed(x.float()).transpose(1, 2)
        for conv in self.convs:
            h = h + F.silu(conv(h))
        return torch.cat([h.mean(-1), h.amax(-1)], dim=1)

    def score(self, samples, cond):
        return self.head(self.features(samples)).squeeze(1) * self.target_std + self.target_mean


class SurrogateFit(NetworkFit):
    """Regress a ``SequenceSurrogate`` onto oracle labels. Batches are (token ids (B, L), labels (B,)).
    Targets are standardised with the training set's statistics (stored in the surrogate).
    Writes ``surrogate.pt`` and ``surrogate_fit.json`` (validation MSE and Pearson r) to ``output_dir``
    (default: the trainer's log folder)."""

    fit_name = "surrogate"

    def __init__(self, surrogate: SequenceSurrogate, lr: float = 2e-3, weight_decay: float = 1e-4,
                 output_dir: str | None = None) -> None:
        super().__init__(lr, weight_decay, output_dir=output_dir)
        self.surrogate = surrogate.requires_grad_(True)
        self.val_pred: list[torch.Tensor] = []
        self.val_true: list[torch.Tensor] = []

    def on_fit_start(self) -> None:
        labels = self.trainer.datamodule.train_labels
        self.surrogate.target_mean.fill_(float(labels.mean()))
        self.surrogate.target_std.fill_(float(labels.std().clamp(min=1e-6)))

    def fit_parameters(self):
        return self.surrogate.parameters()

    def _pred(self, ids: torch.Tensor) -> torch.Tensor:
        return self.surrogate(F.one_hot(ids, self.surrogate.vocab_size).float()).total

    def training_step(self, batch, batch_idx):
        ids, y = batch
        std = self.surrogate.target_std
        loss = F.mse_loss(self._pred(ids) / std, y.float() / std)
        self.log("train/mse_std", loss, prog_bar=True, batch_size=len(y))
        return loss

    def validation_step(self, batch, batch_idx):
        ids, y = batch
        self.val_pred.append(self._pred(ids).detach())
        self.val_true.append(y.float())

    def on_validation_epoch_end(self):
        if not self.val_pred:
            return
        p, t = torch.cat(self.val_pred), torch.cat(self.val_true)
        self.val_pred, self.val_true = [], []
        self.last_val = {"mse": float(F.mse_loss(p, t)), "pearson": float(torch.corrcoef(torch.stack([p, t]))[0, 1])}
        self.log("val/pearson", self.last_val["pearson"], prog_bar=True)

    def save_weights(self, folder: Path) -> Path:
        torch.save(self.surrogate.state_dict(), folder / "surrogate.pt")
        return folder / "surrogate.pt"
