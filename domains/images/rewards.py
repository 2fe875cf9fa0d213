"""Image rewards. Samples are (B, 3, H, W) tensors in [0, 1]; ``cond`` is the list of prompts.

Differentiable, no download:
    ``ShapeAttributeReward`` — log-probability of a colour/shape/count under the shapes classifier
    the project trains (``recipes/images/train_classifier_tiny.yaml``); target from the prompt or fixed.
    ``ColourReward`` — an analytic reward: mean closeness of pixels to a target colour.
Black-box:
    ``JpegCompressibilityReward`` — minus the JPEG size in kB (DDPO's compressibility task).
Real-model rewards (weights from a local folder or hub id):
    ``AestheticReward`` — LAION-style aesthetic predictor: CLIP image embedding -> MLP head.
    ``CLIPScoreReward`` — CLIP text-image similarity (the form of PickScore / HPS-style rewards).
"""

from __future__ import annotations

import io
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from domains.images.shapes import COLOURS, SHAPES, ShapeSpec
from rewardopt.fitting import load_module, save_module
from rewardopt.rewards.base import Reward
from rewardopt.rewards.blackbox import BlackBoxReward

ASSETS = Path(__file__).parent / "assets"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def check_images(name: str, images: torch.Tensor, size: tuple[int, int] | None = None) -> None:
    """Clear errors for the wrong kind of input: rank, channels, range, size."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"{name} expects images shaped (B, 3, H, W) in [0, 1]; got {shape}")
    if size is not None and tuple(images.shape[-2:]) != tuple(size):
        raise ValueError(
            f"{name} was trained on {size[0]}x{size[1]} images; got {images.shape[-2]}x{images.shape[-1]}. "
            f"Set the generator's height/width to {size[0]}, or use a reward that resizes."
        )


# ------------------------------------------------------------------------------- shapes classifier
class ShapeClassifier(nn.Module):
    """A small CNN with three heads: colour (6), shape (3), count (3). Input (B, 3, S, S) in [0, 1].

    ``none_class=True`` gives every head one more output, last: "no shapes in the image", so an image
    without shapes has p(blue) near 0 instead of an arbitrary colour (erasing non-blue shapes does not
    win log p(blue)); the shipped ``embedded:shape-classifier`` has it, the hackable one does not.
    """

    def __init__(self, width: int = 32, size: int = 24, none_class: bool = False) -> None:
        super().__init__()
        self.config = {"width": width, "size": size, **({"none_class": True} if none_class else {})}
        self.none_class = none_class
        w, extra = width, int(none_class)
        self.body = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.SiLU(), nn.Conv2d(w, w, 3, padding=1), nn.SiLU(), nn.AvgPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.SiLU(), nn.AvgPool2d(2),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.heads = nn.ModuleDict({"colour": nn.Linear(2 * w, len(COLOURS) + extra),
                                    "shape": nn.Linear(2 * w, len(SHAPES) + extra),
                                    "count": nn.Linear(2 * w, 3 + extra)})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.body(images * 2 - 1)
        return {k: head(h) for k, head in self.heads.items()}

    def save_pretrained(self, path: str | Path) -> None:
        save_module(self, path)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "ShapeClassifier":
        embedded = {"embedded:shape-classifier": ASSETS / "shape_classifier",
                    "embedded:shape-classifier-hackable": ASSETS / "shape_classifier_hackable"}
        return load_module(cls, path, embedded, "recipes/images/train_classifier_tiny.yaml")


class ShapeAttributeReward(Reward):
    """log p(attribute = target | image) under the frozen shapes classifier (differentiable).

    Args:
        attribute: "colour", "shape" or "count".
        target: a fixed value (e.g. "blue", "circle", "three"); None reads it from each prompt.
        classifier: folder of a trained ``ShapeClassifier`` or ``embedded:shape-classifier``.
    """

    differentiable = True

    def __init__(self, attribute: str = "colour", target: str | None = None,
                 classifier: str = "embedded:shape-classifier", name: str | None = None) -> None:
        labels = {"colour": list(COLOURS), "shape": list(SHAPES), "count": ["one", "two", "three"]}
        if attribute not in labels:
            raise ValueError(f"attribute must be one of {sorted(labels)}, got {attribute!r}")
        if target is not None and target not in labels[attribute]:
            raise ValueError(f"target {target!r} is not a {attribute}; choose from {labels[attribute]}")
        super().__init__(name or f"{attribute}_{target or 'prompt'}")
        self.attribute, self.target, self.labels = attribute, target, labels[attribute]
        self.classifier = ShapeClassifier.from_pretrained(classifier).requires_grad_(False)

    def _targets(self, cond, n: int) -> list[int]:
        if self.target is not None:
            return [self.labels.index(self.target)] * n
        if cond is None:
            raise ValueError(f"{self.name} reads its target from the prompt; pass prompts or set target")
        out = []
        for p in cond:
            spec = ShapeSpec.from_prompt(p)
            value = {"colour": spec.colour, "shape": spec.shape,
                     "count": ["one", "two", "three"][spec.count - 1]}[self.attribute]
            out.append(self.labels.index(value))
        return out

    def score(self, samples, cond):
        check_images(self.name, samples, (self.classifier.config["size"],) * 2)
        logp = self.classifier(samples)[self.attribute].log_softmax(-1)
        idx = torch.tensor(self._targets(cond, len(samples)), device=logp.device)
        return logp.gather(1, idx[:, None]).squeeze(1)


class ColourReward(Reward):
    """Analytic, differentiable: 1 - mean distance of pixels to ``colour`` (a name or RGB triple),
    so 1 means every pixel has that colour. A sanity reward for tests and demos."""

    differentiable = True

    def __init__(self, colour: str | list[float] = "blue", name: str | None = None) -> None:
        super().__init__(name or f"colour_{colour if isinstance(colour, str) else 'rgb'}")
        rgb = COLOURS[colour] if isinstance(colour, str) else colour
        self.register_buffer("rgb", torch.tensor(rgb, dtype=torch.float32).view(1, 3, 1, 1))

    def score(self, samples, cond):
        check_images(self.name, samples)
        return 1 - (samples - self.rgb).abs().mean(dim=(1, 2, 3))


# ------------------------------------------------------------------------------- black-box
class JpegCompressibilityReward(BlackBoxReward):
    """-(JPEG size in kB) at ``quality`` (DDPO's compressibility reward; higher = simpler image)."""

    def __init__(self, quality: int = 95, **kwargs) -> None:
        super().__init__(**kwargs)
        self.quality = quality

    def to_object(self, sample):
        check_images(self.name, sample[None])
        return (sample.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()

    def score_object(self, obj, cond) -> float:
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(obj).save(buf, format="JPEG", quality=self.quality)
        return -buf.tell() / 1000.0


# ------------------------------------------------------------------------------- CLIP-based
def clip_preprocess(images: torch.Tensor, size: int) -> torch.Tensor:
    """Differentiable CLIP preprocessing: (B, 3, H, W) in [0, 1] -> resized, normalised."""
    x = F.interpolate(images, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
    mean = x.new_tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = x.new_tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


class AestheticHead(nn.Module):
    """The LAION aesthetic predictor's MLP over L2-normalised CLIP image embeddings (its public
    weights use this layer layout, so they load by key)."""

    def __init__(self, dim: int = 768) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1),
        )

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.layers(emb).squeeze(-1)


def _load_state(path: str) -> dict:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


class AestheticReward(Reward):
    """LAION-style aesthetic score: ``head(normalize(CLIP_image_embeds(x)))`` (differentiable).

    Args:
        clip_model: ``CLIPVisionModelWithProjection`` folder or hub id (ViT-L/14 for the public head).
        head: path to the MLP head weights (.pth via ``weights_only`` or .safetensors).
    """

    differentiable = True

    def __init__(self, clip_model: str, head: str, name: str | None = None) -> None:
        from transformers import CLIPVisionModelWithProjection

        super().__init__(name or "aesthetic")
        if not Path(head).is_file():
            raise FileNotFoundError(f"reward.head: no aesthetic head weights at {head!r}")
        self.clip = CLIPVisionModelWithProjection.from_pretrained(clip_model).eval().requires_grad_(False)
        self.head = AestheticHead(self.clip.config.projection_dim).eval().requires_grad_(False)
        self.head.load_state_dict(_load_state(head))

    def score(self, samples, cond):
        check_images(self.name, samples)
        emb = self.clip(pixel_values=clip_preprocess(samples, self.clip.config.image_size)).image_embeds
        return self.head(F.normalize(emb, dim=-1))


class CLIPScoreReward(Reward):
    """``logit_scale * cos(CLIP_image(x), CLIP_text(prompt))`` — the PickScore form (differentiable).

    Args:
        clip_model: a ``CLIPModel`` folder or hub id (e.g. a PickScore checkpoint).
        tokenizer: where its tokenizer lives, if not beside the model (PickScore uses the
            tokenizer of the CLIP ViT-H/14 it was fine-tuned from).
    """

    differentiable = True

    def __init__(self, clip_model: str, tokenizer: str | None = None, name: str | None = None) -> None:
        from transformers import AutoTokenizer, CLIPModel

        super().__init__(name or "clip_score")
        self.clip = CLIPModel.from_pretrained(clip_model).eval().requires_grad_(False)
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer or clip_model)

    def score(self, samples, cond):
        check_images(self.name, samples)
        if cond is None:
            raise ValueError(f"{self.name} scores text-image agreement and needs the prompts")
        tok = self.tokenizer(list(cond), padding=True, truncation=True, return_tensors="pt").to(samples.device)
        pixels = clip_preprocess(samples, self.clip.config.vision_config.image_size)
        img = self.clip.get_image_features(pixel_values=pixels)
        txt = self.clip.get_text_features(**tok)
        img = img.pooler_output if hasattr(img, "pooler_output") else img
        txt = txt.pooler_output if hasattr(txt, "pooler_output") else txt
        return self.clip.logit_scale.exp() * (F.normalize(img, dim=-1) * F.normalize(txt, dim=-1)).sum(-1)
