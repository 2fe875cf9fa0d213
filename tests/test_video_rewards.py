"""Video rewards and the independent evaluator: shapes, terms, gradients, what they prefer on procedural
clips, the key-frame wrapper, the prompt transform, wrong-input errors, and the two training recipes."""

from __future__ import annotations

import pytest
import torch

from domains.images.rewards import ColourReward, JpegCompressibilityReward, ShapeAttributeReward
from domains.video.evaluator import EvaluatorAlignment, VideoEvaluator
from domains.video.moving_shapes import HEADS, MotionSpec, MovingShapesDataset, render_video
from domains.video.rewards import KeyFrameImageReward, MotionReward, TemporalConsistencyReward, image_prompt
from rewardopt.media import key_frames
from rewardopt.rewards.base import Reward, require_gradient
from tests.conftest import ROOT


@pytest.fixture(scope="module")
def clips():
    """64 procedural clips from a seed neither model was trained or validated on."""
    ds = MovingShapesDataset(64, seed=4242)
    items = [ds[i] for i in range(len(ds))]
    return torch.stack([it["video"] for it in items]), [it["prompt"] for it in items]


@pytest.fixture(scope="module")
def motion():
    return MotionReward()


def test_motion_reward_shapes_terms_and_gradient(clips, motion):
    videos, prompts = clips
    v = videos[:3].clone().requires_grad_(True)
    out = motion(v, prompts[:3])
    assert out.total.shape == (3,) and set(out.terms) == {"log_p_direction"}
    assert (out.total <= 0).all() and motion.differentiable
    out.total.sum().backward()
    assert v.grad is not None and v.grad.abs().sum() > 0
    full = MotionReward(heads="all")(videos[:3], prompts[:3])
    assert set(full.terms) == {f"log_p_{h}" for h in HEADS}
    assert torch.allclose(full.total, sum(full.terms.values()))


def test_motion_reward_prefers_the_prompts_direction(clips, motion):
    """The clip as drawn beats the same clip played backwards (the opposite direction) for its prompt."""
    videos, prompts = clips
    with torch.no_grad():
        forward = motion(videos, prompts).total
        backward = motion(videos.flip(1), prompts).total
    assert (forward > backward).float().mean() >= 0.95
    assert forward.exp().mean() > 0.9  # p(the prompt's direction) on clean clips


def test_motion_reward_direction_follows_the_prompt():
    """One clip, four prompts differing only in the direction: the drawn direction scores highest."""
    reward = MotionReward()
    for d in ("left", "right", "up", "down"):
        spec = MotionSpec("red", "circle", 1, d)
        video = render_video(spec)[None].expand(4, -1, -1, -1, -1)
        prompts = [MotionSpec("red", "circle", 1, o).prompt for o in ("left", "right", "up", "down")]
        with torch.no_grad():
            r = reward(video, prompts).total
        assert ["left", "right", "up", "down"][int(r.argmax())] == d


def test_motion_reward_wrong_inputs(clips, motion):
    videos, prompts = clips
    with pytest.raises(ValueError, match=r"expects videos shaped \(B, F, 3, H, W\).*image batch"):
        motion(videos[:2, 0], prompts[:2])
    with pytest.raises(ValueError, match="8-frame clips; got 4 frames"):
        motion(videos[:2, :4], prompts[:2])
    with pytest.raises(ValueError, match="16x16 frames; got 24x24"):
        motion(torch.rand(2, 8, 3, 24, 24), prompts[:2])
    with pytest.raises(ValueError, match="not a moving-shapes prompt: 'two red circles'"):
        motion(videos[:2], ["two red circles", prompts[1]])
    with pytest.raises(ValueError, match="reads its targets from the prompts"):
        motion(videos[:2], None)
    with pytest.raises(ValueError, match="heads must be"):
        MotionReward(heads=["speed"])
    with pytest.raises(FileNotFoundError, match="train_motion_classifier_tiny.yaml"):
        MotionReward(classifier="/nonexistent/folder")


def test_temporal_consistency():
    r = TemporalConsistencyReward()
    static = render_video(MotionSpec("red", "circle", 1, "left"))[:1].expand(8, -1, -1, -1)[None]
    moving = render_video(MotionSpec("red", "circle", 1, "left"))[None]
    flicker = moving.clone()
    flicker[:, 1::2] = 1 - flicker[:, 1::2]
    out = r(torch.cat([static, moving, flicker]))
    assert out.total[0] == 0
    assert out.total[2] < out.total[1] < 0
    assert set(out.terms) == {"mean_abs_frame_diff", r.name}
    expected = -(moving[0, 1:] - moving[0, :-1]).abs().mean()
    assert torch.allclose(out.total[1], expected)
    v = moving.clone().requires_grad_(True)
    r(v).total.sum().backward()
    assert r.differentiable and v.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"\(B, F, 3, H, W\)"):
        r(moving[0])


class PromptRecorder(Reward):
    """A simple image reward: each image's mean pixel, plus the prompt's length (to see the prompts)."""

    differentiable = True

    def __init__(self):
        super().__init__("recorder")
        self.seen = []

    def score(self, samples, cond):
        assert samples.ndim == 4
        self.seen.append(list(cond) if cond is not None else None)
        extra = torch.tensor([len(p) for p in cond], dtype=samples.dtype) if cond is not None else 0
        return samples.mean(dim=(1, 2, 3)) + extra


