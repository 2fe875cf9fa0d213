"""The text-to-3D rewards on renders (text alignment, visual consistency) and the independent evaluator: the shipped
networks read ground-truth renders of the canonical objects, gradients reach the renders, errors are clear."""

from __future__ import annotations

import pytest
import torch

from domains.text_to_3d.evaluator import EvaluatorAccuracy, RenderEvaluator, RenderTransformer
from domains.text_to_3d.objects import FRONT_AZIMUTH, FRONT_ELEVATION, PROMPTS, front_camera, render_views
from domains.text_to_3d.rewards import (
    DEGRADED,
    RenderClassifier,
    RenderFeatureNet,
    TextAlignmentReward,
    VisualConsistencyReward,
    degrade_renders,
    feature_metrics,
    info_nce,
)
from domains.text_to_3d.scene import Cameras
from rewardopt.generators.capabilities import ImagePrompt
from rewardopt.testing.contracts import RewardContract

SIDE = (120.0, 20.0)  # a second view (azimuth, elevation), away from the front


@pytest.fixture(scope="module")
def gt():
    """Ground-truth renders of every canonical object: ``front`` (36, 3, 32, 32) and ``side`` (36, 3, 32, 32)."""
    cams = Cameras(torch.tensor([FRONT_AZIMUTH, SIDE[0]]), torch.tensor([FRONT_ELEVATION, SIDE[1]]))
    views = torch.stack([render_views(p, cams, resolution=48) for p in PROMPTS])  # (36, 2, 3, 32, 32)
    return {"front": views[:, 0], "side": views[:, 1]}


@pytest.fixture(scope="module")
def alignment():
    return TextAlignmentReward()


@pytest.fixture(scope="module")
def consistency():
    return VisualConsistencyReward()


def few(gt, idx=(0, 13, 27, 35)):
    """A few side renders with their prompts, and image prompts carrying the front views."""
    idx = list(idx)
    renders = gt["side"][idx]
    prompts = [PROMPTS[i] + ", side view" for i in idx]
    return renders, prompts, [ImagePrompt(p, gt["front"][i]) for p, i in zip(prompts, idx)]


class TestTextAlignmentReward(RewardContract):
    @pytest.fixture
    def make_reward(self):
        return TextAlignmentReward  # a fresh one: the contract's last test patches its score

    @pytest.fixture
    def make_samples(self, gt):
        return lambda: few(gt)[:2]


class TestVisualConsistencyReward(RewardContract):
    @pytest.fixture
    def make_reward(self):
        return VisualConsistencyReward

    @pytest.fixture
    def make_samples(self, gt):
        return lambda: (few(gt)[0], few(gt)[2])


# ------------------------------------------------------------------------------------- text alignment
def test_alignment_scores_the_right_prompt_highest_on_gt_renders(gt, alignment):
    for view in ("front", "side"):
        renders = gt[view]
        with torch.no_grad():
            logp = alignment.classifier(renders).log_softmax(-1)[:, : len(PROMPTS)]  # (render, prompt)
            assert torch.allclose(alignment(renders, PROMPTS).total, logp.diagonal(), atol=1e-5)
        hits = (logp.argmax(1) == torch.arange(len(PROMPTS))).float().mean()
        assert hits >= 0.85, f"{view}: the right prompt scores highest on {hits:.2f} of the canonical objects"


def test_alignment_ignores_the_view_suffix_and_reads_image_prompts(gt, alignment):
    renders, prompts, image_prompts = few(gt)
    plain = alignment(renders, [p.split(",")[0] for p in prompts]).total
    assert torch.allclose(alignment(renders, prompts).total, plain)
    assert torch.allclose(alignment(renders, image_prompts).total, plain)


def test_alignment_prefers_clean_to_blank_and_degraded(gt, alignment):
    renders, prompts, _ = few(gt)
    clean = alignment(renders, prompts).total
    blank = alignment(torch.ones_like(renders), prompts).total
    gen = torch.Generator().manual_seed(0)
    faded = alignment(degrade_renders(renders, fade=0.8, fade_p=1.0, blur_sigma=1.5, blur_p=1.0, generator=gen),
                      prompts)
    assert (clean > blank + 2).all() and (faded.total > blank + 2).all()
    assert faded.terms["top1"].mean() >= 0.75, "a faint, blurry render still reads as its prompt"
    assert (blank < -2).all(), "an empty render must not score well for any prompt (the none class)"


