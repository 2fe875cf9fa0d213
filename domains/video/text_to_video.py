"""Text-to-video generators: the ModelScope / zeroscope family (``UNet3DConditionModel``) and the
embedded tiny moving-shapes model.

``TextToVideoGenerator`` is a small subclass of the image domain's ``StableDiffusionGenerator``: the
same CLIP text encoder, tokenizer, optional VAE, scheduler, CFG, LoRA and transition arithmetic
(``rewardopt.generators.diffusion``), with a ``UNet3DConditionModel`` denoiser on states shaped
(B, C, F, h, w) — what diffusers' ``TextToVideoSDPipeline`` passes it — and ``decode`` giving videos
(B, F, 3, H, W) in [0, 1]. The Generator contract needed nothing new: states are tensors of any shape
and the Gaussian transitions act elementwise (the pipeline's own frame reshapes around
``scheduler.step`` change no number). A test checks the sampler against ``TextToVideoSDPipeline`` to 1e-5.

It loads a ``TextToVideoSDPipeline`` folder or hub id (``unet/``, ``text_encoder/``, ``tokenizer/``,
``scheduler/``, ``vae/``: e.g. ``ali-vilab/text-to-video-ms-1.7b``, ``cerspense/zeroscope_v2_576w``)
with each component's own ``from_pretrained``, or ``embedded:tiny-moving-shapes``: the pixel-space
(no VAE) 16x16, 8-frame model shipped with rewardopt (``recipes/video/pretrain_tiny.yaml``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from diffusers import UNet3DConditionModel
from einops import rearrange

from domains.images.stable_diffusion import StableDiffusionGenerator
from rewardopt.generators.capabilities import VideoSamples
from rewardopt.generators.diffusion import DEFAULT_LORA_TARGETS, DiffusionGenerator

ASSETS = Path(__file__).parent / "assets"
EMBEDDED = {"embedded:tiny-moving-shapes": ASSETS / "tiny_moving_shapes"}


def resolve_pretrained(pretrained: str) -> str:
    """``embedded:<name>`` -> the shipped folder; otherwise the image domain's rules (hub id or folder)."""
    from domains.images.stable_diffusion import resolve_pretrained as resolve_image

    return resolve_image(pretrained, EMBEDDED, "recipes/video/pretrain_tiny.yaml", "video")


class TextToVideoGenerator(VideoSamples, StableDiffusionGenerator):
    """A ``UNet3DConditionModel`` text-to-video sampler (ModelScope / zeroscope layout).

    Args:
        pretrained: hub id, ``TextToVideoSDPipeline`` folder, or ``embedded:tiny-moving-shapes``.
        num_frames: frames per video (the pipeline's default is 16).
        height, width: frame size in pixels (divisible by the VAE factor times the UNet's downsampling).
        Other arguments: ``StableDiffusionGenerator`` / ``DiffusionGenerator``. The pipeline's own
        defaults are 50 DDIM steps and guidance 9; Free²Guide's VideoCrafter2 runs use η = 1 and CFG 12.
    """

    def __init__(self, pretrained: str, num_frames: int = 16, height: int = 256, width: int = 256,
                 sampler: str = "ddim", num_steps: int = 50, guidance_scale: float = 9.0, eta: float = 0.0,
                 gradient_checkpointing: bool = True, lora_rank: int | None = 8, lora_alpha: float | None = None,
                 lora_targets: list[str] = list(DEFAULT_LORA_TARGETS), full_finetune: bool = False,
                 lora_scale: float = 1.0, revision: str | None = None, _components: dict | None = None) -> None:
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        comps = _components if _components is not None else self.load_components(resolve_pretrained(pretrained),
                                                                                   revision)
        super().__init__(pretrained, height, width, sampler, num_steps, guidance_scale, eta, gradient_checkpointing,
                         lora_rank, lora_alpha, lora_targets, full_finetune, lora_scale, revision, _components=comps)
        self.num_frames = int(num_frames)
        if not isinstance(self.denoiser, UNet3DConditionModel):
            raise TypeError(f"TextToVideoGenerator needs a UNet3DConditionModel, got {type(self.denoiser).__name__}")

    unet_class = UNet3DConditionModel  # loaded by StableDiffusionGenerator.load_components
    family = "text-to-video"

    def save_pretrained(self, path: str | os.PathLike) -> None:
        super().save_pretrained(path)
        (Path(path) / "rewardopt.json").write_text(json.dumps({"height": self.height, "width": self.width,
                                                               "num_frames": self.num_frames}))

    #: LoRA in peft's own format (``DiffusionGenerator.save_lora``: ``adapter_model.safetensors`` +
    #: ``adapter_config.json``; ``load_lora`` or ``peft.set_peft_model_state_dict`` load it). Not diffusers'
    #: pipeline format: in diffusers 0.42 ``UNet3DConditionModel`` has no ``PeftAdapterMixin``, so
    #: ``TextToVideoSDPipeline.load_lora_weights`` cannot load any LoRA into it (it fails on
    #: ``load_lora_adapter``); inject the saved ``LoraConfig`` into ``pipe.unet`` with peft instead.
    save_lora = DiffusionGenerator.save_lora

    # ------------------------------------------------------------------ geometry and the contract
    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        c, h, w = super().latent_shape
        return (c, self.num_frames, h, w)

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """(B, C, F, h, w) latents or pixels in [-1, 1] -> (B, F, 3, H, W) videos in [0, 1] (the
        VAE decodes frame by frame, as the pipeline's ``decode_latents``)."""
        self.counter.count_decodes(x0.shape[0])
        frames = rearrange(x0, "b c f h w -> (b f) c h w")
        if self.vae is not None:
            frames = self.vae.decode(frames / self.vae.config.scaling_factor, return_dict=False)[0]
        return rearrange((frames / 2 + 0.5).clamp(0, 1), "(b f) c h w -> b f c h w", b=x0.shape[0])

    def encode_videos(self, videos: torch.Tensor) -> torch.Tensor:
        """(B, F, 3, H, W) in [0, 1] -> states x_0 (B, C, F, h, w) (latents, or pixels in [-1, 1])."""
        if videos.ndim != 5 or tuple(videos.shape[-2:]) != (self.height, self.width):
            raise ValueError(f"videos must be (B, F, 3, {self.height}, {self.width}); got {tuple(videos.shape)}")
        frames = rearrange(videos * 2 - 1, "b f c h w -> (b f) c h w")
        if self.vae is not None:
            frames = self.vae.encode(frames).latent_dist.sample() * self.vae.config.scaling_factor
        return rearrange(frames, "(b f) c h w -> b c f h w", b=videos.shape[0])
