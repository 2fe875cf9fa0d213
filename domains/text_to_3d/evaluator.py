"""The text-to-3D domain's INDEPENDENT evaluator: which prompt of the tiny world a render shows.

``RenderEvaluator`` is never a reward to steer with: benchmarks report it so that a scene which games the
text-alignment reward (``domains.text_to_3d.rewards.TextAlignmentReward``) is caught. It is independent of that
reward by construction: another architecture family (a convolutional stem whose 8x8 map becomes 64 tokens read by a
small transformer, where the reward is a plain CNN with global pooling), other training renders (``render_bank``
seed 2; the reward's are seed 1, the feature network's 3, the prior's 0), another initialisation seed and its own
augmentation. ``recipes/text_to_3d/train_evaluator_tiny.yaml`` trains the model shipped at
``domains/text_to_3d/assets/evaluator`` (``embedded:t3d-evaluator``).

Like the reward's classifier it has a ``none`` class (empty or colourless renders), which counts as wrong.
Renders are (B, 3, H, W) in [0, 1] on the white background, resized to 32 px.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from einops import rearrange
from torch import nn

from domains.text_to_3d.objects import PROMPTS
from domains.text_to_3d.rewards import NONE, RenderClassifierFit, check_renders, prompt_indices, resize
from rewardopt.fitting import load_module, save_module
from rewardopt.rewards.base import Reward, RewardOutput

ASSETS = Path(__file__).parent / "assets"
EMBEDDED = {"embedded:t3d-evaluator": ASSETS / "evaluator"}


class RenderTransformer(nn.Module):
    """Conv stem -> tokens -> transformer -> a linear head over ``prompts`` (+ ``none``).

    The stem (3x3 conv, GELU, then two stride-2 3x3 convs with GELU) maps a (B, 3, S, S) render to an S/4 x S/4
    map of ``dim`` channels; its positions become tokens with a learned position embedding, a CLS token is
    prepended, and a ``layers``-layer pre-norm transformer encoder mixes them; the head reads the CLS output."""

    def __init__(self, prompts: Sequence[str] = PROMPTS, size: int = 32, width: int = 24, dim: int = 64,
                 layers: int = 2, heads: int = 4, none_class: bool = True) -> None:
        super().__init__()
        self.prompts, self.size, self.none_class = list(prompts), size, none_class
        self.config = {"prompts": self.prompts, "size": size, "width": width, "dim": dim, "layers": layers,
                       "heads": heads, "none_class": none_class}
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.GELU(),
                                  nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.GELU(),
                                  nn.Conv2d(2 * width, dim, 3, stride=2, padding=1))
        self.pos = nn.Parameter(torch.zeros(1, (size // 4) ** 2 + 1, dim))
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        layer = nn.TransformerEncoderLayer(dim, nhead=heads, dim_feedforward=2 * dim, dropout=0.0, batch_first=True,
                                           norm_first=True, activation="gelu")
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, len(self.prompts) + int(none_class))
        nn.init.normal_(self.pos, std=0.02)
        nn.init.normal_(self.cls, std=0.02)

    @property
    def classes(self) -> list[str]:
        return self.prompts + ([NONE] if self.none_class else [])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, classes) logits; images are resized to ``size``."""
        tok = rearrange(self.stem(resize(images, self.size) * 2 - 1), "b d h w -> b (h w) d")
        tok = torch.cat([self.cls.expand(tok.shape[0], -1, -1), tok], dim=1)
        return self.head(self.norm(self.encoder(tok + self.pos))[:, 0])

    def save_pretrained(self, path: str | Path) -> None:
        save_module(self, path)

    @classmethod
    def from_pretrained(cls, path: str | Path = "embedded:t3d-evaluator") -> "RenderTransformer":
        return load_module(cls, path, EMBEDDED, "recipes/text_to_3d/train_evaluator_tiny.yaml")


