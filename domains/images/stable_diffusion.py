"""Text-to-image generators: Stable Diffusion 1.x/2.x and the embedded tiny shapes model.

``StableDiffusionGenerator`` holds a ``UNet2DConditionModel``, a CLIP text encoder, a tokenizer,
an optional VAE (latent space; without one the UNet works on pixels) and a scheduler. It loads the
model family's own folders with ``from_pretrained`` — a hub id, a local folder with the diffusers
layout (``unet/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``, optional ``vae/``), or
``embedded:tiny-shapes`` for the tiny model shipped with rewardopt.

To add a new text-to-image family, subclass and override ``load_components`` (what to load),
``encode_condition`` (text -> tensors) and ``_denoiser_output`` (how the denoiser is called).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import AutoTokenizer, CLIPTextModel

from rewardopt.generators.base import Condition
from rewardopt.generators.capabilities import EncodesImages, ImageSamples, SavesPretrained
from rewardopt.generators.diffusion import DEFAULT_LORA_TARGETS, DiffusionGenerator, make_scheduler
from rewardopt.generators.flow import FlowMatchingGenerator

ASSETS = Path(__file__).parent / "assets"
EMBEDDED = {"embedded:tiny-shapes": ASSETS / "tiny_shapes", "embedded:tiny-shapes-flow": ASSETS / "tiny_shapes_flow"}
#: the recipe that regenerates an embedded model, where it is not ``recipe``'s default
EMBEDDED_RECIPES = {"embedded:tiny-shapes-flow": "recipes/images/pretrain_tiny_flow.yaml"}


def resolve_pretrained(pretrained: str, embedded: dict[str, Path] | None = None,
                       recipe: str = "recipes/images/pretrain_tiny.yaml", family: str = "") -> str:
    """Map ``embedded:<name>`` to the shipped folder (of ``embedded``, default this domain's; a missing one names
    the ``recipe`` that regenerates it); check that local-looking paths exist. Other diffusers families (video,
    super-resolution) pass their own ``embedded``, ``recipe`` and ``family``."""
    embedded = EMBEDDED if embedded is None else embedded
    if pretrained in embedded:
        path = embedded[pretrained]
        if not (path / "unet").is_dir():
            raise FileNotFoundError(
                f"the embedded model {pretrained!r} is missing at {path}; regenerate it with "
                f"`rewardopt fit --config {EMBEDDED_RECIPES.get(pretrained, recipe)}`"
            )
        return str(path)
    if pretrained.startswith("embedded:"):
        raise ValueError(f"unknown embedded {family + ' ' if family else ''}model {pretrained!r}; known: "
                         f"{sorted(embedded)}")
    # hub ids look like "org/name"; anything else (./x, /x, ~/x, a/b/c) must be an existing folder
    looks_local = pretrained.startswith((".", "/", "~")) or pretrained.count("/") > 1 or Path(pretrained).exists()
    if looks_local and not Path(pretrained).expanduser().is_dir():
        raise FileNotFoundError(
            f"generator.pretrained: no model folder at {pretrained!r}. Pass a local folder with the "
            "diffusers layout (unet/, text_encoder/, tokenizer/, scheduler/), a hub id such as "
            "'stable-diffusion-v1-5/stable-diffusion-v1-5', or 'embedded:tiny-shapes'."
        )
    return str(Path(pretrained).expanduser()) if looks_local else pretrained


def load_scheduler(path: str, **kwargs):
    """The scheduler saved in ``path``/scheduler as its own class when rewardopt samples with it (DDIM, DDPM, or a
    flow model's FlowMatchEulerDiscreteScheduler), else read as DDIM (``make_scheduler`` converts it either way)."""
    from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler

    config = DDIMScheduler.load_config(path, subfolder="scheduler", **kwargs)  # ConfigMixin: any class's json
    known = {c.__name__: c for c in (DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler)}
    return known.get(config.get("_class_name"), DDIMScheduler).from_config(config)


class StableDiffusionGenerator(ImageSamples, EncodesImages, SavesPretrained, DiffusionGenerator):
    """A UNet2DConditionModel text-to-image sampler (SD 1.x/2.x layout).

    Args:
        pretrained: hub id, local folder, or ``embedded:tiny-shapes``.
        height, width: image size in pixels; must be divisible by the VAE factor times the UNet's
            total downsampling.
        sampler: "ddim" or "ddpm" (a diffusers scheduler built from the checkpoint's scheduler config).
        Other arguments: see ``DiffusionGenerator``.
    """

    def __init__(
        self,
        pretrained: str,
        height: int = 512,
        width: int = 512,
        sampler: str = "ddim",
        num_steps: int = 50,
        guidance_scale: float = 7.5,
        eta: float = 0.0,
        gradient_checkpointing: bool = True,
        lora_rank: int | None = 8,
        lora_alpha: float | None = None,
        lora_targets: list[str] = list(DEFAULT_LORA_TARGETS),
        full_finetune: bool = False,
        lora_scale: float = 1.0,
        revision: str | None = None,
        _components: dict | None = None,
        **schedule_options,
    ) -> None:
        comps = (_components if _components is not None
                 else self.load_components(resolve_pretrained(pretrained), revision))
        super().__init__(
            make_scheduler(sampler, comps["scheduler"].config),
            num_steps=num_steps,
            guidance_scale=guidance_scale,
            eta=eta,
            gradient_checkpointing=gradient_checkpointing,
            lora_rank=lora_rank,
            lora_alpha=lora_alpha,
            lora_targets=lora_targets,
            full_finetune=full_finetune,
            lora_scale=lora_scale,
            **schedule_options,
        )
        self.pretrained = pretrained
        self.denoiser: UNet2DConditionModel = comps["unet"]
        self.text_encoder = comps["text_encoder"]
        self.tokenizer = comps["tokenizer"]
        self.vae: AutoencoderKL | None = comps.get("vae")
        self.height, self.width = int(height), int(width)
        self._check_size()
        self.setup_trainable()
        self.text_encoder.eval()
        if self.vae is not None:
            self.vae.eval()

    @classmethod
    def from_components(cls, unet, text_encoder, tokenizer, scheduler, vae=None,
                        **kwargs) -> "StableDiffusionGenerator":
        """Build from in-memory components (tests, custom models)."""
        comps = {"unet": unet, "text_encoder": text_encoder, "tokenizer": tokenizer, "scheduler": scheduler, "vae": vae}
        return cls(pretrained=kwargs.pop("pretrained", "<in-memory>"), _components=comps, **kwargs)

    #: the denoiser class ``load_components`` loads (subclasses of other families set theirs) and its family's name
    unet_class = UNet2DConditionModel
    family = "Stable Diffusion"

    @classmethod
    def load_components(cls, path: str, revision: str | None = None) -> dict:
        """Load each component with its family's own ``from_pretrained`` (the VAE when the folder has one)."""
        kw = {"revision": revision} if revision else {}
        try:
            comps = {
                "unet": cls.unet_class.from_pretrained(path, subfolder="unet", **kw),
                "text_encoder": CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **kw),
                "tokenizer": AutoTokenizer.from_pretrained(path, subfolder="tokenizer", **kw),
                "scheduler": load_scheduler(path, **kw),
            }
        except OSError as e:
            raise FileNotFoundError(
                f"could not load a {cls.family} model from {path!r}: {e}. Offline machines need a "
                "local folder (or a filled HF cache with HF_HUB_OFFLINE=1)."
            ) from e
        local_vae = Path(path) / "vae"
        if local_vae.is_dir() or not Path(path).exists():
            try:
                comps["vae"] = AutoencoderKL.from_pretrained(path, subfolder="vae", **kw)
            except OSError:
                if local_vae.is_dir():
                    raise
        return comps

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write the diffusers folder layout of the base model (LoRA adapters: see ``save_lora``)."""
        if self.lora_rank is not None:
            raise ValueError("save_pretrained writes base weights only; this generator has LoRA adapters "
                             "— use save_lora")
        path = Path(path)
        self.denoiser.save_pretrained(path / "unet")
        self.text_encoder.save_pretrained(path / "text_encoder")
        self.tokenizer.save_pretrained(path / "tokenizer")
        self.scheduler.save_pretrained(path / "scheduler")
        if self.vae is not None:
            self.vae.save_pretrained(path / "vae")
        (path / "rewardopt.json").write_text(json.dumps({"height": self.height, "width": self.width}))

    # ------------------------------------------------------------------ LoRA in diffusers' format
    def save_lora(self, path: str | os.PathLike) -> Path:
        """Save LoRA weights as ``pytorch_lora_weights.safetensors`` that
        ``StableDiffusionPipeline.load_lora_weights(path)`` loads."""
        from diffusers import StableDiffusionPipeline
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        if self.lora_rank is None:
            raise ValueError("this generator has no LoRA adapter (lora_rank is None)")
        state = convert_state_dict_to_diffusers(get_peft_model_state_dict(self.denoiser))
        StableDiffusionPipeline.save_lora_weights(str(path), unet_lora_layers=state, safe_serialization=True)
        return Path(path) / "pytorch_lora_weights.safetensors"

    # ------------------------------------------------------------------ geometry
    @property
    def vae_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae is not None else 1

    def _check_size(self) -> None:
        down = 2 ** (len(self.denoiser.config.block_out_channels) - 1)
        need = self.vae_factor * down
        for key, v in (("height", self.height), ("width", self.width)):
            if v <= 0 or v % need:
                raise ValueError(
                    f"generator.{key}={v} is not a positive multiple of {need} (VAE factor {self.vae_factor} x "
                    f"UNet downsampling {down}); try {max(need, round(v / need) * need)}"
                )

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        f = self.vae_factor
        return (self.denoiser.config.in_channels, self.height // f, self.width // f)

    # ------------------------------------------------------------------ contract
    @torch.no_grad()
    def _embed(self, prompts: Sequence[str]) -> torch.Tensor:
        tok = self.tokenizer(
            list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length,
            truncation=True, return_tensors="pt",
        )
        device = next(self.text_encoder.parameters()).device
        return self.text_encoder(tok.input_ids.to(device))[0]

    def encode_condition(self, raw: Sequence[str]) -> Condition:
        if isinstance(raw, str):
            raise TypeError("encode_condition takes a list of prompts, not one string")
        cond = Condition(list(raw), {"encoder_hidden_states": self._embed(raw)})
        return cond

    def _uncond_tensors(self, cond: Condition) -> dict[str, torch.Tensor]:
        device = cond.tensors["encoder_hidden_states"].device
        if getattr(self, "_uncond_cache", None) is None or self._uncond_cache.device != device:
            self._uncond_cache = self._embed([""])
        return {"encoder_hidden_states": self._uncond_cache.expand(len(cond), -1, -1)}

    def _denoiser_output(self, denoiser, x, t, tensors):
        # lora_scale is applied around this call by DiffusionGenerator (as cross_attention_kwargs' scale would)
        return denoiser(x, t, encoder_hidden_states=tensors["encoder_hidden_states"], return_dict=False)[0]

    def init_state(self, cond: Condition, generator: torch.Generator | None = None) -> torch.Tensor:
        device = self.alphas_cumprod.device
        shape = (len(cond), *self.latent_shape)
        x = torch.randn(shape, generator=generator, device=generator.device if generator else device)
        return x.to(device) * self.scheduler.init_noise_sigma

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) latents or pixels in [-1, 1] -> (B, 3, H, W) images in [0, 1]."""
        self.counter.count_decodes(x0.shape[0])
        if self.vae is not None:
            x0 = self.vae.decode(x0 / self.vae.config.scaling_factor, return_dict=False)[0]
        return (x0 / 2 + 0.5).clamp(0, 1)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> states x_0 (latents, or pixels in [-1, 1]); for pretraining."""
        if images.shape[-2:] != (self.height, self.width):
            raise ValueError(f"images are {tuple(images.shape[-2:])}, generator expects {(self.height, self.width)}")
        x = images * 2 - 1
        if self.vae is not None:
            x = self.vae.encode(x).latent_dist.sample() * self.vae.config.scaling_factor
        return x


class FlowUNetGenerator(FlowMatchingGenerator, StableDiffusionGenerator):
    """``StableDiffusionGenerator``'s UNet, text encoder and VAE sampled as a rectified flow: the UNet predicts the
    velocity v = ε − x0 at timestep σ·1000, Euler ODE steps over ``FlowMatchEulerDiscreteScheduler``'s σ schedule
    (its ``shift``), Flow-GRPO's SDE where ``sde_noise_level`` > 0. ``embedded:tiny-shapes-flow`` is the tiny
    shapes UNet pretrained with the flow-matching objective (``recipes/images/pretrain_tiny_flow.yaml``).

    Args: ``StableDiffusionGenerator``'s (``sampler`` is "flow") and ``FlowMatchingGenerator``'s schedule options.
    """

    def __init__(
        self,
        pretrained: str,
        height: int = 512,
        width: int = 512,
        num_steps: int = 28,
        guidance_scale: float = 7.0,
        sde_noise_level: float = 0.0,
        sde_window: list[int] | None = None,
        sigmas: list[float] | None = None,
        mu: float | None = None,
        gradient_checkpointing: bool = True,
        lora_rank: int | None = 8,
        lora_alpha: float | None = None,
        lora_targets: list[str] = list(DEFAULT_LORA_TARGETS),
        full_finetune: bool = False,
        lora_scale: float = 1.0,
        revision: str | None = None,
        _components: dict | None = None,
    ) -> None:
        super().__init__(pretrained, height, width, "flow", num_steps, guidance_scale, 0.0, gradient_checkpointing,
                         lora_rank, lora_alpha, lora_targets, full_finetune, lora_scale, revision, _components,
                         sde_noise_level=sde_noise_level, sde_window=sde_window, sigmas=sigmas, mu=mu)

    def init_state(self, cond: Condition, generator: torch.Generator | None = None) -> torch.Tensor:
        device = self._timesteps.device
        x = torch.randn((len(cond), *self.latent_shape), generator=generator,
                        device=generator.device if generator else device)
        return x.to(device)  # σ = 1: pure noise, no init_noise_sigma
