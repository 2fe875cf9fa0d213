"""The oracle Hallucination Score and the super-resolution domain's small classifiers.

Ren et al. (arXiv 2507.14367) call *hallucinations* generated details that fail to match the
low-resolution input or the ground truth, orthogonal to fidelity (PSNR). On the procedural glyphs
(``glyphs.py``) the truth of a hallucination is decidable: the class. The **oracle HS** of an SR
output x with ground-truth class y is

    HS(x, y) = 1 - P_oracle(y | x),    flip(x, y) = [argmax_c P_oracle(c | x) != y]

with ``P_oracle`` a frozen high-resolution glyph classifier the project trains. Our reading: the paper's
HS is an MLLM's rating; here an oracle that sees the class decides, and the MLLM-style judge
(``domains.super_resolution.judge``) is validated against it.

Four networks, each ``config.json`` + ``model.safetensors``, loaded by path or ``embedded:<name>``:

* ``embedded:sr-oracle`` — ``GlyphCNN``: CLASSES, seed 1001; noise, blur, LR-blur mixing. The oracle HS
  (evaluation).
* ``embedded:sr-checker`` — ``PatchMixer``: CLASSES, seed 2001; noise, shifts, contrast. The hacking check.
* ``embedded:sr-lr-classifier`` — ``LRGlyphCNN``: CLASSES' 8x8 LR, seed 3001; noise, bicubic round trips.
  The served judge's view of the LR input.
* ``embedded:sr-features`` — ``GlyphFeatureNet``: OTHER_CHARS (disjoint characters), seed 4001. The proxies'
  multi-layer features.

The oracle (a plain CNN: convolutions, SiLU, average pooling)
and the checker (an MLP-Mixer over 4x4 patches) differ in architecture, initialisation seed, training
draws and augmentation, so a generator that games one is caught by the other. The feature network (a
residual CNN with GroupNorm, GELU and strided convolutions) never sees a class of CLASSES: proxies
built on it share no weights or labels with the oracle (disjoint classes), though its images come from the
same renderer and fonts (B, D, P, 6, 9 resemble some classes). ``GlyphClassifierTraining`` trains each of
them (``recipes/super_resolution/train_{oracle,checker,lr_classifier,features}_tiny.yaml``).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from domains.super_resolution.glyphs import CLASSES, FONTS, OTHER_CHARS, GlyphDataset, downsample, upsample
from rewardopt.fitting import NetworkFit, read_module, save_module
from rewardopt.rewards.base import Reward, RewardOutput

ASSETS = Path(__file__).parent / "assets"
EMBEDDED = {"embedded:sr-oracle": ASSETS / "oracle", "embedded:sr-checker": ASSETS / "checker",
            "embedded:sr-lr-classifier": ASSETS / "lr_classifier", "embedded:sr-features": ASSETS / "features"}
RECIPES = {"embedded:sr-oracle": "train_oracle_tiny", "embedded:sr-checker": "train_checker_tiny",
           "embedded:sr-lr-classifier": "train_lr_classifier_tiny", "embedded:sr-features": "train_features_tiny"}
CHARSETS = {"classes": CLASSES, "other": OTHER_CHARS}


def check_images(name: str, images: Any, size: int) -> None:
    """Clear errors for the wrong kind of input: rank, channels, size."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"{name} expects images shaped (B, 3, H, W) in [0, 1]; got {shape}")
    if tuple(images.shape[-2:]) != (size, size):
        raise ValueError(f"{name} reads {size}x{size} images; got {images.shape[-2]}x{images.shape[-1]}")


# ------------------------------------------------------------------------------------- the networks
class GlyphClassifier(nn.Module):
    """Base of the domain's classifiers: ``forward(images) -> logits`` over ``classes``; ``size`` is the
    input side (32: HR, 8: LR); ``config`` holds the constructor's arguments (``config.json``)."""

    arch: ClassVar[str] = ""
    registry: ClassVar[dict[str, type["GlyphClassifier"]]] = {}

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if cls.arch:
            GlyphClassifier.registry[cls.arch] = cls

    def __init__(self, classes: Sequence[str], size: int, **config) -> None:
        super().__init__()
        self.classes, self.size = tuple(classes), size
        self.config = {"arch": self.arch, "classes": list(self.classes), "size": size, **config}

    @torch.no_grad()
    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """(B, classes) softmax probabilities, without gradients."""
        return self(images).float().softmax(-1)

    def save_pretrained(self, path: str | Path) -> None:
        """``config.json`` (``arch`` and the constructor's arguments) + ``model.safetensors``."""
        save_module(self, path)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "GlyphClassifier":
        """A ``save_pretrained`` folder or an ``embedded:<name>`` id (see the module docstring); the class
        is the one ``config.json``'s ``arch`` names (it must be ``cls`` or a subclass); eval mode."""
        recipe = f"recipes/super_resolution/{RECIPES.get(str(path), 'train_oracle_tiny')}.yaml"
        config, state = read_module(path, EMBEDDED, "glyph classifier", recipe)
        arch = config.pop("arch", None)
        if arch not in GlyphClassifier.registry:
            raise ValueError(f"{path}: config.json has an unknown arch {arch!r}; known: "
                             f"{sorted(GlyphClassifier.registry)}")
        klass = GlyphClassifier.registry[arch]
        if not issubclass(klass, cls):
            raise TypeError(f"{path} holds a {klass.__name__}, not a {cls.__name__}")
        model = klass(**config)
        model.load_state_dict(state)
        return model.eval()