def test_alignment_gradient_reaches_a_rendered_scene(gt, alignment):
    from domains.text_to_3d.scene import VoxelGrid, render

    scene = VoxelGrid(16, init_density=5.0, generator=torch.Generator().manual_seed(0))
    img = render(scene, front_camera(), 32, 32, num_samples=32)
    alignment(img, [PROMPTS[0]]).total.sum().backward()
    assert scene.rgb_raw.grad.abs().sum() > 0 and scene.density_raw.grad.abs().sum() > 0


def test_alignment_resizes_other_sizes(gt, alignment):
    renders, prompts, _ = few(gt)
    big = torch.nn.functional.interpolate(renders, size=(64, 64), mode="bilinear", align_corners=False)
    assert (alignment(big, prompts).total - alignment(renders, prompts).total).abs().max() < 0.5


@pytest.mark.parametrize("bad", [torch.rand(2, 32, 32), torch.rand(2, 1, 32, 32), torch.rand(1, 2, 3, 32, 32)])
def test_wrong_render_shapes_are_clear_errors(alignment, consistency, bad):
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        alignment(bad, [PROMPTS[0]] * len(bad))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        consistency(bad, [ImagePrompt(PROMPTS[0], torch.rand(3, 32, 32))] * len(bad))


def test_prompt_errors(alignment):
    x = torch.rand(2, 3, 32, 32)
    with pytest.raises(ValueError, match="not one of the 36 prompts"):
        alignment(x, ["a purple torus", PROMPTS[0]])
    with pytest.raises(ValueError, match="one prompt per render"):
        alignment(x, [PROMPTS[0]])
    with pytest.raises(ValueError, match="one prompt per render"):
        alignment(x, None)


def test_unknown_backends_and_missing_weights_are_clear(tmp_path):
    with pytest.raises(ValueError, match="unknown backend 'blip:x'"):
        TextAlignmentReward("blip:x")
    with pytest.raises(ValueError, match="unknown backend 'siglip:y'"):
        VisualConsistencyReward("siglip:y")
    with pytest.raises(FileNotFoundError, match="train_alignment_tiny.yaml"):
        TextAlignmentReward(str(tmp_path / "nothing"))
    with pytest.raises(FileNotFoundError, match="train_features_tiny.yaml"):
        VisualConsistencyReward(str(tmp_path / "nothing"))
    with pytest.raises(ValueError, match="pool"):
        VisualConsistencyReward(pool="max")


@pytest.mark.parametrize("backend", ["imagereward", "imagereward:ImageReward-v1.0"])
def test_imagereward_is_not_implemented(backend):
    with pytest.raises(NotImplementedError, match="image-reward"):
        TextAlignmentReward(backend)


def test_clip_backend_scores_the_stripped_prompt(tiny_clip_dir, gt):
    from domains.images.rewards import CLIPScoreReward

    renders, prompts, _ = few(gt)
    reward = TextAlignmentReward(f"clip:{tiny_clip_dir}")
    direct = CLIPScoreReward(str(tiny_clip_dir))(renders, [p.split(",")[0] for p in prompts]).total
    assert torch.allclose(reward(renders, prompts).total, direct, atol=1e-5)
    x = renders.clone().requires_grad_(True)
    reward(x, prompts).total.sum().backward()
    assert x.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------- visual consistency
def test_visual_consistency_is_higher_for_the_prompted_object(gt, consistency):
    n = len(PROMPTS)
    refs = [ImagePrompt(p, gt["front"][i]) for i, p in enumerate(PROMPTS)]
    own = consistency(gt["side"], refs).total
    shifted = consistency(gt["side"], refs[1:] + refs[:1]).total  # each render against another object's front
    assert (own > shifted).float().mean() >= 0.9
    # nearest front view among all 36 is the object's own for most renders from the side
    with torch.no_grad():
        sim = consistency.embed(gt["side"]) @ consistency.embed(gt["front"]).T
    assert torch.allclose(sim.diagonal(), own, atol=1e-5)
    assert (sim.argmax(1) == torch.arange(n)).float().mean() >= 0.75


