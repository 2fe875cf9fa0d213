"""Procedural high-resolution glyphs for super-resolution, with classes that x4 downsampling confuses.

Each item is a letter, digit or shape drawn with one of the two fonts Pillow ships (Aileron, the
scalable FreeType font of ``ImageFont.load_default(size)``, and Pillow's bitmap font, upscaled),
a random stroke width (weight), shear (slant), size, offset, ink and background level, rendered 4x
supersampled and reduced to ``size`` pixels (the ground truth, HR). The low-resolution input (LR) is
``downsample(HR, factor)``: antialiased bicubic, differentiable, the one function every proxy uses.

The classes come in pairs that differ by a detail a few HR pixels wide — 3/8, 1/7, O/Q, E/F — plus two
shapes (circle, square) as an easy control. Glyphs are 35-75% of the image high (11-24 HR pixels, 3-6 LR
pixels): at x4 the detail falls below one LR pixel for the small ones, so a sharp SR model *must*
sometimes commit to the wrong member of a pair: a hallucination. (With 50-85% the oracle still read 98% of
bicubic-upsampled LR inputs correctly and the tiny SR model flipped 2.3% of classes: too few to measure.)
Prompts give the coarse category only ("a digit", "a letter", "a shape"), never the class.

Our reading: the paper's SR data are natural photographs; glyphs make the truth of a hallucination
decidable (the class), which is what the oracle Hallucination Score needs.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

CLASSES = ("3", "8", "1", "7", "O", "Q", "E", "F", "circle", "square")
#: the pairs x4 downsampling confuses (each member's index in CLASSES)
PAIRS = ((0, 1), (2, 3), (4, 5), (6, 7))
CATEGORY = {"3": "digit", "8": "digit", "1": "digit", "7": "digit", "O": "letter", "Q": "letter",
            "E": "letter", "F": "letter", "circle": "shape", "square": "shape"}
FONTS = ("aileron", "bitmap")
#: characters outside CLASSES: the training data of the independent feature network
OTHER_CHARS = tuple("ABCDGHKLMNPRSTUVXYZ24569")
SUPERSAMPLE = 4


def partner(label: int) -> int:
    """The other member of ``label``'s confusable pair (itself for the shapes)."""
    for a, b in PAIRS:
        if label == a:
            return b
        if label == b:
            return a
    return label


