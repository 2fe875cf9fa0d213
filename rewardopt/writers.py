"""What a steering run writes, as a Lightning prediction writer (``SteeringOutputWriter``).

An ``InferenceTimeSteering`` method holds its search and its counters only; its ``predict_step``
returns, per batch, the per-sample records and the samples. The method installs this writer itself
(``configure_callbacks``) unless the trainer already has one (configured by the user, with its own
settings), so ``rewardopt predict`` writes, into the method's ``output_dir`` (``RunMixin``):

* ``samples/`` — every sample through ``generator.write_samples`` (PNGs for images, a text file of
  SMILES or DNA, WAVs for speech, else JSON lines), named ``r<rank>_b<batch>``;
* ``rewards.csv`` — a row per sample: batch, chain, condition, rank, reward, then ``eval_excluded``
  (when the evaluation can fail), ``term/<name>`` and ``diversity`` (on a batch's first row);
* ``grid.png`` — up to ``grid_rows`` rows of pictures with their rewards (``Renderable`` generators);
* ``summary.json`` — reward statistics (``reward_stats``), counted compute next to the method's
  ``expected_cost``, exclusions, width, wall time.

Under DDP every rank writes its own samples; records and counts are gathered to rank 0, which
writes the rest. Samples are dropped from each prediction once written, so ``trainer.predict``
returns (and holds) only the records.
"""

from __future__ import annotations

import csv
import math
import time
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from rewardopt.callbacks import save_image_grid
from rewardopt.generators.capabilities import Renderable

#: rewards.csv's leading columns; each group is sorted by name
FIRST_COLUMNS = ("batch", "chain", "condition", "rank", "reward")


def reward_stats(values: torch.Tensor, failed: torch.Tensor | None = None) -> dict[str, float | int | None]:
    """Mean, median and top-10% mean (the SVDD paper's table columns) of per-sample rewards (n,).

    ``failed`` (n,) bool marks evaluations that failed (an excluded sample; its value is ignored).
    They rank below every valid reward in the median and the top-10% mean (over all n samples), so a
    failure can only lower those — a method whose outputs crash the judge more cannot look better —
    and a statistic that lands on a failure is None. The mean is over the valid samples (None if
    none is). ``failed`` / ``failed_frac`` give the count and fraction next to them, so every table
    row shows them."""
    v = values.detach().double().cpu().flatten()
    bad = torch.zeros_like(v, dtype=torch.bool) if failed is None else failed.detach().cpu().flatten().bool()
    n, nf = v.numel(), int(bad.sum())
    ranked = v.masked_fill(bad, float("-inf")).float()
    k = max(1, math.ceil(0.1 * n))
    med, top = float(ranked.median()), float(ranked.topk(k).values.mean())
    fin = lambda x: x if math.isfinite(x) else None  # noqa: E731
    return {"mean": float(v[~bad].float().mean()) if nf < n else None, "median": fin(med), "top10": fin(top),
            "failed": nf, "failed_frac": nf / max(n, 1)}


