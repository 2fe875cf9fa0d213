"""Callbacks that save what people would rather look at than read: sample grids at fixed seeds
(before / during / after fine-tuning) and reward curves.

They work with any ``RewardFineTuning``. Grids need a ``Renderable`` generator (one whose decoded samples
have a picture: images, molecules); for the others (speech, DNA) ``SampleGrid`` writes the before/after
samples themselves through ``generator.write_samples`` (WAVs, text).
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import torch

from rewardopt.generators.capabilities import Renderable, VideoSamples


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_image_grid(rows: list[torch.Tensor], path: str | Path, row_labels: list[str] | None = None,
                    col_labels: list[str] | None = None, title: str | None = None,
                    cell_labels: list[list[str]] | None = None) -> Path:
    """Save rows of images (each (N, 3, H, W) in [0, 1]) as a labelled PNG grid. ``col_labels`` title
    the first row's columns; ``cell_labels[i][j]`` titles image j of row i (e.g. its reward)."""
    plt = _plt()
    n_rows, n_cols = len(rows), max(len(r) for r in rows)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(1.3 * n_cols + 0.8, 1.4 * n_rows + 0.4), squeeze=False)
    for i, row in enumerate(rows):
        for j in range(n_cols):
            ax = axes[i][j]
            ax.set_xticks([]), ax.set_yticks([])
            if j < len(row):
                ax.imshow(row[j].detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy(), interpolation="nearest")
            if cell_labels and i < len(cell_labels) and j < len(cell_labels[i]):
                ax.set_title(cell_labels[i][j], fontsize=7)
            elif i == 0 and col_labels and j < len(col_labels):
                ax.set_title(col_labels[j], fontsize=7)
        if row_labels:
            axes[i][0].set_ylabel(row_labels[i], fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _labels(prompts: list) -> list[str]:
    """Column titles: the prompt, or nothing for unconditional samples (None conditions)."""
    return ["" if p is None else str(p) for p in prompts]


class SampleGrid(L.Callback):
    """Fixed-seed sample grids: ``grids/step_XXXXXX.png`` every ``every_n_steps`` and
    ``before_after.png`` at the end (top row: the frozen base model, bottom row: fine-tuned, same noise).

    Args:
        prompts: prompts to show (default: the first ``n`` held-out prompts).
        n: number of prompts when ``prompts`` is not given.
        every_n_steps: grid frequency during training (0: only before/after).
        seed: noise seed shared by every grid, so grids are comparable.
    """

    def __init__(self, prompts: list[str] | None = None, n: int = 8, every_n_steps: int = 0, seed: int = 2024) -> None:
        self.prompts, self.n, self.every_n_steps, self.seed = prompts, n, every_n_steps, seed
        self.paths: list[Path] = []

    def _prompts(self, trainer) -> list[str]:
        if self.prompts:
            return list(self.prompts)
        dm = trainer.datamodule
        return list(getattr(dm, "val_prompts", []))[: self.n]

    def _grid(self, trainer, pl_module, name: str) -> None:
        prompts = self._prompts(trainer)
        if not isinstance(pl_module.generator, Renderable):
            return
        images = pl_module.generator.render(pl_module.sample_decoded(prompts, self.seed))
        p = save_image_grid([images], pl_module.output_dir / "grids" / f"{name}.png", col_labels=_labels(prompts),
                            title=f"{type(pl_module).__name__} step {trainer.global_step}")
        self.paths.append(p)

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.is_global_zero and trainer.global_step == 0:
            self._grid(trainer, pl_module, "step_000000")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps and trainer.is_global_zero and step % self.every_n_steps == 0 and step > 0:
            self._grid(trainer, pl_module, f"step_{step:06d}")

    def on_train_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        prompts = self._prompts(trainer)
        g = pl_module.generator
        with g.base_model():
            before = pl_module.sample_decoded(prompts, self.seed)
        after = pl_module.sample_decoded(prompts, self.seed)
        if not isinstance(g, Renderable):  # no picture (speech, DNA): the samples themselves, to listen to or read
            folder = pl_module.output_dir / "before_after"
            g.write_samples(before, folder, "before")
            g.write_samples(after, folder, "after")
            (folder / "conditions.txt").write_text("".join(f"{p}\n" for p in _labels(prompts)))
            pl_module.print(f"[rewardopt] before/after samples: {folder}")
            return
        pictures = [g.render(before), g.render(after)]
        reward = pl_module.reward
        calls = reward.calls  # display only: not charged to the method's compute
        with torch.no_grad():
            rb = reward(before, prompts).total.tolist()
            ra = reward(after, prompts).total.tolist()
        reward.calls = calls
        labels = [f"{p}\n{a:.2f}→{b:.2f}" for p, a, b in zip(_labels(prompts), rb, ra)]
        path = save_image_grid(pictures, pl_module.output_dir / "before_after.png", row_labels=["before", "after"],
                               col_labels=labels, title=f"{type(pl_module).__name__}: {reward.name} (before→after)")
        self.paths.append(path)
        if isinstance(g, VideoSamples):  # and the clips themselves, before | after, playing side by side
            from rewardopt.media import save_side_by_side_gif

            folder = pl_module.output_dir / "before_after"
            for j, (b, a) in enumerate(zip(before, after)):
                self.paths.append(save_side_by_side_gif([b, a], folder / f"{j:02d}.gif", fps=g.fps))
            (folder / "conditions.txt").write_text("".join(f"{j:02d}.gif (before | after): {p}\n"
                                                           for j, p in enumerate(_labels(prompts))))
        pl_module.print(f"[rewardopt] before/after grid: {path}")


class RewardCurve(L.Callback):
    """``reward_curve.png``: training reward per step and held-out reward vs samples generated."""

    def __init__(self) -> None:
        self.train: list[tuple[int, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        v = trainer.callback_metrics.get("train/reward")
        if v is not None:
            self.train.append((pl_module.samples_seen * trainer.world_size, float(v)))

    def state_dict(self):
        return {"train": self.train}

    def load_state_dict(self, state_dict):
        self.train = [tuple(x) for x in state_dict.get("train", [])]

    def on_train_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        plt = _plt()
        fig, ax = plt.subplots(figsize=(5, 3.2))
        if self.train:
            s, r = np.array(self.train).T
            ax.plot(s, r, alpha=0.35, label="train reward (batch)")
            if len(r) >= 5:
                w = max(2, len(r) // 10)
                ax.plot(s[w - 1:], np.convolve(r, np.ones(w) / w, mode="valid"), label=f"train (mean of {w})")
        hist = getattr(pl_module, "history", [])
        if hist:
            ax.plot([h["samples"] for h in hist], [h["reward"] for h in hist], "o-", label="held-out reward")
        ax.set_xlabel("samples generated"), ax.set_ylabel(pl_module.reward.name)
        ax.set_title(type(pl_module).__name__), ax.legend(fontsize=7), fig.tight_layout()
        path = pl_module.output_dir / "reward_curve.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        pl_module.print(f"[rewardopt] reward curve: {path}")
