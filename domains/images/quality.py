"""How clean and how faithful the tiny text-to-image model's samples are.

Two figures, both measured on samples drawn for shapes prompts:

- ``laplacian_ratio``: the mean absolute 4-neighbour Laplacian of the samples over that of
  procedural renders of the same prompts (``domains/images/shapes.render``). Flat backgrounds and
  sharp-edged shapes give the renders a small value; pixel noise raises the samples' value. 1.0 means
  "as smooth as the data".
- ``prompt_following``: the shapes classifier's accuracy on the samples for each attribute (colour,
  shape, count) against the attributes in the prompt.
- ``pixel_accuracy``: a classifier-free reader of colour and count (``read_pixels``: the connected
  components of the pixels away from the dark background, and the palette colour nearest their mean):
  colour 1.00 and count 0.97-1.00 on the renders (shapes placed touching merge). It checks the
  classifiers: their count head has no "four" class, so a "three" prompt drawn with four shapes reads
  as right to them and wrong here.

``benchmarks/tiny_image_quality.py`` reports both for ``embedded:tiny-shapes``.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np
import torch

from domains.images.shapes import BACKGROUND, COLOURS, SHAPES, ShapeSpec, all_specs, render
from rewardopt.run import derived_seed


def quality_prompts(n: int = 16, seed: int = 0) -> list[str]:
    """``n`` distinct shapes prompts, a seeded draw from the 54."""
    prompts = [s.prompt for s in all_specs()]
    return random.Random(seed).sample(prompts, n)


def mean_abs_laplacian(images: torch.Tensor) -> torch.Tensor:
    """Per-image mean |4-neighbour Laplacian| of (B, 3, H, W) images in [0, 1] (interior pixels)."""
    x = images.float()
    lap = (x[..., 1:-1, :-2] + x[..., 1:-1, 2:] + x[..., :-2, 1:-1] + x[..., 2:, 1:-1]
           - 4 * x[..., 1:-1, 1:-1])
    return lap.abs().mean(dim=(1, 2, 3))


def renders(prompts: Sequence[str], size: int, seed: int = 0) -> torch.Tensor:
    """One procedural render per prompt (positions drawn from ``seed``), (B, 3, size, size)."""
    return torch.stack([render(ShapeSpec.from_prompt(p), size, random.Random(derived_seed(seed, i)))
                        for i, p in enumerate(prompts)])


@torch.no_grad()
def sample_images(generator, prompts: Sequence[str], seed: int = 0) -> torch.Tensor:
    """The generator's samples for ``prompts`` (its own sampler settings), (B, 3, H, W) in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    cond = generator.encode_condition(list(prompts))
    return generator.decode(generator.sample(cond, generator=g)).cpu()


def laplacian_ratio(generator, prompts: Sequence[str], seed: int = 0,
                    images: torch.Tensor | None = None) -> float:
    """Mean |Laplacian| of the samples over that of renders of the same prompts (both at the
    generator's size). ``images``: samples already drawn for ``prompts`` (else drawn with ``seed``)."""
    images = sample_images(generator, prompts, seed) if images is None else images
    ref = renders(prompts, images.shape[-1], seed)
    return float(mean_abs_laplacian(images).mean() / mean_abs_laplacian(ref).mean())


@torch.no_grad()
def classifier_accuracy(classifier, images: torch.Tensor, prompts: Sequence[str]) -> dict[str, float]:
    """Per-attribute accuracy of ``classifier`` on ``images`` against the attributes in ``prompts``."""
    specs = [ShapeSpec.from_prompt(p) for p in prompts]
    target = {"colour": [list(COLOURS).index(s.colour) for s in specs],
              "shape": [SHAPES.index(s.shape) for s in specs],
              "count": [s.count - 1 for s in specs]}
    logits = classifier(images)
    return {k: float((logits[k].argmax(-1) == torch.tensor(v)).float().mean()) for k, v in target.items()}


def prompt_following(generator, classifier, prompts: Sequence[str], seed: int = 0,
                     images: torch.Tensor | None = None) -> dict[str, float]:
    """The shapes classifier's colour / shape / count accuracy on the generator's samples."""
    images = sample_images(generator, prompts, seed) if images is None else images
    return classifier_accuracy(classifier, images, prompts)


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean (H, W) mask, each as an array of (row, col) indices."""
    seen = np.zeros_like(mask, dtype=bool)
    out = []
    h, w = mask.shape
    for r0, c0 in zip(*np.nonzero(mask)):
        if seen[r0, c0]:
            continue
        stack, pixels = [(r0, c0)], []
        seen[r0, c0] = True
        while stack:
            r, c = stack.pop()
            pixels.append((r, c))
            for rr, cc in ((r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)):
                if 0 <= rr < h and 0 <= cc < w and mask[rr, cc] and not seen[rr, cc]:
                    seen[rr, cc] = True
                    stack.append((rr, cc))
        out.append(np.array(pixels))
    return out


def background_distance(images: torch.Tensor) -> torch.Tensor:
    """Per-pixel max-abs distance to the dark background colour: (..., 3, H, W) -> (..., H, W)."""
    return (images.float() - torch.tensor(BACKGROUND)[:, None, None]).abs().amax(-3)


def read_pixels(image: torch.Tensor, threshold: float = 0.3, min_area: int = 3) -> tuple[str | None, int]:
    """(colour, count) of one (3, H, W) image read from its pixels: count = the number of 4-connected
    components of at least ``min_area`` pixels farther than ``threshold`` (max-abs) from the dark
    background; colour = the palette colour nearest the mean of those pixels (None without any)."""
    x = image.float().permute(1, 2, 0).numpy()
    mask = (background_distance(image) > threshold).numpy()
    parts = [p for p in _components(mask) if len(p) >= min_area]
    if not parts:
        return None, 0
    pix = np.concatenate(parts)
    mean = x[pix[:, 0], pix[:, 1]].mean(0)
    colour = min(COLOURS, key=lambda c: float(np.abs(np.array(COLOURS[c]) - mean).max()))
    return colour, len(parts)


def pixel_accuracy(images: torch.Tensor, prompts: Sequence[str]) -> dict[str, float]:
    """Colour and count accuracy of ``read_pixels`` on ``images`` against the attributes in ``prompts``."""
    specs = [ShapeSpec.from_prompt(p) for p in prompts]
    reads = [read_pixels(img) for img in images]
    return {"colour": float(np.mean([c == s.colour for (c, _), s in zip(reads, specs)])),
            "count": float(np.mean([n == s.count for (_, n), s in zip(reads, specs)]))}