class SteeringOutputWriter(BasePredictionWriter):
    """Samples, rewards.csv, grid.png and summary.json of an ``InferenceTimeSteering`` predict run.

    Args:
        save_samples: write every sample and the grid (None: the method's ``save_samples``).
        grid_rows: rows of pictures in grid.png (one per condition; unconditional samples six a row).
    """

    def __init__(self, save_samples: bool | None = None, grid_rows: int = 6) -> None:
        super().__init__(write_interval="batch_and_epoch")
        self.save_samples, self.grid_rows = save_samples, grid_rows
        self._grid: list[tuple[str, torch.Tensor, list[float]]] = []  # (row label, pictures, rewards)
        self._tally0: dict[str, int] = {}
        self._t0 = 0.0

    def _saves(self, pl_module: L.LightningModule) -> bool:
        return pl_module.save_samples if self.save_samples is None else self.save_samples

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._grid, self._tally0, self._t0 = [], pl_module.tally(), time.perf_counter()

    def write_on_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, prediction: dict[str, Any],
                           batch_indices: Sequence[int] | None, batch: Any, batch_idx: int,
                           dataloader_idx: int) -> None:
        samples = prediction.pop("samples")  # on disk from here on: predictions keep the records only
        if not self._saves(pl_module):
            return
        stem = f"r{trainer.global_rank}_b{batch_idx:05d}"
        pl_module.generator.write_samples(samples, pl_module.output_dir / "samples", stem)
        if trainer.is_global_zero:
            rewards = [r["reward"] for r in prediction["records"]]
            self._collect_grid(pl_module, prediction["conditions"], samples, rewards)

    def _collect_grid(self, pl_module: L.LightningModule, raw: list[Any], samples: Any, totals: list[float]) -> None:
        """Keep up to ``grid_rows`` rows of pictures (``generator.render``): one row per condition, or
        for unconditional samples rows of up to 6 samples."""
        g = pl_module.generator
        if not isinstance(g, Renderable):
            return
        n = pl_module.num_samples
        if all(r is None for r in raw):
            start = 0
            if self._grid and len(self._grid[-1][1]) < 6:  # top up the last row first
                label, pics, vals = self._grid[-1]
                start = 6 - len(pics)
                self._grid[-1] = (label, torch.cat([pics, g.render(samples[:start]).cpu()]), vals + totals[:start])
            groups = [("", slice(k, min(k + 6, len(totals)))) for k in range(start, len(totals), 6)]
        else:
            groups = [(str(raw[j]), slice(j * n, (j + 1) * n)) for j in range(len(raw))]
        for label, sl in groups[: max(0, self.grid_rows - len(self._grid))]:
            self._grid.append((label, g.render(samples[sl]).cpu(), totals[sl]))

    def write_on_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, predictions: Sequence[Any],
                           batch_indices: Sequence[Any]) -> None:
        if predictions and not isinstance(predictions[0], dict):  # several predict dataloaders
            predictions = [p for loader in predictions for p in loader]
        now = pl_module.tally()
        local = {"records": [r for p in predictions for r in p["records"]], "wall": time.perf_counter() - self._t0,
                 "tally": {k: v - self._tally0.get(k, 0) for k, v in now.items()}}
        parts = pl_module.gather(local)
        if not trainer.is_global_zero:
            return
        records = [r for p in parts for r in p["records"]]
        summary = self.summary(pl_module, records, parts)
        out = pl_module.output_dir
        out.mkdir(parents=True, exist_ok=True)
        keys = sorted({k for r in records for k in r}, key=lambda k: (k not in FIRST_COLUMNS, k))
        with open(out / "rewards.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(records)
        if self._grid:
            save_image_grid([s for _, s, _ in self._grid], out / "grid.png", row_labels=[p for p, _, _ in self._grid],
                            cell_labels=[[f"{v:.2f}" for v in r] for _, _, r in self._grid],
                            title=f"{type(pl_module).__name__} ({pl_module.reward.name}), {pl_module.num_samples} per "
                            f"prompt, {summary['nfe_per_sample']:.0f} NFE/sample")
        st = summary["reward_stats"] or {}
        num = lambda x: float("nan") if x is None else x  # noqa: E731
        failed = f" ({summary['eval_excluded']} evaluations failed, ranked last)" if summary["eval_excluded"] else ""
        pl_module.print(f"[rewardopt] {type(pl_module).__name__}: {summary['samples']} samples, reward median "
                        f"{num(st.get('median')):.4f} top-10% {num(st.get('top10')):.4f}{failed}, NFE/sample "
                        f"{summary['nfe_per_sample']:.1f}, reward calls/sample "
                        f"{summary['reward_calls_per_sample']:.1f}")
        pl_module.write_summary(summary)

    @staticmethod
    def summary(pl_module: L.LightningModule, records: list[dict[str, Any]],
                parts: list[dict[str, Any]]) -> dict[str, Any]:
        """summary.json of a run from every rank's records and counter growth (``parts``, rank order)."""
        m = pl_module
        n = len(records)
        counted = {k: sum(p["tally"][k] for p in parts) for k in parts[0]["tally"]}
        totals = {k: counted.pop(k) for k in m.COUNTS}
        excluded, all_excluded = counted.pop("excluded"), counted.pop("all_excluded")  # the rest: extra_counts()
        values = torch.tensor([r["reward"] for r in records])
        eval_failed = torch.tensor([bool(r.get("eval_excluded", 0)) for r in records], dtype=torch.bool)
        eval_failed |= ~values.isfinite()
        divs = [r["diversity"] for r in records if "diversity" in r]
        return {
            "method": type(m).__name__,
            "reward": (m.eval_reward or m.reward).name,
            "steered_by": m.reward.name,
            "budget": m.budget,
            "width": {m.width_name: getattr(m, m.width_name)} if m.width_name else None,
            "num_steps": m.T,
            "samples": n,
            "reward_stats": reward_stats(values, eval_failed) if n else None,
            # evaluations that failed (excluded by the evaluation reward): ranked last in reward_stats
            "eval_excluded": int(eval_failed.sum()),
            "diversity": sum(divs) / len(divs) if divs else None,
            **totals, **{f"{k}_per_sample": v / max(n, 1) for k, v in totals.items()},
            "expected_cost_per_sample": m.expected_cost(),
            "wall_time_s": round(max(p["wall"] for p in parts), 2),
            "world_size": m.rank_and_world()[1],
            # candidates never selected (black-box failures under on_failure: exclude), and the groups
            # whose candidates all failed (the first was kept)
            "excluded": excluded, "all_excluded": all_excluded,
            **counted,
        }
