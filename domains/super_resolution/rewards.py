"""Super-resolution rewards: the Hallucination Score proxies and the HS judge. Higher is better.

Samples are SR outputs (B, 3, H, W) in [0, 1]; ``cond`` is the list of SR conditions, dicts with
``image`` (the LR input, (3, H/4, W/4)), ``prompt``, ``hr`` (the ground truth) and ``label``.

Differentiable proxies (totals are minus a distance; gradients reach the samples):
    ``FeatureDistance``     d_feat(SR, GT): mean over the backend's layers of the mean squared feature
                            difference (needs ``cond["hr"]``).
    ``LRFeatureDistance``   GT-free d_feat(down(SR), LR). Our reading: both are bicubic-upsampled back to
                            the SR size before the features (the feature network reads HR-size images), so
                            it compares what the SR output looks like at the input's resolution with the
                            input — detail the input does not support is invisible to it by design; what it
                            catches is an output that, shrunk back, no longer matches its input.
    ``LPIPSStyleDistance``  LPIPS's form without its learned heads: at each layer, features unit-normalised
                            along channels, squared differences summed over channels and averaged over
                            positions, then the layers averaged with equal weights (no learned linear
                            weights: LPIPS's are trained on human judgements of natural images).
    ``PixelDistance``       minus the pixel MSE to the GT (or, ``reference="lr"``, of down(SR) to the LR);
                            the PSNR is a term.
Feature backends (``FeatureBackend``): ``GlyphFeatures`` (the project's feature network, independent
of the oracle: ``embedded:sr-features``), ``Dinov2Features`` (``transformers.Dinov2Model``) and
``CLIPVisionFeatures`` (``transformers.CLIPVisionModel``), loaded from a folder or hub id, with their
resizing and normalisation done in torch (differentiable).

Black-box: ``HallucinationJudge`` — an MLLM over an OpenAI-compatible endpoint shown the LR input and the
SR output side by side (``domains.super_resolution.judge``), total = -rating (1 = no hallucination ...
9 = severe). Offline, ``python -m domains.super_resolution.judge`` serves a stand-in that reads the panel.
The oracle HS (evaluation only) is ``domains.super_resolution.hallucination.OracleHallucination``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from domains.super_resolution.glyphs import downsample, upsample
from domains.super_resolution.hallucination import GlyphFeatureNet, _frozen_copy
from domains.super_resolution.judge import HALLUCINATION_TEMPLATE, LABELS, panel_png
from rewardopt.rewards.base import Reward, RewardOutput
from rewardopt.rewards.judges import OpenAIJudge

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def check_samples(name: str, samples: Any) -> None:
    if not isinstance(samples, torch.Tensor) or samples.ndim != 4 or samples.shape[1] != 3:
        shape = tuple(samples.shape) if isinstance(samples, torch.Tensor) else type(samples).__name__
        raise ValueError(f"{name} expects SR outputs shaped (B, 3, H, W) in [0, 1]; got {shape}")


def cond_images(name: str, cond: Sequence[Any] | None, key: str, like: torch.Tensor) -> torch.Tensor:
    """``cond[i][key]`` stacked to (B, 3, h, w) on ``like``'s device and dtype; errors name the reward."""
    n = like.shape[0]
    if cond is None or len(cond) != n:
        raise ValueError(f"{name} needs one SR condition per sample (dicts with {key!r}); got "
                         f"{'none' if cond is None else len(cond)} for {n} samples")
    try:
        return torch.stack([torch.as_tensor(c[key]) for c in cond]).to(like.device, like.dtype)
    except (KeyError, TypeError, IndexError):
        raise ValueError(f"{name} reads cond[i][{key!r}] (the SR condition dict); got {str(cond[0])[:80]}") from None