def downsample(hr: torch.Tensor, factor: int = 4) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, H/f, W/f): antialiased bicubic (the usual SR degradation), differentiable."""
    if hr.shape[-1] % factor or hr.shape[-2] % factor:
        raise ValueError(f"image size {tuple(hr.shape[-2:])} is not divisible by the SR factor {factor}")
    h, w = hr.shape[-2] // factor, hr.shape[-1] // factor
    return F.interpolate(hr, size=(h, w), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)


def upsample(lr: torch.Tensor, factor: int = 4) -> torch.Tensor:
    """(B, C, h, w) -> (B, C, h·f, w·f) bicubic: the LR input shown at HR size (the baseline SR)."""
    return F.interpolate(lr, scale_factor=factor, mode="bicubic", align_corners=False).clamp(0, 1)


@dataclass
class GlyphSpec:
    char: str  # a character, or "circle" / "square"
    font: str = "aileron"
    scale: float = 0.8  # glyph height as a fraction of the image
    stroke: int = 0  # extra stroke width in HR pixels (bolder)
    shear: float = 0.0  # slant
    dx: float = 0.0  # offset as a fraction of the image
    dy: float = 0.0
    ink: float = 0.9
    background: float = 0.1
    tint: tuple[float, float, float] = (1.0, 1.0, 1.0)

    @classmethod
    def random(cls, char: str, rng: random.Random, fonts: tuple[str, ...] = FONTS) -> "GlyphSpec":
        return cls(char, font=rng.choice(fonts), scale=rng.uniform(0.35, 0.75), stroke=rng.choice((0, 0, 1, 2)),
                   shear=rng.uniform(-0.2, 0.2), dx=rng.uniform(-0.06, 0.06), dy=rng.uniform(-0.06, 0.06),
                   ink=rng.uniform(0.75, 1.0), background=rng.uniform(0.0, 0.25),
                   tint=tuple(rng.uniform(0.7, 1.0) for _ in range(3)))


def _font(name: str, px: int):
    if name == "aileron":
        return ImageFont.load_default(size=px)
    if name == "bitmap":
        return ImageFont.load_default_imagefont()
    raise ValueError(f"unknown font {name!r}; Pillow ships {FONTS}")


def _mask(spec: GlyphSpec, size: int) -> Image.Image:
    """The glyph's coverage (L mode, ``size`` px, supersampled then reduced)."""
    big = size * SUPERSAMPLE
    target = spec.scale * big
    if spec.char in ("circle", "square"):
        img = Image.new("L", (big, big), 0)
        d = ImageDraw.Draw(img)
        r = target / 2
        c = (big / 2 + spec.dx * big, big / 2 + spec.dy * big)
        box = (c[0] - r, c[1] - r, c[0] + r, c[1] + r)
        width = int(round(big * 0.08)) + spec.stroke * SUPERSAMPLE
        (d.ellipse if spec.char == "circle" else d.rectangle)(box, outline=255, width=width)
    else:
        if spec.font == "bitmap":  # a fixed-size bitmap font: draw small, scale up, then place
            font = _font("bitmap", 0)
            left, top, right, bottom = font.getbbox(spec.char)
            tile = Image.new("L", (right - left + 2, bottom - top + 2), 0)
            ImageDraw.Draw(tile).text((1 - left, 1 - top), spec.char, fill=255, font=font)
            tile = tile.crop(tile.getbbox())  # its strokes are already bold once scaled: no extra stroke
            k = target / tile.height
            tile = tile.resize((max(1, round(tile.width * k)), max(1, round(tile.height * k))), Image.NEAREST)
        else:
            font = _font("aileron", max(8, round(target * 1.3)))
            sw = spec.stroke * SUPERSAMPLE // 2
            left, top, right, bottom = font.getbbox(spec.char, stroke_width=sw)
            tile = Image.new("L", (right - left + 2, bottom - top + 2), 0)
            ImageDraw.Draw(tile).text((1 - left, 1 - top), spec.char, fill=255, font=font, stroke_width=sw,
                                      stroke_fill=255)
            tile = tile.crop(tile.getbbox())
            k = target / tile.height
            tile = tile.resize((max(1, round(tile.width * k)), max(1, round(tile.height * k))), Image.BILINEAR)
        img = Image.new("L", (big, big), 0)
        x = round(big / 2 - tile.width / 2 + spec.dx * big)
        y = round(big / 2 - tile.height / 2 + spec.dy * big)
        img.paste(tile, (x, y))
    if spec.shear:
        img = img.transform(img.size, Image.AFFINE, (1, spec.shear, -spec.shear * big / 2, 0, 1, 0),
                            resample=Image.BILINEAR)
    return img.resize((size, size), Image.LANCZOS)


def render(spec: GlyphSpec, size: int = 32) -> torch.Tensor:
    """The glyph as a (3, size, size) float tensor in [0, 1]."""
    m = torch.from_numpy(np.asarray(_mask(spec, size), dtype=np.float32) / 255.0)
    tint = torch.tensor(spec.tint).view(3, 1, 1)
    return (spec.background + (spec.ink * tint - spec.background) * m).clamp(0, 1)


def prompt_for(label: int) -> str:
    """The coarse text prompt of a class: 'a digit', 'a letter' or 'a shape' (never the class)."""
    return f"a {CATEGORY[CLASSES[label]]}"


class GlyphDataset(torch.utils.data.Dataset):
    """``length`` glyphs, deterministic in (seed, index): dicts with ``hr`` (3, size, size), ``lr``
    (3, size/factor, size/factor), ``label`` (index into ``classes``), ``prompt``.

    ``chars``: the characters drawn (default CLASSES; the feature network trains on OTHER_CHARS);
    ``fonts``: which of Pillow's fonts to use (default both).
    """

    def __init__(self, length: int, size: int = 32, seed: int = 0, factor: int = 4,
                 chars: tuple[str, ...] = CLASSES, fonts: tuple[str, ...] = FONTS) -> None:
        if size % factor:
            raise ValueError(f"size {size} is not divisible by factor {factor}")
        self.length, self.size, self.seed, self.factor = length, size, seed, factor
        self.chars, self.fonts = tuple(chars), tuple(fonts)

    def __len__(self) -> int:
        return self.length

    def spec(self, i: int) -> tuple[int, GlyphSpec]:
        rng = random.Random(self.seed * 1_000_003 + i)
        label = rng.randrange(len(self.chars))
        return label, GlyphSpec.random(self.chars[label], rng, self.fonts)

    def __getitem__(self, i: int) -> dict:
        label, spec = self.spec(i)
        hr = render(spec, self.size)
        lr = downsample(hr[None], self.factor)[0]
        prompt = prompt_for(label) if self.chars == CLASSES else "a glyph"
        return {"hr": hr, "lr": lr, "label": label, "prompt": prompt}
