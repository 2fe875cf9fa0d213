"""Diffusion super-resolution: the ``StableDiffusionUpscalePipeline`` family (SD x4 upscaler) and the
embedded tiny glyph model.

``SuperResolutionGenerator`` is a small subclass of the image domain's ``StableDiffusionGenerator``:
the same CLIP text encoder, tokenizer, VAE, scheduler, CFG, LoRA and transition arithmetic
(``rewardopt.generators.diffusion``). What the upscaler adds, as diffusers' pipeline does it:

* the condition is a low-resolution (LR) image: mapped to [-1, 1] and noised once by the
  ``low_res_scheduler`` (a ``DDPMScheduler``) at ``noise_level``; the UNet's input is the latents
  concatenated (channels) with that noised LR image, and ``class_labels=noise_level``;
* the unconditional CFG branch shares the noised image and the noise level; only its text is empty;
* latents live at the LR resolution and the VAE decoder does the upscaling (x4 for 3-block VAEs), so
  the output size is the LR size times the VAE factor.

Raw conditions (a list): dicts ``{"image": LR (3, h, w) in [0, 1], "prompt": str, "hr": (3, H, W)
ground truth (optional), "label": int (optional), "lr_noise": (3, h, w) (optional: the noise the LR is
noised with, for exact reproduction; otherwise drawn from torch's global RNG)}``, or plain LR tensors /
PIL images (empty prompt). They are kept as ``Condition.raw`` so rewards read ``cond.raw[i]["hr"]``.

``denoising_loss`` is the model's supervised training loss on (LR, HR) pairs (``PairedDenoisingLoss``),
used by the tiny pretraining and by DRaFT's ``denoising_weight``.

It loads a ``StableDiffusionUpscalePipeline`` folder or hub id (``unet/``, ``vae/``, ``text_encoder/``,
``tokenizer/``, ``scheduler/``, ``low_res_scheduler/``, ``model_index.json``: e.g.
``stabilityai/stable-diffusion-x4-upscaler``) with each component's own ``from_pretrained``, or
``embedded:tiny-glyphs-x4`` (``recipes/super_resolution/pretrain_tiny.yaml``).
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DConditionModel

from domains.images.stable_diffusion import StableDiffusionGenerator
from rewardopt.generators.base import Condition
from rewardopt.generators.capabilities import PairedDenoisingLoss
from rewardopt.generators.diffusion import DEFAULT_LORA_TARGETS

ASSETS = Path(__file__).parent / "assets"
EMBEDDED = {"embedded:tiny-glyphs-x4": ASSETS / "tiny_glyphs_x4"}
#: the pipeline's defaults (``StableDiffusionUpscalePipeline.__call__`` / ``__init__``, diffusers 0.42)
PIPELINE_NOISE_LEVEL, PIPELINE_GUIDANCE, PIPELINE_STEPS, PIPELINE_MAX_NOISE_LEVEL = 20, 9.0, 75, 350
#: the VAE scaling factor the pipeline's constructor forces on any checkpoint (SD x4's)
PIPELINE_SCALING_FACTOR = 0.08333


def resolve_pretrained(pretrained: str) -> str:
    """``embedded:<name>`` -> the shipped folder; otherwise the image domain's rules (hub id or folder)."""
    from domains.images.stable_diffusion import resolve_pretrained as resolve_image

    return resolve_image(pretrained, EMBEDDED, "recipes/super_resolution/pretrain_tiny.yaml", "super-resolution")


def to_lr_tensor(image: Any) -> torch.Tensor:
    """A (3, h, w) float tensor in [0, 1] from a tensor or a PIL image (clear errors otherwise)."""
    if not isinstance(image, torch.Tensor):
        from PIL import Image

        if not isinstance(image, Image.Image):
            raise TypeError(f"a low-resolution image must be a (3, h, w) tensor in [0, 1] or a PIL image, "
                            f"got {type(image).__name__}")
        image = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"a low-resolution image must be (3, h, w); got shape {tuple(image.shape)}")
    if image.numel() and (float(image.min()) < -1e-3 or float(image.max()) > 1 + 1e-3):
        raise ValueError(f"low-resolution images are in [0, 1]; got values in [{float(image.min()):.3g}, "
                         f"{float(image.max()):.3g}] (images in [-1, 1]? pass (x + 1) / 2)")
    return image.float()


