"""Video rewards. Samples are (B, F, 3, H, W) tensors in [0, 1]; ``cond`` is the list of prompts.

Differentiable, no download:
    ``MotionReward`` — sum over heads of log p(head = the prompt's value) under the frozen
    ``MotionClassifier`` (a factorised spatio-temporal CNN, ``embedded:motion-classifier``): the
    fine-tuning reward of the video domain (DRaFT-K, AlignProp). Default head: direction.
    ``TemporalConsistencyReward`` — minus the mean absolute difference between consecutive frames.
    ``KeyFrameImageReward`` — any image reward summed over the 4 key frames (Free²Guide's way of
    scoring videos with ImageReward / CLIP); differentiable iff the image reward is.

The independent evaluator (never a reward to steer with) is ``domains.video.evaluator.VideoEvaluator``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from domains.images.shapes import ShapeSpec
from domains.video.moving_shapes import HEADS, MotionSpec
from rewardopt.fitting import NetworkFit, load_module, save_module
from rewardopt.media import key_frames
from rewardopt.rewards.base import Reward, RewardOutput

ASSETS = Path(__file__).parent / "assets"
EMBEDDED = {"embedded:motion-classifier": ASSETS / "motion_classifier"}


def check_videos(name: str, videos: torch.Tensor, frames: int | None = None, size: int | None = None) -> None:
    """Clear errors for the wrong kind of input: rank, channels, frame count, frame size."""
    if not isinstance(videos, torch.Tensor) or videos.ndim != 5 or videos.shape[2] != 3:
        shape = tuple(videos.shape) if isinstance(videos, torch.Tensor) else type(videos).__name__
        hint = " (that is an image batch: use an image reward, or KeyFrameImageReward around it)" if (
            isinstance(videos, torch.Tensor) and videos.ndim == 4) else ""
        raise ValueError(f"{name} expects videos shaped (B, F, 3, H, W) in [0, 1]; got {shape}{hint}")
    if frames is not None and videos.shape[1] != frames:
        raise ValueError(f"{name} was trained on {frames}-frame clips; got {videos.shape[1]} frames. Set the "
                         f"generator's num_frames to {frames}")
    if size is not None and tuple(videos.shape[-2:]) != (size, size):
        raise ValueError(f"{name} was trained on {size}x{size} frames; got {videos.shape[-2]}x{videos.shape[-1]}. "
                         f"Set the generator's height/width to {size}")


def prompt_specs(name: str, cond: Sequence[str] | None, n: int) -> list[MotionSpec]:
    """The moving-shapes attributes of each prompt; errors name the reward and the prompt."""
    if cond is None:
        raise ValueError(f"{name} reads its targets from the prompts; pass one moving-shapes prompt per video")
    if len(cond) != n:
        raise ValueError(f"{name}: {len(cond)} prompts for {n} videos")
    specs = []
    for p in cond:
        try:
            specs.append(MotionSpec.from_prompt(str(p)))
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
    return specs


# ------------------------------------------------------------------------------- the classifier
class FactorisedBlock(nn.Module):
    """A (2+1)D block: a 3x3 spatial conv on every frame, then a temporal conv (kernel 3) across frames
    at every position, each followed by SiLU, with a residual connection around the pair (the
    factorisation of R(2+1)D, Tran et al., CVPR 2018, "A Closer Look at Spatiotemporal Convolutions")."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.spatial = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.temporal = nn.Conv1d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, frames: int) -> torch.Tensor:  # x: ((b f), c, h, w)
        h = F.silu(self.spatial(x))
        hw = h.shape[-2:]
        t = rearrange(h, "(b f) c h w -> (b h w) c f", f=frames)
        t = F.silu(self.temporal(t))
        h = rearrange(t, "(b h w) c f -> (b f) c h w", h=hw[0], w=hw[1])
        return h + self.skip(x)


