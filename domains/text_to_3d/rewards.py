"""Rewards on renders of a text-to-3D scene (VP3D, Chen et al., CVPR 2024, "VP3D: Unleashing 2D Visual Prompt for
Text-to-3D Generation"). Samples are renders (B, 3, H, W) in [0, 1] on a WHITE background (the tiny world's, as
``objects.BACKGROUND``); ``cond`` is one condition per render: a prompt string (a view suffix such as ", side view"
is ignored) or an ``ImagePrompt`` (prompt + visual prompt image).

VP3D refines a score-distilled scene with two differentiable rewards on its renders: a human-feedback text-image
alignment reward (ImageReward) and a visual-consistency reward between the renders and the visual prompt. Here:

``TextAlignmentReward``  log p(prompt | render) under ``RenderClassifier`` (``embedded:t3d-alignment``): the
                         tiny world's stand-in for ImageReward; or the CLIP score (``clip:<folder or hub id>``,
                         ``domains.images.rewards.CLIPScoreReward``). ``imagereward`` is not implemented.
``VisualConsistencyReward``  cos(f(render), f(visual prompt)) with f the contrastively trained, view-invariant
                         ``RenderFeatureNet`` (``embedded:t3d-features``), or DINOv2 / CLIP vision features
                         (``dinov2:<path>``, ``clip:<path>``: ``domains.super_resolution.rewards``' backends).

Our reading of "human feedback" in the tiny world: no people rate voxel renders, so the text-alignment reward is a
classifier over the 36 prompts trained on ground-truth renders of jittered instances; its ``none`` class (empty or
colourless renders) keeps an empty scene from scoring well for any prompt. It is trained with artefacts of early
score-distilled scenes (``degrade_renders``: blur, low resolution, fading toward white, small shifts and scalings,
colour and contrast changes, noise), so its gradient is informative before the scene looks like anything.

The three networks of the domain (these two and the evaluator, ``domains.text_to_3d.evaluator``) differ in
architecture family, initialisation seed, training data (``render_bank`` seeds 1, 3 and 2; the prior uses 0) and
augmentation; ``recipes/text_to_3d/train_{alignment,features,evaluator}_tiny.yaml`` train them.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from domains.super_resolution.hallucination import ResBlock, blur
from domains.text_to_3d.objects import PROMPTS, Renders, render_bank
from rewardopt.fitting import NetworkFit, load_module, save_module
from rewardopt.rewards.base import Reward, RewardOutput

ASSETS = Path(__file__).parent / "assets"
EMBEDDED = {"embedded:t3d-alignment": ASSETS / "alignment", "embedded:t3d-features": ASSETS / "features"}
NONE = "<none>"  # the classifiers' extra class: no object of the tiny world (empty, or colourless)


# ------------------------------------------------------------------------------------- inputs
def check_renders(name: str, renders: Any) -> None:
    """Clear errors for the wrong kind of input (rank, channels)."""
    if not isinstance(renders, torch.Tensor) or renders.ndim != 4 or renders.shape[1] != 3:
        shape = tuple(renders.shape) if isinstance(renders, torch.Tensor) else type(renders).__name__
        hint = " (several views per scene: flatten them into the batch)" if (
            isinstance(renders, torch.Tensor) and renders.ndim == 5) else ""
        raise ValueError(f"{name} expects renders shaped (B, 3, H, W) in [0, 1]; got {shape}{hint}")


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear (antialiased when shrinking), differentiable; a no-op at the right size."""
    if tuple(images.shape[-2:]) == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def base_prompt(cond: Any) -> str:
    """The prompt of a condition (a string or an ``ImagePrompt``), without its view suffix:
    "a red cube, side view" -> "a red cube"."""
    return str(cond).split(",")[0].strip()


def prompt_indices(name: str, cond: Sequence[Any] | None, n: int, prompts: Sequence[str]) -> list[int]:
    """The index in ``prompts`` of each condition's prompt; errors name the reward and the prompt."""
    if cond is None or len(cond) != n:
        raise ValueError(f"{name} needs one prompt per render; got {'none' if cond is None else len(cond)} for "
                         f"{n} renders")
    index = {p: i for i, p in enumerate(prompts)}
    out = []
    for c in cond:
        p = base_prompt(c)
        if p not in index:
            raise ValueError(f"{name}: {p!r} is not one of the {len(prompts)} prompts its classifier knows "
                             f"(e.g. {prompts[0]!r}, {prompts[len(prompts) // 2]!r}); "
                             "domains.text_to_3d.objects.PROMPTS lists them")
        out.append(index[p])
    return out


