"""Super-resolution proxies (feature, LR-feature, LPIPS-style and pixel distances): zero at the ground truth,
larger for a wrong class, differentiable into the images; DINOv2 / CLIP-vision backends from tiny configs
saved and loaded by path; the panel the HS judge is shown; the served judge through HTTP."""

from __future__ import annotations

import io
from dataclasses import replace

import pytest
import torch

from domains.super_resolution.glyphs import CLASSES, GlyphDataset, downsample, render, upsample
from domains.super_resolution.judge import (
    LABELS,
    HallucinationJudgeModel,
    hallucination_panel,
    panel_png,
    panel_tiles,
    serve,
)
from domains.super_resolution.rewards import (
    CLIPVisionFeatures,
    Dinov2Features,
    FeatureDistance,
    GlyphFeatures,
    HallucinationJudge,
    LPIPSStyleDistance,
    LRFeatureDistance,
    PixelDistance,
    feature_mse,
    normalised_distance,
)


def conds(hr, labels):
    return [{"image": downsample(h[None])[0], "prompt": "a glyph", "hr": h, "label": int(y)}
            for h, y in zip(hr, labels)]


@pytest.fixture(scope="module")
def pool():
    """GT glyphs of the digit pairs, and another class rendered with the same spec (3 -> O, 8 -> square, ...)."""
    ds = GlyphDataset(64, seed=99)
    gt, wrong, labels = [], [], []
    for i in range(len(ds)):
        label, spec = ds.spec(i)
        if CLASSES[label] not in ("3", "8", "1", "7"):
            continue
        other = {"3": "O", "8": "square", "1": "circle", "7": "O"}[CLASSES[label]]
        gt.append(render(spec))
        wrong.append(render(replace(spec, char=other)))
        labels.append(label)
        if len(gt) == 6:
            break
    return torch.stack(gt), torch.stack(wrong), labels


PROXIES = [FeatureDistance, LPIPSStyleDistance, LRFeatureDistance, PixelDistance,
           lambda: PixelDistance(reference="lr"), lambda: LRFeatureDistance(distance="lpips")]


@pytest.mark.parametrize("make", PROXIES)
def test_proxies_are_zero_at_the_ground_truth_worse_for_a_wrong_class_and_differentiable(pool, make):
    gt, wrong, labels = pool
    reward = make()
    assert reward.differentiable
    cond = conds(gt, labels)
    at_gt = reward(gt, cond).total
    assert at_gt.abs().max() < 1e-4  # down(GT) is the LR: the GT-free ones are 0 there too
    x = wrong.clone().requires_grad_(True)
    out = reward(x, cond)
    assert (out.total < -1e-3).all()
    out.total.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_pixel_distance_psnr_and_lpips_style_normalisation():
    hr = torch.full((2, 3, 32, 32), 0.5)
    out = PixelDistance()(hr + 0.1, conds(hr, [0, 1]))
    assert torch.allclose(out.terms["mse"], torch.tensor(0.01))
    assert torch.allclose(out.terms["psnr"], torch.tensor(20.0))
    a = torch.randn(2, 5, 4, 4)
    assert normalised_distance(a, 3 * a).abs().max() < 1e-6 < feature_mse(a, 3 * a).min()  # channel-unit-normalised
    b = torch.randn(2, 5, 4, 4)
    manual = ((a / a.norm(dim=1, keepdim=True) - b / b.norm(dim=1, keepdim=True)) ** 2).sum(1).mean((1, 2))
    assert torch.allclose(normalised_distance(a, b), manual, atol=1e-5)


def test_lr_feature_distance_compares_upsampled_down_sr_with_upsampled_lr(pool):
    gt, wrong, labels = pool
    backend = GlyphFeatures()
    got = LRFeatureDistance(backend)(wrong, conds(gt, labels)).terms["distance"]
    a, b = upsample(downsample(wrong)), upsample(downsample(gt))
    fa, fb = backend.features(a), backend.features(b)
    want = torch.stack([((x - y) ** 2).flatten(1).mean(1) for x, y in zip(fa, fb)]).mean(0)
    assert torch.allclose(got, want, atol=1e-6)
    with pytest.raises(ValueError, match="image"):
        LRFeatureDistance()(wrong, [{"hr": h} for h in gt])


def _tiny_dinov2(path):
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                             patch_size=8, image_size=32)).save_pretrained(path)
    return path


def _tiny_clip(path):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    CLIPVisionModel(CLIPVisionConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, patch_size=8, image_size=32)).save_pretrained(path)
    return path


