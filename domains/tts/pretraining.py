"""``CodecLMPretraining``: teacher-forced maximum likelihood of the codec LM that ships the weights
of its best held-out NLL.

``CausalLMPretraining`` exports the weights of the last step; a codec LM on the 1,800-utterance
corpus overfits (the 2-layer model's held-out NLL was lowest at 1,000 steps and rose after), so
this one keeps a copy of the weights at each new best ``val/nll`` and exports that copy. Lightning's
``EarlyStopping`` on ``val/nll`` (in the recipe) ends the run once it stops improving. Dropout (the
generator's ``dropout``) regularises training only: the exported model has its dropout set to 0,
because fine-tuning runs the LM in ``train()`` mode and sampling must not drop units.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from rewardopt.generators.autoregressive import CausalLMPretraining


class CodecLMPretraining(CausalLMPretraining):
    """``CausalLMPretraining`` exporting the best held-out NLL's weights (see the module docstring).
    ``generator_fit.json`` adds ``best_val_nll`` and ``best_step``; the best copy travels in
    Lightning checkpoints, so a resumed run keeps it. Args: those of ``CausalLMPretraining``."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.best_val: float | None = None
        self.best_step: int | None = None
        self._best_state: dict[str, torch.Tensor] | None = None

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        v = self.last_val.get(self.metric)
        if self.trainer.sanity_checking or v is None:
            return
        if self.best_val is None or v < self.best_val:
            self.best_val, self.best_step = float(v), int(self.global_step)
            self._best_state = {k: t.detach().clone() for k, t in self.network.state_dict().items()}
            self.print(f"[rewardopt] new best {self.metric} {v:.4f}{self.unit} at step {self.global_step}")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["codec_lm_best"] = {"val": self.best_val, "step": self.best_step, "state": self._best_state}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        best = checkpoint.get("codec_lm_best") or {}
        self.best_val, self.best_step, self._best_state = best.get("val"), best.get("step"), best.get("state")

    def on_train_end(self) -> None:
        if self._best_state is not None:
            self.network.load_state_dict(self._best_state)
        for m in self.network.modules():
            if isinstance(m, nn.Dropout):
                m.p = 0.0
        cfg = getattr(self.network, "config", None)
        for key in ("resid_pdrop", "embd_pdrop", "attn_pdrop"):
            if cfg is not None and hasattr(cfg, key):
                setattr(cfg, key, 0.0)
        super().on_train_end()

    def fit_report(self) -> dict[str, Any]:
        return {**super().fit_report(), "best_val_nll": self.best_val, "best_step": self.best_step}
