"""The embedded tiny x4 super-resolution model (``embedded:tiny-glyphs-x4``): configs, data modules and
its pretraining job.

The layout is SD x4 upscaler's at a toy size: a 3-block ``AutoencoderKL`` (x4, 4 latent channels) whose
decoder does the upscaling, a ``UNet2DConditionModel`` on 8x8 latents whose input is the 4 latent
channels + the 3 channels of the noised 8x8 LR image, with ``num_class_embeds`` covering the LR noise
levels (``class_labels=noise_level``), the image domain's 2-layer CLIP text encoder with a word-level
tokenizer over the glyph prompts ("a digit", "a letter", "a shape"), and SD x4's schedulers.

Our reading of SD x4's schedulers (``stabilityai/stable-diffusion-x4-upscaler``'s ``scheduler/`` and
``low_res_scheduler/`` configs, from memory of the hub files; not checked offline): the sampler is a
``DDIMScheduler`` with scaled-linear betas 1e-4 .. 0.02 over 1000 steps, v-prediction, no clipping,
``set_alpha_to_one=False``, ``steps_offset=1``; the LR is noised by a ``DDPMScheduler`` with the same
betas; ``max_noise_level`` 350 (the pipeline's default); the VAE's ``scaling_factor`` 0.08333 (the
pipeline's constructor forces it).

``TinySuperResolutionPretraining`` trains the VAE first (L1 reconstruction + a small KL), then, from
``vae_steps`` on, freezes it, rescales its latent space so that latents x 0.08333 have unit std (an exact
reparametrisation of ``quant_conv`` / ``post_quant_conv``, so the pipeline's forced scaling factor is the
right one), and trains the UNet with ``SuperResolutionGenerator.denoising_loss``.

The shipped model (``recipes/super_resolution/pretrain_tiny.yaml``: 1,000 VAE + 3,000 UNet steps at batch 32,
24 min on one shared CPU core; VAE 242 k and UNet 1.06 M parameters): held-out VAE MSE 0.0013 (29.6 dB),
v-MSE 0.153. On 256 held-out glyphs (seed 11), 20 DDIM steps, noise level 20, CFG 1: PSNR(SR, GT) 22.1 dB
against bicubic's 20.0 dB; mean gradient magnitude 0.0319, GT's 0.0319, bicubic's 0.0222 (as sharp as the
ground truth); CFG 9: 19.4 dB. The VAE keeps about half of the glyphs' colour tint, and SR inherits that.
"""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from transformers import PreTrainedTokenizerFast

from domains.images.tiny import MAX_TOKENS, tiny_text_encoder, word_level_tokenizer
from domains.super_resolution.glyphs import CATEGORY, GlyphDataset
from domains.super_resolution.upscaler import PIPELINE_SCALING_FACTOR, SuperResolutionGenerator, glyph_conditions
from rewardopt.data import PromptDataModule
from rewardopt.fitting import NetworkFit

MAX_NOISE_LEVEL = 350


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer over the glyph prompts' words ("a", "digit", "letter", "shape")."""
    return word_level_tokenizer(["a", *sorted(set(CATEGORY.values()))], MAX_TOKENS)


def tiny_vae(channels: tuple[int, ...] = (32, 64, 64), latent_channels: int = 4, size: int = 32) -> AutoencoderKL:
    """len(channels) blocks: a factor 2**(len-1) (3 blocks: x4)."""
    n = len(channels)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=channels,
                         down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                         layers_per_block=1, norm_num_groups=8, sample_size=size,
                         scaling_factor=PIPELINE_SCALING_FACTOR)


def tiny_sr_unet(size: int = 8, latent_channels: int = 4, channels: tuple[int, ...] = (32, 64, 64),
                 cross_attention_dim: int = 32, max_noise_level: int = MAX_NOISE_LEVEL) -> UNet2DConditionModel:
    """SD x4's UNet layout at toy size: in = latents + LR image, ``num_class_embeds`` = the noise levels
    0..max_noise_level (their embedding table starts at zero, so rarely trained levels add nothing)."""
    n = len(channels)
    unet = UNet2DConditionModel(
        sample_size=size, in_channels=latent_channels + 3, out_channels=latent_channels, layers_per_block=1,
        block_out_channels=channels, down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",), cross_attention_dim=cross_attention_dim,
        attention_head_dim=8, norm_num_groups=8, num_class_embeds=max_noise_level + 1,
    )
    torch.nn.init.zeros_(unet.class_embedding.weight)
    return unet


def sd_x4_schedulers(prediction_type: str = "v_prediction") -> tuple[DDIMScheduler, DDPMScheduler]:
    """(scheduler, low_res_scheduler): our reading of SD x4's (see the module docstring)."""
    betas = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="scaled_linear",
                 clip_sample=False)
    return (DDIMScheduler(**betas, set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type),
            DDPMScheduler(**betas, variance_type="fixed_small"))


