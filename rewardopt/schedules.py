"""Learning-rate schedules shared by the pretraining modules."""

from __future__ import annotations

import torch


def warmup_decay(opt: torch.optim.Optimizer, warmup_steps: int = 0, total_steps: int = 0):
    """Linear warm-up over ``warmup_steps``, then (if ``total_steps``) linear decay to 5% at
    ``total_steps``; a Lightning scheduler config stepping every optimiser step, or None when both
    are off (constant learning rate)."""
    if not warmup_steps and not total_steps:
        return None

    def factor(step: int) -> float:
        warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0
        return warm * (max(0.05, 1 - step / total_steps) if total_steps else 1.0)

    return {"scheduler": torch.optim.lr_scheduler.LambdaLR(opt, factor), "interval": "step"}
