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
    own = [np.array(COLOURS[ShapeSpec.from_prompt(varied[i]["prompt"]).colour]) for i in range(64)]
    palette_other = [any(np.abs(np.array(c) - np.array(p)).max() < 0.02 for n, p in COLOURS.items()
                         if np.abs(np.array(p) - o).max() > 0) for c, o in zip(corners, own)]
    assert sum(palette_other) >= 5
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
    """An image with no shapes (the background alone) reads as "none" on every head, so erasing non-blue
    shapes pays less than recolouring them blue. Measured (median over specs, nats of log p(blue)):
    recolouring +28; fading to 25% / erasing +15 / +8 (the hackable classifier: +20 / +20; shape-free
    images fitted to uniform instead of "none": +40 / +40). Any step away from a confident "red" raises
    a log-probability reward, so fading still pays something: the test holds erasing <= 0.4x and any
    fade <= 0.75x of the honest gain, and p(blue) < 1% throughout."""
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
    assert p[:, -1].mean() > 0.9  # the "none" class
    assert p[:, list(COLOURS).index("blue")].max() < 0.01

    specs, original, as_blue = _batch(None)
    reward = ShapeAttributeReward("colour", target="blue")
    prompts = [s.prompt for s in specs]
    bg = torch.tensor(BACKGROUND)[None, :, None, None]
    with torch.no_grad():
        r0, r_blue = reward(original, prompts).total, reward(as_blue, prompts).total
        faded = {a: reward(a * original + (1 - a) * bg, prompts).total for a in (0.5, 0.25, 0.0)}
    honest = (r_blue - r0).median()
    for a, r in faded.items():
        assert (r - r0).median() < (0.4 if a == 0.0 else 0.75) * honest, (a, (r - r0).median(), honest)
        assert r.exp().mean() < 0.01, a


def test_classifier_training_labels_shape_free_images_none_and_scores_only_images_with_shapes():
    from domains.images.tiny import ShapeClassifierTraining

    fit = ShapeClassifierTraining(width=8, none_class=True)
    logged = {}
    fit.log = lambda name, value, **kw: logged.__setitem__(name, (float(value), kw.get("batch_size")))
    ds = ShapesDataset(8, 24, seed=0, backgrounds="varied", empty_fraction=0.5)
    batch = torch.utils.data.default_collate([ds[i] for i in range(8)])
    n_empty = int(batch["empty"].sum())
    assert 0 < n_empty < 8
    loss = fit._step(batch, "val")
    logits = fit.classifier(batch["image"])
    expected = 0.0
    for k, z in logits.items():
        target = batch[k].clone()
        target[batch["empty"]] = z.shape[-1] - 1
        expected = expected + torch.nn.functional.cross_entropy(z, target)
    assert torch.allclose(loss, expected)
    full = ~batch["empty"]
    acc = (logits["colour"][full].argmax(-1) == batch["colour"][full]).float().mean().item()
    assert logged["val/acc_colour"] == (pytest.approx(acc), 8 - n_empty)
    all_empty = torch.utils.data.default_collate(
        [ShapesDataset(4, 24, seed=0, backgrounds="varied", empty_fraction=1.0)[i] for i in range(4)])
    logged.clear()
    fit._step(all_empty, "val")
    assert "val/acc_colour" not in logged and "val/loss" in logged  # no NaN accuracy from an all-empty batch
    with pytest.raises(ValueError, match="none_class"):
        ShapeClassifierTraining(width=8)._step(batch, "val")


def test_the_fixed_dataset_is_the_renders_of_its_seeded_stream_and_varied_keeps_its_shapes():
    """The diffusion model's data must not move when the classifier's options are added: item i of the
    fixed dataset is render(spec, size, Random(derived_seed(seed, i))) after drawing the spec."""
    from rewardopt.run import derived_seed

    fixed = ShapesDataset(16, 24, seed=3)
    varied = ShapesDataset(16, 24, seed=3, backgrounds="varied")
    for i in range(16):
        rng = random.Random(derived_seed(3, i))
        spec = fixed.specs[rng.randrange(len(fixed.specs))]
        assert torch.equal(fixed[i]["image"], render(spec, 24, rng))
        assert varied[i]["prompt"] == fixed[i]["prompt"] == spec.prompt
        img_f, img_v = fixed[i]["image"], varied[i]["image"]
        shape_px = (img_f - torch.tensor(BACKGROUND)[:, None, None]).abs().amax(0) > 1e-4
        assert torch.equal(img_f[:, shape_px], img_v[:, shape_px])


def test_flat_varied_backgrounds_stay_away_from_the_shapes_colour():
    from domains.images.shapes import varied_background

    for i in range(300):
        rng = random.Random(i)
        spec = NON_BLUE[i % len(NON_BLUE)] if i % 2 else ShapeSpec("blue", "circle", 1)
        bg = varied_background(spec, 24, rng)
        if np.abs(bg - bg[0, 0]).max() < 1e-6:  # flat (blends are checked only at their ends, see docstring)
            assert np.abs(bg[0, 0] - np.array(COLOURS[spec.colour])).max() >= 0.3