def test_key_frame_reward_sums_the_inner_reward_over_the_four_key_frames(clips):
    videos, prompts = clips
    inner = ColourReward("red")
    kf = KeyFrameImageReward(inner)
    out = kf(videos[:5], prompts[:5])
    idx = key_frames(8, 4)
    assert idx == [0, 2, 5, 7]
    expected = sum(inner(videos[:5, i]).total for i in idx)
    assert torch.allclose(out.total, expected, atol=1e-6)
    assert set(out.terms) == {f"frame_{i}" for i in idx}
    assert torch.allclose(out.terms["frame_5"], inner(videos[:5, 5]).total)
    v = videos[:2].clone().requires_grad_(True)
    kf(v, prompts[:2]).total.sum().backward()
    assert kf.differentiable and v.grad.abs().sum() > 0
    assert v.grad[:, 1].abs().sum() == 0 and v.grad[:, 2].abs().sum() > 0  # only key frames are scored
    assert not KeyFrameImageReward(JpegCompressibilityReward()).differentiable
    with pytest.raises(TypeError, match="black-box"):
        require_gradient("DRaFT", KeyFrameImageReward(JpegCompressibilityReward()))


def test_key_frame_reward_prompt_transform_and_resize(clips):
    videos, prompts = clips
    rec = PromptRecorder()
    KeyFrameImageReward(rec, prompt_transform="image_prompt")(videos[:2], ["a red circle moving left",
                                                                           "two blue squares moving up"])
    assert rec.seen[-1] == ["one red circle"] * 4 + ["two blue squares"] * 4
    KeyFrameImageReward(rec)(videos[:1], ["a red circle moving left"])
    assert rec.seen[-1] == ["a red circle moving left"] * 4  # no transform: unchanged
    KeyFrameImageReward(rec, prompt_transform="domains.video.rewards.image_prompt")(videos[:1], prompts[:1])
    assert rec.seen[-1] == [image_prompt(prompts[0])] * 4
    # the image domain's classifier reward is trained at 24 px: it refuses 16-px frames, reads resized ones
    shape_reward = ShapeAttributeReward("colour")
    with pytest.raises(ValueError, match="trained on 24x24"):
        KeyFrameImageReward(shape_reward, prompt_transform=image_prompt)(videos[:2], prompts[:2])
    out = KeyFrameImageReward(shape_reward, resize=24, prompt_transform=image_prompt)(videos[:8], prompts[:8])
    assert out.total.shape == (8,) and (out.total > 4 * torch.log(torch.tensor(0.5))).float().mean() >= 0.75
    v = videos[:2].clone().requires_grad_(True)  # the resize is differentiable: the gradient reaches key frames only
    KeyFrameImageReward(shape_reward, resize=24, prompt_transform=image_prompt)(v, prompts[:2]).total.sum().backward()
    touched = v.grad.abs().flatten(2).sum(-1).sum(0) > 0
    assert touched.tolist() == [f in (0, 2, 5, 7) for f in range(8)]


def test_image_prompt():
    assert image_prompt("two red circles moving left") == "two red circles"
    assert image_prompt("a red circle moving left") == "one red circle"
    assert image_prompt("a green triangle moving down") == "one green triangle"
    with pytest.raises(ValueError, match="not a moving-shapes prompt"):
        image_prompt("two red circles")


@pytest.fixture(scope="module")
def evaluator():
    return VideoEvaluator()


def test_evaluator_reads_procedural_clips(clips, evaluator):
    videos, prompts = clips
    res = evaluator.text_alignment(videos, prompts)
    for h in HEADS:
        assert res[h] > 0.9, (h, res[h])
        assert res["correct"][h].shape == (64,) and res["correct"][h].dtype == torch.bool
    assert res["all"] == pytest.approx(float(torch.stack([res["correct"][h] for h in HEADS]).all(0).float().mean()))
    reversed_res = evaluator.text_alignment(videos.flip(1), prompts)  # backwards: the wrong direction
    assert reversed_res["direction"] < 0.1 and reversed_res["colour"] > 0.9


def test_evaluator_is_independent_and_evaluation_only(clips, evaluator, motion):
    videos, prompts = clips
    assert type(evaluator.model).__name__ != type(motion.classifier).__name__
    reward = EvaluatorAlignment()
    out = reward(videos[:8], prompts[:8])
    assert out.total.shape == (8,) and set(out.total.tolist()) <= {0.0, 1.0}
    assert set(out.terms) == {f"correct_{h}" for h in HEADS}
    assert not reward.differentiable and "NEVER" in EvaluatorAlignment.__doc__
    with pytest.raises(TypeError, match="differentiable reward"):
        require_gradient("DRaFT", reward)
    with pytest.raises(ValueError, match=r"\(B, F, 3, H, W\)"):
        evaluator.text_alignment(videos[:2, 0], prompts[:2])
    with pytest.raises(ValueError, match="not a moving-shapes prompt"):
        evaluator.text_alignment(videos[:1], ["hello"])


@pytest.mark.parametrize("name", ["train_motion_classifier_tiny", "train_evaluator_tiny"])
def test_training_recipes_fit_two_steps(name, tmp_path, monkeypatch):
    """As tests/test_recipes.py runs every recipe (its `# Test: fit 2` line), for these two."""
    from tests.test_recipes import check_fit, parse_test_header, run_recipe

    recipe = ROOT / "recipes" / "video" / f"{name}.yaml"
    spec = parse_test_header(recipe.read_text())
    assert spec.action == "fit" and spec.steps == 2
    monkeypatch.chdir(ROOT)
    run = run_recipe(recipe, spec, tmp_path)
    check_fit(run)
    assert (run.out / "model.safetensors").is_file() and (run.out / "config.json").is_file()
