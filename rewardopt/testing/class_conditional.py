"""Bring your own model: a class-conditional ``diffusers.UNet2DModel`` as a rewardopt generator.

This is the example of CONTRIBUTING.md's "Bring your own model" section, as a user writes it: a
``DiffusionGenerator`` subclass that says where the weights are, how a condition becomes tensors,
how the denoiser is called and how a state becomes an image. Sampling (DDIM/DDPM, CFG), LoRA (peft,
on any ``nn.Module``), checkpointing and compute counting come from ``DiffusionGenerator``.
``tests/test_byo_model.py`` fine-tunes it with LoRA through ``rewardopt fit`` and loads the adapter back.
"""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler, UNet2DModel

from rewardopt.generators.base import Condition
from rewardopt.generators.capabilities import ImageSamples
from rewardopt.generators.diffusion import DiffusionGenerator


class ClassConditionalUNetGenerator(ImageSamples, DiffusionGenerator):
    """Pixel-space images (B, C, H, W) in [0, 1] from class labels (conditions: ints, or strings like "3").

    Args:
        pretrained: a folder (or hub id) holding ``unet/`` (a UNet2DModel with ``num_class_embeds``)
            and ``scheduler/``, as diffusers' ``save_pretrained`` writes them.
        null_class: the label trained as "no class", for classifier-free guidance (None: no CFG).
        Other arguments: see ``DiffusionGenerator`` (``lora_targets`` name the denoiser's modules).
    """

    def __init__(self, pretrained: str, null_class: int | None = None, num_steps: int = 50,
                 guidance_scale: float = 1.0, eta: float = 0.0, lora_rank: int | None = None,
                 lora_targets: list[str] = ["to_q", "to_k", "to_v", "to_out.0"], full_finetune: bool = False,
                 gradient_checkpointing: bool = False) -> None:
        super().__init__(DDIMScheduler.from_pretrained(pretrained, subfolder="scheduler"), num_steps=num_steps,
                         guidance_scale=guidance_scale, eta=eta, lora_rank=lora_rank, lora_targets=lora_targets,
                         full_finetune=full_finetune, gradient_checkpointing=gradient_checkpointing)
        self.denoiser = self.load_denoiser(pretrained)
        self.null_class = null_class
        self.setup_trainable()  # freezes everything, then adds LoRA adapters (or opens the full denoiser)

    def load_denoiser(self, pretrained: str) -> torch.nn.Module:
        return UNet2DModel.from_pretrained(pretrained, subfolder="unet")

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        cfg = self.denoiser.config
        return (cfg.in_channels, cfg.sample_size, cfg.sample_size)

    def encode_condition(self, raw) -> Condition:
        labels = torch.tensor([int(r) for r in raw], device=self.alphas_cumprod.device)
        return Condition(list(raw), {"class_labels": labels})

    def _uncond_tensors(self, cond: Condition) -> dict[str, torch.Tensor] | None:
        if self.null_class is None:
            return None
        return {"class_labels": torch.full_like(cond.tensors["class_labels"], self.null_class)}

    def _denoiser_output(self, denoiser, x, t, tensors) -> torch.Tensor:
        return denoiser(x, t, class_labels=tensors["class_labels"], return_dict=False)[0]

    def init_state(self, cond: Condition, generator: torch.Generator | None = None) -> torch.Tensor:
        device = generator.device if generator is not None else self.alphas_cumprod.device
        x = torch.randn((len(cond), *self.sample_shape), generator=generator, device=device)
        return x.to(self.alphas_cumprod.device) * self.scheduler.init_noise_sigma

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        self.counter.count_decodes(x0.shape[0])
        return (x0 / 2 + 0.5).clamp(0, 1)