def test_visual_consistency_needs_image_prompts(gt, consistency):
    renders, prompts, _ = few(gt)
    with pytest.raises(TypeError, match="ImagePrompt"):
        consistency(renders, prompts)
    with pytest.raises(ValueError, match="one condition per render"):
        consistency(renders, None)


def test_visual_consistency_resizes_visual_prompts(gt, consistency):
    renders, prompts, refs = few(gt)
    big = [ImagePrompt(str(r), torch.nn.functional.interpolate(r["image"][None], size=(64, 64), mode="bilinear",
                                                               align_corners=False)[0]) for r in refs]
    assert (consistency(renders, big).total - consistency(renders, refs).total).abs().max() < 0.1


@pytest.mark.parametrize("kind", ["dinov2", "clip"])
def test_visual_consistency_with_hf_backends(tmp_path, gt, kind):
    if kind == "dinov2":
        from transformers import Dinov2Config, Dinov2Model

        Dinov2Model(Dinov2Config(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                                 patch_size=8, image_size=32)).save_pretrained(tmp_path / kind)
    else:
        from transformers import CLIPVisionConfig, CLIPVisionModel

        CLIPVisionModel(CLIPVisionConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                         intermediate_size=32, image_size=32, patch_size=8)).save_pretrained(
            tmp_path / kind)
    renders, _, refs = few(gt)
    for pool in ("cls", "mean"):
        reward = VisualConsistencyReward(f"{kind}:{tmp_path / kind}", pool=pool)
        x = renders.clone().requires_grad_(True)
        out = reward(x, refs).total
        assert out.shape == (4,) and (out.abs() <= 1 + 1e-5).all()
        out.sum().backward()
        assert x.grad.abs().sum() > 0
        same = reward(torch.stack([r["image"] for r in refs]), refs).total
        assert torch.allclose(same, torch.ones(4), atol=1e-4)  # a render identical to its visual prompt: cos 1


# ------------------------------------------------------------------------------------- evaluator
def test_evaluator_reads_canonical_gt_renders(gt):
    ev = RenderEvaluator()
    for view in ("front", "side"):
        assert ev.accuracy(gt[view], PROMPTS) >= 0.85, view
    probs = ev.probs(gt["front"])
    assert probs.shape == (36, 37) and torch.allclose(probs.sum(1), torch.ones(36))  # the none class last
    assert ev.predict(torch.ones(2, 3, 32, 32)) == [None, None]  # an empty render is no object
    p = ev.prompt_probability(gt["front"][:3], [q + ", front view" for q in PROMPTS[:3]])
    assert torch.allclose(p, probs[torch.arange(3), torch.arange(3)])


def test_evaluator_accuracy_reward_is_for_evaluation_only(gt):
    r = EvaluatorAccuracy()
    assert not r.differentiable and r.differentiable_part() is None
    out = r(gt["front"][:4], PROMPTS[:4])
    assert set(out.total.tolist()) <= {0.0, 1.0} and "p_prompt" in out.terms
    wrong = r(gt["front"][:4], PROMPTS[4:8]).total
    assert wrong.sum() < out.total.sum()


def test_evaluator_is_independent_of_the_reward(alignment, consistency):
    import yaml

    from tests.conftest import ROOT

    ev = RenderEvaluator()
    assert not any(isinstance(m, torch.nn.TransformerEncoder) for m in alignment.classifier.modules())
    assert any(isinstance(m, torch.nn.TransformerEncoder) for m in ev.model.modules())
    recipes = {k: yaml.safe_load((ROOT / f"recipes/text_to_3d/train_{k}_tiny.yaml").read_text())
               for k in ("alignment", "evaluator", "features")}
    data = [r["data"]["init_args"] for r in recipes.values()]
    seeds = [d["seed"] for d in data] + [d["val_seed"] for d in data] + [0]  # 0: the prior's render bank
    assert len(set(seeds)) == len(seeds), "the networks train and validate on render banks of their own"
    inits = [r["model"]["init_args"]["seed"] for r in recipes.values()]
    assert len(set(inits)) == 3
    augs = [r["model"]["init_args"]["augment"] for r in recipes.values()]
    assert augs[0] != augs[1], "the evaluator has its own augmentation"


