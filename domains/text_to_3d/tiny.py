"""The embedded tiny multi-view prior: its tokenizer, configs, data and pretraining job.

The prior (``domains.text_to_3d.prior.MultiViewPrior``) is a pixel-space (no VAE) 32x32 ``UNet2DConditionModel`` on a
2-layer CLIP text encoder with a word-level tokenizer over the tiny 3D world's words, plus a tiny
``CLIPVisionModelWithProjection`` and diffusers' IP-Adapter layers for the visual prompt.
``TinyMultiViewPriorPretraining`` trains all of it on multi-view renders of jittered objects (``objects.render_bank``):
the denoising target is a view of an instance under its view-suffixed prompt ("a red cone on a blue cube, back view"),
the visual prompt the front view of the same instance. The image is dropped (zero embeddings) half of the time so one
prior serves text-only SDS and VP-SDS, the text a tenth of the time for classifier-free guidance.
``recipes/text_to_3d/pretrain_prior_tiny.yaml`` runs it and writes the folder shipped at
``domains/text_to_3d/assets/tiny_multiview_prior``.
"""

from __future__ import annotations

import time

import lightning as L
import torch
import torch.nn.functional as F
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection, PreTrainedTokenizerFast

from domains.images.tiny import (
    TinyTextToImagePretraining,
    tiny_scheduler,
    tiny_text_encoder,
    tiny_unet,
    word_level_tokenizer,
)
from domains.text_to_3d.objects import COLOURS, PROMPTS, SHAPES, MultiViewDataset, render_bank
from domains.text_to_3d.prior import MultiViewPrior, init_ip_adapter

#: every word of the tiny world's view-suffixed prompts ("a blue cone on a red cube, front view")
WORDS = ["a", *COLOURS, *SHAPES, "on", "and", "front", "side", "back", "overhead", "view", ","]
#: the longest prompt, "a blue cone on a red cube, overhead view", is 10 words; + start / end
MAX_TOKENS = 12


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A CLIP-style word-level tokenizer over ``WORDS``, saved and loaded like any HF tokenizer."""
    return word_level_tokenizer(WORDS, MAX_TOKENS)


def tiny_image_encoder(image_size: int = 32, patch_size: int = 4, hidden: int = 32, layers: int = 2,
                       projection_dim: int = 32) -> CLIPVisionModelWithProjection:
    """A tiny CLIP vision tower with a projection (the IP-Adapter's image encoder)."""
    return CLIPVisionModelWithProjection(CLIPVisionConfig(
        image_size=image_size, patch_size=patch_size, hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=4, projection_dim=projection_dim,
    ))


def build_tiny_prior(seed: int = 0, size: int = 32, channels: tuple[int, ...] = (16, 32, 64),
                     prediction_type: str = "sample", beta_schedule: str = "scaled_linear", plain_levels: int = 2,
                     patch_size: int = 4, image_hidden: int = 32, image_embed_dim: int = 32,
                     **kwargs) -> MultiViewPrior:
    """A freshly initialised tiny prior (random weights, seeded): UNet + text encoder + vision tower + IP-Adapter
    layers, all from configs. ``plain_levels``: UNet levels without attention (2 of 3: attention, and the
    IP-Adapter's cross-attention, at 8x8 and in the middle block)."""
    torch.manual_seed(seed)
    tok = build_tokenizer()
    unet = tiny_unet(size, channels=tuple(channels), plain_levels=plain_levels)
    text_encoder = tiny_text_encoder(len(tok), max_tokens=MAX_TOKENS)
    image_encoder = tiny_image_encoder(size, patch_size, image_hidden, projection_dim=image_embed_dim)
    init_ip_adapter(unet, image_embed_dim)
    kwargs.setdefault("height", size)
    kwargs.setdefault("width", size)
    return MultiViewPrior.from_components(unet, text_encoder, tok, tiny_scheduler(prediction_type, beta_schedule),
                                          image_encoder=image_encoder, **kwargs)


class MultiViewDataModule(L.LightningDataModule):
    """Multi-view renders of jittered instances (``objects.render_bank``) as ``MultiViewDataset`` batches.

    The training bank (``instances`` per prompt x ``views`` random views each) and a held-out bank of other instances
    and cameras (``val_seed``, default ``seed + 1``) are rendered once, in ``setup`` (a few minutes on a CPU core for
    the full sizes). ``prompts``: default the world's 36.
    """

    def __init__(self, batch_size: int = 64, instances: int = 16, views: int = 16, val_instances: int = 2,
                 val_views: int = 8, size: int = 32, seed: int = 0, val_seed: int | None = None,
                 num_samples: int = 64, resolution: int = 48, prompts: list[str] | None = None,
                 num_workers: int = 0) -> None:
        super().__init__()
        self.batch_size, self.instances, self.views = batch_size, instances, views
        self.val_instances, self.val_views, self.size = val_instances, val_views, size
        self.seed, self.val_seed = seed, seed + 1 if val_seed is None else val_seed
        self.num_samples, self.resolution, self.num_workers = num_samples, resolution, num_workers
        self.prompts = list(PROMPTS if prompts is None else prompts)
        self.train_set: MultiViewDataset | None = None
        self.val_set: MultiViewDataset | None = None

    def _bank(self, instances: int, views: int, seed: int) -> MultiViewDataset:
        t0 = time.perf_counter()
        bank = render_bank(self.prompts, instances, views, self.size, seed, num_samples=self.num_samples,
                           resolution=self.resolution)
        print(f"[rewardopt] rendered {len(bank['label'])} views ({len(self.prompts)} prompts x {instances} instances "
              f"x {views}) in {time.perf_counter() - t0:.0f} s")
        return MultiViewDataset(bank)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None and stage in (None, "fit"):
            self.train_set = self._bank(self.instances, self.views, self.seed)
        if self.val_set is None and stage in (None, "fit", "validate"):
            self.val_set = self._bank(self.val_instances, self.val_views, self.val_seed)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True,
                                           num_workers=self.num_workers,
                                           generator=torch.Generator().manual_seed(self.seed))

    def val_dataloader(self):
        return torch.utils.data.DataLoader(self.val_set, batch_size=self.batch_size, num_workers=self.num_workers)