@pytest.mark.parametrize("kind", ["dinov2", "clip"])
def test_transformers_backends_load_by_path_and_are_differentiable(tmp_path, pool, kind):
    gt, wrong, labels = pool
    if kind == "dinov2":
        backend = Dinov2Features(str(_tiny_dinov2(tmp_path / "dino")), size=48)
        mean, std, size = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 48
    else:
        backend = CLIPVisionFeatures(str(_tiny_clip(tmp_path / "clip")), layers=[-1])
        mean, std, size = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711), 32
    x = torch.rand(2, 3, 32, 32)
    manual = torch.nn.functional.interpolate(x, size=(size, size), mode="bicubic", align_corners=False,
                                             antialias=True)
    manual = (manual - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert torch.allclose(backend.preprocess(x), manual, atol=1e-6)
    feats = backend.features(x)
    tokens = 1 + (size // 8) ** 2
    assert len(feats) == (2 if kind == "dinov2" else 1) and feats[-1].shape == (2, 16, tokens)
    for reward in (FeatureDistance(backend), LPIPSStyleDistance(backend)):
        cond = conds(gt, labels)
        assert reward(gt, cond).total.abs().max() < 1e-5
        w = wrong.clone().requires_grad_(True)
        out = reward(w, cond)
        out.total.sum().backward()
        assert (out.total < 0).all() and w.grad.abs().sum() > 0
    reward.train()
    assert not backend.training and not backend.model.training  # frozen backends stay in eval mode


def test_panel_shows_lr_upsampled_and_sr_side_by_side_and_reads_back(pool):
    from PIL import Image

    gt, wrong, _ = pool
    lr = downsample(gt[:1])[0]
    img = hallucination_panel(lr, wrong[0])
    assert img.size == (272, 160)  # two 128 px tiles (32 px x4), a 16 px gap, a 32 px caption strip
    lr_up, sr = panel_tiles(panel_png(lr, wrong[0]))
    assert (sr - wrong[0]).abs().max() <= 0.5 / 255 + 1e-6  # nearest x4 then area averaging: the 8-bit pixels
    assert (lr_up - upsample(lr[None])[0]).abs().max() <= 0.5 / 255 + 1e-6
    assert LABELS == ("LR input (upsampled)", "SR output")
    a = torch.from_numpy(__import__("numpy").asarray(img)).float()
    assert (a[:32, :, :].amax() > 200) and (a[:32].mean() < 80)  # white captions on the dark strip
    buf = io.BytesIO()
    img.resize((544, 320), Image.Resampling.NEAREST).save(buf, format="PNG")  # a client that resizes
    lr_up2, sr2 = panel_tiles(buf.getvalue())
    assert (sr2 - wrong[0]).abs().max() <= 0.5 / 255 + 1e-6 and (lr_up2 - lr_up).abs().max() <= 1e-6


def test_served_judge_rates_a_wrong_class_above_the_ground_truth_over_http(pool):
    gt, wrong, labels = pool
    model = HallucinationJudgeModel()
    lr = downsample(gt)
    p_lr, p_sr = model.probabilities(panel_png(lr[0], wrong[0]))
    hs, reasoning = model.judge(panel_png(lr[0], wrong[0]))
    assert hs == pytest.approx(float((p_lr * (1 - p_sr)).sum()), abs=1e-6) and "SR output" in reasoning
    with serve(port=0) as server:
        judge = HallucinationJudge(server.base_url, max_workers=2)
        cond = conds(gt, labels)
        out_gt, out_wrong = judge(gt, cond), judge(wrong, cond)
        assert server.requests == 2 * len(gt)
    r_gt, r_wrong = out_gt.terms["hs_judge"], out_wrong.terms["hs_judge"]
    assert torch.equal(out_gt.total, -r_gt) and ((r_gt >= 1) & (r_wrong <= 9)).all()
    assert (r_wrong > r_gt).all() and r_wrong.mean() > 7 and r_gt.mean() < 3.5
    # the rating is the model's 1 + 8 HS, read from the answer's log-probs (expectation)
    expected = 1 + 8 * model.judge(panel_png(lr[0], wrong[0]))[0]
    assert float(r_wrong[0]) == pytest.approx(expected, abs=0.15)
    assert not judge.differentiable


def test_proxy_gradients_reach_the_sr_models_lora_through_sampling_and_decode():
    """Two sampler steps of a tiny SuperResolutionGenerator (16 px, LoRA rank 2), the VAE decode, each proxy:
    its gradient reaches the LoRA parameters (what DRaFT-K trains). One sampling graph for the four."""
    from domains.super_resolution.tiny import build_tiny_sr_generator
    from domains.super_resolution.upscaler import glyph_conditions

    gen = build_tiny_sr_generator(seed=0, size=16, vae_channels=(8, 16, 16), unet_channels=(16, 32),
                                  max_noise_level=60, num_steps=2, guidance_scale=1.0, lora_rank=2, noise_level=20)
    raw = glyph_conditions(GlyphDataset(2, 16, seed=3), range(2), seed=0)
    cond = gen.encode_condition(raw)
    x = gen.init_state(cond, generator=torch.Generator().manual_seed(0))
    for i in range(len(gen.timesteps)):
        x = gen.step(x, i, cond)
    sr = gen.decode(x)
    assert sr.shape == (2, 3, 16, 16) and sr.requires_grad
    lora = [p for n, p in gen.denoiser.named_parameters() if "lora_" in n]
    assert lora
    for make in (FeatureDistance, LPIPSStyleDistance, LRFeatureDistance, PixelDistance):
        grads = torch.autograd.grad(make()(sr, raw).total.sum(), lora, retain_graph=True, allow_unused=True)
        assert any(g is not None and float(g.abs().sum()) > 0 for g in grads), make.__name__


def test_a_failed_judge_call_is_excluded_from_selection_not_negated_to_plus_infinity(pool):
    gt, wrong, labels = pool
    with serve(port=0, faults={0: "500"}) as server:
        judge = HallucinationJudge(server.base_url, max_workers=1, retries=0, cache_size=0).for_selection()
        out = judge(gt[:3], conds(gt[:3], labels[:3]))
    assert out.excluded.tolist() == [True, False, False]
    assert out.total[0] == float("-inf") and torch.isfinite(out.total[1:]).all() and (out.total[1:] < 0).all()
