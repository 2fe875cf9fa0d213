"""The oracle Hallucination Score and the domain's classifiers: HS ~0 on ground truth and high on the wrong
member of a confusable pair rendered with the same spec, the flip indicator, the independent checker,
save/load by path (one loader for the four architectures), the augmentation."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from domains.super_resolution.glyphs import CLASSES, OTHER_CHARS, GlyphDataset, partner, render, upsample
from domains.super_resolution.hallucination import (
    GlyphClassifier,
    GlyphCNN,
    GlyphFeatureNet,
    LRGlyphCNN,
    OracleHallucination,
    PatchMixer,
    degrade,
    load_classifier,
    oracle_hs,
)


def paired_glyphs(n: int = 48, seed: int = 777):
    """(GT images, their labels, the partner class rendered with the same spec, the partner labels) for
    glyphs of the four confusable pairs (the shapes have no partner)."""
    ds = GlyphDataset(4 * n, seed=seed)
    gt, wrong, labels = [], [], []
    for i in range(len(ds)):
        label, spec = ds.spec(i)
        if partner(label) == label:
            continue
        gt.append(render(spec))
        wrong.append(render(replace(spec, char=CLASSES[partner(label)])))
        labels.append(label)
        if len(gt) == n:
            break
    return torch.stack(gt), torch.tensor(labels), torch.stack(wrong)


@pytest.fixture(scope="module")
def glyphs():
    return paired_glyphs()


@pytest.mark.parametrize("which,gt_hs", [("embedded:sr-oracle", 0.05), ("embedded:sr-checker", 0.1)])
def test_hs_is_near_zero_on_ground_truth_and_high_on_the_partner_class(glyphs, which, gt_hs):
    """The oracle (and, less sharply, the checker: fewer steps, stronger augmentation) on the glyphs of the
    confusable pairs and on their partner drawn with the same spec."""
    gt, labels, wrong = glyphs
    with torch.no_grad():
        hs_gt, flip_gt = oracle_hs(gt, labels, which)
        hs_wrong, flip_wrong = oracle_hs(wrong, labels, which)
    assert hs_gt.mean() < gt_hs and flip_gt.mean() < 0.05
    assert hs_wrong.mean() > 0.8 and flip_wrong.mean() > 0.8
    # flip is exactly "the argmax is not the label"
    net = load_classifier(which)
    with torch.no_grad():
        argmax = net(torch.cat([gt, wrong])).argmax(-1)
    assert torch.equal(torch.cat([flip_gt, flip_wrong]).bool(), argmax != labels.repeat(2))
    assert ((hs_gt >= 0) & (hs_gt <= 1)).all()


def test_the_checker_is_another_architecture():
    assert isinstance(load_classifier("embedded:sr-oracle"), GlyphCNN)
    assert isinstance(load_classifier("embedded:sr-checker"), PatchMixer)
    assert isinstance(load_classifier("embedded:sr-lr-classifier"), LRGlyphCNN)
    features = load_classifier("embedded:sr-features")
    assert isinstance(features, GlyphFeatureNet) and features.classes == OTHER_CHARS
    assert not set(features.classes) & set(CLASSES)  # trained on other characters


def test_oracle_reward_is_minus_hs_with_a_flip_term_and_its_gradient_reaches_the_images(glyphs):
    gt, labels, wrong = glyphs
    reward = OracleHallucination()
    assert reward.differentiable
    x = torch.cat([gt[:4], wrong[:4]]).requires_grad_(True)
    cond = [{"label": int(y)} for y in labels[:4].repeat(2)]
    out = reward(x, cond)
    hs, _ = oracle_hs(x.detach(), labels[:4].repeat(2))
    assert torch.allclose(out.total, -hs, atol=1e-6) and torch.allclose(out.terms["hs"], hs, atol=1e-6)
    assert out.terms["flip"][4:].sum() >= 3 and out.terms["flip"][:4].sum() == 0
    out.total.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="label"):
        reward(x.detach(), [{"prompt": "a digit"}] * 8)


def test_bicubic_upsampling_is_scored_and_the_shapes_are_easy():
    """The baseline SR (bicubic upsampling of the LR) keeps the class for the shapes (no partner)."""
    ds = GlyphDataset(64, seed=31)
    items = [ds[i] for i in range(64)]
    shapes = [it for it in items if CLASSES[it["label"]] in ("circle", "square")]
    lr = torch.stack([it["lr"] for it in shapes])
    hs, flip = oracle_hs(upsample(lr), [it["label"] for it in shapes])
    assert flip.mean() < 0.2 and hs.mean() < 0.3


@pytest.mark.parametrize("cls,kwargs,size", [(GlyphCNN, {"width": 4}, 32), (PatchMixer, {"dim": 8, "depth": 1}, 32),
                                             (LRGlyphCNN, {"width": 4, "hidden": 8}, 8),
                                             (GlyphFeatureNet, {"width": 4}, 32)])
def test_save_and_load_by_path(tmp_path, cls, kwargs, size):
    torch.manual_seed(0)
    net = cls(**kwargs).eval()
    net.save_pretrained(tmp_path / "m")
    back = GlyphClassifier.from_pretrained(tmp_path / "m")
    assert type(back) is cls and back.config == net.config and not back.training
    x = torch.rand(2, 3, size, size)
    assert torch.equal(net(x), back(x))
    assert type(cls.from_pretrained(tmp_path / "m")) is cls
    if cls is not GlyphCNN:
        with pytest.raises(TypeError, match="not a GlyphCNN"):
            GlyphCNN.from_pretrained(tmp_path / "m")


def test_missing_weights_name_the_recipe(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_oracle_tiny"):
        GlyphClassifier.from_pretrained(tmp_path / "none")


def test_degrade_is_seeded_and_each_artefact_changes_the_images():
    x = GlyphDataset(4, seed=3)
    x = torch.stack([x[i]["hr"] for i in range(4)])

    def run(seed, **kw):
        return degrade(x, generator=torch.Generator().manual_seed(seed), **kw)

    assert torch.equal(degrade(x), x)
    for kw in ({"noise_std": 0.1}, {"blur_sigma": 1.0, "blur_p": 1.0}, {"lr_mix": 0.5, "lr_mix_p": 1.0},
               {"shift": 2}, {"contrast": 0.3}):
        a, b = run(0, **kw), run(0, **kw)
        assert torch.equal(a, b) and not torch.equal(a, x) and a.min() >= 0 and a.max() <= 1, kw
    lr = torch.stack([GlyphDataset(4, seed=3)[i]["lr"] for i in range(4)])
    assert degrade(lr, round_trip_p=1.0).shape == lr.shape
