"""Image rewards: contracts, agreement with the libraries they wrap, real-model loading by path."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from domains.images.rewards import (
    AestheticHead,
    AestheticReward,
    CLIPScoreReward,
    ColourReward,
    JpegCompressibilityReward,
    ShapeAttributeReward,
    ShapeClassifier,
)
from domains.images.shapes import ShapeSpec, render
from rewardopt.testing.contracts import RewardContract

PROMPTS = ["two red circles", "one blue square", "three green triangles", "one white circle"]


def shapes_batch(size=24):
    import random

    imgs = torch.stack([render(ShapeSpec.from_prompt(p), size, random.Random(i)) for i, p in enumerate(PROMPTS)])
    return imgs, PROMPTS


class TestShapeAttributeReward(RewardContract):
    @pytest.fixture
    def make_reward(self):
        return lambda: ShapeAttributeReward("colour")

    @pytest.fixture
    def make_samples(self):
        return shapes_batch


class TestColourReward(RewardContract):
    @pytest.fixture
    def make_reward(self):
        return lambda: ColourReward("blue")

    @pytest.fixture
    def make_samples(self):
        return shapes_batch


class TestJpegReward(RewardContract):
    @pytest.fixture
    def make_reward(self):
        return lambda: JpegCompressibilityReward()

    @pytest.fixture
    def make_samples(self):
        return shapes_batch


@pytest.fixture
def aesthetic_files(tiny_clip_dir, tmp_path):
    from transformers import CLIPModel, CLIPVisionModelWithProjection

    clip = CLIPModel.from_pretrained(tiny_clip_dir)
    vision_config = clip.config.vision_config
    vision = CLIPVisionModelWithProjection(vision_config.__class__(**{**vision_config.to_dict(), "projection_dim": 16}))
    vision.save_pretrained(tmp_path / "vision")
    torch.manual_seed(0)
    torch.save(AestheticHead(16).state_dict(), tmp_path / "head.pth")
    return tmp_path / "vision", tmp_path / "head.pth"


class TestAestheticReward(RewardContract):
    @pytest.fixture
    def make_reward(self, aesthetic_files):
        return lambda: AestheticReward(str(aesthetic_files[0]), str(aesthetic_files[1]))

    @pytest.fixture
    def make_samples(self):
        return shapes_batch


class TestCLIPScoreReward(RewardContract):
    @pytest.fixture
    def make_reward(self, tiny_clip_dir):
        return lambda: CLIPScoreReward(str(tiny_clip_dir))

    @pytest.fixture
    def make_samples(self):
        return shapes_batch


def test_jpeg_reward_matches_pil_directly():
    imgs, prompts = shapes_batch()
    out = JpegCompressibilityReward(quality=95)(imgs, prompts).total
    for img, value in zip(imgs, out):
        arr = (img.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=95)
        assert value.item() == pytest.approx(-buf.tell() / 1000.0)
    noisy = torch.rand(1, 3, 24, 24, generator=torch.Generator().manual_seed(0))
    assert JpegCompressibilityReward()(noisy, None).total.item() < out.min().item()  # noise compresses worse


def test_shape_attribute_reward_reads_the_prompt():
    imgs, prompts = shapes_batch()
    clf = ShapeClassifier.from_pretrained("embedded:shape-classifier")
    with torch.no_grad():
        logp = clf(imgs)["colour"].log_softmax(-1)
        got = ShapeAttributeReward("colour")(imgs, prompts).total
    from domains.images.shapes import COLOURS

    idx = [list(COLOURS).index(ShapeSpec.from_prompt(p).colour) for p in prompts]
    assert torch.allclose(got, logp[torch.arange(4), idx])
    assert (got > np.log(0.5)).all(), "the shipped classifier recognises clean renders' colours"
    blue = ShapeAttributeReward("colour", target="blue")(imgs, prompts).total
    assert blue[1] > blue[0]  # the blue square scores higher on "blue" than the red circles


def test_image_rewards_reject_bad_inputs():
    with pytest.raises(ValueError, match="trained on 24x24"):
        ShapeAttributeReward("colour")(torch.rand(2, 3, 32, 32), ["one red circle"] * 2)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        ColourReward()(torch.rand(2, 1, 8, 8), None)
    with pytest.raises(ValueError, match="not a shapes prompt"):
        ShapeAttributeReward("colour")(torch.rand(1, 3, 24, 24), ["a photo of a cat"])
    with pytest.raises(ValueError, match="target 'pink'"):
        ShapeAttributeReward("colour", target="pink")
    with pytest.raises(FileNotFoundError, match="aesthetic head"):
        AestheticReward("unused", "/nonexistent/head.pth")