class MotionClassifier(nn.Module):
    """Reads colour, shape, count and direction from a moving-shapes clip (B, F, 3, S, S) in [0, 1].

    A factorised spatio-temporal CNN: a stem conv per frame, three (2+1)D blocks (``FactorisedBlock``)
    at S, S/2 and S/4 with average pooling between them, then a mean over frames and positions and one
    linear head per attribute (sizes ``moving_shapes.HEADS``). The temporal convs act before any
    spatial pooling, so displacement between neighbouring frames (the direction) is visible to them.
    """

    def __init__(self, width: int = 24, size: int = 16, frames: int = 8) -> None:
        super().__init__()
        self.config = {"width": width, "size": size, "frames": frames}
        w = width
        self.stem = nn.Conv2d(3, w, 3, padding=1)
        self.blocks = nn.ModuleList([FactorisedBlock(w, w), FactorisedBlock(w, 2 * w), FactorisedBlock(2 * w, 2 * w)])
        self.heads = nn.ModuleDict({k: nn.Linear(2 * w, n) for k, n in HEADS.items()})

    def forward(self, videos: torch.Tensor) -> dict[str, torch.Tensor]:
        b, f = videos.shape[:2]
        x = F.silu(self.stem(rearrange(videos * 2 - 1, "b f c h w -> (b f) c h w")))
        for i, block in enumerate(self.blocks):
            if i:
                x = F.avg_pool2d(x, 2)
            x = block(x, f)
        h = rearrange(x, "(b f) c h w -> b c (f h w)", b=b).mean(-1)
        return {k: head(h) for k, head in self.heads.items()}

    def save_pretrained(self, path: str | Path) -> None:
        save_module(self, path)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "MotionClassifier":
        return load_module(cls, path, EMBEDDED, "recipes/video/train_motion_classifier_tiny.yaml")


def augment(videos: torch.Tensor, noise_std: float) -> torch.Tensor:
    """Light Gaussian pixel noise, its std drawn uniformly in [0, noise_std] per clip (the image
    classifier's augmentation), so generated clips' small artefacts do not throw the model."""
    if noise_std <= 0:
        return videos
    std = noise_std * torch.rand(videos.shape[0], *[1] * (videos.ndim - 1), device=videos.device)
    return (videos + std * torch.randn_like(videos)).clamp(0, 1)


class HeadsFit(NetworkFit):
    """Shared by the motion classifier's and the evaluator's training: cross-entropy summed over the
    four heads, light noise augmentation, per-head and all-correct accuracies logged."""

    network: nn.Module

    def _step(self, batch, stage: str):
        x = batch["video"]
        if stage == "train":
            x = augment(x, self.hparams.noise_std)
        logits = self.network(x)
        loss = sum(F.cross_entropy(z, batch[k]) for k, z in logits.items())
        self.log(f"{stage}/loss", loss, prog_bar=True, batch_size=x.shape[0])
        correct = torch.stack([logits[k].argmax(-1) == batch[k] for k in logits])
        for k, c in zip(logits, correct):
            self.log(f"{stage}/acc_{k}", c.float().mean(), batch_size=x.shape[0])
        self.log(f"{stage}/acc_all", correct.all(0).float().mean(), batch_size=x.shape[0])
        return loss

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def fit_parameters(self):
        return self.network.parameters()

    def save_weights(self, folder: Path) -> Path:
        self.network.save_pretrained(folder)
        return folder


class MotionClassifierTraining(HeadsFit):
    """Trains ``MotionClassifier`` (the motion reward's model) on procedural moving-shapes clips;
    exports config.json, model.safetensors and ``motion_classifier_fit.json`` (last held-out
    accuracies) to ``output_dir``. ``recipes/video/train_motion_classifier_tiny.yaml`` ships it.

    Args:
        width: channels of the first blocks (the last two have 2x). size, frames: the clips'.
        noise_std: max std of the Gaussian pixel-noise augmentation.
        seed: initialisation seed of the network.
    """

    fit_name = "motion_classifier"

    def __init__(self, output_dir: str | None = None, width: int = 24, size: int = 16, frames: int = 8,
                 lr: float = 2e-3, weight_decay: float = 0.01, noise_std: float = 0.05, seed: int = 0,
                 warmup_steps: int = 0, decay: bool = False) -> None:
        super().__init__(lr, weight_decay, warmup_steps, decay, output_dir=output_dir)
        self.save_hyperparameters()
        torch.manual_seed(seed)
        self.network = MotionClassifier(width, size, frames)


