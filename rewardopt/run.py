"""The run plumbing every LightningModule here shares: where outputs go, per-rank random streams,
gathering Python objects across ranks, and writing the run summary.

``RunMixin`` is mixed into every module that writes outputs (fine-tuning methods, steering methods,
network fits, DRIL); the free functions serve code that has no module (data samplers, benchmarks).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

#: the multiplier that separates the seeds of independent streams (a prime above any index we use)
SEED_STRIDE = 1_000_003


def derived_seed(seed: int, index: int = 0, rank: int = 0, world_size: int = 1) -> int:
    """The seed of stream ``index`` (a micro-batch, a predict batch, an epoch) on ``rank``: distinct for
    every (index, rank) of one ``seed``, and the same on a resumed run as on an uninterrupted one."""
    return seed * SEED_STRIDE + index * world_size + rank


def seeded_generator(seed: int, index: int = 0, rank: int = 0, world_size: int = 1) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with ``derived_seed(seed, index, rank, world_size)``."""
    return torch.Generator().manual_seed(derived_seed(seed, index, rank, world_size))


def gather_objects(obj: Any, world_size: int) -> list[Any]:
    """``obj`` from every rank, in rank order (``[obj]`` in a single process). Every rank must call it."""
    if world_size <= 1:
        return [obj]
    parts: list[Any] = [None] * world_size
    torch.distributed.all_gather_object(parts, obj)
    return parts


def write_json(path: str | Path, data: Any) -> Path:
    """Write ``data`` as indented JSON (parent folders created); return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))
    return path


class RunMixin:
    """Output folder, rank, per-rank RNG, gather and summary for a ``LightningModule`` (mix it in
    first: ``class M(RunMixin, L.LightningModule)``).

    The output folder — summaries, samples, grids, exported weights — is, in order: the module's
    ``output_dir`` argument (stored as ``_output_dir``); the trainer's ``log_dir``, which is the
    logger's folder, or ``default_root_dir`` when there is no logger (``logger: false``, as in every
    steering recipe); ``default_output_dir`` outside a trainer. ``trainer.log_dir`` is a collective
    under DDP (a broadcast, so that every rank agrees on a logger's version folder), so the folder is
    resolved on every rank in ``setup`` and kept: asking for it on rank 0 alone afterwards is safe.
    A subclass that overrides ``setup`` calls ``super().setup(stage)``.
    """

    _output_dir: str | None = None
    _resolved_output_dir: Path | None = None
    default_output_dir: str = "runs/unnamed"

    def setup(self, stage: str) -> None:
        super().setup(stage)  # type: ignore[misc]
        self._resolved_output_dir = None
        self._resolved_output_dir = self.output_dir

    @property
    def output_dir(self) -> Path:
        if self._output_dir:
            return Path(self._output_dir)
        if self._resolved_output_dir is not None:
            return self._resolved_output_dir
        trainer = getattr(self, "_trainer", None)
        if trainer is not None and trainer.log_dir:
            return Path(trainer.log_dir)
        return Path(self.default_output_dir)

    def rank_and_world(self) -> tuple[int, int]:
        """(global rank, world size); (0, 1) outside a trainer."""
        trainer = getattr(self, "_trainer", None)
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def is_global_zero(self) -> bool:
        return self.rank_and_world()[0] == 0

    def rank_generator(self, seed: int, index: int) -> torch.Generator:
        """The random stream of ``index`` on this rank (``seeded_generator``)."""
        rank, world = self.rank_and_world()
        return seeded_generator(seed, index, rank, world)

    def gather(self, obj: Any) -> list[Any]:
        """``obj`` from every rank, in rank order (``gather_objects``). Every rank must call it."""
        return gather_objects(obj, self.rank_and_world()[1])

    def write_summary(self, summary: dict[str, Any], name: str = "summary.json") -> Path:
        """Write ``summary`` into the output folder and print where (call it on rank 0 only)."""
        path = write_json(self.output_dir / name, summary)
        self.print(f"[rewardopt] summary: {path}")  # type: ignore[attr-defined]
        return path
