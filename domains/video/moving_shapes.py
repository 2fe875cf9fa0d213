"""Procedural "moving shapes" world: prompts like "two blue squares moving up" and the videos they describe.

The data the embedded tiny text-to-video model (``embedded:tiny-moving-shapes``) is pretrained on, and
the data its judge, its motion reward and its independent evaluator are trained on. Everything is
generated from a seed (no download, reproducible).

A video is a (F, 3, S, S) float tensor in [0, 1]: one or two shapes of one colour (the image domain's
palette and shapes, ``domains.images.shapes``) on the dark background, all moving ``SPEED`` of the frame
per frame in one direction (left, right, up, down). Positions are sub-pixel and the shapes are drawn
with 4x supersampled edges, so the motion is smooth at 16 px.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
import torch

from domains.images.shapes import BACKGROUND, COLOURS, SHAPES, _shape_mask
from rewardopt.run import derived_seed

DIRECTIONS: dict[str, tuple[float, float]] = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0),
                                              "down": (0.0, 1.0)}
COUNT_WORDS = ("a", "two")
#: displacement per frame as a fraction of the frame size (16 px, 8 frames: 0.9 px a frame, 6.3 px in all)
SPEED = 0.056
SUPERSAMPLE = 4


@dataclass(frozen=True)
class MotionSpec:
    """One prompt's attributes: colour, shape, count (1-2) and direction."""

    colour: str
    shape: str
    count: int
    direction: str

    @property
    def prompt(self) -> str:
        noun = self.shape if self.count == 1 else self.shape + "s"
        return f"{COUNT_WORDS[self.count - 1]} {self.colour} {noun} moving {self.direction}"

    @classmethod
    def from_prompt(cls, prompt: str) -> "MotionSpec":
        """Parse "a red circle moving left" back into attributes; ValueError on other text."""
        words = prompt.strip().lower().split()
        ok = (len(words) == 5 and words[0] in COUNT_WORDS and words[1] in COLOURS and words[3] == "moving"
              and words[4] in DIRECTIONS)
        shape = words[2][:-1] if ok and words[2].endswith("s") and words[2][:-1] in SHAPES else words[2] if ok else ""
        if not ok or shape not in SHAPES:
            raise ValueError(f"not a moving-shapes prompt: {prompt!r}; expected '<a|two> <colour> <shape> moving "
                             f"<{'|'.join(DIRECTIONS)}>', e.g. 'two blue squares moving up'")
        return cls(words[1], shape, COUNT_WORDS.index(words[0]) + 1, words[4])

    @property
    def labels(self) -> dict[str, int]:
        """Class indices: colour, shape, count (0-based), direction."""
        return {"colour": list(COLOURS).index(self.colour), "shape": SHAPES.index(self.shape),
                "count": self.count - 1, "direction": list(DIRECTIONS).index(self.direction)}


HEADS = {"colour": len(COLOURS), "shape": len(SHAPES), "count": len(COUNT_WORDS), "direction": len(DIRECTIONS)}


def all_specs() -> list[MotionSpec]:
    return [MotionSpec(c, s, n, d) for c in COLOURS for s in SHAPES for n in (1, 2) for d in DIRECTIONS]


def split_prompts(seed: int = 0, n_heldout: int = 24) -> tuple[list[str], list[str]]:
    """Deterministic split of the 144 prompts into (train, held-out); every prompt is in the
    pretraining data (held-out means held out from fine-tuning, as in the image domain)."""
    prompts = [s.prompt for s in all_specs()]
    rng = random.Random(seed)
    rng.shuffle(prompts)
    return sorted(prompts[n_heldout:]), sorted(prompts[:n_heldout])


def radius(count: int, size: int) -> float:
    return size * (0.2 if count == 1 else 0.15)


def trajectory(spec: MotionSpec, size: int, frames: int, rng: random.Random) -> list[list[tuple[float, float]]]:
    """Centres (x, y) per frame per shape: random starts such that every shape stays inside the frame
    for the whole clip and two shapes never overlap (they move together)."""
    r = radius(spec.count, size)
    dx, dy = DIRECTIONS[spec.direction]
    travel = SPEED * size * (frames - 1)
    lo, hi = r + 0.5, size - r - 0.5

    def span(d: float) -> tuple[float, float]:  # start range along an axis moving by d * travel
        return (lo - min(0.0, d * travel), hi - max(0.0, d * travel))

    (x0, x1), (y0, y1) = span(dx), span(dy)
    starts: list[tuple[float, float]] = []
    for _ in range(spec.count):
        for _attempt in range(200):
            cx, cy = rng.uniform(x0, x1), rng.uniform(y0, y1)
            if all(math.hypot(cx - a, cy - b) > 2.3 * r for a, b in starts):
                break
        starts.append((cx, cy))
    step = SPEED * size
    return [[(cx + dx * step * f, cy + dy * step * f) for cx, cy in starts] for f in range(frames)]


def render_video(spec: MotionSpec, size: int = 16, frames: int = 8, rng: random.Random | None = None) -> torch.Tensor:
    """Draw ``spec`` as a (frames, 3, size, size) clip in [0, 1] (anti-aliased by supersampling)."""
    rng = rng or random.Random(0)
    k = SUPERSAMPLE
    yy, xx = (np.mgrid[0 : size * k, 0 : size * k].astype(np.float32) + 0.5) / k
    r = radius(spec.count, size)
    path = trajectory(spec, size, frames, rng)
    colours = [np.clip(np.array(COLOURS[spec.colour], np.float32)
                       + np.array([rng.uniform(-0.05, 0.05) for _ in range(3)], np.float32), 0, 1)
               for _ in range(spec.count)]
    out = np.empty((frames, size, size, 3), np.float32)
    for f, centres in enumerate(path):
        img = np.empty((size * k, size * k, 3), np.float32)
        img[:] = BACKGROUND
        for (cx, cy), colour in zip(centres, colours):
            img[_shape_mask(spec.shape, cx, cy, r, yy, xx)] = colour
        out[f] = img.reshape(size, k, size, k, 3).mean(axis=(1, 3))
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


class MovingShapesDataset(torch.utils.data.Dataset):
    """``length`` random (video, prompt, labels) items; item i is a pure function of (seed, i).

    ``prompts`` restricts the specs (default: all 144)."""

    def __init__(self, length: int = 20000, size: int = 16, frames: int = 8, seed: int = 0,
                 prompts: list[str] | None = None) -> None:
        if size < 8 or frames < 2:
            raise ValueError(f"need size >= 8 and frames >= 2, got size={size}, frames={frames}")
        self.length, self.size, self.frames, self.seed = length, size, frames, seed
        self.specs = [MotionSpec.from_prompt(p) for p in prompts] if prompts else all_specs()

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        rng = random.Random(derived_seed(self.seed, i))
        spec = self.specs[rng.randrange(len(self.specs))]
        return {"video": render_video(spec, self.size, self.frames, rng), "prompt": spec.prompt, **spec.labels}
