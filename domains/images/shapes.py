"""Procedural "shapes" world: prompts like "two red circles" and the images they describe.

This is the data the embedded tiny text-to-image model is pretrained on and the data its
attribute classifier (a differentiable reward) is trained on. Everything is generated from a seed,
so it needs no download and is reproducible.

Images are (3, S, S) float tensors in [0, 1]: 1-3 shapes of one colour on a background. The
diffusion model's data has the fixed dark ``BACKGROUND``; the reward classifier's data may have
``backgrounds="varied"`` (``varied_background``), so that the reward reads the shapes' colour rather
than the background's and cannot be won by painting the background.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
import torch

from rewardopt.run import derived_seed

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.9, 0.1, 0.1),
    "green": (0.1, 0.8, 0.2),
    "blue": (0.15, 0.3, 0.95),
    "yellow": (0.95, 0.85, 0.1),
    "purple": (0.6, 0.2, 0.8),
    "white": (0.95, 0.95, 0.95),
}
SHAPES = ("circle", "square", "triangle")
COUNTS = ("one", "two", "three")
BACKGROUND = (0.08, 0.08, 0.1)


@dataclass(frozen=True)
class ShapeSpec:
    """One prompt's attributes: colour, shape and count (1-3)."""

    colour: str
    shape: str
    count: int

    @property
    def prompt(self) -> str:
        noun = self.shape if self.count == 1 else self.shape + "s"
        return f"{COUNTS[self.count - 1]} {self.colour} {noun}"

    @classmethod
    def from_prompt(cls, prompt: str) -> "ShapeSpec":
        """Parse "two red circles" back into attributes; raises ValueError on other text."""
        words = prompt.strip().lower().split()
        if len(words) != 3 or words[0] not in COUNTS or words[1] not in COLOURS:
            raise ValueError(
                f"not a shapes prompt: {prompt!r}; expected '<count> <colour> <shape>', e.g. 'two red circles'"
            )
        shape = words[2][:-1] if words[2].endswith("s") and words[2][:-1] in SHAPES else words[2]
        if shape not in SHAPES:
            raise ValueError(f"unknown shape in prompt {prompt!r}; known: {SHAPES}")
        return cls(words[1], shape, COUNTS.index(words[0]) + 1)


def all_specs() -> list[ShapeSpec]:
    return [ShapeSpec(c, s, n) for c in COLOURS for s in SHAPES for n in (1, 2, 3)]


def split_prompts(seed: int = 0, n_heldout: int = 12) -> tuple[list[str], list[str]]:
    """Deterministic split of the 54 prompts into (train, held-out)."""
    prompts = [s.prompt for s in all_specs()]
    rng = random.Random(seed)
    rng.shuffle(prompts)
    return sorted(prompts[n_heldout:]), sorted(prompts[:n_heldout])


def _shape_mask(shape: str, cx: float, cy: float, r: float, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    if shape == "circle":
        return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
    if shape == "square":
        return (np.abs(xx - cx) <= r * 0.85) & (np.abs(yy - cy) <= r * 0.85)
    # upward triangle: below the two slanted edges and above the base
    top, base = cy - r, cy + r * 0.8
    half = (yy - top) / (base - top) * r
    return (yy >= top) & (yy <= base) & (np.abs(xx - cx) <= half)


BACKGROUND_MODES = ("fixed", "varied")


def varied_background(spec: ShapeSpec, size: int, rng: random.Random) -> np.ndarray:
    """A random (size, size, 3) background away from the shapes' colour.

    A quarter keep the fixed dark background (the generator's own data); the rest are a full or dimmed
    palette colour other than the shapes' (the reward-hacking case: blue around red shapes), a random
    RGB colour at least 0.3 (max-abs) from the shapes' colour, or a linear blend of two such colours.
    Flat backgrounds are never within 0.3 of the shapes' colour; a blend's two ends are not, but its
    middle can pass nearer (about 1% of varied backgrounds have a pixel within 0.3).
    """
    own = np.array(COLOURS[spec.colour], np.float32)

    def far_colour() -> np.ndarray:
        for _ in range(100):
            if rng.random() < 0.5:
                name = rng.choice([c for c in COLOURS if c != spec.colour])
                c = np.array(COLOURS[name], np.float32) * (1.0 if rng.random() < 0.5 else rng.uniform(0.3, 1.0))
            else:
                c = np.array([rng.random() for _ in range(3)], np.float32)
            if np.abs(c - own).max() >= 0.3:
                return c
        return np.array(BACKGROUND, np.float32)

    u = rng.random()
    if u < 0.25:
        return np.broadcast_to(np.array(BACKGROUND, np.float32), (size, size, 3)).copy()
    if u < 0.8:
        return np.broadcast_to(far_colour(), (size, size, 3)).copy()
    a, b, angle = far_colour(), far_colour(), rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1) - 0.5
    w = np.clip(0.5 + xx * math.cos(angle) + yy * math.sin(angle), 0, 1)[..., None]
    return (1 - w) * a + w * b