class GlyphCNN(GlyphClassifier):
    """The oracle: a plain CNN over HR glyphs. Two 3x3 conv + SiLU layers at 32, 16 and 8 px (widths
    w, 2w, 4w) with 2x2 average pooling between them, global mean and max pooling, a linear head."""

    arch = "glyph_cnn"

    def __init__(self, classes: Sequence[str] = CLASSES, size: int = 32, width: int = 24) -> None:
        super().__init__(classes, size, width=width)
        w = width

        def stage(i: int, o: int) -> list[nn.Module]:
            return [nn.Conv2d(i, o, 3, padding=1), nn.SiLU(), nn.Conv2d(o, o, 3, padding=1), nn.SiLU()]

        self.body = nn.Sequential(*stage(3, w), nn.AvgPool2d(2), *stage(w, 2 * w), nn.AvgPool2d(2),
                                  *stage(2 * w, 4 * w))
        self.head = nn.Linear(8 * w, len(self.classes))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        h = self.body(images * 2 - 1)
        return self.head(torch.cat([h.mean((2, 3)), h.amax((2, 3))], dim=1))


class MixerBlock(nn.Module):
    """MLP-Mixer block (Tolstikhin et al., 2021): a token-mixing MLP across patches, then a channel MLP,
    each pre-LayerNorm with a residual connection."""

    def __init__(self, tokens: int, dim: int, token_hidden: int, channel_hidden: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.token_mlp = nn.Sequential(nn.Linear(tokens, token_hidden), nn.GELU(), nn.Linear(token_hidden, tokens))
        self.channel_mlp = nn.Sequential(nn.Linear(dim, channel_hidden), nn.GELU(), nn.Linear(channel_hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, D)
        x = x + rearrange(self.token_mlp(rearrange(self.norm1(x), "b n d -> b d n")), "b d n -> b n d")
        return x + self.channel_mlp(self.norm2(x))


class PatchMixer(GlyphClassifier):
    """The hacking-check classifier: an MLP-Mixer over ``patch`` x ``patch`` patches (64 tokens at 32 px),
    ``depth`` blocks of width ``dim``, mean over tokens, a linear head. No convolutions."""

    arch = "patch_mixer"

    def __init__(self, classes: Sequence[str] = CLASSES, size: int = 32, patch: int = 4, dim: int = 64,
                 depth: int = 4) -> None:
        super().__init__(classes, size, patch=patch, dim=dim, depth=depth)
        self.patch = patch
        n = (size // patch) ** 2
        self.embed = nn.Linear(3 * patch * patch, dim)
        self.blocks = nn.Sequential(*[MixerBlock(n, dim, 2 * n, 2 * dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, len(self.classes))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = rearrange(images * 2 - 1, "b c (h p) (w q) -> b (h w) (c p q)", p=self.patch, q=self.patch)
        return self.head(self.norm(self.blocks(self.embed(x))).mean(1))


class LRGlyphCNN(GlyphClassifier):
    """The judge's LR classifier: reads the 8x8 low-resolution input. Two 3x3 convs at 8 px, a stride-2
    conv to 4 px, flattened (positions kept) into a two-layer MLP head."""

    arch = "lr_cnn"

    def __init__(self, classes: Sequence[str] = CLASSES, size: int = 8, width: int = 32, hidden: int = 128) -> None:
        super().__init__(classes, size, width=width, hidden=hidden)
        w = width
        self.body = nn.Sequential(nn.Conv2d(3, w, 3, padding=1), nn.SiLU(), nn.Conv2d(w, w, 3, padding=1), nn.SiLU(),
                                  nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.SiLU(), nn.Flatten())
        self.head = nn.Sequential(nn.Linear(2 * w * (size // 2) ** 2, hidden), nn.SiLU(),
                                  nn.Linear(hidden, len(self.classes)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(images * 2 - 1))


class ResBlock(nn.Module):
    """GroupNorm -> GELU -> conv, twice, plus the (1x1-projected, strided) input."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.GroupNorm(4, c_in), nn.GELU(), nn.Conv2d(c_in, c_out, 3, stride, 1),
                                 nn.GroupNorm(4, c_out), nn.GELU(), nn.Conv2d(c_out, c_out, 3, 1, 1))
        self.skip = nn.Identity() if c_in == c_out and stride == 1 else nn.Conv2d(c_in, c_out, 1, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) + self.skip(x)


class GlyphFeatureNet(GlyphClassifier):
    """The proxies' feature network: a residual CNN (GroupNorm, GELU, strided convs) classifying the
    characters of OTHER_CHARS. ``features(images)`` gives the outputs of its three stages — (B, w, 32, 32),
    (B, 2w, 16, 16), (B, 4w, 8, 8) — the multi-layer features ``FeatureDistance`` and friends compare."""

    arch = "feature_net"

    def __init__(self, classes: Sequence[str] = OTHER_CHARS, size: int = 32, width: int = 16) -> None:
        super().__init__(classes, size, width=width)
        w = width
        self.stem = nn.Conv2d(3, w, 3, padding=1)
        self.stages = nn.ModuleList([ResBlock(w, w), ResBlock(w, 2 * w, 2), ResBlock(2 * w, 4 * w, 2)])
        self.head = nn.Sequential(nn.GroupNorm(4, 4 * w), nn.GELU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(4 * w, len(self.classes)))

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        h, out = self.stem(images * 2 - 1), []
        for stage in self.stages:
            h = stage(h)
            out.append(h)
        return out

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images)[-1])


@functools.lru_cache(maxsize=16)
def load_classifier(path: str) -> GlyphClassifier:
    """``GlyphClassifier.from_pretrained(path)``, frozen, loaded once per process (shared by rewards)."""
    return GlyphClassifier.from_pretrained(path).requires_grad_(False)


def _frozen_copy(path: str) -> GlyphClassifier:
    """A frozen classifier of its own (a reward's submodule: ``.to(device)`` must not move a shared one)."""
    import copy

    return copy.deepcopy(load_classifier(str(path)))


# ------------------------------------------------------------------------------------- the oracle HS
def oracle_hs(images: torch.Tensor, labels: torch.Tensor | Sequence[int],
              oracle: GlyphClassifier | str = "embedded:sr-oracle") -> tuple[torch.Tensor, torch.Tensor]:
    """(HS, flip) per image: HS = 1 - P_oracle(label | image) (differentiable in ``images``), flip = 1.0
    where the oracle's argmax is not the label (a step function: no useful gradient)."""
    net = load_classifier(oracle) if isinstance(oracle, str) else oracle
    check_images("oracle_hs", images, net.size)
    labels = torch.as_tensor(labels, device=images.device, dtype=torch.long)
    logits = net(images.to(next(net.parameters()).dtype)).float()
    p = logits.softmax(-1).gather(1, labels[:, None]).squeeze(1)
    return 1 - p, (logits.argmax(-1) != labels).float()


def cond_labels(name: str, cond: Sequence[Any] | None, n: int) -> list[int]:
    """The ground-truth class of each SR condition (``cond[i]["label"]``); errors name the reward."""
    if cond is None or len(cond) != n:
        raise ValueError(f"{name} needs one SR condition per sample (dicts with 'label'); got "
                         f"{'none' if cond is None else len(cond)} for {n} samples")
    try:
        return [int(c["label"]) for c in cond]
    except (KeyError, TypeError):
        raise ValueError(f"{name} reads the ground-truth class from cond[i]['label']; "
                         f"got {str(cond[0])[:80]}") from None


class OracleHallucination(Reward):
    """Minus the oracle Hallucination Score: total = -(1 - P_oracle(y | SR)); terms ``hs`` and ``flip``
    (the class-flip indicator), with y = ``cond[i]["label"]``, the ground truth.

    ``differentiable = True`` because it is: the gradient of -HS flows to the samples. It is the domain's
    *evaluation* oracle, though — it reads the ground-truth class. Report it (``eval_reward``,
    benchmarks); steer or fine-tune with the proxies (``domains.super_resolution.rewards``) and check for
    hacking with ``classifier="embedded:sr-checker"`` (an independent classifier). Fine-tuning on the
    oracle itself is an upper-bound experiment, never a result about proxies.
    """

    differentiable = True

    def __init__(self, classifier: str = "embedded:sr-oracle", name: str | None = None) -> None:
        super().__init__(name or ("oracle_hs" if classifier == "embedded:sr-oracle" else "hallucination"))
        self.classifier = _frozen_copy(classifier)

    def score(self, samples, cond):
        labels = cond_labels(self.name, cond, len(samples))
        hs, flip = oracle_hs(samples, labels, self.classifier)
        return RewardOutput(-hs, {"hs": hs, "flip": flip})


# ------------------------------------------------------------------------------------- training
def blur(images: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur (5 taps, replicate padding) of (B, C, H, W), one sigma per image."""
    r = 2
    t = torch.arange(-r, r + 1, dtype=images.dtype, device=images.device)
    k = torch.exp(-t**2 / (2 * sigma.to(images.dtype)[:, None].clamp_min(1e-3) ** 2))
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(images.shape[1], 0)
    b, c = images.shape[:2]
    x = rearrange(images, "b c h w -> 1 (b c) h w")
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), k[:, None, None, :], groups=b * c)
    x = F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), k[:, None, :, None], groups=b * c)
    return rearrange(x, "1 (b c) h w -> b c h w", b=b)


def degrade(images: torch.Tensor, *, noise_std: float = 0.0, blur_sigma: float = 0.0, blur_p: float = 0.0,
            lr_mix: float = 0.0, lr_mix_p: float = 0.0, shift: int = 0, contrast: float = 0.0,
            round_trip_p: float = 0.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Imperfect-SR artefacts, drawn per image (each off at 0), in this order:

    * ``lr_mix``/``lr_mix_p``: with probability ``lr_mix_p`` blend toward the bicubic round trip
      up(down(x)) by a weight uniform in [0, lr_mix] (an SR output that stays partly blurry; HR only);
    * ``round_trip_p``: replace an LR image by down(up(x)) (what the judge reads back from the panel; LR only);
    * ``blur_sigma``/``blur_p``: Gaussian blur, sigma uniform in [0.3, blur_sigma], with probability ``blur_p``;
    * ``shift``: a random translation by up to ``shift`` px (edge pixels repeat);
    * ``contrast``: ink/background contrast scaled by 1 ± ``contrast`` about the mean;
    * ``noise_std``: Gaussian pixel noise, std uniform in [0, noise_std]; then clamped to [0, 1]."""
    b, dev = images.shape[0], images.device

    def u(*shape):
        return torch.rand(b, *shape, generator=generator, device=dev)

    x = images
    if lr_mix > 0 and lr_mix_p > 0:
        w = (lr_mix * u(1, 1, 1)) * (u(1, 1, 1) < lr_mix_p)
        x = x + w * (upsample(downsample(x)) - x)
    if round_trip_p > 0:
        x = torch.where(u(1, 1, 1) < round_trip_p, downsample(upsample(x)), x)
    if blur_sigma > 0 and blur_p > 0:
        sigma = 0.3 + max(0.0, blur_sigma - 0.3) * u()
        x = torch.where(u(1, 1, 1) < blur_p, blur(x, sigma), x)
    if shift > 0:
        pad = F.pad(x, (shift,) * 4, mode="replicate")
        dx = (u() * (2 * shift + 1)).long().clamp_max(2 * shift).tolist()
        dy = (u() * (2 * shift + 1)).long().clamp_max(2 * shift).tolist()
        h, w_ = x.shape[-2:]
        x = torch.stack([pad[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w_] for i in range(b)])
    if contrast > 0:
        mean = x.mean((1, 2, 3), keepdim=True)
        x = mean + (x - mean) * (1 + contrast * (2 * u(1, 1, 1) - 1))
    if noise_std > 0:
        x = x + noise_std * u(1, 1, 1) * torch.randn(x.shape, generator=generator, device=dev, dtype=x.dtype)
    return x.clamp(0, 1)


class GlyphDataModule(L.LightningDataModule):
    """Glyph batches (``GlyphDataset`` items: hr, lr, label, prompt) for the domain's classifiers; each
    trains on its own ``seed`` and is validated on ``val_length`` fresh glyphs of ``seed + 1``.

    Args:
        chars: "classes" (CLASSES) or "other" (OTHER_CHARS: the feature network's).
        fonts: Pillow's fonts to draw (default both).
    """

    def __init__(self, batch_size: int = 64, length: int = 100_000, seed: int = 0, chars: str = "classes",
                 fonts: tuple[str, ...] = FONTS, size: int = 32, val_length: int = 512, num_workers: int = 0) -> None:
        super().__init__()
        if chars not in CHARSETS:
            raise ValueError(f"chars must be one of {sorted(CHARSETS)}, got {chars!r}")
        self.batch_size, self.length, self.seed, self.chars = batch_size, length, seed, chars
        self.fonts, self.size, self.val_length, self.num_workers = tuple(fonts), size, val_length, num_workers

    def _dataset(self, length: int, seed: int) -> GlyphDataset:
        return GlyphDataset(length, self.size, seed, chars=CHARSETS[self.chars], fonts=self.fonts)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(self._dataset(self.length, self.seed), batch_size=self.batch_size,
                                           shuffle=True, num_workers=self.num_workers,
                                           generator=torch.Generator().manual_seed(self.seed))

    def val_dataloader(self):
        return torch.utils.data.DataLoader(self._dataset(self.val_length, self.seed + 1), batch_size=self.batch_size,
                                           num_workers=self.num_workers)


class GlyphClassifierTraining(NetworkFit):
    """Trains one of the domain's classifiers on glyphs and exports it (``config.json``,
    ``model.safetensors``, ``<fit_name>_fit.json`` with the last held-out figures) to ``output_dir``.

    Args:
        arch: "glyph_cnn" (oracle), "patch_mixer" (checker), "lr_cnn" (reads ``lr``), "feature_net".
        network: the network's own arguments (e.g. ``{width: 24}``).
        chars: "classes" or "other" — must be the data's.
        augment: ``degrade``'s keyword arguments for training batches (validation: the same
            artefacts at fixed seeds, logged as ``val/aug_acc``).
        fit_name: names the report (``oracle`` -> ``oracle_fit.json``).
        seed: the initialisation.
        lr, weight_decay, warmup_steps, decay, output_dir: ``NetworkFit``'s.

    Held out: ``val/acc``, ``val/nll``, ``val/aug_acc``; HR classifiers over CLASSES also
    ``val/bicubic_acc`` and ``val/bicubic_hs``: the classifier on bicubic-upsampled LR (the baseline
    SR) — how often the plain upsampling keeps the class, and its mean HS.
    """

    def __init__(self, arch: str = "glyph_cnn", network: dict | None = None, chars: str = "classes",
                 augment: dict | None = None, fit_name: str = "classifier", seed: int = 0,
                 output_dir: str | None = None, lr: float = 3e-3, weight_decay: float = 0.01, warmup_steps: int = 0,
                 decay: bool = False) -> None:
        super().__init__(lr, weight_decay, warmup_steps, decay, output_dir)
        if arch not in GlyphClassifier.registry:
            raise ValueError(f"arch must be one of {sorted(GlyphClassifier.registry)}, got {arch!r}")
        if chars not in CHARSETS:
            raise ValueError(f"chars must be one of {sorted(CHARSETS)}, got {chars!r}")
        self.save_hyperparameters()
        self.fit_name = fit_name
        self.augment = dict(augment or {})
        torch.manual_seed(seed)
        self.network = GlyphClassifier.registry[arch](classes=CHARSETS[chars], **(network or {}))
        self.reads = "lr" if self.network.size < 32 else "hr"

    def _inputs(self, batch) -> torch.Tensor:
        x = batch[self.reads]
        check_images(type(self.network).__name__, x, self.network.size)
        return x

    def training_step(self, batch, batch_idx):
        x = degrade(self._inputs(batch), **self.augment)
        loss = F.cross_entropy(self.network(x), batch["label"])
        self.log("train/loss", loss, prog_bar=True, batch_size=x.shape[0])
        return loss

    def validation_step(self, batch, batch_idx):
        x, y, n = self._inputs(batch), batch["label"], batch["label"].shape[0]
        logits = self.network(x)
        self.log("val/acc", (logits.argmax(-1) == y).float().mean(), batch_size=n)
        self.log("val/nll", F.cross_entropy(logits, y), batch_size=n)
        gen = torch.Generator(device=x.device).manual_seed(batch_idx)  # the same artefacts at every validation
        aug = self.network(degrade(x, generator=gen, **self.augment))
        self.log("val/aug_acc", (aug.argmax(-1) == y).float().mean(), batch_size=n)
        if self.reads == "hr" and self.hparams.chars == "classes":
            p = self.network(upsample(batch["lr"])).softmax(-1)
            self.log("val/bicubic_acc", (p.argmax(-1) == y).float().mean(), batch_size=n)
            self.log("val/bicubic_hs", (1 - p.gather(1, y[:, None])).mean(), batch_size=n)

    def fit_parameters(self):
        return self.network.parameters()

    def save_weights(self, folder: Path) -> Path:
        self.network.save_pretrained(folder)
        return folder
