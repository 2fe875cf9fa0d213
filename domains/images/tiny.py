"""The embedded tiny text-to-image model: configs, tokenizer and its pretraining job.

The model is a pixel-space (no VAE) 24x24 ``UNet2DConditionModel`` conditioned on a 2-layer CLIP
text encoder with a word-level tokenizer over the shapes vocabulary. ``TinyTextToImagePretraining``
trains it with the standard ε-prediction loss on ``ShapesDataset``; ``recipes/images/pretrain_tiny.yaml``
runs it and writes the folder shipped at ``domains/images/assets/tiny_shapes``.
"""

from __future__ import annotations

import random
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast

from domains.images.shapes import COLOURS, COUNTS, SHAPES, ShapesDataset
from domains.images.stable_diffusion import StableDiffusionGenerator
from rewardopt.fitting import NetworkFit

SPECIALS = ["<|pad|>", "<|unk|>", "<|startoftext|>", "<|endoftext|>"]
MAX_TOKENS = 8


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer for the shapes vocabulary, saved and loaded like any HF tokenizer."""
    return word_level_tokenizer(list(COUNTS) + list(COLOURS) + [w for s in SHAPES for w in (s, s + "s")], MAX_TOKENS)


def word_level_tokenizer(words: list[str], max_tokens: int) -> PreTrainedTokenizerFast:
    """A CLIP-style (start/end tokens, padded) word-level tokenizer over ``words``."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel

    vocab = {tok: i for i, tok in enumerate(SPECIALS + words)}
    tk = Tokenizer(WordLevel(vocab, unk_token="<|unk|>"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>",
        special_tokens=[("<|startoftext|>", vocab["<|startoftext|>"]), ("<|endoftext|>", vocab["<|endoftext|>"])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<|pad|>", unk_token="<|unk|>", bos_token="<|startoftext|>",
        eos_token="<|endoftext|>", model_max_length=max_tokens,
    )


def tiny_unet(size: int = 24, in_channels: int = 3, cross_attention_dim: int = 32,
              channels: tuple[int, ...] = (16, 32, 64), plain_levels: int = 1) -> UNet2DConditionModel:
    """A small UNet2DConditionModel; the first ``plain_levels`` resolutions have no attention (self-attention at
    the high resolutions is what costs most on a CPU), the others cross-attend to the condition."""
    n = len(channels)
    if not 1 <= plain_levels < n:
        raise ValueError(f"plain_levels={plain_levels}: between 1 and {n - 1} of the {n} levels go without attention")
    return UNet2DConditionModel(
        sample_size=size, in_channels=in_channels, out_channels=in_channels, layers_per_block=1,
        block_out_channels=channels,
        down_block_types=("DownBlock2D",) * plain_levels + ("CrossAttnDownBlock2D",) * (n - plain_levels),
        up_block_types=("CrossAttnUpBlock2D",) * (n - plain_levels) + ("UpBlock2D",) * plain_levels,
        cross_attention_dim=cross_attention_dim, attention_head_dim=8, norm_num_groups=8,
    )


def tiny_text_encoder(vocab_size: int, hidden: int = 32, max_tokens: int = MAX_TOKENS) -> CLIPTextModel:
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=max_tokens, pad_token_id=0, bos_token_id=2,
        eos_token_id=3, projection_dim=hidden,
    ))


def tiny_scheduler(prediction_type: str = "epsilon", beta_schedule: str = "scaled_linear") -> DDIMScheduler:
    """SD's schedule by default (scaled-linear betas, no alpha-to-one) so recipes transfer to real
    checkpoints; ``beta_schedule="squaredcos_cap_v2"`` is the cosine schedule. ``prediction_type``:
    "epsilon", "v_prediction" or "sample" (x0)."""
    return DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                         beta_schedule=beta_schedule, clip_sample=False, set_alpha_to_one=False,
                         steps_offset=1, prediction_type=prediction_type)


