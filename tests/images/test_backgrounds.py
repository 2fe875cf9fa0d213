"""Varied backgrounds for the reward classifier: the shipped reward reads the shapes, not the background.

The hackable classifier (trained on the fixed dark background only) is kept as a teaching case for
reward hacking: painting the background blue raises its log p(blue) without touching the shapes.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from domains.images.rewards import ShapeAttributeReward, ShapeClassifier
from domains.images.shapes import BACKGROUND, COLOURS, SHAPES, ShapesDataset, ShapeSpec, render

NON_BLUE = [ShapeSpec(c, s, n) for c in COLOURS if c != "blue" for s in SHAPES for n in (1, 2, 3)]


def _corner(img: torch.Tensor) -> tuple[float, ...]:
    return tuple(round(v, 4) for v in img[:, 0, 0].tolist())


def test_render_paints_the_given_background_and_keeps_the_shapes():
    spec = ShapeSpec("red", "square", 1)
    plain = render(spec, 24, random.Random(0))
    blue_bg = render(spec, 24, random.Random(0), background=COLOURS["blue"])
    assert _corner(plain) == pytest.approx(BACKGROUND, abs=1e-4)
    assert _corner(blue_bg) == pytest.approx(COLOURS["blue"], abs=1e-4)
    shape_px = (plain - torch.tensor(BACKGROUND)[:, None, None]).abs().sum(0) > 1e-3
    assert shape_px.sum() > 20
    assert torch.equal(plain[:, shape_px], blue_bg[:, shape_px])  # same shapes, same place, same colour


def test_varied_dataset_draws_many_backgrounds_and_fixed_keeps_one():
    fixed = ShapesDataset(64, 24, seed=0, backgrounds="fixed")
    varied = ShapesDataset(64, 24, seed=0, backgrounds="varied")
    assert all(_corner(fixed[i]["image"]) == pytest.approx(BACKGROUND, abs=1e-4) for i in range(64))
    corners = [_corner(varied[i]["image"]) for i in range(64)]
    assert len(set(corners)) > 30
    assert torch.equal(varied[5]["image"], ShapesDataset(64, 24, seed=0, backgrounds="varied")[5]["image"])
    # some backgrounds are full palette colours other than the shapes' own (the hack's case)
    assert sum(min(np.abs(np.array(c) - np.array(p)).max() for p in COLOURS.values()) < 0.02 for c in corners) >= 5
    with pytest.raises(ValueError, match="backgrounds must be"):
        ShapesDataset(8, 24, backgrounds="plaid")


def _batch(background):
    rng = random.Random(0)
    specs = [NON_BLUE[rng.randrange(len(NON_BLUE))] for _ in range(48)]
    seeds = list(range(48))
    imgs = torch.stack([render(s, 24, random.Random(i), background=background) for s, i in zip(specs, seeds)])
    as_blue = torch.stack([render(ShapeSpec("blue", s.shape, s.count), 24, random.Random(i), background=background)
                           for s, i in zip(specs, seeds)])
    return specs, imgs, as_blue


def test_the_shipped_reward_reads_the_shapes_colour_on_a_blue_background():
    specs, on_blue, _ = _batch(COLOURS["blue"])
    clf = ShapeClassifier.from_pretrained("embedded:shape-classifier")
    with torch.no_grad():
        p = clf(on_blue)["colour"].softmax(-1)
    truth = torch.tensor([list(COLOURS).index(s.colour) for s in specs])
    assert (p.argmax(-1) == truth).float().mean() >= 0.9
    assert p[:, list(COLOURS).index("blue")].mean() < 0.1


def test_painting_the_background_blue_wins_only_the_hackable_reward():
    specs, dark, as_blue = _batch(None)
    _, painted, _ = _batch(COLOURS["blue"])
    prompts = [s.prompt for s in specs]
    robust = ShapeAttributeReward("colour", target="blue")
    hackable = ShapeAttributeReward("colour", target="blue", classifier="embedded:shape-classifier-hackable")
    with torch.no_grad():  # mean p(blue) = mean exp(reward)
        p = {(name, case): r(x, prompts).total.exp().mean().item()
             for name, r in (("robust", robust), ("hackable", hackable))
             for case, x in (("dark", dark), ("painted", painted), ("blue shapes", as_blue))}
    assert p["hackable", "dark"] < 0.05 and p["robust", "dark"] < 0.05, p
    assert p["hackable", "painted"] > 0.9, p   # the teaching case: the background alone wins the old reward
    assert p["robust", "painted"] < 0.05, p    # the shipped one is not fooled ...
    assert p["robust", "blue shapes"] > 0.9, p  # ... and pays for blue shapes


def test_erasing_the_shapes_does_not_win_the_shipped_reward():
    """An image with no shapes (the background alone) reads as no colour in particular, so DRaFT cannot
    raise log p(blue) by erasing non-blue shapes."""
    ds = ShapesDataset(64, 24, seed=0, backgrounds="varied", empty_fraction=1.0)
    items = [ds[i] for i in range(64)]
    assert all(it["empty"] for it in items)
    empty = torch.stack([it["image"] for it in items])
    from domains.images.quality import mean_abs_laplacian

    assert mean_abs_laplacian(empty).max() < 1e-3  # nothing drawn: flat or a smooth blend
    dark = torch.tensor(BACKGROUND)[None, :, None, None].expand(4, 3, 24, 24)
    clf = ShapeClassifier.from_pretrained("embedded:shape-classifier")
    with torch.no_grad():
        p = clf(torch.cat([empty, dark]))["colour"].softmax(-1)
    assert p.max(-1).values.mean() < 0.5, p.max(-1).values
    assert p[:, list(COLOURS).index("blue")].max() < 0.5
    assert ShapesDataset(8, 24, backgrounds="varied")[0]["empty"] is False
    with pytest.raises(ValueError, match="empty_fraction"):
        ShapesDataset(8, 24, backgrounds="fixed", empty_fraction=0.1)