# ------------------------------------------------------------------------------- rewards
class MotionReward(Reward):
    """``sum_{h in heads} log p_h(label_h(prompt) | video)`` under the frozen ``MotionClassifier``
    (differentiable). The video domain's fine-tuning reward for DRaFT-K / AlignProp.

    Args:
        heads: which attributes to reward: any of colour, shape, count, direction (default
            ["direction"]: the motion the prompt asks for); "all" for the four.
        classifier: folder of a trained ``MotionClassifier`` or ``embedded:motion-classifier``.
    Terms: one per head, ``log_p_<head>``.
    """

    differentiable = True

    def __init__(self, heads: Sequence[str] | str = ("direction",), classifier: str = "embedded:motion-classifier",
                 name: str | None = None) -> None:
        heads = list(HEADS) if heads == "all" else [heads] if isinstance(heads, str) else list(heads)
        unknown = [h for h in heads if h not in HEADS]
        if not heads or unknown:
            raise ValueError(f"heads must be a non-empty subset of {list(HEADS)} (or 'all'); got {heads}")
        super().__init__(name or "motion_" + "_".join(heads))
        self.heads = heads
        self.classifier = MotionClassifier.from_pretrained(classifier).requires_grad_(False)

    def score(self, samples, cond):
        cfg = self.classifier.config
        check_videos(self.name, samples, cfg["frames"], cfg["size"])
        specs = prompt_specs(self.name, cond, len(samples))
        logits = self.classifier(samples)
        terms = {}
        for h in self.heads:
            idx = torch.tensor([s.labels[h] for s in specs], device=samples.device)
            terms[f"log_p_{h}"] = logits[h].log_softmax(-1).gather(1, idx[:, None]).squeeze(1)
        return RewardOutput(torch.stack(list(terms.values())).sum(0), terms)


class TemporalConsistencyReward(Reward):
    """``r(x) = -1/((F-1)·C·H·W) · Σ_{f=1}^{F-1} Σ_{c,h,w} |x_{f+1} - x_f|`` (differentiable): minus the
    mean absolute difference between consecutive frames.

    The flow-free form of the common temporal-smoothness terms: temporal total variation, the short-term
    temporal loss of video consistency models without warping (Lai et al., ECCV 2018, "Learning Blind
    Video Temporal Consistency"), and VBench's "temporal flickering" score, which is built from the mean
    absolute difference between frames (Huang et al., CVPR 2024). It is 0 for a static clip and lowest
    for flicker, so alone it rewards freezing the video: pair it with ``MotionReward`` (a small weight).
    Terms: ``mean_abs_frame_diff`` (the positive difference) and the total.
    """

    differentiable = True

    def __init__(self, name: str | None = None) -> None:
        super().__init__(name or "temporal_consistency")

    def score(self, samples, cond):
        check_videos(self.name, samples)
        if samples.shape[1] < 2:
            raise ValueError(f"{self.name} needs at least 2 frames; got {samples.shape[1]}")
        diff = (samples[:, 1:] - samples[:, :-1]).abs().mean(dim=(1, 2, 3, 4))
        return RewardOutput(-diff, {"mean_abs_frame_diff": diff.detach(), self.name: -diff})


def image_prompt(prompt: str) -> str:
    """A moving-shapes prompt as the image domain's shapes prompt: the motion dropped, the count as a
    number word: "two red circles moving left" -> "two red circles", "a red circle moving left" ->
    "one red circle". ValueError on other text."""
    s = MotionSpec.from_prompt(prompt)
    return ShapeSpec(s.colour, s.shape, s.count).prompt


def _resolve_transform(transform: Callable[[str], str] | str | None) -> Callable[[str], str] | None:
    if transform is None or callable(transform):
        return transform
    if transform == "image_prompt":
        return image_prompt
    module, _, attr = str(transform).rpartition(".")
    if not module:
        raise ValueError(f"prompt_transform {transform!r}: give a callable or a dotted path like "
                         "'domains.video.rewards.image_prompt'")
    return getattr(importlib.import_module(module), attr)


