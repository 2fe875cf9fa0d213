"""PrivateRewardModel: the release saved and loaded back scores exactly as the bandit predicts, is
differentiable through the image embedding, carries its privacy record, and steers Best-of-N through the
recipes (the rating session writes it, the Best-of-N recipe loads it)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from rewardopt.cli import RewardOptCLI
from rewardopt.feedback.bandit import PrivateKernelBandit
from rewardopt.feedback.embed import ColourLayoutEmbedder, SentenceEmbedder
from rewardopt.feedback.kernels import RandomFourierFeatures
from rewardopt.feedback.reward import PrivateRewardModel, save_release
from rewardopt.feedback.simulate import SimulatedRater, score_to_reward
from rewardopt.rewards.base import Reward
from rewardopt.testing.contracts import RewardContract
from tests.conftest import ROOT

PROMPTS = ["two red circles", "one blue square", "three green triangles"]


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """A bandit fed ratings of random images for the three prompts, released at epsilon = 4 and saved."""
    ctx_emb, act_emb = SentenceEmbedder(), ColourLayoutEmbedder(grid=2, scale=2.0)
    b = PrivateKernelBandit(RandomFourierFeatures(384 + 12, 64, 1.0, seed=1), epsilon=4.0, explore_rounds=60, seed=2)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(60, 3, 8, 8, generator=g)
    contexts = ctx_emb([PROMPTS[i % 3] for i in range(60)])
    b.observe_batch(contexts, act_emb(images), images.mean((1, 2, 3)) * 2 - 1)
    folder = save_release(tmp_path_factory.mktemp("release") / "reward_model", b, ctx_emb, act_emb,
                          extra={"rater": "test"})
    return b, folder, ctx_emb, act_emb


class TestPrivateRewardContract(RewardContract):
    @pytest.fixture
    def make_reward(self, released):
        return lambda: PrivateRewardModel(str(released[1]))

    @pytest.fixture
    def make_samples(self):
        return lambda: (torch.rand(3, 3, 12, 12, generator=torch.Generator().manual_seed(1)), PROMPTS)


def test_loaded_model_scores_as_the_bandit_predicts(released):
    b, folder, ctx_emb, act_emb = released
    model = PrivateRewardModel(str(folder))
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = model(images, PROMPTS).total
        want = torch.stack([b.predict(c, a[None])[0] for c, a in zip(ctx_emb(PROMPTS), act_emb(images))])
    assert torch.allclose(got, want.float(), atol=1e-5)
    assert torch.allclose(PrivateRewardModel(str(folder), output="rating")(images, PROMPTS).total, 5 + 4 * got)
    assert isinstance(model, Reward) and model.differentiable  # ColourLayoutEmbedder is differentiable


def test_saved_release_records_its_privacy(released):
    b, folder, *_ = released
    config = json.loads((folder / "reward_model.json").read_text())
    model = PrivateRewardModel(str(folder))
    assert model.accountant.epsilon(config["privacy"]["delta"]) == pytest.approx(4.0)
    assert config["bandit"]["sigma"] == pytest.approx(b.sigma) and config["bandit"]["lambda"] == pytest.approx(b.lam)
    assert config["bandit"]["observations"] == 60 and config["rater"] == "test"
    # only the release is saved: theta and the public feature map, never the exact statistics
    from safetensors.torch import load_file

    assert set(load_file(str(folder / "reward_model.safetensors"))) == {"theta", "features.frequencies"}


def test_gradient_reaches_the_pixels(released):
    model = PrivateRewardModel(str(released[1]))
    x = torch.rand(2, 3, 8, 8).requires_grad_()
    model(x, PROMPTS[:2]).total.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_missing_release_and_missing_prompts_are_clear_errors(tmp_path, released):
    with pytest.raises(FileNotFoundError, match="private_ratings_tiny.yaml"):
        PrivateRewardModel(str(tmp_path / "nothing"))
    with pytest.raises(ValueError, match="prompt"):
        PrivateRewardModel(str(released[1]))(torch.rand(1, 3, 8, 8), None)
    unreleased = PrivateKernelBandit(RandomFourierFeatures(4, 8), 1.0)
    with pytest.raises(RuntimeError, match="nothing released"):
        save_release(tmp_path / "x", unreleased, SentenceEmbedder(), ColourLayoutEmbedder())


def test_simulated_rater_scale():
    class Fixed(Reward):
        def score(self, samples, cond):
            return torch.tensor([math.log(1.0), math.log(0.5), math.log(0.06), -1e9])

    rater = SimulatedRater(Fixed())
    scores = rater(torch.zeros(4, 3, 2, 2), ["a"] * 4)
    assert scores.tolist() == [9.0, 5.0, 1.0, 1.0]  # round(1 + 8 p)
    assert score_to_reward(scores).tolist() == [1.0, 0.0, -1.0, -1.0]
    assert SimulatedRater(Fixed(), integer=False)(torch.zeros(4, 3, 2, 2), None)[2] == pytest.approx(1.48)


def test_rating_session_then_best_of_n_with_the_released_model(tmp_path):
    """The session recipe writes the reward model; the Best-of-N recipe loads it and steers with it."""
    small = ["--model.init_args.generator.init_args.num_steps", "2", "--trainer.enable_progress_bar", "false"]
    session = ["--config", str(ROOT / "recipes/feedback/private_ratings_tiny.yaml"), *small,
               "--trainer.default_root_dir", str(tmp_path / "session"), "--data.init_args.rounds", "12",
               "--data.init_args.batch_size", "4", "--data.init_args.num_eval", "1",
               "--model.init_args.explore_rounds", "8", "--model.init_args.candidates", "2"]
    c = RewardOptCLI(args=session, run=False)
    c.trainer.predict(c.model, datamodule=c.datamodule)
    s = json.loads((tmp_path / "session" / "summary.json").read_text())
    assert s["users"] == 12 and s["observations_released"] == 8
    assert s["privacy"]["epsilon"] == pytest.approx(1.0)
    raw = {"mean_score_exploring", "mean_score_greedy", "greedy_regret", "random_regret_same_rounds"}
    assert raw <= set(s["non_private_diagnostics"]) and not raw & set(s)  # raw rating statistics kept apart
    assert sum(r["greedy"] for r in c.model.log_rounds) == 4  # the last 4 users saw the released model's choice
    model_dir = tmp_path / "session" / "reward_model"
    steer = ["--config", str(ROOT / "recipes/feedback/best_of_n_private_reward_tiny.yaml"), *small,
             "--model.init_args.reward.init_args.path", str(model_dir), "--model.init_args.budget", "8",
             "--model.init_args.num_samples", "1", "--model.init_args.output_dir", str(tmp_path / "bon"),
             "--trainer.limit_predict_batches", "1", "--data.init_args.val_batch_size", "2"]
    c = RewardOptCLI(args=steer, run=False)
    assert isinstance(c.model.reward, PrivateRewardModel)
    c.trainer.predict(c.model, datamodule=c.datamodule)
    s = json.loads((tmp_path / "bon" / "summary.json").read_text())
    assert s["samples"] == 2 and s["reward_calls"] == 2 * 4  # N = 4 candidates scored by the private model
    assert c.model.reward.calls == 8
