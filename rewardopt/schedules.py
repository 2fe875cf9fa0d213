"""Learning-rate schedules shared by the network fits (``rewardopt.fitting``) and DRIL."""

from __future__ import annotations

from typing import Any

import torch
from torch.optim.lr_scheduler import ChainedScheduler, LinearLR, LRScheduler, MultiStepLR

FLOOR = 0.05  # the decay ends at 5% of the peak learning rate


def warmup_decay(opt: torch.optim.Optimizer, warmup_steps: int = 0, total_steps: int = 0) -> dict[str, Any] | None:
    """Linear warm-up over ``warmup_steps``, times (if ``total_steps``) a linear decay to 5% at
    ``total_steps``: the learning rate at optimiser step s is the peak times
    ``min(1, (s + 1) / warmup_steps) * max(0.05, 1 - s / total_steps)``. A Lightning scheduler config
    stepping every optimiser step, or None when both are off (constant learning rate).

    Built from torch's schedulers, chained so that their factors multiply: ``LinearLR`` from
    1/warmup_steps to 1 over the warm-up; ``LinearLR`` from 1 to 1 - K/total_steps over the K steps
    before the floor; a ``MultiStepLR`` drop onto the floor at step K + 1."""
    if not warmup_steps and not total_steps:
        return None
    parts: list[LRScheduler] = []
    if warmup_steps > 1:
        parts.append(LinearLR(opt, start_factor=1 / warmup_steps, end_factor=1.0, total_iters=warmup_steps - 1))
    if total_steps:
        last = int(total_steps * (1 - FLOOR))  # K: the last step above the floor (1 - K/T >= 5%)
        while 1 - (last + 1) / total_steps >= FLOOR:
            last += 1
        while last > 0 and 1 - last / total_steps < FLOOR:
            last -= 1
        end = 1 - last / total_steps
        if last > 0:
            parts.append(LinearLR(opt, start_factor=1.0, end_factor=end, total_iters=last))
        parts.append(MultiStepLR(opt, milestones=[last + 1], gamma=FLOOR / end))
    if not parts:  # a one-step warm-up is no warm-up
        parts.append(LinearLR(opt, start_factor=1.0, end_factor=1.0, total_iters=1))
    return {"scheduler": parts[0] if len(parts) == 1 else ChainedScheduler(parts, opt), "interval": "step"}