class RenderEvaluator(nn.Module):
    """The independent evaluator (a frozen ``RenderTransformer``); see the module docstring.

    ``probs(renders)``: (B, P + 1) probabilities of the P prompts (``prompts``, in ``objects.PROMPTS``' order)
    and, last, of the ``none`` class, so ``probs(x).argmax(-1) == PROMPTS.index(p)`` counts an empty render as
    wrong. ``predict(renders)``: the first choice per render, a prompt or ``None`` (no object of the world).
    ``correct(renders, prompts)``: (B,) bool; ``accuracy(renders, prompts)``: its mean. ``prompt_probability``:
    (B,) p(prompt | render), a soft score. Conditions may carry a view suffix or be ``ImagePrompt``s."""

    def __init__(self, model: str = "embedded:t3d-evaluator") -> None:
        super().__init__()
        self.model = RenderTransformer.from_pretrained(model).requires_grad_(False)

    @classmethod
    def from_pretrained(cls, path: str | Path = "embedded:t3d-evaluator") -> "RenderEvaluator":
        return cls(str(path))

    @property
    def prompts(self) -> list[str]:
        return self.model.prompts

    @torch.no_grad()
    def probs(self, renders: torch.Tensor) -> torch.Tensor:
        check_renders(type(self).__name__, renders)
        return self.model(renders.detach().to(next(self.model.parameters()).dtype)).float().softmax(-1)

    def predict(self, renders: torch.Tensor) -> list[str | None]:
        classes = self.model.classes
        return [None if classes[i] == NONE else classes[i] for i in self.probs(renders).argmax(-1).tolist()]

    def correct(self, renders: torch.Tensor, prompts: Sequence) -> torch.Tensor:
        idx = torch.tensor(prompt_indices(type(self).__name__, prompts, len(renders), self.prompts))
        return self.probs(renders).argmax(-1).cpu() == idx

    def accuracy(self, renders: torch.Tensor, prompts: Sequence) -> float:
        return float(self.correct(renders, prompts).float().mean())

    def prompt_probability(self, renders: torch.Tensor, prompts: Sequence) -> torch.Tensor:
        idx = torch.tensor(prompt_indices(type(self).__name__, prompts, len(renders), self.prompts))
        return self.probs(renders).cpu().gather(1, idx[:, None]).squeeze(1)


class EvaluatorAccuracy(Reward):
    """The independent evaluator as a Reward, FOR EVALUATION ONLY (``eval_reward`` of a summary).

    NEVER steer, select or fine-tune with it: it is the held-out judge of the text-to-3D domain. Not
    differentiable, so gradient methods refuse it. ``total``: 1 where the evaluator's first choice is the prompt,
    else 0; term ``p_prompt`` (the evaluator's probability of the prompt)."""

    differentiable = False

    def __init__(self, model: str = "embedded:t3d-evaluator", name: str | None = None) -> None:
        super().__init__(name or "evaluator_accuracy")
        self.evaluator = RenderEvaluator(model)

    def score(self, samples, cond):
        dev = samples.device
        correct = self.evaluator.correct(samples, cond).float().to(dev)
        return RewardOutput(correct, {"p_prompt": self.evaluator.prompt_probability(samples, cond).to(dev)})


class RenderEvaluatorTraining(RenderClassifierFit):
    """Trains the evaluator's ``RenderTransformer`` on its own ``render_bank`` renders (seed 2 in the recipe) with
    its own augmentation; exports config.json, model.safetensors and ``evaluator_fit.json`` to ``output_dir``.

    Args:
        width, dim, layers, heads, size, none_class: the network's. augment, none_p, label_smoothing:
        ``RenderClassifierFit``'s. seed: the initialisation (the alignment classifier's recipe uses another).
    """

    fit_name = "evaluator"

    def __init__(self, output_dir: str | None = None, width: int = 24, dim: int = 64, layers: int = 2, heads: int = 4,
                 size: int = 32, none_class: bool = True, augment: dict | None = None, none_p: float = 0.05,
                 label_smoothing: float = 0.0, lr: float = 1e-3, weight_decay: float = 0.01, warmup_steps: int = 50,
                 decay: bool = True, seed: int = 1) -> None:
        super().__init__(augment, none_p, label_smoothing, lr, weight_decay, warmup_steps, decay, output_dir)
        self.save_hyperparameters()
        torch.manual_seed(seed)
        self.network = RenderTransformer(PROMPTS, size, width, dim, layers, heads, none_class)
