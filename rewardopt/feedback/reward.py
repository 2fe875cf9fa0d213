"""A released private estimate as a rewardopt ``Reward`` over (condition, sample).

``save_release`` writes what the bandit released — theta~, the feature map (its config and buffers), the
embedders (class path and config) and the accountant's record — into a folder:

    reward_model.json          config: features, embedders, privacy record, lambda, sigma, rating map
    reward_model.safetensors   theta (m,) and the feature map's buffers ("features.<name>")

``PrivateRewardModel(path)`` loads it and scores samples for their prompts:
r(sample, prompt) = phi([context_embedder(prompt); action_embedder(sample)])^T theta~, in the bandit's reward
units ((rating - 5) / 4; ``output="rating"`` gives 5 + 4 r, the 1-9 scale). Privacy: the reward model is a
function of the release alone, so anything computed from it — Best-of-N choices, SVDD values, gradients —
is post-processing and keeps the release's (epsilon, delta) (recorded in ``privacy``).

Black-box methods (Best-of-N, SVDD) use its values; it is ``differentiable`` exactly when the action
embedder is (``ColourLayoutEmbedder`` is: pooling, then the cos/sin features), so gradient methods may use
it too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from einops import rearrange
from safetensors.torch import load_file, save_file

from rewardopt.feedback.bandit import PrivateKernelBandit
from rewardopt.feedback.embed import build_embedder, embedder_spec
from rewardopt.feedback.kernels import build_features, features_config
from rewardopt.feedback.privacy import ZCDPAccountant
from rewardopt.rewards.base import Reward

CONFIG = "reward_model.json"
WEIGHTS = "reward_model.safetensors"


def save_release(folder: str | Path, bandit: PrivateKernelBandit, context_embedder: torch.nn.Module,
                 action_embedder: torch.nn.Module, extra: dict[str, Any] | None = None) -> Path:
    """Write the bandit's release as a reward model folder (see the module docstring); the folder."""
    if not bandit.released:
        raise RuntimeError("nothing released yet: call bandit.release() (or observe explore_rounds ratings) first")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {"theta": bandit.theta.double().contiguous()}
    tensors.update({f"features.{k}": v.contiguous() for k, v in bandit.features.state_dict().items()})
    save_file(tensors, str(folder / WEIGHTS))
    config = {
        "features": features_config(bandit.features),
        "context_embedder": embedder_spec(context_embedder),
        "action_embedder": embedder_spec(action_embedder),
        "privacy": bandit.accountant.record(bandit.delta),
        "bandit": {"epsilon": _num(bandit.epsilon), "delta": bandit.delta, "reward_bound": bandit.reward_bound,
                   "lambda": bandit.lam, "sigma": bandit.sigma, "sensitivity": bandit.sensitivity,
                   "explore_rounds": bandit.explore_rounds, "observations": bandit._n, "seed": bandit.seed},
        "rating_map": "reward = (rating - 5) / 4",
        **(extra or {}),
    }
    (folder / CONFIG).write_text(json.dumps(config, indent=2))
    return folder


def _num(v: float):
    return "inf" if v == float("inf") else v


class PrivateRewardModel(Reward):
    """The released estimate phi([c; a])^T theta~ as a reward (see the module docstring).

    Args:
        path: a folder written by ``save_release`` (``rewardopt predict`` with a ``SimulatedRatings``
            recipe writes one to ``<output_dir>/reward_model``).
        output: "reward" ((rating - 5) / 4, about [-1, 1]) or "rating" (5 + 4 r, about 1-9).
    """

    def __init__(self, path: str, output: str = "reward", name: str | None = None) -> None:
        super().__init__(name or "private_reward")
        if output not in ("reward", "rating"):
            raise ValueError(f"output must be 'reward' or 'rating', got {output!r}")
        folder = Path(path)
        if not (folder / CONFIG).is_file() or not (folder / WEIGHTS).is_file():
            raise FileNotFoundError(
                f"no released reward model at {folder} (expected {CONFIG} and {WEIGHTS}); write one with "
                "`rewardopt predict --config recipes/feedback/private_ratings_tiny.yaml`")
        self.config = json.loads((folder / CONFIG).read_text())
        state = load_file(str(folder / WEIGHTS))
        feats = {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")}
        self.features = build_features(self.config["features"], feats).requires_grad_(False)
        self.context_embedder = build_embedder(self.config["context_embedder"])
        self.action_embedder = build_embedder(self.config["action_embedder"])
        self.register_buffer("theta", state["theta"].float())
        self.output = output
        self.accountant = ZCDPAccountant.from_record(self.config["privacy"])
        self.differentiable = bool(getattr(self.action_embedder, "differentiable", False))

    @property
    def privacy(self) -> dict:
        """The release's privacy record (rho, epsilon at its delta, each release)."""
        return self.config["privacy"]

    def score(self, samples, cond):
        if cond is None:
            raise ValueError(f"{self.name} scores a sample for its prompt (the context); pass the prompts")
        ctx = self.context_embedder([str(c) for c in cond]).to(self.theta.device)
        act = self.action_embedder(samples)
        z = torch.cat([ctx.to(act.dtype), rearrange(act, "n ... -> n (...)")], dim=1)
        r = self.features(z) @ self.theta.to(z.dtype)
        return 5 + 4 * r if self.output == "rating" else r