class KeyFrameImageReward(Reward):
    """``r(video, prompt) = Σ_{i in key frames} r_image(frame_i, T(prompt))``: an image reward summed
    over the ``k`` key frames (``rewardopt.media.key_frames``: evenly spaced, first to last) — how
    Free²Guide (Kim et al., 2024) scores videos with ImageReward / CLIP, summing the image score over
    key frames. Differentiable iff the image reward is.

    Args:
        reward: any image reward (samples (B, 3, H, W) in [0, 1]).
        k: number of key frames (4, Free²Guide's).
        resize: frame size the image reward expects (bilinear, differentiable; e.g. 24 for the image
            domain's ``ShapeAttributeReward``); None keeps the frames' size.
        prompt_transform: maps each video prompt to the image reward's prompt (a callable, a dotted path,
            or "image_prompt" for ``image_prompt``: "a red circle moving left" -> "one red circle");
            None passes prompts unchanged.
    Terms: ``frame_<i>`` (the image reward on key frame i). A video any of whose key frames the image
    reward excludes is excluded (total -inf).

    Measured (2048 key frames of 512 procedural clips, seed 999): the image domain's shipped 24-px
    classifier (``embedded:shape-classifier``, behind ``ShapeAttributeReward``) on 16-px frames resized
    to 24 (bilinear) reads colour 0.99 and count 0.98 but shape only 0.65: 86% of squares read as circles
    (bicubic: shape 0.76, nearest: 0.81; the same classifier on its own 24-px renders: 0.96, on its own
    domain's 16-px renders resized bilinearly: 0.86). So key-frame colour/count rewards from it are
    usable on the tiny video model, its shape reward is not; the video domain's own ``MotionReward``
    reads all four attributes.
    """

    def __init__(self, reward: Reward, k: int = 4, resize: int | None = None,
                 prompt_transform: Callable[[str], str] | str | None = None, name: str | None = None) -> None:
        if not isinstance(reward, Reward):
            raise TypeError(f"KeyFrameImageReward wraps a Reward; got {type(reward).__name__}")
        if k < 1 or (resize is not None and resize < 1):
            raise ValueError(f"need k >= 1 and resize >= 1 (or None); got k={k}, resize={resize}")
        super().__init__(name or f"keyframes_{reward.name}")
        self.reward, self.k, self.resize = reward, k, resize
        self.prompt_transform = _resolve_transform(prompt_transform)
        self.differentiable = reward.differentiable
        self.batch_relative = getattr(reward, "batch_relative", False)

    def score(self, samples, cond):
        check_videos(self.name, samples)
        b = samples.shape[0]
        idx = key_frames(samples.shape[1], self.k)
        frames = rearrange(samples[:, idx], "b k c h w -> (b k) c h w")
        if self.resize is not None and tuple(frames.shape[-2:]) != (self.resize, self.resize):
            frames = F.interpolate(frames, size=(self.resize, self.resize), mode="bilinear", align_corners=False)
        prompts = None
        if cond is not None:
            if len(cond) != b:
                raise ValueError(f"{self.name}: {len(cond)} prompts for {b} videos")
            t = self.prompt_transform or (lambda p: p)
            prompts = [t(p) for p in cond for _ in idx]
        out = self.reward(frames, prompts)
        per_frame = rearrange(out.total, "(b k) -> b k", b=b)
        terms = {f"frame_{i}": per_frame[:, j] for j, i in enumerate(idx)}
        if out.excluded is None:
            return RewardOutput(per_frame.sum(1), terms)
        excluded = rearrange(out.excluded, "(b k) -> b k", b=b).any(1)
        total = torch.where(excluded, torch.full_like(per_frame[:, 0], float("-inf")),
                            torch.where(excluded[:, None], torch.zeros_like(per_frame), per_frame).sum(1))
        return RewardOutput(total, terms, excluded=excluded)

    def differentiable_part(self) -> Reward | None:
        return self if self.differentiable else None