def as_condition_dict(item: Any) -> dict:
    """A raw condition as the dict form (dicts are kept as given, so rewards see the same object)."""
    if isinstance(item, dict):
        if "image" not in item:
            raise KeyError(f"a super-resolution condition dict needs an 'image' (the LR input); "
                           f"got keys {sorted(item)}")
        return item
    return {"image": to_lr_tensor(item), "prompt": ""}


class SuperResolutionGenerator(PairedDenoisingLoss, StableDiffusionGenerator):
    """A ``StableDiffusionUpscalePipeline``-layout super-resolution sampler (``ImageSamples`` through
    ``StableDiffusionGenerator``; ``PairedDenoisingLoss``).

    Args:
        pretrained: hub id, pipeline folder, or ``embedded:tiny-glyphs-x4``.
        noise_level: the LR image's augmentation noise level in [0, max_noise_level] (pipeline: 20).
        height, width: the HR output size, or None (then any LR size the UNet takes; the output is the
            LR size times the VAE factor). When given, LR inputs must be exactly height/f x width/f.
        max_noise_level: None: the pipeline folder's ``model_index.json`` value (SD x4: 350).
        num_steps: the pipeline's default is 75; guidance_scale 9.0; sampler "ddim" or "ddpm".
        Other arguments: ``StableDiffusionGenerator`` / ``DiffusionGenerator``.
    """

    def __init__(self, pretrained: str, noise_level: int = PIPELINE_NOISE_LEVEL, height: int | None = None,
                 width: int | None = None, sampler: str = "ddim", num_steps: int = PIPELINE_STEPS,
                 guidance_scale: float = PIPELINE_GUIDANCE, eta: float = 0.0, gradient_checkpointing: bool = True,
                 lora_rank: int | None = 8, lora_alpha: float | None = None,
                 lora_targets: list[str] = list(DEFAULT_LORA_TARGETS), full_finetune: bool = False,
                 lora_scale: float = 1.0, max_noise_level: int | None = None, revision: str | None = None,
                 _components: dict | None = None) -> None:
        comps = _components if _components is not None else self.load_components(resolve_pretrained(pretrained),
                                                                                   revision)
        if comps.get("vae") is None:
            raise ValueError("SuperResolutionGenerator needs a VAE (its decoder does the upscaling); the model at "
                             f"{pretrained!r} has no vae/")
        vae = comps["vae"]
        if getattr(vae.config, "scaling_factor", None) != PIPELINE_SCALING_FACTOR:
            import warnings

            # as StableDiffusionUpscalePipeline.__init__ does: it forces 0.08333 on any VAE it is given
            warnings.warn(f"the VAE's scaling_factor is {getattr(vae.config, 'scaling_factor', None)}; "
                          f"StableDiffusionUpscalePipeline forces {PIPELINE_SCALING_FACTOR}, and so does this "
                          "generator (fix the checkpoint's vae/config.json)", stacklevel=2)
            vae.register_to_config(scaling_factor=PIPELINE_SCALING_FACTOR)
        if comps.get("low_res_scheduler") is None:
            raise ValueError("SuperResolutionGenerator needs a low_res_scheduler (the DDPMScheduler that noises "
                             "the LR)")
        if (height is None) != (width is None):
            raise ValueError("give both height and width (the HR size) or neither")
        # 0 x 0 stands for "not fixed" through StableDiffusionGenerator.__init__ (which takes ints)
        super().__init__(pretrained, height or 0, width or 0, sampler, num_steps, guidance_scale, eta,
                         gradient_checkpointing, lora_rank, lora_alpha, lora_targets, full_finetune, lora_scale,
                         revision, _components=comps)
        self.low_res_scheduler: DDPMScheduler = comps["low_res_scheduler"]
        self.max_noise_level = int(max_noise_level if max_noise_level is not None
                                   else comps.get("max_noise_level", PIPELINE_MAX_NOISE_LEVEL))
        self.noise_level = int(noise_level)
        self._check_noise_level(self.noise_level)
        latent, image_channels = self.vae.config.latent_channels, 3
        if self.denoiser.config.in_channels != latent + image_channels:
            raise ValueError(f"the UNet takes {self.denoiser.config.in_channels} input channels; a super-resolution "
                             f"UNet takes the VAE's {latent} latent channels + {image_channels} LR image channels")
        self.register_buffer("_lr_alphas_cumprod", self.low_res_scheduler.alphas_cumprod.clone().float(),
                             persistent=False)

    unet_class = UNet2DConditionModel
    family = "super-resolution (StableDiffusionUpscalePipeline)"

    @classmethod
    def from_components(cls, unet, text_encoder, tokenizer, scheduler, vae=None, low_res_scheduler=None,
                        max_noise_level: int = PIPELINE_MAX_NOISE_LEVEL, **kwargs) -> "SuperResolutionGenerator":
        comps = {"unet": unet, "text_encoder": text_encoder, "tokenizer": tokenizer, "scheduler": scheduler,
                 "vae": vae, "low_res_scheduler": low_res_scheduler, "max_noise_level": max_noise_level}
        return cls(pretrained=kwargs.pop("pretrained", "<in-memory>"), _components=comps, **kwargs)

    @classmethod
    def load_components(cls, path: str, revision: str | None = None) -> dict:
        """The SD components, the ``low_res_scheduler`` and the pipeline's ``max_noise_level``."""
        from diffusers import StableDiffusionUpscalePipeline

        comps = super().load_components(path, revision)
        kw = {"revision": revision} if revision else {}
        try:
            comps["low_res_scheduler"] = DDPMScheduler.from_pretrained(path, subfolder="low_res_scheduler", **kw)
        except OSError as e:
            raise FileNotFoundError(f"could not load the low_res_scheduler of {path!r}: {e}") from e
        try:
            comps["max_noise_level"] = int(StableDiffusionUpscalePipeline.load_config(path, **kw)
                                           .get("max_noise_level", PIPELINE_MAX_NOISE_LEVEL))
        except (OSError, ValueError):  # no model_index.json: the pipeline's default
            comps["max_noise_level"] = PIPELINE_MAX_NOISE_LEVEL
        return comps

    def _check_noise_level(self, level: int) -> None:
        if not 0 <= level <= self.max_noise_level:
            raise ValueError(f"noise_level must be in [0, max_noise_level={self.max_noise_level}], got {level}")
        n_embeds = self.denoiser.config.num_class_embeds
        if n_embeds is not None and level >= n_embeds:
            raise ValueError(f"noise_level {level} has no class embedding (the UNet has num_class_embeds={n_embeds})")

    # ------------------------------------------------------------------ saving
    def save_pretrained(self, path: str | os.PathLike) -> None:
        """The ``StableDiffusionUpscalePipeline`` layout: the SD folders, ``low_res_scheduler/`` and
        ``model_index.json`` (with ``max_noise_level``), which ``StableDiffusionUpscalePipeline.from_pretrained``
        loads. (Its constructor resets the VAE's scaling_factor to 0.08333 when it differs: the tiny model is
        saved with that value.)"""
        import diffusers

        super().save_pretrained(path)
        path = Path(path)
        self.low_res_scheduler.save_pretrained(path / "low_res_scheduler")
        lib = lambda m: ["transformers" if type(m).__module__.startswith("transformers") else "diffusers",  # noqa: E731
                         type(m).__name__]
        index = {"_class_name": "StableDiffusionUpscalePipeline", "_diffusers_version": diffusers.__version__,
                 "max_noise_level": self.max_noise_level, "feature_extractor": [None, None],
                 "safety_checker": [None, None], "watermarker": [None, None],
                 **{k: lib(m) for k, m in (("unet", self.denoiser), ("vae", self.vae),
                                           ("text_encoder", self.text_encoder), ("tokenizer", self.tokenizer),
                                           ("scheduler", self.scheduler),
                                           ("low_res_scheduler", self.low_res_scheduler))}}
        (path / "model_index.json").write_text(json.dumps(index, indent=2))
        (path / "rewardopt.json").write_text(json.dumps({"noise_level": self.noise_level}))

    # save_lora: StableDiffusionGenerator's, diffusers' format (StableDiffusionUpscalePipeline.load_lora_weights
    # loads it: the pipeline has StableDiffusionLoraLoaderMixin and the UNet PeftAdapterMixin)

    def load_lora(self, path: str | os.PathLike) -> None:
        """Load a LoRA written by ``save_lora`` (diffusers' ``pytorch_lora_weights.safetensors``) into this
        generator's adapter, which must have the file's rank (the file carries no alpha: as diffusers loads it,
        alpha = rank). A peft-format folder (``adapter_config.json``) goes to ``DiffusionGenerator.load_lora``."""
        from diffusers import StableDiffusionUpscalePipeline
        from diffusers.utils import convert_unet_state_dict_to_peft
        from peft.utils import set_peft_model_state_dict

        path = Path(path)
        if (path / "adapter_config.json").is_file():
            return super().load_lora(path)
        state, _ = StableDiffusionUpscalePipeline.lora_state_dict(str(path))
        state = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in state.items()
                                                 if k.startswith("unet.")})
        ranks = {v.shape[0] for k, v in state.items() if "lora_A" in k}
        if self.lora_rank is None or ranks != {self.lora_rank}:
            raise ValueError(f"the LoRA at {str(path)!r} has rank {sorted(ranks)}; set generator.lora_rank to it "
                             f"(now {self.lora_rank})")
        alpha = self.lora_alpha or self.lora_rank
        if float(alpha) != float(self.lora_rank):
            raise ValueError(f"diffusers' LoRA files carry no alpha (loaded as alpha = rank = {self.lora_rank}); this "
                             f"generator has lora_alpha={alpha}")
        result = set_peft_model_state_dict(self.denoiser, state)
        if result.unexpected_keys or [k for k in result.missing_keys if "lora_" in k]:
            raise ValueError(f"the LoRA at {str(path)!r} does not fit this UNet: unexpected "
                             f"{list(result.unexpected_keys)[:3]}, missing "
                             f"{[k for k in result.missing_keys if 'lora_' in k][:3]}")

    # ------------------------------------------------------------------ geometry
    def _check_size(self) -> None:
        if self.height == 0 and self.width == 0:
            self.height = self.width = None
        if self.height is not None:
            f = self.vae_factor
            for key, v in (("height", self.height), ("width", self.width)):
                if v <= 0 or v % f:
                    raise ValueError(f"generator.{key}={v} (the HR size) is not a positive multiple of the VAE "
                                     f"factor {f}")
                self._check_lr_side(key, v // f)

    def _check_lr_side(self, key: str, v: int) -> None:
        down = 2 ** (len(self.denoiser.config.block_out_channels) - 1)
        if v <= 0 or v % down:
            raise ValueError(f"the low-resolution {key} {v} is not a positive multiple of the UNet's downsampling "
                             f"{down} (latents are at the LR size)")

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        if self.height is None:
            raise ValueError("latent_shape depends on the LR input (height/width not fixed); see lr_shape(cond)")
        f = self.vae_factor
        return (self.vae.config.latent_channels, self.height // f, self.width // f)

    def hr_size(self, lr_size: tuple[int, int]) -> tuple[int, int]:
        return (lr_size[0] * self.vae_factor, lr_size[1] * self.vae_factor)

    # ------------------------------------------------------------------ conditions
    def noise_lr(self, image: torch.Tensor, noise: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        """LR (B, 3, h, w) in [0, 1] -> in [-1, 1], noised by the low_res_scheduler at ``level`` (B,)
        (``DDPMScheduler.add_noise``: sqrt(ᾱ) x + sqrt(1 - ᾱ) ε)."""
        a = self._lr_alphas_cumprod[level.long()].to(image.dtype).view(-1, 1, 1, 1)
        return a.sqrt() * (image * 2 - 1) + (1 - a).sqrt() * noise

    def _lr_batch(self, items: list[dict], device) -> torch.Tensor:
        images = [to_lr_tensor(d["image"]) for d in items]
        sizes = {tuple(im.shape[-2:]) for im in images}
        if len(sizes) > 1:
            raise ValueError(f"the LR images of a batch must share one size; got {sorted(sizes)}")
        (h, w), = sizes
        if self.height is not None and (h * self.vae_factor, w * self.vae_factor) != (self.height, self.width):
            raise ValueError(f"LR images are {h}x{w}; this generator makes {self.height}x{self.width} with a "
                             f"VAE factor {self.vae_factor}, so it needs {self.height // self.vae_factor}x"
                             f"{self.width // self.vae_factor} LR inputs")
        self._check_lr_side("height", h)
        self._check_lr_side("width", w)
        return torch.stack(images).to(device)

    def _lr_noise(self, items: list[dict], shape, device, generator: torch.Generator | None = None) -> torch.Tensor:
        out = []
        for d in items:
            n = d.get("lr_noise")
            if n is None:
                dev = generator.device if generator is not None else "cpu"
                n = torch.randn(shape, generator=generator, device=dev)
            elif tuple(n.shape) != tuple(shape):
                raise ValueError(f"lr_noise is {tuple(n.shape)}; the LR image is {tuple(shape)}")
            out.append(n.float())
        return torch.stack(out).to(device)

    def encode_condition(self, raw: Sequence[Any]) -> Condition:
        if isinstance(raw, (str, dict)) or (isinstance(raw, torch.Tensor) and raw.ndim == 3):
            raise TypeError("encode_condition takes a list of conditions (dicts, LR tensors or PIL images), not one")
        items = [as_condition_dict(r) for r in raw]
        device = next(self.text_encoder.parameters()).device
        image = self._lr_batch(items, device)
        noise = self._lr_noise(items, image.shape[1:], device)
        level = torch.full((len(items),), self.noise_level, dtype=torch.long, device=device)
        emb = self._embed([d.get("prompt", "") for d in items])
        return Condition(items, {"encoder_hidden_states": emb, "image": self.noise_lr(image, noise, level),
                                 "noise_level": level})

    def _uncond_tensors(self, cond: Condition) -> dict[str, torch.Tensor]:
        """The empty prompt, with the same noised LR image and noise level (as the pipeline's CFG batch)."""
        text = super()._uncond_tensors(cond)
        return {**text, "image": cond.tensors["image"], "noise_level": cond.tensors["noise_level"]}

    def _denoiser_output(self, denoiser, x, t, tensors):
        return denoiser(torch.cat([x, tensors["image"].to(x.dtype)], dim=1), t,
                        encoder_hidden_states=tensors["encoder_hidden_states"], class_labels=tensors["noise_level"],
                        return_dict=False)[0]

    def init_state(self, cond: Condition, generator: torch.Generator | None = None) -> torch.Tensor:
        device = self.alphas_cumprod.device
        h, w = cond.tensors["image"].shape[-2:]
        shape = (len(cond), self.vae.config.latent_channels, h, w)
        x = torch.randn(shape, generator=generator, device=generator.device if generator else device)
        return x.to(device) * self.scheduler.init_noise_sigma

    # decode: StableDiffusionGenerator's (VAE decode of latents / scaling_factor -> (B, 3, H, W) in [0, 1])

    # ------------------------------------------------------------------ the supervised loss on pairs
    def denoising_loss(self, raw: Sequence[Any], generator: torch.Generator | None = None,
                       noise_level: int | None = None, cond_dropout: float = 0.0) -> torch.Tensor:
        """The diffusion training loss on (LR, HR) pairs: mean squared error of the UNet's output against
        the target of the scheduler's ``prediction_type`` (ε, v or x0), at a uniform random timestep, with the
        HR encoded by the (frozen) VAE and the LR noised at a random augmentation level.

        Our reading of SD x4's training (``LatentUpscaleDiffusion`` with ``ImageConcatWithNoiseAugmentation``):
        the noise level is uniform in [0, max_noise_level) per item; ``noise_level`` fixes it instead. Each
        raw item needs an ``"hr"`` (3, H, W) in [0, 1]; its ``"image"`` (the LR) is used when present, else the
        HR downsampled by ``glyphs.downsample`` (antialiased bicubic). ``cond_dropout``: probability of an empty
        prompt (CFG training). Differentiable into the trainable weights (LoRA, or the UNet); counts one NFE per
        item (``nfe_grad`` with autograd on). ``generator`` draws every random number (timesteps, noises, levels)."""
        from domains.super_resolution.glyphs import downsample

        items = [as_condition_dict(r) if not (isinstance(r, dict) and "image" not in r) else r for r in raw]
        if not items:
            raise ValueError("denoising_loss needs at least one (LR, HR) pair")
        missing = [i for i, d in enumerate(items) if not isinstance(d, dict) or d.get("hr") is None]
        if missing:
            raise KeyError(f"denoising_loss needs paired data: items {missing[:5]} have no 'hr' (the ground truth)")
        device = next(self.text_encoder.parameters()).device
        hr = torch.stack([to_lr_tensor(d["hr"]) for d in items]).to(device)
        f = self.vae_factor
        if any("image" not in d for d in items):
            lr_all = downsample(hr, f)
            for j, d in enumerate(items):
                if "image" not in d:
                    items[j] = {**d, "image": lr_all[j]}
        lr = self._lr_batch(items, device)
        if tuple(hr.shape[-2:]) != self.hr_size(tuple(lr.shape[-2:])):
            raise ValueError(f"HR images are {tuple(hr.shape[-2:])}; their LR inputs {tuple(lr.shape[-2:])} x the VAE "
                             f"factor {f} give {self.hr_size(tuple(lr.shape[-2:]))}")
        b = len(items)
        gdev = generator.device if generator is not None else "cpu"
        draw = lambda shape: torch.randn(shape, generator=generator, device=gdev).to(device)  # noqa: E731
        with torch.no_grad():
            x0 = self.vae.encode(hr * 2 - 1).latent_dist
            x0 = (x0.mean + x0.std * draw(x0.mean.shape)) * self.vae.config.scaling_factor
            emb = self._embed([d.get("prompt", "") for d in items])
            if cond_dropout > 0:
                drop = torch.rand(b, generator=generator, device=gdev).to(device) < cond_dropout
                emb = torch.where(drop.view(-1, 1, 1), self._embed([""]).expand_as(emb), emb)
        if noise_level is None:
            level = torch.randint(0, self.max_noise_level, (b,), generator=generator, device=gdev).to(device)
        else:
            self._check_noise_level(int(noise_level))
            level = torch.full((b,), int(noise_level), dtype=torch.long, device=device)
        image = self.noise_lr(lr, draw(lr.shape), level)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (b,), generator=generator,
                          device=gdev).to(device)
        noise = draw(x0.shape)
        a = self.alphas_cumprod[t].view(-1, 1, 1, 1).to(x0.dtype)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        self.counter.nfe += b
        if torch.is_grad_enabled():
            self.counter.nfe_grad += b
        pred = self._call_denoiser(xt, t, {"encoder_hidden_states": emb, "image": image, "noise_level": level})
        kind = self.scheduler.config.prediction_type
        target = {"epsilon": noise, "sample": x0, "v_prediction": a.sqrt() * noise - (1 - a).sqrt() * x0}.get(kind)
        if target is None:
            raise ValueError(f"unsupported prediction_type {kind!r}; use epsilon, v_prediction or sample")
        return F.mse_loss(pred.float(), target.float())


def glyph_conditions(dataset, indices: Sequence[int], seed: int | None = None) -> list[dict]:
    """Raw conditions (``SRCondition`` dicts) of ``dataset`` items (``GlyphDataset``): LR image, prompt, HR,
    label, index, a short ``name``, and (given a ``seed``) a fixed ``lr_noise`` per item, drawn from (seed,
    index) so a condition is the same every time."""
    from domains.super_resolution.data import SRCondition

    out = []
    for i in indices:
        item = dataset[i]
        d = SRCondition(image=item["lr"], prompt=item["prompt"], hr=item["hr"], label=int(item["label"]),
                        index=int(i), name=f"glyph {int(i)} ({item['prompt']})")
        if seed is not None:
            d["lr_noise"] = torch.randn(item["lr"].shape, generator=torch.Generator().manual_seed(
                random.Random(seed * 1_000_003 + int(i)).getrandbits(62)))
        out.append(d)
    return out
