"""Super-resolution conditions: ``SRCondition`` and a data module over folders of your own images.

An SR condition is a dict — ``image`` (the LR input, (3, h, w) in [0, 1]), ``prompt``, and for paired data
``hr`` (the ground truth, (3, H, W)) and ``label`` — that prints as its short ``name`` (rewards.csv rows,
grid labels), not as its tensors. ``ImageFolderSRDataModule`` makes them from folders of high-resolution
images (DIV2K, your own photographs): random HR crops for training, centre crops for held-out evaluation,
the LR by the domain's degradation (antialiased bicubic x factor, ``glyphs.downsample``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from domains.super_resolution.glyphs import downsample
from rewardopt.data import PromptDataModule

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class SRCondition(dict):
    """A super-resolution condition (a dict: rewards read ``cond["hr"]`` etc.) whose text form is its
    ``name`` (or prompt), so logs and CSV files show "glyph 17 (a digit)" rather than tensors."""

    def __str__(self) -> str:
        return str(self.get("name") or self.get("prompt") or "SR input")

    __repr__ = __str__


def list_images(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no image folder at {str(folder)!r}")
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise FileNotFoundError(f"{str(folder)!r} has no images ({', '.join(IMAGE_SUFFIXES)})")
    return paths


def load_rgb(path: Path) -> torch.Tensor:
    from PIL import Image

    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


class ImageFolderPairs(torch.utils.data.Dataset):
    """(LR, HR) SR conditions from the images of a folder: an ``hr_size`` crop of each (random with a
    seeded per-item generator when ``random_crop``, else the centre), LR = downsample(HR, factor)."""

    def __init__(self, folder: str | Path, hr_size: int = 512, factor: int = 4, prompt: str = "",
                 random_crop: bool = True, seed: int = 0) -> None:
        if hr_size % factor:
            raise ValueError(f"hr_size {hr_size} is not divisible by the SR factor {factor}")
        self.paths = list_images(folder)
        self.hr_size, self.factor, self.prompt = hr_size, factor, prompt
        self.random_crop, self.seed = random_crop, seed

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> SRCondition:
        """Item ``i``: image ``i % len(paths)`` (an epoch's cycled position may exceed the folder), with its crop and
        the LR's augmentation noise (``lr_noise``, for the generator's low-resolution scheduler) seeded by
        (seed, i) — so a condition is the same on every visit and on resume, and repeats of one image within an
        epoch get different crops."""
        path = self.paths[i % len(self.paths)]
        img = load_rgb(path)
        s = self.hr_size
        h, w = img.shape[-2:]
        if h < s or w < s:
            raise ValueError(f"{path} is {w}x{h}, smaller than hr_size {s}: resize it or lower hr_size")
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        if self.random_crop:
            y, x = (int(torch.randint(0, n - s + 1, (1,), generator=g)) for n in (h, w))
        else:
            y, x = (h - s) // 2, (w - s) // 2
        hr = img[:, y:y + s, x:x + s]
        lr = downsample(hr[None], self.factor)[0]
        return SRCondition(image=lr, hr=hr, prompt=self.prompt, name=path.name,
                           lr_noise=torch.randn(lr.shape, generator=g))


class ImageFolderSRDataModule(PromptDataModule):
    """SR conditions from your own high-resolution images, for fine-tuning, steering and prediction.

    Args:
        train_dir / val_dir: folders of HR images (searched recursively).
        hr_size: the HR crop side (the LR input is hr_size / factor); factor: the SR factor (x4 upscaler: 4).
        prompt: the text prompt of every condition (the x4 upscaler is text-conditioned; "" is allowed).
        batch_size, val_batch_size: per device; epoch_size: training items per epoch (the folder is cycled).
    Batching, shuffling and exact mid-epoch resume are ``PromptDataModule``'s, over item positions; images are
    read when their batch is collated. Each condition carries a seeded ``lr_noise``, so before/after evaluations
    and resumed runs see the same noised LR. Crops are fixed per (seed, position): the same in every epoch.
    """

    def __init__(self, train_dir: str, val_dir: str, hr_size: int = 512, factor: int = 4, prompt: str = "",
                 batch_size: int = 1, val_batch_size: int = 4, epoch_size: int = 1024, seed: int = 0) -> None:
        self.train = ImageFolderPairs(train_dir, hr_size, factor, prompt, random_crop=True, seed=seed)
        self.val = ImageFolderPairs(val_dir, hr_size, factor, prompt, random_crop=False)
        # training items are an epoch's positions (image = position % folder size: its own crop and LR noise)
        super().__init__(list(range(max(epoch_size, len(self.train)))), list(range(len(self.val))),
                         batch_size=batch_size, val_batch_size=val_batch_size, val_repeats=1,
                         epoch_size=epoch_size, seed=seed)

    @staticmethod
    def _loading(loader: torch.utils.data.DataLoader, dataset: ImageFolderPairs) -> torch.utils.data.DataLoader:
        """``loader`` (of indices) with batches collated into the images' SR conditions."""
        return torch.utils.data.DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=loader.sampler,
                                           drop_last=loader.drop_last, collate_fn=_Load(dataset))

    def train_dataloader(self):
        return self._loading(super().train_dataloader(), self.train)

    def val_dataloader(self):
        return self._loading(super().val_dataloader(), self.val)


class _Load:
    """Collate a batch of indices into the dataset's items (a class, so worker processes can pickle it)."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __call__(self, idx: list[int]) -> list:
        return [self.dataset[i] for i in idx]
