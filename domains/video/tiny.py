"""The embedded tiny text-to-video model: configs, tokenizer, data modules and its pretraining job.

A pixel-space (no VAE) 16x16, 8-frame ``UNet3DConditionModel`` (1.9 M parameters) conditioned on the image
domain's 2-layer CLIP text encoder, with a word-level tokenizer over the moving-shapes vocabulary.
``TinyTextToVideoPretraining`` trains it with the image recipe's loss (x0-prediction) on
``MovingShapesDataset``; ``recipes/video/pretrain_tiny.yaml`` writes the folder shipped at
``domains/video/assets/tiny_moving_shapes``.
"""

from __future__ import annotations

import lightning as L
import torch
from diffusers import UNet3DConditionModel
from transformers import PreTrainedTokenizerFast

from domains.images.shapes import COLOURS, SHAPES
from domains.images.tiny import TinyTextToImagePretraining, tiny_scheduler, tiny_text_encoder, word_level_tokenizer
from domains.video.moving_shapes import COUNT_WORDS, DIRECTIONS, MovingShapesDataset, split_prompts
from domains.video.text_to_video import TextToVideoGenerator
from rewardopt.data import PromptDataModule

MAX_TOKENS = 8  # "<s> two blue squares moving up </s>" is 7


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer for the moving-shapes vocabulary, saved and loaded like any HF tokenizer."""
    words = list(COUNT_WORDS) + list(COLOURS) + [w for s in SHAPES for w in (s, s + "s")] + ["moving", *DIRECTIONS]
    return word_level_tokenizer(words, MAX_TOKENS)


def tiny_unet3d(size: int = 16, in_channels: int = 3, cross_attention_dim: int = 32,
                channels: tuple[int, ...] = (16, 32, 64)) -> UNet3DConditionModel:
    """Spatial convs and attention per frame, temporal convs and attention across frames (ModelScope's
    layout), cross-attention to the text at the two coarser levels."""
    n = len(channels)
    return UNet3DConditionModel(
        sample_size=size, in_channels=in_channels, out_channels=in_channels, layers_per_block=1,
        block_out_channels=channels, down_block_types=("DownBlock3D",) + ("CrossAttnDownBlock3D",) * (n - 1),
        up_block_types=("CrossAttnUpBlock3D",) * (n - 1) + ("UpBlock3D",), cross_attention_dim=cross_attention_dim,
        attention_head_dim=8, norm_num_groups=8,
    )


def build_tiny_video_generator(seed: int = 0, size: int = 16, frames: int = 8, channels: tuple[int, ...] = (16, 32, 64),
                               prediction_type: str = "sample", beta_schedule: str = "scaled_linear",
                               **kwargs) -> TextToVideoGenerator:
    """A freshly initialised tiny text-to-video generator (random weights, seeded)."""
    torch.manual_seed(seed)
    tok = build_tokenizer()
    kwargs.setdefault("height", size)
    kwargs.setdefault("width", size)
    kwargs.setdefault("num_frames", frames)
    return TextToVideoGenerator.from_components(tiny_unet3d(size, channels=channels), tiny_text_encoder(len(tok)),
                                                tok, tiny_scheduler(prediction_type, beta_schedule), **kwargs)


class MovingShapesDataModule(L.LightningDataModule):
    """Procedural (video, prompt, labels) batches for pretraining, the judge, the motion reward and
    the evaluator (each trains on its own ``seed``)."""

    def __init__(self, batch_size: int = 16, length: int = 100_000, size: int = 16, frames: int = 8, seed: int = 0,
                 num_workers: int = 0) -> None:
        super().__init__()
        self.batch_size, self.length, self.size, self.frames = batch_size, length, size, frames
        self.seed, self.num_workers = seed, num_workers

    def train_dataloader(self):
        ds = MovingShapesDataset(self.length, self.size, self.frames, self.seed)
        return torch.utils.data.DataLoader(ds, batch_size=self.batch_size, shuffle=True, num_workers=self.num_workers,
                                           generator=torch.Generator().manual_seed(self.seed))

    def val_dataloader(self):
        ds = MovingShapesDataset(256, self.size, self.frames, self.seed + 1)
        return torch.utils.data.DataLoader(ds, batch_size=self.batch_size, num_workers=self.num_workers)


class MovingShapesPromptDataModule(PromptDataModule):
    """The moving-shapes prompts split into 120 training and 24 held-out prompts (seeded, fixed)."""

    def __init__(self, batch_size: int = 2, val_batch_size: int = 8, val_repeats: int = 1, epoch_size: int = 256,
                 seed: int = 0) -> None:
        train, held_out = split_prompts()
        super().__init__(train, held_out, batch_size, val_batch_size, val_repeats, epoch_size, seed)


class TinyTextToVideoPretraining(TinyTextToImagePretraining):
    """Pretrains the tiny text-to-video model (UNet3D + text encoder) with the diffusion MSE loss
    (``TinyTextToImagePretraining``'s) on moving-shapes clips.

    Args:
        frames: frames per clip. Other args: ``TinyTextToImagePretraining``.
    """

    def __init__(self, output_dir: str | None = None, size: int = 16, frames: int = 8,
                 channels: list[int] = [16, 32, 64], lr: float = 1e-3, cond_dropout: float = 0.1, seed: int = 0,
                 prediction_type: str = "sample", beta_schedule: str = "scaled_linear",
                 ema_decay: float | None = None) -> None:
        self._frames = frames
        super().__init__(output_dir, size, channels, lr, cond_dropout, seed, prediction_type, beta_schedule, ema_decay)

    def build_generator(self, seed, size, channels, prediction_type, beta_schedule):
        return build_tiny_video_generator(seed, size, self._frames, channels, prediction_type, beta_schedule,
                                          lora_rank=None, gradient_checkpointing=False)

    def states(self, batch) -> torch.Tensor:
        return self.generator.encode_videos(batch["video"])
