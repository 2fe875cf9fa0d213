"""The video domain's INDEPENDENT evaluator: how well clips match their moving-shapes prompts.

``VideoEvaluator`` is never a reward to steer or fine-tune with: benchmarks report it so that a method
which games the motion reward (``domains.video.rewards.MotionReward``) is caught. It is independent of
that reward by construction: a different architecture (a per-frame CNN whose 4x4 feature maps become
one token per frame, with frame-difference tokens, read by a tiny transformer over time, where the
reward is a factorised spatio-temporal CNN), different training data (seed 301, the reward's is 201)
and a different initialisation seed. ``recipes/video/train_evaluator_tiny.yaml`` trains the model
shipped at ``domains/video/assets/evaluator`` (``embedded:video-evaluator``).

``text_alignment(videos, prompts)`` gives per-attribute accuracy against the prompts and ``all`` (all
four attributes right), plus the per-sample correctness. ``EvaluatorAlignment`` exposes it as a
``Reward`` for one use only: ``eval_reward`` in summaries.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from einops import rearrange
from torch import nn

from domains.video.moving_shapes import HEADS
from domains.video.rewards import HeadsFit, check_videos, prompt_specs
from rewardopt.fitting import load_module, save_module
from rewardopt.rewards.base import Reward, RewardOutput

ASSETS = Path(__file__).parent / "assets"
EMBEDDED = {"embedded:video-evaluator": ASSETS / "evaluator"}


class FrameTokenTransformer(nn.Module):
    """Per-frame CNN -> one token per frame, tokens of frame differences -> transformer -> heads.

    Each frame x_f and each difference x_{f+1} - x_f (zero for the last frame) go through a small 2D CNN
    (shared weights, two stride-2 stages to S/4); the flattened S/4 x S/4 maps (positions kept, so where
    a shape is — and where it went — is in the token) are projected to ``dim`` and summed into the
    frame's token, plus a learned frame embedding. A CLS token and a ``layers``-layer pre-norm
    transformer encoder over the F + 1 tokens; linear heads on the CLS output.
    """

    def __init__(self, width: int = 16, dim: int = 64, layers: int = 2, size: int = 16, frames: int = 8) -> None:
        super().__init__()
        self.config = {"width": width, "dim": dim, "layers": layers, "size": size, "frames": frames}
        w, s = width, size // 4

        def cnn() -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(3, w, 3, padding=1), nn.GELU(), nn.Conv2d(w, w, 3, stride=2, padding=1),
                                 nn.GELU(), nn.Conv2d(w, w, 3, stride=2, padding=1), nn.GELU(), nn.Flatten(),
                                 nn.Linear(w * s * s, dim))

        self.frame_cnn, self.diff_cnn = cnn(), cnn()
        self.pos = nn.Parameter(torch.zeros(1, frames + 1, dim))
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        layer = nn.TransformerEncoderLayer(dim, nhead=4, dim_feedforward=2 * dim, dropout=0.0, batch_first=True,
                                           norm_first=True, activation="gelu")
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.heads = nn.ModuleDict({k: nn.Linear(dim, n) for k, n in HEADS.items()})
        nn.init.normal_(self.pos, std=0.02)
        nn.init.normal_(self.cls, std=0.02)

    def forward(self, videos: torch.Tensor) -> dict[str, torch.Tensor]:
        b, f = videos.shape[:2]
        x = videos * 2 - 1
        diff = torch.cat([x[:, 1:] - x[:, :-1], torch.zeros_like(x[:, :1])], dim=1)
        tok = self.frame_cnn(rearrange(x, "b f c h w -> (b f) c h w")) + self.diff_cnn(
            rearrange(diff, "b f c h w -> (b f) c h w"))
        tok = torch.cat([self.cls.expand(b, -1, -1), rearrange(tok, "(b f) d -> b f d", b=b)], dim=1)
        h = self.norm(self.encoder(tok + self.pos[:, : f + 1]))[:, 0]
        return {k: head(h) for k, head in self.heads.items()}

    def save_pretrained(self, path: str | Path) -> None:
        save_module(self, path)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "FrameTokenTransformer":
        return load_module(cls, path, EMBEDDED, "recipes/video/train_evaluator_tiny.yaml")


class VideoEvaluator(nn.Module):
    """The independent evaluator (a frozen ``FrameTokenTransformer``); see the module docstring.

    ``text_alignment(videos, prompts)`` -> ``{"colour", "shape", "count", "direction", "all"}``: accuracies
    (floats) against the prompts, and ``"correct"``: the same keys as (B,) bool tensors per sample.
    """

    def __init__(self, model: str = "embedded:video-evaluator") -> None:
        super().__init__()
        self.model = FrameTokenTransformer.from_pretrained(model).requires_grad_(False)

    @classmethod
    def from_pretrained(cls, path: str | Path = "embedded:video-evaluator") -> "VideoEvaluator":
        return cls(str(path))

    @torch.no_grad()
    def predict(self, videos: torch.Tensor) -> dict[str, torch.Tensor]:
        """The predicted class index per head, (B,) each."""
        cfg = self.model.config
        check_videos(type(self).__name__, videos, cfg["frames"], cfg["size"])
        return {k: z.argmax(-1) for k, z in self.model(videos.float()).items()}

    @torch.no_grad()
    def text_alignment(self, videos: torch.Tensor, prompts: Sequence[str]) -> dict:
        pred = self.predict(videos)
        specs = prompt_specs(type(self).__name__, prompts, len(videos))
        correct = {k: pred[k].cpu() == torch.tensor([s.labels[k] for s in specs]) for k in HEADS}
        correct["all"] = torch.stack([correct[k] for k in HEADS]).all(0)
        return {**{k: float(v.float().mean()) for k, v in correct.items()}, "correct": correct}


class EvaluatorAlignment(Reward):
    """The independent evaluator as a Reward, FOR EVALUATION ONLY (``eval_reward`` of a summary).

    NEVER steer, select or fine-tune with it: it is the held-out judge of the video domain, and a method
    optimised against it would be graded by its own target. It is not differentiable and methods that
    need gradients refuse it. ``total``: 1 where all four attributes match the prompt, else 0 (its mean is
    ``text_alignment``'s ``all``); terms ``correct_<head>`` (0/1) per attribute.
    """

    differentiable = False

    def __init__(self, model: str = "embedded:video-evaluator", name: str | None = None) -> None:
        super().__init__(name or "evaluator_alignment")
        self.evaluator = VideoEvaluator(model)

    def score(self, samples, cond):
        res = self.evaluator.text_alignment(samples, cond)
        dev = samples.device
        terms = {f"correct_{k}": v.float().to(dev) for k, v in res["correct"].items() if k != "all"}
        return RewardOutput(res["correct"]["all"].float().to(dev), terms)


class VideoEvaluatorTraining(HeadsFit):
    """Trains the evaluator's ``FrameTokenTransformer`` on procedural clips (its own data seed, 301 in
    the recipe); exports config.json, model.safetensors and ``evaluator_fit.json`` to ``output_dir``.

    Args:
        width, dim, layers: the model's (``FrameTokenTransformer``). noise_std: max std of the pixel-noise
        augmentation. seed: initialisation seed (the motion classifier's recipe uses another).
    """

    fit_name = "evaluator"

    def __init__(self, output_dir: str | None = None, width: int = 16, dim: int = 64, layers: int = 2,
                 size: int = 16, frames: int = 8, lr: float = 1e-3, weight_decay: float = 0.01,
                 noise_std: float = 0.05, seed: int = 1, warmup_steps: int = 50, decay: bool = True) -> None:
        super().__init__(lr, weight_decay, warmup_steps, decay, output_dir=output_dir)
        self.save_hyperparameters()
        torch.manual_seed(seed)
        self.network = FrameTokenTransformer(width, dim, layers, size, frames)