class TinyMultiViewPriorPretraining(TinyTextToImagePretraining):
    """Pretrains the tiny multi-view prior — UNet, text encoder, vision tower and IP-Adapter projection and layers —
    with the diffusion MSE on the target its scheduler predicts (ε, v or x0), on ``MultiViewDataModule`` batches.

    Each item is denoised under its view-suffixed prompt with the front view of the same instance as the visual
    prompt; the visual prompt is dropped (zero ``image_embeds``, the prior's "no image") with ``image_dropout``, the
    prompt (empty text) with ``cond_dropout``, independently — so both together (the CFG branch) come
    ``cond_dropout * image_dropout`` of the time.

    Held-out metrics (same noise and timesteps for every variant): ``val/loss`` (text + image),
    ``val/loss_text_only`` (text, zero image: text-only SDS's prior), ``val/loss_image_only`` (empty text + image)
    and ``val/loss_uncond``; the report adds ``image_prompt_gain`` = text-only minus text + image.

    Args:
        image_dropout: probability of a zero image embedding. plain_levels: UNet levels without attention.
            patch_size, image_hidden, image_embed_dim: the vision tower's. Other arguments: see
            ``TinyTextToImagePretraining``.
    """

    def __init__(self, output_dir: str | None = None, size: int = 32, channels: list[int] = [16, 32, 64],
                 lr: float = 1e-3, cond_dropout: float = 0.1, image_dropout: float = 0.5, seed: int = 0,
                 prediction_type: str = "sample", beta_schedule: str = "scaled_linear",
                 ema_decay: float | None = None, plain_levels: int = 2, patch_size: int = 4, image_hidden: int = 32,
                 image_embed_dim: int = 32):
        if not 0.0 <= image_dropout <= 1.0 or not 0.0 <= cond_dropout <= 1.0:
            raise ValueError(f"image_dropout ({image_dropout}) and cond_dropout ({cond_dropout}) are probabilities")
        super().__init__(output_dir, size, channels, lr, cond_dropout, seed, prediction_type, beta_schedule,
                         ema_decay)

    def build_generator(self, seed: int, size: int, channels: tuple[int, ...], prediction_type: str,
                        beta_schedule: str) -> MultiViewPrior:
        h = self.hparams  # saved with this class's arguments before the parent builds the generator
        g = build_tiny_prior(seed, size, channels, prediction_type, beta_schedule, h.plain_levels, h.patch_size,
                             h.image_hidden, h.image_embed_dim, lora_rank=None,
                             gradient_checkpointing=False)
        g.image_encoder.requires_grad_(True).train()
        return g

    def _networks(self) -> torch.nn.ModuleList:
        g = self.generator
        return torch.nn.ModuleList([g.denoiser, g.text_encoder, g.image_encoder])

    def _conditioning(self, batch, text: torch.Tensor, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """Condition tensors with the prompt where ``text`` (B,) and the visual prompt where ``image`` (B,) is True."""
        g = self.generator
        prompts = [p if keep else "" for p, keep in zip(batch["prompt"], text.tolist())]
        ids = g.tokenizer(prompts, padding="max_length", max_length=g.tokenizer.model_max_length,
                          truncation=True, return_tensors="pt").input_ids.to(self.device)
        image_embeds = g.embed_images(batch["front"]) * image.to(self.device, torch.float32).view(-1, 1, 1)
        return {"encoder_hidden_states": g.text_encoder(ids)[0], "image_embeds": image_embeds}

    def _denoising_mse(self, x0, tensors, noise, t) -> torch.Tensor:
        g = self.generator
        xt = g.add_noise(x0, t, noise)
        return F.mse_loss(g._denoiser_output(g.denoiser, xt, t, tensors), self._target(x0, noise, t))

    def _loss(self, batch) -> torch.Tensor:
        x0 = self.states(batch)
        b = x0.shape[0]
        text = torch.tensor([self._rng.random() >= self.hparams.cond_dropout for _ in range(b)])
        image = torch.tensor([self._rng.random() >= self.hparams.image_dropout for _ in range(b)])
        noise = torch.randn_like(x0)
        t = torch.randint(0, self.train_sched.config.num_train_timesteps, (b,), device=self.device)
        return self._denoising_mse(x0, self._conditioning(batch, text, image), noise, t)

    VARIANTS = {"loss": (True, True), "loss_text_only": (True, False), "loss_image_only": (False, True),
                "loss_uncond": (False, False)}

    def validation_step(self, batch, batch_idx):
        x0 = self.states(batch)
        b = x0.shape[0]
        rng = torch.Generator().manual_seed(10_000 + batch_idx)  # the same draws at every validation
        noise = torch.randn(x0.shape, generator=rng).to(x0)
        t = torch.randint(0, self.train_sched.config.num_train_timesteps, (b,), generator=rng).to(self.device)
        for name, (text, image) in self.VARIANTS.items():
            tensors = self._conditioning(batch, torch.full((b,), text), torch.full((b,), image))
            self.log(f"val/{name}", self._denoising_mse(x0, tensors, noise, t), prog_bar=name == "loss",
                     batch_size=b)

    def fit_report(self) -> dict:
        report = dict(self.last_val)
        if "val/loss" in report and "val/loss_text_only" in report:
            report["image_prompt_gain"] = report["val/loss_text_only"] - report["val/loss"]
        return report


__all__ = ["WORDS", "MAX_TOKENS", "build_tokenizer", "tiny_image_encoder", "build_tiny_prior", "MultiViewDataModule",
           "TinyMultiViewPriorPretraining"]