# ------------------------------------------------------------------------------------- augmentation
def degrade_renders(images: torch.Tensor, *, shift: float = 0.0, scale: float = 0.0, lowres: int = 0,
                    lowres_p: float = 0.0, blur_sigma: float = 0.0, blur_p: float = 0.0, fade: float = 0.0,
                    fade_p: float = 0.0, saturation: float = 0.0, contrast: float = 0.0, noise_std: float = 0.0,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """Artefacts of renders of a partly optimised scene, drawn per image (each off at 0), in this order:

    * ``shift`` / ``scale``: a translation by up to ``shift`` of the image side and a zoom by 1 ± ``scale``,
      the uncovered border filled white (the background);
    * ``lowres`` / ``lowres_p``: with probability ``lowres_p``, down to a side uniform in [``lowres``, H) and
      back (bilinear): the coarse blob of an early scene;
    * ``blur_sigma`` / ``blur_p``: Gaussian blur, sigma uniform in [0.3, ``blur_sigma``], with probability ``blur_p``;
    * ``fade`` / ``fade_p``: with probability ``fade_p``, blend toward white by a weight uniform in [0, ``fade``]
      (a semi-transparent scene);
    * ``saturation`` / ``contrast``: scale the colours' distance from their grey, and from the image mean, by
      1 ± the value;
    * ``noise_std``: Gaussian pixel noise, std uniform in [0, ``noise_std``]; then clamped to [0, 1].
    """
    b, dev = images.shape[0], images.device

    def u(*shape):
        return torch.rand(b, *shape, generator=generator, device=dev)

    x = images
    if shift > 0 or scale > 0:
        zoom = 1 + scale * (2 * u() - 1)
        move = shift * 2 * (2 * u(2) - 1)  # affine_grid's coordinates span 2 per image side
        theta = torch.zeros(b, 2, 3, device=dev, dtype=x.dtype)
        theta[:, 0, 0] = theta[:, 1, 1] = 1 / zoom
        theta[:, :, 2] = move
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = 1 + F.grid_sample(x - 1, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if lowres > 0 and lowres_p > 0:
        h = x.shape[-1]
        side = int(lowres + (h - lowres) * float(torch.rand(1, generator=generator, device=dev)))
        if side < h:
            coarse = F.interpolate(F.interpolate(x, size=(side, side), mode="bilinear", antialias=True,
                                                 align_corners=False), size=x.shape[-2:], mode="bilinear",
                                   align_corners=False)
            x = torch.where(u(1, 1, 1) < lowres_p, coarse, x)
    if blur_sigma > 0 and blur_p > 0:
        sigma = 0.3 + max(0.0, blur_sigma - 0.3) * u()
        x = torch.where(u(1, 1, 1) < blur_p, blur(x, sigma), x)
    if fade > 0 and fade_p > 0:
        w = fade * u(1, 1, 1) * (u(1, 1, 1) < fade_p)
        x = x + w * (1 - x)
    if saturation > 0:
        grey = x.mean(1, keepdim=True)
        x = grey + (x - grey) * (1 + saturation * (2 * u(1, 1, 1) - 1))
    if contrast > 0:
        mean = x.mean((1, 2, 3), keepdim=True)
        x = mean + (x - mean) * (1 + contrast * (2 * u(1, 1, 1) - 1))
    if noise_std > 0:
        x = x + noise_std * u(1, 1, 1) * torch.randn(x.shape, generator=generator, device=dev, dtype=x.dtype)
    return x.clamp(0, 1)


#: one fixed set of strong artefacts (an early score-distilled scene) every network is measured on
#: (``val/degraded_acc``; not any network's training augmentation)
DEGRADED = {"lowres": 8, "lowres_p": 0.5, "blur_sigma": 1.5, "blur_p": 0.7, "fade": 0.6, "fade_p": 0.8,
            "shift": 0.06, "scale": 0.1, "saturation": 0.3, "noise_std": 0.05}


def none_examples(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Inputs of the ``none`` class made from a batch: half white with faint noise (an empty scene), half the
    batch's own renders turned grey (shape without colour: no prompt of the tiny world is colourless)."""
    b = images.shape[0]
    grey = images.mean(1, keepdim=True).expand_as(images)
    blank = 1 - 0.05 * torch.rand(b, 1, 1, 1, generator=generator, device=images.device) * torch.rand(
        images.shape, generator=generator, device=images.device)
    pick = torch.rand(b, 1, 1, 1, generator=generator, device=images.device) < 0.5
    return torch.where(pick, blank, grey)


# ------------------------------------------------------------------------------------- data
class RenderBankDataModule(L.LightningDataModule):
    """Batches of ``objects.render_bank`` renders for the domain's classifiers and feature network.

    Training renders: ``instances`` jittered instances of each prompt seen from ``views`` random views
    (``seed``); held out: ``val_instances`` x ``val_views`` of fresh instances (``val_seed``). Items: ``image``
    (3, S, S) float in [0, 1], ``label`` (the prompt's index in ``objects.PROMPTS``), ``instance``; with
    ``pairs=True`` (contrastive training) an item is one instance seen twice: ``image`` and ``other`` (another
    random view of it, or with probability ``front_p`` its front view, the visual prompt's camera).

    Args:
        resolution, num_samples: ``render_bank``'s voxel lattice and ray samples.
        cache_dir: if set, banks are saved there (keyed by their arguments) and read back on the next run: the
            same renders, without rendering them again.
    """

    def __init__(self, batch_size: int = 64, instances: int = 12, views: int = 16, seed: int = 1,
                 val_instances: int = 2, val_views: int = 8, val_seed: int = 101, size: int = 32,
                 resolution: int = 48, num_samples: int = 64, pairs: bool = False, front_p: float = 0.5,
                 val_batch_size: int = 128, cache_dir: str | None = None) -> None:
        super().__init__()
        if seed == val_seed:
            raise ValueError(f"seed and val_seed are both {seed}: the held-out renders would be the training ones")
        self.batch_size, self.val_batch_size = batch_size, val_batch_size
        self.bank_args = {"size": size, "resolution": resolution, "num_samples": num_samples}
        self.train_spec, self.val_spec = (instances, views, seed), (val_instances, val_views, val_seed)
        self.pairs, self.front_p, self.cache_dir = pairs, front_p, cache_dir
        self.train_bank = self.val_bank = None

    def bank(self, instances: int, views: int, seed: int) -> dict:
        args = {"instances": instances, "views": views, "seed": seed, **self.bank_args}
        path = None
        if self.cache_dir:
            path = Path(self.cache_dir) / ("bank_cone_" + "_".join(f"{k}{v}" for k, v in args.items()) + ".pt")
            if path.is_file():
                return torch.load(path, weights_only=True)
        bank = render_bank(PROMPTS, **args)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(bank, path)
        return bank

    def setup(self, stage: str | None = None) -> None:
        if self.train_bank is None:
            self.train_bank = self.bank(*self.train_spec)
            self.val_bank = self.bank(*self.val_spec)

    def _dataset(self, bank: dict, seed: int) -> torch.utils.data.Dataset:
        return ViewPairs(bank, self.front_p, seed) if self.pairs else Renders(bank)

    def train_dataloader(self):
        seed = self.train_spec[2]
        return torch.utils.data.DataLoader(self._dataset(self.train_bank, seed), batch_size=self.batch_size,
                                           shuffle=True, generator=torch.Generator().manual_seed(seed), drop_last=True)

    def val_dataloader(self):
        return torch.utils.data.DataLoader(Renders(self.val_bank), batch_size=self.val_batch_size)


class ViewPairs(Renders):
    """Two views of one instance per item: ``image`` and ``other`` (another view, or its front view with
    probability ``front_p``), drawn by a generator seeded by ``seed`` and the index (deterministic)."""

    def __init__(self, bank: dict, front_p: float, seed: int) -> None:
        super().__init__(bank)
        self.front_p, self.seed = front_p, seed
        ids = bank["instance"].tolist()
        self.members: dict[int, list[int]] = {}
        for j, k in enumerate(ids):
            self.members.setdefault(k, []).append(j)

    def __getitem__(self, i: int) -> dict:
        item = super().__getitem__(i)
        rng = random.Random(self.seed * 1_000_003 + i)
        if rng.random() < self.front_p:
            item["other"] = item["front"]
        else:
            others = [j for j in self.members[item["instance"]] if j != i] or [i]
            item["other"] = self.bank["images"][rng.choice(others)].float() / 255
        return item


# ------------------------------------------------------------------------------------- networks
class RenderClassifier(nn.Module):
    """The text-alignment reward's classifier: which prompt a render (B, 3, S, S) in [0, 1] shows.

    A plain CNN: two 3x3 conv + SiLU layers at S, S/2 and S/4 (widths w, 2w, 4w) with 2x2 average pooling
    between them; the last map's global mean and max and its 2x2 average pooling (where things are: left / right,
    top / bottom, which stacks and side-by-side pairs need) feed a linear head over ``prompts`` (and, with
    ``none_class``, one more output, last: no object of the tiny world)."""

    def __init__(self, prompts: Sequence[str] = PROMPTS, size: int = 32, width: int = 24,
                 none_class: bool = True) -> None:
        super().__init__()
        self.prompts, self.size, self.none_class = list(prompts), size, none_class
        self.config = {"prompts": self.prompts, "size": size, "width": width, "none_class": none_class}
        w = width

        def stage(i: int, o: int) -> list[nn.Module]:
            return [nn.Conv2d(i, o, 3, padding=1), nn.SiLU(), nn.Conv2d(o, o, 3, padding=1), nn.SiLU()]

        self.body = nn.Sequential(*stage(3, w), nn.AvgPool2d(2), *stage(w, 2 * w), nn.AvgPool2d(2),
                                  *stage(2 * w, 4 * w))
        self.head = nn.Linear(4 * w * 6, len(self.prompts) + int(none_class))

    @property
    def classes(self) -> list[str]:
        return self.prompts + ([NONE] if self.none_class else [])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, classes) logits; images are resized to ``size``."""
        h = self.body(resize(images, self.size) * 2 - 1)
        quadrants = rearrange(F.adaptive_avg_pool2d(h, 2), "b c h w -> b (c h w)")
        return self.head(torch.cat([h.mean((2, 3)), h.amax((2, 3)), quadrants], dim=1))

    def save_pretrained(self, path: str | Path) -> None:
        save_module(self, path)

    @classmethod
    def from_pretrained(cls, path: str | Path = "embedded:t3d-alignment") -> "RenderClassifier":
        return load_module(cls, path, EMBEDDED, "recipes/text_to_3d/train_alignment_tiny.yaml")


class RenderFeatureNet(nn.Module):
    """The visual-consistency reward's features: a residual CNN (GroupNorm, GELU, strided convs: the SR domain's
    ``ResBlock``) at S, S/2, S/4, global average pooling and a two-layer projection to ``dim``;
    ``forward(images)`` gives unit-norm embeddings (B, dim). Trained contrastively (InfoNCE over two views of one
    jittered instance), so two views of one object are close and other objects far."""

    def __init__(self, size: int = 32, width: int = 16, dim: int = 64) -> None:
        super().__init__()
        self.size = size
        self.config = {"size": size, "width": width, "dim": dim}
        w = width
        self.stem = nn.Conv2d(3, w, 3, padding=1)
        self.stages = nn.Sequential(ResBlock(w, w), ResBlock(w, 2 * w, 2), ResBlock(2 * w, 4 * w, 2))
        self.head = nn.Sequential(nn.GroupNorm(4, 4 * w), nn.GELU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(4 * w, 4 * w), nn.GELU(), nn.Linear(4 * w, dim))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        h = self.stages(self.stem(resize(images, self.size) * 2 - 1))
        return F.normalize(self.head(h), dim=-1)

    def save_pretrained(self, path: str | Path) -> None:
        save_module(self, path)

    @classmethod
    def from_pretrained(cls, path: str | Path = "embedded:t3d-features") -> "RenderFeatureNet":
        return load_module(cls, path, EMBEDDED, "recipes/text_to_3d/train_features_tiny.yaml")


# ------------------------------------------------------------------------------------- training
class RenderClassifierFit(NetworkFit):
    """Shared by the alignment classifier's and the evaluator's training: cross-entropy (with label smoothing)
    on augmented renders, a share of ``none`` examples (``none_examples``), held-out accuracies.

    Held out (``val/``): ``acc`` and ``nll`` on clean renders; ``aug_acc`` under the network's own training
    augmentation and ``degraded_acc`` under the common ``DEGRADED`` artefacts (both at fixed seeds);
    ``none_rate``: how often a clean render is called ``none``; ``blank_none``: how often an empty render is."""

    network: nn.Module

    def __init__(self, augment: dict | None, none_p: float, label_smoothing: float, lr: float, weight_decay: float,
                 warmup_steps: int, decay: bool, output_dir: str | None) -> None:
        super().__init__(lr, weight_decay, warmup_steps, decay, output_dir=output_dir)
        self.augment, self.none_p, self.label_smoothing = dict(augment or {}), none_p, label_smoothing

    def training_step(self, batch, batch_idx):
        x, y = degrade_renders(batch["image"], **self.augment), batch["label"]
        if self.network.none_class and self.none_p > 0:
            pick = torch.rand(x.shape[0], device=x.device) < self.none_p
            x = torch.where(pick[:, None, None, None], none_examples(x), x)
            y = torch.where(pick, torch.full_like(y, len(self.network.prompts)), y)
        loss = F.cross_entropy(self.network(x), y, label_smoothing=self.label_smoothing)
        self.log("train/loss", loss, prog_bar=True, batch_size=x.shape[0])
        return loss

    def validation_step(self, batch, batch_idx):
        x, y, n = batch["image"], batch["label"], batch["label"].shape[0]
        logits = self.network(x)
        self.log("val/acc", (logits.argmax(-1) == y).float().mean(), batch_size=n)
        self.log("val/nll", F.cross_entropy(logits, y), batch_size=n)
        gen = torch.Generator(device=x.device).manual_seed(batch_idx)  # the same artefacts at every validation
        aug = self.network(degrade_renders(x, generator=gen, **self.augment)).argmax(-1)
        self.log("val/aug_acc", (aug == y).float().mean(), batch_size=n)
        gen = torch.Generator(device=x.device).manual_seed(10_000 + batch_idx)
        deg = self.network(degrade_renders(x, generator=gen, **DEGRADED)).argmax(-1)
        self.log("val/degraded_acc", (deg == y).float().mean(), batch_size=n)
        if self.network.none_class:
            none = len(self.network.prompts)
            self.log("val/none_rate", (logits.argmax(-1) == none).float().mean(), batch_size=n)
            blank = self.network(torch.ones_like(x[:1])).argmax(-1)
            self.log("val/blank_none", (blank == none).float().mean(), batch_size=1)

    def fit_parameters(self):
        return self.network.parameters()

    def save_weights(self, folder: Path) -> Path:
        self.network.save_pretrained(folder)
        return folder


class AlignmentClassifierTraining(RenderClassifierFit):
    """Trains ``RenderClassifier`` (``TextAlignmentReward``'s model) on ``render_bank`` renders and exports
    config.json, model.safetensors and ``alignment_fit.json`` to ``output_dir``
    (``recipes/text_to_3d/train_alignment_tiny.yaml`` ships ``embedded:t3d-alignment``).

    Args:
        width, size, none_class: the network's. augment: ``degrade_renders``' keyword arguments.
        none_p: the share of each batch replaced by ``none`` examples. label_smoothing: of the cross-entropy
            (keeps log p finite-sloped on confident renders: a reward that still has a gradient).
        seed: the initialisation.
    """

    fit_name = "alignment"

    def __init__(self, output_dir: str | None = None, width: int = 24, size: int = 32, none_class: bool = True,
                 augment: dict | None = None, none_p: float = 0.05, label_smoothing: float = 0.05,
                 lr: float = 3e-3, weight_decay: float = 0.01, warmup_steps: int = 20, decay: bool = True,
                 seed: int = 0) -> None:
        super().__init__(augment, none_p, label_smoothing, lr, weight_decay, warmup_steps, decay, output_dir)
        self.save_hyperparameters()
        torch.manual_seed(seed)
        self.network = RenderClassifier(PROMPTS, size, width, none_class)


def info_nce(a: torch.Tensor, b: torch.Tensor, temperature: float, labels: torch.Tensor | None = None,
             same_label_weight: float = 1.0) -> torch.Tensor:
    """Symmetric InfoNCE (SimCLR's NT-Xent) over unit embeddings a, b (B, D) where (a_i, b_i) are positives and
    every other embedding of the 2B is a negative.

    ``labels`` (B,) and ``same_label_weight`` w: negatives that share the anchor's label count w times in the
    denominator (their logit + log w; 0 leaves them out: false-negative cancellation, Huynh et al., WACV 2022),
    so other instances of the same prompt are pushed away less than other prompts."""
    z = torch.cat([a, b])
    sim = z @ z.T / temperature
    n = a.shape[0]
    eye = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    if labels is not None and same_label_weight != 1.0:
        lab = torch.cat([labels, labels])
        same = (lab[:, None] == lab[None]) & ~eye
        same[torch.arange(2 * n), target] = False  # the positive itself is never down-weighted
        shift = float("-inf") if same_label_weight <= 0 else float(torch.log(torch.tensor(same_label_weight)))
        sim = torch.where(same, sim + shift, sim)
    sim = sim.masked_fill(eye, float("-inf"))
    return F.cross_entropy(sim, target)


def retrieval(queries: torch.Tensor, keys: torch.Tensor, query_ids: torch.Tensor, key_ids: torch.Tensor,
              exclude_self: bool = False) -> torch.Tensor:
    """(Q,) bool: whether each query's nearest key (cosine; unit embeddings) has the query's id."""
    sim = queries @ keys.T
    if exclude_self:
        sim = sim.fill_diagonal_(float("-inf"))
    return key_ids[sim.argmax(1)] == query_ids


class FeatureNetTraining(NetworkFit):
    """Trains ``RenderFeatureNet`` (``VisualConsistencyReward``'s features) contrastively: the two views of an
    item (``RenderBankDataModule(pairs=True)``) are positives, the rest of the batch negatives (``info_nce``);
    each view is augmented independently (``degrade_renders``), so a blurry render of an object stays close to
    its clean front view. Exports config.json, model.safetensors and ``features_fit.json`` to ``output_dir``.

    Held out (``val/``), over all held-out renders: ``instance_retrieval`` — a render's nearest other render
    (another view) is of the same instance; ``prompt_retrieval`` — of the same prompt; ``front_retrieval`` /
    ``front_prompt_retrieval`` — a render's nearest front view (the visual prompts of all held-out instances)
    is its own instance's / prompt's: what ``VisualConsistencyReward`` relies on; ``novel_front_prompt_retrieval``
    — among the OTHER instances' front views, the nearest is of the render's prompt (a visual prompt the scene was
    not drawn from, as a generated one is); ``degraded_front_prompt_retrieval``: front_prompt_retrieval with the
    renders under ``DEGRADED``; ``pos_cos`` / ``neg_cos``: mean cosine to the own front view /
    to other prompts' front views.

    Args:
        width, dim, size: the network's. temperature: InfoNCE's. same_prompt_weight: how much the other instances
            of an item's prompt count as negatives (``info_nce``'s ``same_label_weight``; 1: plain InfoNCE, where
            they count fully and the features separate instances; 0: they are left out). augment:
            ``degrade_renders``' keyword arguments. seed: the initialisation.
    """

    fit_name = "features"

    def __init__(self, output_dir: str | None = None, width: int = 16, dim: int = 64, size: int = 32,
                 temperature: float = 0.1, same_prompt_weight: float = 1.0, augment: dict | None = None,
                 lr: float = 3e-3, weight_decay: float = 0.01, warmup_steps: int = 20, decay: bool = True,
                 seed: int = 2) -> None:
        super().__init__(lr, weight_decay, warmup_steps, decay, output_dir=output_dir)
        self.save_hyperparameters()
        self.temperature, self.same_prompt_weight, self.augment = temperature, same_prompt_weight, dict(augment or {})
        torch.manual_seed(seed)
        self.network = RenderFeatureNet(size, width, dim)
        self._val: list[dict[str, torch.Tensor]] = []

    def training_step(self, batch, batch_idx):
        a = self.network(degrade_renders(batch["image"], **self.augment))
        b = self.network(degrade_renders(batch["other"], **self.augment))
        loss = info_nce(a, b, self.temperature, batch["label"], self.same_prompt_weight)
        self.log("train/loss", loss, prog_bar=True, batch_size=a.shape[0])
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val = []

    def validation_step(self, batch, batch_idx):
        gen = torch.Generator(device=batch["image"].device).manual_seed(10_000 + batch_idx)
        self._val.append({"emb": self.network(batch["image"]), "front": self.network(batch["front"]),
                          "deg": self.network(degrade_renders(batch["image"], generator=gen, **DEGRADED)),
                          "instance": batch["instance"], "label": batch["label"]})

    def on_validation_epoch_end(self) -> None:
        v = {k: torch.cat([d[k] for d in self._val]) for k in self._val[0]} if self._val else None
        self._val = []
        if v is not None:
            for k, value in feature_metrics(v["emb"], v["front"], v["deg"], v["instance"], v["label"]).items():
                self.log(f"val/{k}", value)
        super().on_validation_epoch_end()

    def fit_parameters(self):
        return self.network.parameters()

    def save_weights(self, folder: Path) -> Path:
        self.network.save_pretrained(folder)
        return folder


def feature_metrics(emb: torch.Tensor, front: torch.Tensor, degraded: torch.Tensor, instance: torch.Tensor,
                    label: torch.Tensor) -> dict[str, float]:
    """``FeatureNetTraining``'s held-out figures from unit embeddings of renders (N, D), of each render's front
    view (N, D) and of the degraded renders (N, D), with their instance ids and prompt labels (N,)."""
    keys, first = torch.unique(instance, return_inverse=True)
    pick = torch.zeros(len(keys), dtype=torch.long, device=instance.device).scatter_(
        0, first, torch.arange(len(instance), device=instance.device))  # one row per instance
    fronts, front_inst, front_label = front[pick], instance[pick], label[pick]
    not_own = (emb @ fronts.T).masked_fill(instance[:, None] == front_inst[None], float("-inf"))
    own = (emb * front).sum(-1)
    other = emb @ fronts.T
    other = other.masked_fill(label[:, None] == front_label[None], float("nan"))
    out = {
        "instance_retrieval": float(retrieval(emb, emb, instance, instance, exclude_self=True).float().mean()),
        "prompt_retrieval": float(retrieval(emb, emb, label, label, exclude_self=True).float().mean()),
        "front_retrieval": float(retrieval(emb, fronts, instance, front_inst).float().mean()),
        "front_prompt_retrieval": float(retrieval(emb, fronts, label, front_label).float().mean()),
        "novel_front_prompt_retrieval": float((front_label[not_own.argmax(1)] == label).float().mean()),
        "degraded_front_prompt_retrieval": float(retrieval(degraded, fronts, label, front_label).float().mean()),
        "pos_cos": float(own.mean()), "neg_cos": float(other.nanmean()),
    }
    if len(keys) < 2 or (label[:, None] != front_label[None]).sum() == 0:  # a held-out set too small to compare with
        out = {k: v for k, v in out.items() if k not in ("novel_front_prompt_retrieval", "neg_cos")}
    return out


# ------------------------------------------------------------------------------------- rewards
def split_backend(spec: str, schemes: Sequence[str]) -> tuple[str, str]:
    """("embedded" | a scheme | "path", the rest) of a backend string: ``embedded:<name>``, ``<scheme>:<path>``
    or a folder of a trained network."""
    spec = str(spec)
    head, sep, rest = spec.partition(":")
    if spec.startswith("embedded:"):
        return "embedded", spec
    if head in schemes:
        return head, rest
    if sep and not Path(spec).exists() and len(head) > 1:  # "c:\\..." stays a path
        raise ValueError(f"unknown backend {spec!r}: use embedded:<name>, {', '.join(s + ':<path>' for s in schemes)}"
                         " or the folder of a network trained by the domain's recipe")
    return "path", spec


class TextAlignmentReward(Reward):
    """VP3D's text-alignment reward on renders (differentiable): how well each render shows its prompt.

    Backends:
        ``embedded:t3d-alignment`` (default) or a folder: ``log p(prompt | render)`` under the frozen
            ``RenderClassifier`` (its softmax includes the ``none`` class, so an empty or colourless render scores
            low for every prompt). Renders are resized to the classifier's 32 px. Terms ``log_p``, ``p`` and
            ``top1`` (1 where the prompt is the classifier's first choice).
        ``clip:<folder or hub id>``: the CLIP score ``logit_scale * cos(image, text)`` of a ``CLIPModel``
            (``domains.images.rewards.CLIPScoreReward``; ``tokenizer`` if it is not beside the model).
        ``imagereward``: VP3D's own reward model; not implemented (see the error).
    The view suffix of a prompt (", side view") is dropped before scoring: the reward asks what the object is, the
    prior's view-dependent prompting is the prior's business.
    """

    differentiable = True

    def __init__(self, backend: str = "embedded:t3d-alignment", tokenizer: str | None = None,
                 name: str | None = None) -> None:
        super().__init__(name or "text_alignment")
        if str(backend).split(":")[0] == "imagereward":
            raise NotImplementedError(
                "TextAlignmentReward(backend='imagereward'): VP3D's ImageReward model is not implemented here. It "
                "needs the `image-reward` package (pip install image-reward; not a dependency of rewardopt) and its "
                "checkpoint (ImageReward-v1.0, a BLIP backbone) from the hub. Use backend='clip:<folder or hub id>' "
                "or the offline embedded:t3d-alignment")
        kind, where = split_backend(backend, ("clip",))
        self.backend = str(backend)
        self.classifier = self.clip = None
        if kind == "clip":
            from domains.images.rewards import CLIPScoreReward

            self.clip = CLIPScoreReward(where, tokenizer, name=self.name)
        else:
            self.classifier = RenderClassifier.from_pretrained(where).requires_grad_(False)

    def score(self, samples, cond):
        check_renders(self.name, samples)
        if self.clip is not None:
            if cond is None or len(cond) != len(samples):
                raise ValueError(f"{self.name} needs one prompt per render")
            s = self.clip.score(samples, [base_prompt(c) for c in cond])
            return RewardOutput(s, {"clip_score": s})
        idx = torch.tensor(prompt_indices(self.name, cond, len(samples), self.classifier.prompts),
                           device=samples.device)
        logp = self.classifier(samples.to(next(self.classifier.parameters()).dtype)).float().log_softmax(-1)
        total = logp.gather(1, idx[:, None]).squeeze(1)
        top1 = (logp.argmax(-1) == idx).float()
        return RewardOutput(total, {"log_p": total, "p": total.detach().exp(), "top1": top1})


def condition_images(name: str, cond: Sequence[Any] | None, like: torch.Tensor) -> torch.Tensor:
    """The visual prompt of each condition (``cond[i]["image"]``, an ``ImagePrompt``), resized to ``like``'s
    size and stacked (B, 3, H, W) on its device and dtype; clear errors for plain strings."""
    n = like.shape[0]
    if cond is None or len(cond) != n:
        raise ValueError(f"{name} needs one condition per render; got {'none' if cond is None else len(cond)} for "
                         f"{n} renders")
    images = []
    for c in cond:
        image = c.get("image") if isinstance(c, dict) else None
        if not isinstance(image, torch.Tensor):
            raise TypeError(f"{name} compares each render with its condition's visual prompt: pass ImagePrompt("
                            "prompt, image) conditions (rewardopt.generators.capabilities.ImagePrompt, e.g. "
                            f"VP-SDS with a front view as the visual prompt); got {type(c).__name__} {str(c)[:60]!r}")
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"{name}: a visual prompt is (3, H, W) in [0, 1]; got {tuple(image.shape)}")
        images.append(resize(image[None].to(like.device, like.dtype), like.shape[-1])[0])
    return torch.stack(images)


class VisualConsistencyReward(Reward):
    """VP3D's visual-consistency reward (differentiable): ``cos(f(render), f(visual prompt))`` for each render and
    its condition's visual prompt (``ImagePrompt``'s ``image``, e.g. the front view of the object).

    Backends for f (independent of the evaluator):
        ``embedded:t3d-features`` (default) or a folder: ``RenderFeatureNet``'s unit embedding, trained to be
            view-invariant (two views of one instance are positives) and identity-sensitive.
        ``dinov2:<folder or hub id>`` / ``clip:<folder or hub id>``: DINOv2's / CLIP's vision tower
            (``domains.super_resolution.rewards.Dinov2Features`` / ``CLIPVisionFeatures``), the last layer's CLS
            token (``pool="cls"``) or its mean over tokens (``pool="mean"``).
    Terms: ``cosine``.
    """

    differentiable = True

    def __init__(self, backend: str = "embedded:t3d-features", pool: str = "cls", name: str | None = None) -> None:
        if pool not in ("cls", "mean"):
            raise ValueError(f"pool must be 'cls' or 'mean', got {pool!r}")
        super().__init__(name or "visual_consistency")
        kind, where = split_backend(backend, ("dinov2", "clip"))
        self.backend, self.pool = str(backend), pool
        if kind in ("dinov2", "clip"):
            from domains.super_resolution.rewards import CLIPVisionFeatures, Dinov2Features

            self.net = (Dinov2Features if kind == "dinov2" else CLIPVisionFeatures)(where, layers=[-1])
        else:
            self.net = RenderFeatureNet.from_pretrained(where).requires_grad_(False)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(B, D) unit embeddings of images (B, 3, H, W) in [0, 1]."""
        if isinstance(self.net, RenderFeatureNet):
            return self.net(images.to(next(self.net.parameters()).dtype)).float()
        tokens = self.net.features(images)[-1]  # (B, C, N)
        return F.normalize(tokens[:, :, 0] if self.pool == "cls" else tokens.mean(-1), dim=-1)

    def score(self, samples, cond):
        check_renders(self.name, samples)
        refs = condition_images(self.name, cond, samples)
        e = self.embed(torch.cat([samples, refs]))
        a, b = rearrange(e, "(two n) d -> two n d", two=2)
        cos = (a * b).sum(-1)
        return RewardOutput(cos, {"cosine": cos})
