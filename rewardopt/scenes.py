"""What score distillation optimises: a differentiable scene that renders images from views.

``Scene`` is the contract between ``rewardopt.methods.sds`` and a domain's 3D representation (a voxel grid, a NeRF, 3D
Gaussians): its ``nn.Parameter``s are what the method trains; it draws random training views, renders them
differentiably into (B, 3, H, W) images in [0, 1], names each view for view-dependent prompting ("front", "side",
"back", "overhead"), renders fixed evaluation views, and writes what people look at (a turntable GIF). The generator
(the 2D diffusion prior) stays frozen.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch
from torch import nn


def view_dependent_prompt(prompt: str, view: str) -> str:
    """DreamFusion's view-dependent prompt: ``"<prompt>, <view> view"``."""
    return f"{prompt}, {view} view"


class Scene(nn.Module, ABC):
    """A differentiable scene. Subclasses: ``domains.text_to_3d.scene.VoxelScene``."""

    @abstractmethod
    def random_views(self, n: int, generator: torch.Generator | None = None) -> Any:
        """``n`` random training views (cameras)."""

    @abstractmethod
    def render(self, views: Any, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, 3, H, W) renders in [0, 1], differentiable w.r.t. the scene's parameters; ``generator`` randomises
        what training renders randomise (ray jitter, backgrounds)."""

    @abstractmethod
    def view_names(self, views: Any) -> list[str]:
        """One of "front", "side", "back", "overhead" per view (the view-dependent prompt suffix)."""

    @abstractmethod
    def evaluation_views(self, n: int) -> Any:
        """``n`` fixed views around the scene (a turntable, the front view first)."""

    def save_turntable(self, path: str | Path, frames: int = 24) -> Path:
        """Write a turntable GIF; scenes that cannot say so."""
        raise NotImplementedError(f"{type(self).__name__} does not write turntables")