def sr_factor(name: str, sr: torch.Tensor, lr: torch.Tensor) -> int:
    f = sr.shape[-1] // lr.shape[-1]
    if f < 1 or tuple(lr.shape[-2:]) != (sr.shape[-2] // f, sr.shape[-1] // f) or sr.shape[-1] % lr.shape[-1]:
        raise ValueError(f"{name}: SR outputs {tuple(sr.shape[-2:])} are not an integer multiple of the LR inputs "
                         f"{tuple(lr.shape[-2:])}")
    return f


# ------------------------------------------------------------------------------- feature backends
class FeatureBackend(nn.Module):
    """Multi-layer features of images (B, 3, H, W) in [0, 1]: ``features(images)`` -> a list of
    channel-first maps, each (B, C, ...) (conv maps (B, C, h, w), or tokens (B, C, N)); frozen,
    differentiable in the images. Subclasses do their own resizing and normalisation in torch."""

    def __init__(self, layers: Sequence[int] | None = None) -> None:
        super().__init__()
        self.layers = None if layers is None else [int(i) for i in layers]

    def all_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        raise NotImplementedError

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        feats = self.all_features(images)
        if self.layers is None:
            return feats
        try:
            return [feats[i] for i in self.layers]
        except IndexError:
            raise ValueError(f"{type(self).__name__}: layers {self.layers} out of range for its {len(feats)} "
                             "layers") from None

    def train(self, mode: bool = True):  # frozen: always in eval mode (no dropout)
        return super().train(False)


class GlyphFeatures(FeatureBackend):
    """The project's feature network (``GlyphFeatureNet``, trained on OTHER_CHARS: independent of the
    oracle): its three stages' maps. ``path``: a folder or ``embedded:sr-features``."""

    def __init__(self, path: str = "embedded:sr-features", layers: Sequence[int] | None = None) -> None:
        super().__init__(layers)
        net = _frozen_copy(path)
        if not isinstance(net, GlyphFeatureNet):
            raise TypeError(f"{path} holds a {type(net).__name__}; GlyphFeatures needs a GlyphFeatureNet "
                            "(train one with recipes/super_resolution/train_features_tiny.yaml)")
        self.net = net

    def all_features(self, images):
        if tuple(images.shape[-2:]) != (self.net.size, self.net.size):
            images = F.interpolate(images, size=(self.net.size,) * 2, mode="bicubic", align_corners=False,
                                   antialias=True)
        return self.net.features(images)


def _preprocessor(path: str, mean, std, size: int | None):
    """(mean, std, size) from a local folder's ``preprocessor_config.json`` where present, else the defaults."""
    cfg = Path(path) / "preprocessor_config.json"
    if cfg.is_file():
        c = json.loads(cfg.read_text())
        mean, std = c.get("image_mean", mean), c.get("image_std", std)
        if size is None:
            crop = c.get("crop_size")
            size = crop.get("height") if isinstance(crop, dict) else crop
    return tuple(mean), tuple(std), size


class _HFVisionFeatures(FeatureBackend):
    """A ``transformers`` vision encoder's hidden states (after the embeddings: layers 1..L) as
    (B, C, tokens) maps; images resized (bicubic, antialiased) to ``size`` and normalised in torch."""

    model_class = ""
    default_mean: tuple[float, ...] = IMAGENET_MEAN
    default_std: tuple[float, ...] = IMAGENET_STD

    def __init__(self, path: str, layers: Sequence[int] | None = None, size: int | None = None,
                 dtype: str = "float32") -> None:
        import transformers

        super().__init__(layers)
        cls = getattr(transformers, self.model_class)
        self.model = cls.from_pretrained(path, dtype=getattr(torch, dtype)).eval().requires_grad_(False)
        mean, std, size = _preprocessor(path, self.default_mean, self.default_std, size)
        self.size = int(size or self.default_size())
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def default_size(self) -> int:
        return int(self.model.config.image_size)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(images, size=(self.size, self.size), mode="bicubic", align_corners=False, antialias=True)
        return ((x - self.mean) / self.std).to(self.model.dtype)

    def all_features(self, images):
        out = self.model(pixel_values=self.preprocess(images), output_hidden_states=True)
        return [rearrange(h.float(), "b n c -> b c n") for h in out.hidden_states[1:]]


class Dinov2Features(_HFVisionFeatures):
    """DINOv2 (``transformers.Dinov2Model``, e.g. facebook/dinov2-small) hidden states, all tokens (CLS and
    patches). ``size``: the input side (default: the processor's crop, else 224; a multiple of the patch
    size); ImageNet normalisation unless the folder's processor config says otherwise."""

    model_class = "Dinov2Model"

    def default_size(self) -> int:
        return 224


class CLIPVisionFeatures(_HFVisionFeatures):
    """CLIP's vision tower (``transformers.CLIPVisionModel``) hidden states, all tokens; ``size`` defaults to
    the model's ``image_size`` (its position embeddings' grid); CLIP normalisation."""

    model_class = "CLIPVisionModel"
    default_mean, default_std = CLIP_MEAN, CLIP_STD


def make_backend(backend: FeatureBackend | str) -> FeatureBackend:
    return GlyphFeatures(backend) if isinstance(backend, str) else backend


# ------------------------------------------------------------------------------- distances
def feature_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B,): mean squared difference over channels and positions."""
    return (a - b).pow(2).flatten(1).mean(1)


def normalised_distance(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """(B,): LPIPS's per-layer form without the learned weights: unit-normalise along channels, sum the
    squared differences over channels, average over positions."""
    na = a / (a.pow(2).sum(1, keepdim=True) + eps).sqrt()
    nb = b / (b.pow(2).sum(1, keepdim=True) + eps).sqrt()
    return (na - nb).pow(2).sum(1).flatten(1).mean(1)


DISTANCES = {"mse": feature_mse, "lpips": normalised_distance}


def layer_distance(backend: FeatureBackend, x: torch.Tensor, y: torch.Tensor, kind: str) -> torch.Tensor:
    """(B,): the distance ``kind`` per layer, averaged over layers with equal weights."""
    pairs = [f.chunk(2) for f in backend.features(torch.cat([x, y]))]  # one forward for both sides
    return torch.stack([DISTANCES[kind](a.float(), b.float()) for a, b in pairs]).mean(0)


class _FeatureProxy(Reward):
    differentiable = True
    kind = "mse"

    def __init__(self, backend: FeatureBackend | str = "embedded:sr-features", name: str | None = None) -> None:
        super().__init__(name)
        self.backend = make_backend(backend)

    def reference(self, samples: torch.Tensor, cond) -> tuple[torch.Tensor, torch.Tensor]:
        """The pair the features compare."""
        return samples, cond_images(self.name, cond, "hr", samples)

    def score(self, samples, cond):
        check_samples(self.name, samples)
        x, y = self.reference(samples, cond)
        d = layer_distance(self.backend, x, y, self.kind)
        return RewardOutput(-d, {"distance": d})


class FeatureDistance(_FeatureProxy):
    """-d_feat(SR, GT): the mean over the backend's layers of the mean squared feature difference
    (needs ``cond[i]["hr"]``; differentiable). ``backend``: a ``FeatureBackend`` or a feature-network path."""

    kind = "mse"

    def __init__(self, backend: FeatureBackend | str = "embedded:sr-features", name: str | None = None) -> None:
        super().__init__(backend, name or "feature_distance")


class LPIPSStyleDistance(_FeatureProxy):
    """-d_LPIPS-style(SR, GT): per layer, channel-unit-normalised features, squared differences summed over
    channels and averaged over positions; layers averaged with equal weights. No learned linear heads
    (LPIPS's are fitted to human judgements on natural images; we have none for glyphs)."""

    kind = "lpips"

    def __init__(self, backend: FeatureBackend | str = "embedded:sr-features", name: str | None = None) -> None:
        super().__init__(backend, name or "lpips_style_distance")


class LRFeatureDistance(_FeatureProxy):
    """GT-free: -d(up(down(SR)), up(LR)) with ``up`` the bicubic upsampling back to the SR size and
    ``down`` the domain's antialiased bicubic degradation (needs ``cond[i]["image"]``, the LR input).

    Our reading of the paper's d_feat(down(SR), LR): the feature network reads HR-size images, so both
    sides are upsampled the same way before the features. ``distance``: "mse" (FeatureDistance's form)
    or "lpips" (LPIPSStyleDistance's)."""

    def __init__(self, backend: FeatureBackend | str = "embedded:sr-features", distance: str = "mse",
                 name: str | None = None) -> None:
        if distance not in DISTANCES:
            raise ValueError(f"distance must be one of {sorted(DISTANCES)}, got {distance!r}")
        super().__init__(backend, name or "lr_feature_distance")
        self.kind = distance

    def reference(self, samples, cond):
        lr = cond_images(self.name, cond, "image", samples)
        f = sr_factor(self.name, samples, lr)
        return upsample(downsample(samples, f), f), upsample(lr, f)


class PixelDistance(Reward):
    """-MSE in pixels (differentiable), with the PSNR (dB, peak 1) as a term.

    ``reference``: "hr" compares the SR output with the ground truth (``cond[i]["hr"]``); "lr" compares
    down(SR) with the LR input (``cond[i]["image"]``): GT-free LR consistency."""

    differentiable = True

    def __init__(self, reference: str = "hr", name: str | None = None) -> None:
        if reference not in ("hr", "lr"):
            raise ValueError(f"reference must be 'hr' or 'lr', got {reference!r}")
        super().__init__(name or ("pixel_distance" if reference == "hr" else "lr_pixel_distance"))
        self.reference = reference

    def score(self, samples, cond):
        check_samples(self.name, samples)
        if self.reference == "hr":
            x, y = samples, cond_images(self.name, cond, "hr", samples)
        else:
            y = cond_images(self.name, cond, "image", samples)
            x = downsample(samples, sr_factor(self.name, samples, y))
        mse = (x.float() - y.float()).pow(2).flatten(1).mean(1)
        psnr = -10 * torch.log10(mse.clamp_min(1e-10))
        return RewardOutput(-mse, {"mse": mse, "psnr": psnr})


# ------------------------------------------------------------------------------- the HS judge
class HallucinationJudge(OpenAIJudge):
    """The Hallucination Score of an MLLM judge (black-box): each SR output is sent beside its LR input
    (``domains.super_resolution.judge.panel_png``: "LR input (upsampled)" | "SR output", tiles upscaled to
    at least ``min_tile`` px) with ``prompt_template`` (default ``HALLUCINATION_TEMPLATE``: 1 = no
    hallucination ... 9 = severe, "Answer: N"); total = -rating, the rating logged as ``hs_judge``.
    The template's ``{prompt}`` is the condition's coarse prompt ("a digit").

    Args:
        base_url, model: the endpoint (``python -m domains.super_resolution.judge`` serves the offline one).
        min_tile: the panel's tile size; labels: its two captions.
        The rest: ``OpenAIJudge``'s (``score_marker`` "Answer:", ``logprob_score`` "expectation" by default).
    """

    def __init__(self, base_url: str, model: str = "sr-hallucination-judge",
                 prompt_template: str = HALLUCINATION_TEMPLATE, score_min: int = 1, score_max: int = 9,
                 score_marker: str | list[str] = "Answer:", logprob_score: str = "expectation", min_tile: int = 128,
                 labels: tuple[str, str] = LABELS, api_key_env: str | None = "OPENAI_API_KEY",
                 max_tokens: int = 512, max_workers: int = 8, timeout_s: float | None = 60.0, retries: int = 2,
                 cache_size: int = 10_000, on_failure: str | float | None = None, name: str | None = None,
                 **kwargs) -> None:
        super().__init__(base_url, model, prompt_template=prompt_template, score_min=score_min, score_max=score_max,
                         api_key_env=api_key_env, score_marker=score_marker, logprob_score=logprob_score,
                         max_tokens=max_tokens, max_workers=max_workers, timeout_s=timeout_s, retries=retries,
                         cache_size=cache_size, on_failure=on_failure, name=name or "hs_judge", **kwargs)
        self.min_tile, self.labels = min_tile, tuple(labels)

    def to_object(self, sample: Any) -> bytes:
        lr, sr = sample
        return panel_png(lr, sr, self.min_tile, self.labels)

    def score(self, samples, cond):
        check_samples(self.name, samples)
        lr = cond_images(self.name, cond, "image", samples)
        sr_factor(self.name, samples, lr)
        pairs = [(lr[i], samples[i]) for i in range(len(samples))]
        prompts = [c.get("prompt", "") if isinstance(c, dict) else "" for c in cond]
        out = super().score(pairs, prompts)
        rating = out.total.to(samples.device)
        total = -rating
        excluded = out.excluded
        if excluded is not None:
            excluded = excluded.to(samples.device)
            total = torch.where(excluded, torch.full_like(total, -math.inf), total)
        return RewardOutput(total, {"hs_judge": rating}, out.info, excluded=excluded)