def build_tiny_sr_generator(seed: int = 0, size: int = 32, vae_channels: tuple[int, ...] = (32, 64, 64),
                            unet_channels: tuple[int, ...] = (32, 64, 64), prediction_type: str = "v_prediction",
                            max_noise_level: int = MAX_NOISE_LEVEL, **kwargs) -> SuperResolutionGenerator:
    """A freshly initialised tiny super-resolution generator (random weights, seeded); ``size``: the HR size."""
    torch.manual_seed(seed)
    tok = build_tokenizer()
    vae = tiny_vae(tuple(vae_channels), size=size)
    factor = 2 ** (len(vae_channels) - 1)
    scheduler, low_res = sd_x4_schedulers(prediction_type)
    unet = tiny_sr_unet(size // factor, channels=tuple(unet_channels), max_noise_level=max_noise_level)
    return SuperResolutionGenerator.from_components(unet, tiny_text_encoder(len(tok)), tok, scheduler, vae=vae,
                                                    low_res_scheduler=low_res, max_noise_level=max_noise_level,
                                                    **kwargs)


# ----------------------------------------------------------------------------------------------- data
class GlyphPairsDataModule(L.LightningDataModule):
    """(HR, LR, label, prompt) glyph batches for pretraining: training items from ``seed``, 256 held-out
    items from ``seed + 1``."""

    def __init__(self, batch_size: int = 32, length: int = 100_000, size: int = 32, factor: int = 4, seed: int = 0,
                 num_workers: int = 0, val_length: int = 256) -> None:
        super().__init__()
        self.batch_size, self.length, self.size, self.factor = batch_size, length, size, factor
        self.seed, self.num_workers, self.val_length = seed, num_workers, val_length

    def train_dataloader(self):
        ds = GlyphDataset(self.length, self.size, self.seed, self.factor)
        return torch.utils.data.DataLoader(ds, batch_size=self.batch_size, shuffle=True, num_workers=self.num_workers,
                                           generator=torch.Generator().manual_seed(self.seed))

    def val_dataloader(self):
        ds = GlyphDataset(self.val_length, self.size, self.seed + 1, self.factor)
        return torch.utils.data.DataLoader(ds, batch_size=self.batch_size, num_workers=self.num_workers)


class GlyphConditionDataModule(PromptDataModule):
    """Raw super-resolution conditions (lists of dicts: ``image`` LR, ``prompt``, ``hr``, ``label``,
    ``index``) for fine-tuning, steering and prediction: ``num_train`` glyphs of ``train_seed`` and
    ``num_val`` held-out glyphs of ``val_seed`` (other seeds than the pretraining data's 0 and 1).
    Every condition carries a fixed ``lr_noise`` (drawn from its seed and index), so before/after evaluations
    see the same noised LR and a resumed run encodes the same conditions as an uninterrupted one. Batching,
    shuffling and resuming are ``PromptDataModule``'s."""

    def __init__(self, batch_size: int = 4, val_batch_size: int = 16, val_repeats: int = 1, epoch_size: int = 1024,
                 num_train: int = 1024, num_val: int = 64, train_seed: int = 10, val_seed: int = 11, size: int = 32,
                 factor: int = 4, seed: int = 0) -> None:
        if train_seed == val_seed:
            raise ValueError("train_seed and val_seed must differ (held-out glyphs)")
        train = glyph_conditions(GlyphDataset(num_train, size, train_seed, factor), range(num_train), seed=train_seed)
        held_out = glyph_conditions(GlyphDataset(num_val, size, val_seed, factor), range(num_val), seed=val_seed)
        super().__init__(train, held_out, batch_size, val_batch_size, val_repeats, epoch_size, seed)


# ----------------------------------------------------------------------------------------------- pretraining
def rescale_latents(vae: AutoencoderKL, k: float) -> None:
    """Multiply the VAE's latent space by ``k`` exactly: the posterior's mean x k and std x k (log-variance
    + 2 log k) in ``quant_conv``, and ``post_quant_conv`` reads latents / k. Decoding is unchanged."""
    c = vae.config.latent_channels
    with torch.no_grad():
        vae.quant_conv.weight[:c] *= k
        vae.quant_conv.bias[:c] *= k
        vae.quant_conv.bias[c:] += 2 * math.log(k)
        vae.post_quant_conv.weight /= k


class TinySuperResolutionPretraining(NetworkFit):
    """Pretrains the tiny x4 SR model: the VAE for ``vae_steps`` (L1 reconstruction + ``kl_weight`` x KL),
    then the UNet (``denoising_loss``, empty prompt with probability ``cond_dropout``) with the VAE frozen
    and its latents rescaled to unit std at the pipeline's scaling factor 0.08333.

    Args:
        output_dir: where the pipeline-layout folder and ``generator_fit.json`` go.
        size: HR size; vae_channels / unet_channels: block widths; prediction_type: the scheduler's.
        lr_vae, lr_unet: peak AdamW learning rates; each phase warms up for 5% and decays (cosine) to 5%.
        scale_batches: training batches whose latents measure the std at the phase switch.
    """

    fit_name = "generator"

    def __init__(self, output_dir: str | None = None, size: int = 32, vae_channels: list[int] = [32, 64, 64],
                 unet_channels: list[int] = [32, 64, 64], vae_steps: int = 1000, lr_vae: float = 2e-3,
                 lr_unet: float = 1e-3, kl_weight: float = 1e-6, cond_dropout: float = 0.1,
                 prediction_type: str = "v_prediction", max_noise_level: int = MAX_NOISE_LEVEL, seed: int = 0,
                 scale_batches: int = 8) -> None:
        super().__init__(lr_unet, weight_decay=0.0, output_dir=output_dir)
        self.save_hyperparameters()
        self.generator = build_tiny_sr_generator(seed, size, tuple(vae_channels), tuple(unet_channels), prediction_type,
                                                 max_noise_level, lora_rank=None, gradient_checkpointing=False,
                                                 num_steps=20)
        self.generator.vae.requires_grad_(True)
        self.generator.denoiser.requires_grad_(True)
        self._rng = torch.Generator().manual_seed(seed)
        self._pending_scale: list[torch.Tensor] = []

    @property
    def in_vae_phase(self) -> bool:
        return self.global_step < self.hparams.vae_steps

    @staticmethod
    def pairs(batch) -> list[dict]:
        return [{"image": lr, "hr": hr, "prompt": p} for lr, hr, p in zip(batch["lr"], batch["hr"], batch["prompt"])]

    def vae_loss(self, hr: torch.Tensor, sample: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        vae = self.generator.vae
        post = vae.encode(hr * 2 - 1).latent_dist
        z = post.sample() if sample else post.mean
        rec = vae.decode(z).sample
        l1 = (rec - (hr * 2 - 1)).abs().mean()
        return l1 + self.hparams.kl_weight * post.kl().mean(), F.mse_loss((rec / 2 + 0.5).clamp(0, 1), hr)

    def on_train_batch_start(self, batch, batch_idx) -> None:
        if self.global_step == self.hparams.vae_steps and not self.__dict__.get("_scaled"):
            self._switch_to_unet()

    def _switch_to_unet(self) -> None:
        """Freeze the VAE and rescale its latents to unit std at the pipeline's scaling factor."""
        vae = self.generator.vae
        vae.requires_grad_(False).eval()
        ds = GlyphDataset(self.hparams.scale_batches * 32, self.hparams.size, seed=12345)
        hr = torch.stack([ds[i]["hr"] for i in range(len(ds))]).to(self.device)
        with torch.no_grad():
            std = float(vae.encode(hr * 2 - 1).latent_dist.mean.std())
        k = 1.0 / (PIPELINE_SCALING_FACTOR * std)
        rescale_latents(vae, k)
        vae.register_to_config(scaling_factor=PIPELINE_SCALING_FACTOR)
        self._scaled, self._latent_std = True, std
        self.print(f"[rewardopt] VAE frozen at step {self.global_step}; latent std {std:.4g} -> x{k:.4g}")

    def training_step(self, batch, batch_idx):
        if self.in_vae_phase:
            loss, mse = self.vae_loss(batch["hr"])
            self.log("train/vae_loss", loss, prog_bar=True)
            return loss
        loss = self.generator.denoising_loss(self.pairs(batch), generator=self._rng,
                                             cond_dropout=self.hparams.cond_dropout)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        _, mse = self.vae_loss(batch["hr"], sample=False)
        self.log("val/vae_mse", mse, prog_bar=True)
        if not self.in_vae_phase:
            rng = torch.Generator().manual_seed(1000 + batch_idx)
            self.log("val/loss", self.generator.denoising_loss(self.pairs(batch), generator=rng), prog_bar=True)

    def fit_parameters(self):
        return [{"params": list(self.generator.vae.parameters()), "lr": self.hparams.lr_vae},
                {"params": list(self.generator.denoiser.parameters()), "lr": self.hparams.lr_unet}]

    def lr_schedule(self, opt):
        total = self.trainer.max_steps if self.trainer.max_steps > 0 else 10_000
        switch = min(self.hparams.vae_steps, total)

        def phase(step: int) -> float:
            start, length = (0, switch) if step < switch else (switch, max(1, total - switch))
            s = step - start
            warm = max(1, length // 20)
            if s < warm:
                return (s + 1) / warm
            return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, (s - warm) / max(1, length - warm))))
        return {"scheduler": torch.optim.lr_scheduler.LambdaLR(opt, phase), "interval": "step"}

    def fit_report(self):
        return {**self.last_val, "latent_std": getattr(self, "_latent_std", None)}

    def save_weights(self, folder: Path) -> Path:
        if not self.__dict__.get("_scaled"):  # stopped in the VAE phase (tests): still a consistent folder
            self.generator.vae.register_to_config(scaling_factor=PIPELINE_SCALING_FACTOR)
        self.generator.save_pretrained(folder)
        return folder