# ------------------------------------------------------------------------------------- networks
@pytest.mark.parametrize("make", [lambda: RenderClassifier(width=8), lambda: RenderFeatureNet(width=8, dim=16),
                                  lambda: RenderTransformer(width=8, dim=16, layers=1, heads=2)])
def test_networks_round_trip(tmp_path, make):
    torch.manual_seed(0)
    net = make().eval()
    net.save_pretrained(tmp_path / "net")
    back = type(net).from_pretrained(tmp_path / "net")
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(net(x), back(x))
    assert back.config == net.config


def test_degrade_renders_is_seeded_and_stays_in_range():
    x = torch.rand(4, 3, 32, 32)
    a = degrade_renders(x, generator=torch.Generator().manual_seed(1), **DEGRADED)
    b = degrade_renders(x, generator=torch.Generator().manual_seed(1), **DEGRADED)
    assert torch.equal(a, b) and a.min() >= 0 and a.max() <= 1 and not torch.equal(a, x)
    assert torch.equal(degrade_renders(x), x)  # every artefact off by default
    white = torch.ones(2, 3, 32, 32)
    moved = degrade_renders(white, shift=0.2, scale=0.2, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(moved, white)  # the uncovered border is the white background
    faded = degrade_renders(torch.zeros(2, 3, 8, 8), fade=1.0, fade_p=1.0, generator=torch.Generator().manual_seed(0))
    assert (faded >= 0).all() and faded.mean() > 0  # toward white


def test_info_nce_and_feature_metrics():
    torch.manual_seed(0)
    a = torch.nn.functional.normalize(torch.randn(8, 16), dim=-1)
    assert info_nce(a, a, 0.1) < info_nce(a, a.roll(1, 0), 0.1)
    inst = torch.arange(4).repeat_interleave(2)
    emb = a[inst]  # two identical "views" per instance, fronts equal to them
    m = feature_metrics(emb, emb, emb, inst, inst)
    assert m["instance_retrieval"] == m["front_retrieval"] == m["front_prompt_retrieval"] == 1.0
    assert abs(m["pos_cos"] - 1) < 1e-5


def test_the_evaluator_is_not_fooled_by_what_hacks_the_reward(alignment):
    """The benchmark's hacking check: renders pushed (L-inf 8/255, 30 signed-gradient steps) to maximise the text-
    alignment reward for ANOTHER prompt gain a lot of reward, while the independent evaluator still reads the object
    that is actually there. If the evaluator shared the reward's blind spots, reward gains would count as accuracy."""
    evaluator = RenderEvaluator()
    cams = Cameras(torch.tensor([0.0, 120.0]), torch.tensor([15.0, 20.0]))
    source = [PROMPTS[i] for i in (12, 24, 13, 25) for _ in range(2)]
    target = [PROMPTS[i] for i in (13, 25, 12, 24) for _ in range(2)]
    x0 = torch.cat([render_views(p, cams, 32, 48) for p in source[::2]])
    x = x0.clone().requires_grad_(True)
    budget = 8 / 255
    for _ in range(30):
        (grad,) = torch.autograd.grad(alignment(x, target).total.sum(), x)
        with torch.no_grad():
            x += grad.sign() / 255
            x.copy_((x0 + (x - x0).clamp(-budget, budget)).clamp(0, 1))
    with torch.no_grad():
        before, after = alignment(x0, target).total.exp().mean(), alignment(x, target).total.exp().mean()
        assert after > 0.1 and after > 100 * before  # the reward is hacked
        assert evaluator.prompt_probability(x, target).mean() < 0.01  # the evaluator is not
        assert evaluator.prompt_probability(x, source).mean() > 0.9