def build_tiny_generator(seed: int = 0, size: int = 24, channels: tuple[int, ...] = (16, 32, 64),
                         prediction_type: str = "epsilon", beta_schedule: str = "scaled_linear",
                         **kwargs) -> StableDiffusionGenerator:
    """A freshly initialised tiny generator (random weights, seeded)."""
    torch.manual_seed(seed)
    tok = build_tokenizer()
    kwargs.setdefault("height", size)
    kwargs.setdefault("width", size)
    return StableDiffusionGenerator.from_components(
        tiny_unet(size, channels=channels), tiny_text_encoder(len(tok)), tok,
        tiny_scheduler(prediction_type, beta_schedule), **kwargs
    )


def build_tiny_flow_generator(seed: int = 0, size: int = 24, channels: tuple[int, ...] = (16, 32, 64),
                              shift: float = 1.0, **kwargs):
    """A freshly initialised tiny rectified-flow generator: the tiny UNet and text encoder over a
    ``FlowMatchEulerDiscreteScheduler`` with ``shift`` (random weights, seeded)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from domains.images.stable_diffusion import FlowUNetGenerator

    torch.manual_seed(seed)
    tok = build_tokenizer()
    kwargs.setdefault("height", size)
    kwargs.setdefault("width", size)
    return FlowUNetGenerator.from_components(tiny_unet(size, channels=channels), tiny_text_encoder(len(tok)), tok,
                                             FlowMatchEulerDiscreteScheduler(shift=shift), **kwargs)


class ShapesDataModule(L.LightningDataModule):
    """Procedural (image, prompt, labels) batches for pretraining and the classifier.

    ``backgrounds``: "fixed" (the dark background: the diffusion model's data) or "varied" (random
    backgrounds that never match the shapes' colour: the reward classifier's data, so the reward reads
    the shapes; validation uses the same mode); ``empty_fraction`` of varied items show no shapes.
    """

    def __init__(self, batch_size: int = 64, length: int = 100_000, size: int = 24, seed: int = 0,
                 num_workers: int = 0, backgrounds: str = "fixed", empty_fraction: float = 0.0):
        super().__init__()
        self.batch_size, self.length, self.size = batch_size, length, size
        self.seed, self.num_workers, self.backgrounds = seed, num_workers, backgrounds
        self.empty_fraction = empty_fraction

    def train_dataloader(self):
        ds = ShapesDataset(self.length, self.size, self.seed, backgrounds=self.backgrounds,
                           empty_fraction=self.empty_fraction)
        return torch.utils.data.DataLoader(ds, batch_size=self.batch_size, shuffle=True, num_workers=self.num_workers,
                                           generator=torch.Generator().manual_seed(self.seed))

    def val_dataloader(self):
        ds = ShapesDataset(512, self.size, self.seed + 1, backgrounds=self.backgrounds,
                           empty_fraction=self.empty_fraction)
        return torch.utils.data.DataLoader(ds, batch_size=self.batch_size, num_workers=self.num_workers)


class TinyTextToImagePretraining(NetworkFit):
    """Pretrains the tiny text-to-image model (UNet + text encoder) with the diffusion MSE loss on
    the target its scheduler predicts (ε, v or x0).

    Args:
        output_dir: where the diffusers-layout folder and ``generator_fit.json`` (the last held-out
            loss) are written at the end of training (default: the trainer's log folder).
        size: image size; channels: UNet block widths.
        lr: peak AdamW learning rate of a one-cycle schedule; cond_dropout: probability of an empty
            prompt (enables CFG).
        prediction_type, beta_schedule: the scheduler's (``tiny_scheduler``); saved with the model.
        ema_decay: keep an exponential moving average of the weights with this decay and export it
            (None: export the trained weights).
    """

    fit_name = "generator"

    def __init__(self, output_dir: str | None = None, size: int = 24, channels: list[int] = [16, 32, 64],
                 lr: float = 1e-3, cond_dropout: float = 0.1, seed: int = 0, prediction_type: str = "epsilon",
                 beta_schedule: str = "scaled_linear", ema_decay: float | None = None):
        super().__init__(lr, weight_decay=0.0, output_dir=output_dir)
        self.save_hyperparameters()
        self.generator = self.build_generator(seed, size, tuple(channels), prediction_type, beta_schedule)
        self.generator.denoiser.requires_grad_(True)
        self.generator.text_encoder.requires_grad_(True)
        self.train_sched = DDPMScheduler.from_config(self.generator.scheduler.config)
        self._rng = random.Random(seed)
        self.ema: torch.optim.swa_utils.AveragedModel | None = None
        if ema_decay is not None:
            self.ema = torch.optim.swa_utils.AveragedModel(
                self._networks(), multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(ema_decay))

    def build_generator(self, seed: int, size: int, channels: tuple[int, ...], prediction_type: str,
                        beta_schedule: str):
        """The freshly initialised generator to pretrain (override point for other tiny families)."""
        return build_tiny_generator(seed, size, channels, prediction_type, beta_schedule, lora_rank=None,
                                    gradient_checkpointing=False)

    def states(self, batch) -> torch.Tensor:
        """Clean states x_0 of a batch (override point: the data's key and the generator's encoder)."""
        return self.generator.encode_images(batch["image"])

    def _networks(self) -> torch.nn.ModuleList:
        return torch.nn.ModuleList([self.generator.denoiser, self.generator.text_encoder])

    def _target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        kind = self.generator.scheduler.config.prediction_type
        if kind == "epsilon":
            return noise
        if kind == "sample":
            return x0
        if kind == "v_prediction":
            a = self.generator.alphas_cumprod[t].view(-1, *[1] * (x0.ndim - 1)).to(x0.dtype)
            return a.sqrt() * noise - (1 - a).sqrt() * x0
        raise ValueError(f"unknown prediction_type {kind!r}; use epsilon, v_prediction or sample")

    def prompt_embeddings(self, batch) -> torch.Tensor:
        """The text encoder's states of the batch's prompts, each replaced by "" with probability ``cond_dropout``."""
        g = self.generator
        prompts = [("" if self._rng.random() < self.hparams.cond_dropout else p) for p in batch["prompt"]]
        ids = g.tokenizer(prompts, padding="max_length", max_length=g.tokenizer.model_max_length,
                          truncation=True, return_tensors="pt").input_ids.to(self.device)
        return g.text_encoder(ids)[0]

    def _loss(self, batch) -> torch.Tensor:
        g = self.generator
        x0 = self.states(batch)
        emb = self.prompt_embeddings(batch)
        noise = torch.randn_like(x0)
        t = torch.randint(0, self.train_sched.config.num_train_timesteps, (x0.shape[0],), device=self.device)
        xt = g.add_noise(x0, t.view(-1, *[1] * (x0.ndim - 1)), noise)
        pred = g.denoiser(xt, t, encoder_hidden_states=emb, return_dict=False)[0]
        return F.mse_loss(pred, self._target(x0, noise, t))

    def training_step(self, batch, batch_idx):
        loss = self._loss(batch)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self.ema is not None:
            self.ema.update_parameters(self._networks())

    def use_ema(self) -> None:
        """Copy the averaged weights into the generator (no-op without ``ema_decay``)."""
        if self.ema is not None:
            for p, q in zip(self._networks().parameters(), self.ema.module.parameters()):
                p.data.copy_(q.data)

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self._loss(batch), prog_bar=True)

    def fit_parameters(self):
        return [p for p in self.generator.parameters() if p.requires_grad]

    def lr_schedule(self, opt):
        steps = self.trainer.max_steps if self.trainer.max_steps > 0 else 10_000
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=self.lr, total_steps=steps, pct_start=0.05)
        return {"scheduler": sched, "interval": "step"}

    def save_weights(self, folder: Path) -> Path:
        self.use_ema()
        self.generator.save_pretrained(folder)
        return folder


class ShapeClassifierTraining(NetworkFit):
    """Trains ``ShapeClassifier`` (the differentiable reward model) on procedural shapes.

    Light Gaussian pixel noise is added so the classifier is not thrown by the small artefacts of
    generated images. Items with no shapes (``batch["empty"]``, from ``empty_fraction``) are labelled
    with the "none" class of every head, which needs ``none_class=True`` (an image without shapes then
    has p(blue) near 0, so erasing non-blue shapes does not win log p(blue)); accuracies are over the
    items with shapes. Exports to ``output_dir`` (config.json + model.safetensors, and
    ``classifier_fit.json`` with the last held-out loss and accuracies; default: the trainer's log
    folder) at the end.
    """

    fit_name = "classifier"

    def __init__(self, output_dir: str | None = None, width: int = 32, size: int = 24, lr: float = 2e-3,
                 weight_decay: float = 0.01, noise_std: float = 0.05, none_class: bool = False):
        super().__init__(lr, weight_decay, output_dir=output_dir)
        from domains.images.rewards import ShapeClassifier

        self.save_hyperparameters()
        self.classifier = ShapeClassifier(width, size, none_class=none_class)

    def _step(self, batch, stage: str):
        x = batch["image"]
        if stage == "train":
            noise = self.hparams.noise_std * torch.rand(x.shape[0], 1, 1, 1, device=x.device) * torch.randn_like(x)
            x = (x + noise).clamp(0, 1)
        logits = self.classifier(x)
        empty = batch.get("empty", torch.zeros(x.shape[0], dtype=torch.bool, device=x.device))
        if empty.any() and not self.classifier.none_class:
            raise ValueError("the data has shape-free images (empty_fraction > 0): set none_class: true")
        loss = 0.0
        for k, z in logits.items():
            target = torch.where(empty, z.shape[-1] - 1, batch[k])  # "none" is the last class
            loss = loss + F.cross_entropy(z, target)
        full = ~empty
        n_full = int(full.sum())
        self.log(f"{stage}/loss", loss, prog_bar=True, batch_size=x.shape[0])
        if n_full:
            for k in logits:
                acc = (logits[k][full].argmax(-1) == batch[k][full]).float().mean()
                self.log(f"{stage}/acc_{k}", acc, batch_size=n_full)
        return loss

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def fit_parameters(self):
        return self.classifier.parameters()

    def save_weights(self, folder: Path) -> Path:
        self.classifier.save_pretrained(folder)
        return folder


class TinyFlowPretraining(TinyTextToImagePretraining):
    """Pretrains ``embedded:tiny-shapes-flow``: the same UNet and text encoder as the tiny diffusion model, trained
    with the rectified-flow objective of SD3 (Esser et al. 2024): x_σ = (1 − σ) x0 + σ ε, the network at timestep
    t = 1000·σ regresses the velocity ε − x0 (MSE), σ drawn from the logit-normal density (``logit_mean``,
    ``logit_std``; SD3: 0, 1). The same architecture and data as ``embedded:tiny-shapes``, so a flow-vs-diffusion
    comparison changes only the objective and the sampler.

    Args: ``TinyTextToImagePretraining``'s (``prediction_type`` / ``beta_schedule`` do not apply) and ``shift``
        (the sampling schedule's shift, saved with the scheduler; 1 at 24 px: SD3's 3.0 is for 1024² images).
    """

    def __init__(self, output_dir: str | None = None, size: int = 24, channels: list[int] = [16, 32, 64],
                 lr: float = 1e-3, cond_dropout: float = 0.1, seed: int = 0, shift: float = 1.0,
                 logit_mean: float = 0.0, logit_std: float = 1.0, ema_decay: float | None = None):
        self._shift = float(shift)
        super().__init__(output_dir, size, channels, lr, cond_dropout, seed, ema_decay=ema_decay)
        self._noise_rng = torch.Generator().manual_seed(seed + 1)

    def build_generator(self, seed: int, size: int, channels: tuple[int, ...], prediction_type: str,
                        beta_schedule: str):
        return build_tiny_flow_generator(seed, size, channels, self._shift, lora_rank=None,
                                         gradient_checkpointing=False)

    def _loss(self, batch) -> torch.Tensor:
        g = self.generator
        x0 = self.states(batch)
        emb = self.prompt_embeddings(batch)
        noise = torch.randn_like(x0)
        u = self.hparams.logit_mean + self.hparams.logit_std * torch.randn(x0.shape[0], generator=self._noise_rng)
        sigma = torch.sigmoid(u).to(self.device)
        t = sigma * g.num_train_timesteps
        xt = g.add_noise(x0, t, noise)
        pred = g.denoiser(xt, t, encoder_hidden_states=emb, return_dict=False)[0]
        return F.mse_loss(pred, noise - x0)