def render(spec: ShapeSpec, size: int = 32, rng: random.Random | None = None,
           background: tuple[float, float, float] | np.ndarray | None = None) -> torch.Tensor:
    """Draw ``spec`` at random non-overlapping positions. Returns (3, size, size) in [0, 1].

    ``background``: an RGB colour or a (size, size, 3) array; default the fixed dark ``BACKGROUND``.
    The shapes (positions, jitter) depend on ``rng`` only, not on the background.
    """
    rng = rng or random.Random(0)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    img = np.empty((size, size, 3), np.float32)
    img[:] = BACKGROUND if background is None else np.asarray(background, np.float32)
    r = size * (0.2 if spec.count == 1 else 0.14 if spec.count == 2 else 0.12)
    centres: list[tuple[float, float]] = []
    for _ in range(spec.count):
        for _attempt in range(100):
            cx, cy = rng.uniform(r + 1, size - r - 1), rng.uniform(r + 1, size - r - 1)
            if all(math.hypot(cx - a, cy - b) > 2.2 * r for a, b in centres):
                break
        centres.append((cx, cy))
        jitter = np.array([rng.uniform(-0.05, 0.05) for _ in range(3)], np.float32)
        colour = np.clip(np.array(COLOURS[spec.colour], np.float32) + jitter, 0, 1)
        img[_shape_mask(spec.shape, cx, cy, r, yy, xx)] = colour
    return torch.from_numpy(img).permute(2, 0, 1).contiguous()


class ShapesDataset(torch.utils.data.Dataset):
    """``length`` random (image, prompt, labels) items; item i is a pure function of (seed, i).

    ``backgrounds="varied"`` draws a random background per item (``varied_background``);
    ``empty_fraction`` of those items then show the background alone (``empty`` is True), so a
    classifier can learn that no shapes means no colour, shape or count in particular.
    """

    def __init__(self, length: int = 20000, size: int = 32, seed: int = 0, prompts: list[str] | None = None,
                 backgrounds: str = "fixed", empty_fraction: float = 0.0):
        if backgrounds not in BACKGROUND_MODES:
            raise ValueError(f"backgrounds must be one of {BACKGROUND_MODES}, got {backgrounds!r}")
        if not 0.0 <= empty_fraction <= 1.0 or (empty_fraction and backgrounds != "varied"):
            raise ValueError(f"empty_fraction must be in [0, 1] and needs backgrounds='varied'; got {empty_fraction}")
        self.length, self.size, self.seed, self.backgrounds = length, size, seed, backgrounds
        self.empty_fraction = empty_fraction
        self.specs = [ShapeSpec.from_prompt(p) for p in prompts] if prompts else all_specs()

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        rng = random.Random(derived_seed(self.seed, i))
        spec = self.specs[rng.randrange(len(self.specs))]
        background, empty = None, False
        if self.backgrounds == "varied":  # drawn from its own stream: the shapes match the fixed dataset's
            bg_rng = random.Random(derived_seed(self.seed + 7919, i))
            background = varied_background(spec, self.size, bg_rng)
            empty = bg_rng.random() < self.empty_fraction
        image = render(spec, self.size, rng, background=background)
        if empty:  # the background alone: its labels are uninformative (ShapeClassifierTraining: uniform targets)
            image = torch.from_numpy(np.ascontiguousarray(background, np.float32)).permute(2, 0, 1).contiguous()
        return {
            "image": image,
            "empty": empty,
            "prompt": spec.prompt,
            "colour": list(COLOURS).index(spec.colour),
            "shape": SHAPES.index(spec.shape),
            "count": spec.count - 1,
        }
