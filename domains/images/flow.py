"""Text-to-image rectified flows: Stable Diffusion 3 / 3.5 (``StableDiffusion3Generator``) and FLUX.1
(``FluxGenerator``), sampled by ``rewardopt.generators.flow.FlowMatchingGenerator`` (Euler ODE steps, CFG, Flow-GRPO's
SDE, LoRA on the transformer).

Each loads its family's diffusers folder (a hub id or a local folder: ``transformer/``, ``text_encoder*/``,
``tokenizer*/``, ``vae/``, ``scheduler/``) with each component's own ``from_pretrained``, and reproduces what the
family's diffusers pipeline (``StableDiffusion3Pipeline``, ``FluxPipeline``) computes: the prompt embeddings, the σ
schedule (``sigmas`` and ``mu``), the transformer call and the VAE's shift and scaling factors. With
``sde_noise_level=0`` our sampler gives the pipeline's ``output_type="latent"`` output for the same initial latents
(``tests/images/test_flow_pipelines.py`` checks it to 1e-5).

States. SD3: VAE latents (B, C, h, w) (the pipeline's). FLUX: the *packed* latents (B, (h/2)(w/2), 4C) — the
transformer's image tokens, what ``FluxPipeline`` takes as ``latents=`` and returns with ``output_type="latent"``;
``decode`` unpacks them, ``encode_images`` packs. ``init_state`` draws the noise as the pipelines do (the same
``torch.Generator`` gives the same x_T: FLUX draws (B, C, h, w) and packs it) in float32; with ``dtype`` bfloat16 /
float16 the pipelines draw in the prompt embeddings' dtype and step in it, so there the two agree only to that
precision, and our states stay float32.

Guidance. SD3: classifier-free guidance with the empty prompt as negative (``guidance_scale``, the pipeline's).
FLUX.1-dev is guidance-distilled: ``guidance_scale`` is the transformer's guidance *embedding* (the pipeline's
``guidance_scale``; ignored by models without ``guidance_embeds``, FLUX.1-schnell) and costs no extra pass;
``true_cfg_scale`` > 1 adds true CFG against ``negative_prompt`` (the pipeline's ``true_cfg_scale``), and is what the
generator's ``guidance_scale`` *attribute* holds (the CFG weight every method reads, e.g. SDS).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel, SD3Transformer2DModel
from einops import rearrange
from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection, T5EncoderModel

from domains.images.stable_diffusion import load_scheduler
from rewardopt.generators.base import Condition
from rewardopt.generators.capabilities import EncodesImages, ImageSamples, SavesPretrained
from rewardopt.generators.diffusion import DEFAULT_LORA_TARGETS
from rewardopt.generators.flow import FlowMatchingGenerator

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def calculate_shift(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096, base_shift: float = 0.5,
                    max_shift: float = 1.15) -> float:
    """The resolution-dependent shift μ of SD3 / FLUX: linear in the image's token count, ``base_shift`` at
    ``base_seq_len`` tokens and ``max_shift`` at ``max_seq_len`` (diffusers' ``calculate_shift``, same arithmetic)."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * slope + (base_shift - slope * base_seq_len)


def shift_from_config(config, image_seq_len: int, default_max_shift: float) -> float:
    """μ from a scheduler config's ``base_image_seq_len``, ``max_image_seq_len``, ``base_shift``, ``max_shift``, with
    the pipeline's defaults where a key is absent (``max_shift``: SD3's pipeline 1.16, FLUX's 1.15)."""
    get = config.get if hasattr(config, "get") else lambda k, d: getattr(config, k, d)
    return calculate_shift(image_seq_len, get("base_image_seq_len", 256), get("max_image_seq_len", 4096),
                           get("base_shift", 0.5), get("max_shift", default_max_shift))


def resolve_folder(pretrained: str, family: str, layout: str, example: str) -> str:
    """A local-looking ``pretrained`` must be a folder with ``transformer/``; anything else is passed on as a hub id."""
    looks_local = pretrained.startswith((".", "/", "~")) or pretrained.count("/") > 1 or Path(pretrained).exists()
    if not looks_local:
        return pretrained
    path = Path(pretrained).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"generator.pretrained: no {family} model folder at {pretrained!r}. Pass a local "
                                f"folder with the diffusers layout ({layout}) or a hub id such as {example!r}.")
    if not (path / "transformer").is_dir():
        raise FileNotFoundError(f"generator.pretrained: {pretrained!r} has no transformer/ subfolder; a {family} "
                                f"folder has the diffusers layout ({layout})")
    return str(path)


def check_dtype(dtype: str | None) -> torch.dtype | None:
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"generator.dtype must be one of {sorted(DTYPES)} or null, got {dtype!r}")
    return None if dtype is None else DTYPES[dtype]


def _load(cls, path: str, subfolder: str, family: str, **kw):
    try:
        return cls.from_pretrained(path, subfolder=subfolder, **kw)
    except OSError as e:
        raise FileNotFoundError(f"could not load {subfolder}/ of a {family} model from {path!r}: {e}. Offline "
                                "machines need a local folder (or a filled HF cache with HF_HUB_OFFLINE=1).") from e


class FlowTransformerGenerator(ImageSamples, EncodesImages, SavesPretrained, FlowMatchingGenerator):
    """What SD3 and FLUX share: a transformer over VAE latents, the σ schedule set at construction, the VAE's shift
    and scaling factors, saving through the family's pipeline class (so diffusers loads the folder), LoRA in
    diffusers' format. Subclasses set the components, the prompt encoding and the transformer call."""

    family = ""
    #: the diffusers pipeline whose folder layout and LoRA format this generator uses (imported when needed)
    pipeline_name = ""
    layout = ""
    example = ""
    #: (component name, class, required) in the pipeline's order
    components: tuple = ()

    def _build(self, comps: dict, height: int, width: int, dtype: str | None, in_memory: bool, **base) -> None:
        """Check the size, set the schedule, hold the components. ``dtype`` (already applied by ``from_pretrained``
        when loaded) casts in-memory components (``from_components``)."""
        check_dtype(dtype)
        if dtype is not None and in_memory:
            comps = {k: v.to(DTYPES[dtype]) if isinstance(v, torch.nn.Module) else v for k, v in comps.items()}
        self.height, self.width = int(height), int(width)
        self._check_size(comps)
        schedule = self.schedule_for(comps, int(base["num_steps"]))
        super().__init__(comps["scheduler"], **base, **schedule)
        self.denoiser = comps["transformer"]
        self.vae: AutoencoderKL = comps["vae"]
        for name, _, _ in self.components:
            if name not in ("transformer", "vae", "scheduler"):
                setattr(self, name, comps.get(name))
        self.setup_trainable()
        for name, _, _ in self.components:
            if isinstance(getattr(self, name, None), torch.nn.Module) and name != "transformer":
                getattr(self, name).eval()

    def setup_trainable(self) -> None:
        """``DiffusionGenerator``'s, with LoRA weights kept in float32 when the transformer is loaded in bfloat16 /
        float16 (``dtype``): peft casts the layer's input to the adapter's dtype and the sum back. Full fine-tuning
        trains the weights in the dtype they were loaded in."""
        super().setup_trainable()
        if self.lora_rank is not None:
            for p in self.denoiser.parameters():
                if p.requires_grad and p.dtype != torch.float32:
                    p.data = p.data.float()

    # ------------------------------------------------------------------ loading and saving
    @classmethod
    def load_components(cls, pretrained: str, revision: str | None = None, dtype: str | None = None,
                        skip: Sequence[str] = ()) -> dict:
        """Each component with its own ``from_pretrained``; optional ones (SD3's T5) are None when the local folder
        lacks them or they are in ``skip``."""
        path = resolve_folder(pretrained, cls.family, cls.layout, cls.example)
        kw = {"revision": revision} if revision else {}
        kw_model = kw if check_dtype(dtype) is None else {**kw, "torch_dtype": DTYPES[dtype]}
        comps = {}
        for name, klass, required in cls.components:
            if name in skip or (not required and Path(path).is_dir() and not (Path(path) / name).is_dir()):
                comps[name] = None
            elif name == "scheduler":
                comps[name] = load_scheduler(path, **kw)
            elif name.startswith("tokenizer"):
                comps[name] = _load(AutoTokenizer, path, name, cls.family, **kw)
            else:
                comps[name] = _load(klass, path, name, cls.family, **kw_model)
        return comps

    @classmethod
    def from_components(cls, **kwargs):
        """Build from in-memory components named as the pipeline names them (``transformer``, ``vae``,
        ``text_encoder``, ..., ``scheduler``); the other keyword arguments are the constructor's."""
        names = {n for n, _, _ in cls.components}
        comps = {k: kwargs.pop(k) for k in list(kwargs) if k in names}
        missing = [n for n, _, req in cls.components if req and comps.get(n) is None]
        if missing:
            raise ValueError(f"{cls.__name__}.from_components needs {missing}")
        return cls(pretrained=kwargs.pop("pretrained", "<in-memory>"), _components=comps, **kwargs)

    @classmethod
    def pipeline_class(cls) -> type:
        import diffusers

        return getattr(diffusers, cls.pipeline_name)

    def pipeline_components(self) -> dict:
        return {name: getattr(self, "denoiser" if name == "transformer" else name, None)
                for name, _, _ in self.components}

    def to_pipeline(self):
        """The family's diffusers pipeline over this generator's modules (shared, not copied)."""
        return self.pipeline_class()(**self.pipeline_components())

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """The diffusers folder of the base model (``model_index.json`` and one subfolder per component), written by
        the family's pipeline so that both ``<Pipeline>.from_pretrained`` and this class load it."""
        if self.lora_rank is not None:
            raise ValueError("save_pretrained writes base weights only; this generator has LoRA adapters — use "
                             "save_lora")
        path = Path(path)
        self.to_pipeline().save_pretrained(path)
        (path / "rewardopt.json").write_text(json.dumps({"height": self.height, "width": self.width}))

    def save_lora(self, path: str | os.PathLike) -> Path:
        """LoRA weights as ``pytorch_lora_weights.safetensors``, which the family pipeline's ``load_lora_weights``
        loads."""
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        if self.lora_rank is None:
            raise ValueError("this generator has no LoRA adapter (lora_rank is None)")
        state = convert_state_dict_to_diffusers(get_peft_model_state_dict(self.denoiser))
        self.pipeline_class().save_lora_weights(str(path), transformer_lora_layers=state, safe_serialization=True)
        return Path(path) / "pytorch_lora_weights.safetensors"

    # ------------------------------------------------------------------ geometry
    @staticmethod
    def vae_factor_of(vae: AutoencoderKL) -> int:
        return 2 ** (len(vae.config.block_out_channels) - 1)

    @property
    def vae_factor(self) -> int:
        return self.vae_factor_of(self.vae)

    def _patch(self, comps: dict) -> int:
        raise NotImplementedError

    def _check_size(self, comps: dict) -> None:
        f, p = self.vae_factor_of(comps["vae"]), self._patch(comps)
        need = f * p
        for key, v in (("height", self.height), ("width", self.width)):
            if v <= 0 or v % need:
                raise ValueError(f"generator.{key}={v} is not a positive multiple of {need} (VAE factor {f} x "
                                 f"{self.family} patch {p}); try {max(need, round(v / need) * need)}")

    def image_seq_len(self, comps: dict) -> int:
        """The transformer's image token count at this size."""
        n = self.vae_factor_of(comps["vae"]) * self._patch(comps)
        return (self.height // n) * (self.width // n)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, h, w) of the VAE latents."""
        f = self.vae_factor
        return (self.vae.config.latent_channels, self.height // f, self.width // f)

    # ------------------------------------------------------------------ the VAE
    @property
    def _shift(self) -> float:
        return float(getattr(self.vae.config, "shift_factor", None) or 0.0)

    def _decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) latents -> (B, 3, H, W) in [0, 1], as the pipelines decode: z / scaling + shift."""
        self.counter.count_decodes(z.shape[0])
        dtype = self.vae.dtype
        z = z / self.vae.config.scaling_factor + self._shift
        x = self.vae.decode(z.to(dtype), return_dict=False)[0].float()
        return (x / 2 + 0.5).clamp(0, 1)

    def _encode_latents(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-2:] != (self.height, self.width):
            raise ValueError(f"images are {tuple(images.shape[-2:])}, generator expects {(self.height, self.width)}")
        x = (images * 2 - 1).to(self.vae.dtype)
        z = self.vae.encode(x).latent_dist.sample().float()
        return (z - self._shift) * self.vae.config.scaling_factor

    def _noise(self, shape: tuple, generator: torch.Generator | None) -> torch.Tensor:
        device = self._timesteps.device
        x = torch.randn(shape, generator=generator, device=generator.device if generator is not None else device)
        return x.to(device)  # σ = 1: pure noise

    # ------------------------------------------------------------------ conditions
    def _uncond_raw(self) -> str:
        return ""

    def _uncond_tensors(self, cond: Condition) -> dict[str, torch.Tensor]:
        key = next(iter(cond.tensors))
        device = cond.tensors[key].device
        cache = self.__dict__.get("_uncond_cache")
        if cache is None or cache[key].device != device:
            cache = self._embed([self._uncond_raw()])
            self._uncond_cache = cache
        return {k: v.expand(len(cond), *v.shape[1:]) for k, v in cache.items()}

    def encode_condition(self, raw: Sequence[str]) -> Condition:
        if isinstance(raw, str):
            raise TypeError("encode_condition takes a list of prompts, not one string")
        return Condition(list(raw), self._embed(list(raw)))

    def _embed(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    @staticmethod
    def _tokens(tokenizer, prompts: list[str], max_length: int, device) -> torch.Tensor:
        return tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                         return_tensors="pt").input_ids.to(device)


class StableDiffusion3Generator(FlowTransformerGenerator):
    """Stable Diffusion 3 / 3.5 (``SD3Transformer2DModel``) over its VAE's latents, sampled as
    ``StableDiffusion3Pipeline`` samples (``sde_noise_level=0``).

    Prompt embeddings as the pipeline computes them (no clip skip): each CLIP's penultimate hidden states (CLIP-L,
    CLIP-G: ``CLIPTextModelWithProjection``) concatenated along features, zero-padded to T5's width and followed by
    T5's ``max_sequence_length`` token states (zeros of that shape without T5); the pooled projection is both CLIPs'
    projected pooled outputs side by side. CFG against the empty prompt. The schedule is the scheduler's own
    (``shift``); with ``use_dynamic_shifting`` in its config, μ = ``calculate_shift`` of the image token count.

    Args:
        pretrained: hub id (e.g. stabilityai/stable-diffusion-3.5-medium) or a local diffusers folder.
        height, width: pixels; multiples of VAE factor x patch size (8 x 2 = 16 for SD3).
        use_t5: load T5 (``text_encoder_3``); False (or a folder without it) runs without it, as the pipeline
            does with ``text_encoder_3=None``.
        max_sequence_length: T5 tokens (the pipeline's default 256).
        dtype: load the weights in "bfloat16" / "float16" / "float32" (None: float32, from_pretrained's default);
            states and steps stay float32.
        Other arguments: ``FlowMatchingGenerator`` / ``DiffusionGenerator``'s.
    """

    family = "Stable Diffusion 3"
    pipeline_name = "StableDiffusion3Pipeline"
    layout = ("transformer/, text_encoder/, text_encoder_2/, optional text_encoder_3/, tokenizer/, tokenizer_2/, "
              "tokenizer_3/, vae/, scheduler/")
    example = "stabilityai/stable-diffusion-3.5-medium"
    components = (
        ("transformer", SD3Transformer2DModel, True), ("scheduler", None, True), ("vae", AutoencoderKL, True),
        ("text_encoder", CLIPTextModelWithProjection, True), ("tokenizer", None, True),
        ("text_encoder_2", CLIPTextModelWithProjection, True), ("tokenizer_2", None, True),
        ("text_encoder_3", T5EncoderModel, False), ("tokenizer_3", None, False),
    )

    def __init__(
        self,
        pretrained: str,
        height: int = 1024,
        width: int = 1024,
        num_steps: int = 28,
        guidance_scale: float = 7.0,
        sde_noise_level: float = 0.0,
        sde_window: list[int] | None = None,
        use_t5: bool = True,
        max_sequence_length: int = 256,
        gradient_checkpointing: bool = True,
        lora_rank: int | None = 8,
        lora_alpha: float | None = None,
        lora_targets: list[str] = list(DEFAULT_LORA_TARGETS),
        full_finetune: bool = False,
        lora_scale: float = 1.0,
        dtype: str | None = None,
        revision: str | None = None,
        _components: dict | None = None,
    ) -> None:
        if not 1 <= max_sequence_length <= 512:
            raise ValueError(f"max_sequence_length must be in [1, 512] (the pipelines' limit), got "
                             f"{max_sequence_length}")
        comps = (dict(_components) if _components is not None
                 else self.load_components(pretrained, revision, dtype, skip=() if use_t5 else ("text_encoder_3",)))
        if not use_t5:
            comps["text_encoder_3"] = comps["tokenizer_3"] = None
        if (comps.get("text_encoder_3") is None) != (comps.get("tokenizer_3") is None):
            raise ValueError("text_encoder_3 (T5) and tokenizer_3 go together: pass both or neither")
        self.max_sequence_length = int(max_sequence_length)
        self.pretrained = pretrained
        self._build(comps, height, width, dtype, _components is not None, num_steps=num_steps,
                    guidance_scale=guidance_scale, gradient_checkpointing=gradient_checkpointing, lora_rank=lora_rank,
                    lora_alpha=lora_alpha, lora_targets=lora_targets, full_finetune=full_finetune,
                    lora_scale=lora_scale, sde_noise_level=sde_noise_level, sde_window=sde_window)

    def _patch(self, comps: dict) -> int:
        return int(comps["transformer"].config.patch_size)

    def _check_size(self, comps: dict) -> None:
        super()._check_size(comps)
        cfg = comps["transformer"].config
        n = self.vae_factor_of(comps["vae"]) * cfg.patch_size
        if cfg.pos_embed_max_size is not None and max(self.height, self.width) // n > cfg.pos_embed_max_size:
            top = cfg.pos_embed_max_size * n
            raise ValueError(f"generator.height/width {self.height}x{self.width} exceed the transformer's position "
                             f"embedding (pos_embed_max_size={cfg.pos_embed_max_size} patches: at most {top} pixels)")

    def schedule_for(self, comps: dict, num_steps: int) -> dict:
        """μ only when the scheduler shifts dynamically (as ``StableDiffusion3Pipeline``); no custom sigmas."""
        cfg = comps["scheduler"].config
        if not cfg.get("use_dynamic_shifting", False):
            return {}
        return {"mu": shift_from_config(cfg, self.image_seq_len(comps), default_max_shift=1.16)}

    @torch.no_grad()
    def _clip(self, index: int, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        tokenizer = (self.tokenizer, self.tokenizer_2)[index]
        encoder = (self.text_encoder, self.text_encoder_2)[index]
        ids = self._tokens(tokenizer, prompts, self.tokenizer.model_max_length, encoder.device)
        out = encoder(ids, output_hidden_states=True)
        return out.hidden_states[-2].to(self.text_encoder.dtype), out[0]

    @torch.no_grad()
    def _embed(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        (h1, p1), (h2, p2) = self._clip(0, prompts), self._clip(1, prompts)
        width = self.denoiser.config.joint_attention_dim
        if self.text_encoder_3 is None:
            t5 = torch.zeros(len(prompts), self.max_sequence_length, width, device=h1.device, dtype=h1.dtype)
        else:
            ids = self._tokens(self.tokenizer_3, prompts, self.max_sequence_length, self.text_encoder_3.device)
            t5 = self.text_encoder_3(ids)[0].to(device=h1.device)
        clip = torch.cat([h1, h2], dim=-1)
        if clip.shape[-1] > t5.shape[-1]:
            raise ValueError(f"the CLIP embeddings ({clip.shape[-1]} wide) do not fit T5's width {t5.shape[-1]}")
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return {"encoder_hidden_states": torch.cat([clip, t5.to(clip.dtype)], dim=-2),
                "pooled_projections": torch.cat([p1, p2], dim=-1)}

    def _denoiser_output(self, denoiser, x, t, tensors):
        dtype = denoiser.dtype
        out = denoiser(hidden_states=x.to(dtype), timestep=t, encoder_hidden_states=tensors["encoder_hidden_states"]
                       .to(dtype), pooled_projections=tensors["pooled_projections"].to(dtype), return_dict=False)[0]
        return out.to(x.dtype)

    def init_state(self, cond: Condition, generator: torch.Generator | None = None) -> torch.Tensor:
        return self._noise((len(cond), *self.latent_shape), generator)

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) latents -> (B, 3, H, W) images in [0, 1]."""
        return self._decode_latents(x0)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> latents (z − shift) · scaling."""
        return self._encode_latents(images)


class FluxGenerator(FlowTransformerGenerator):
    """FLUX.1 (``FluxTransformer2DModel``) over packed VAE latents, sampled as ``FluxPipeline`` samples
    (``sde_noise_level=0``).

    Prompt: CLIP's pooled output (``CLIPTextModel``) as ``pooled_projections``, T5's ``max_sequence_length`` token
    states as ``encoder_hidden_states``; text ids are zeros, image ids each token's (0, row, column). Schedule: the
    pipeline's linear σ grid ``linspace(1, 1/T, T)`` (none when the scheduler config has ``use_flow_sigmas``),
    shifted with μ = ``calculate_shift`` of the image token count.

    Args:
        pretrained: hub id (e.g. black-forest-labs/FLUX.1-dev) or a local diffusers folder.
        height, width: pixels; multiples of VAE factor x 2 (the 2x2 packing): 16 for FLUX.
        guidance_scale: the distilled guidance fed to the transformer's guidance embedding (FLUX.1-dev: 3.5); no
            effect without ``guidance_embeds``.
        true_cfg_scale: true classifier-free guidance against ``negative_prompt`` (1: none, the pipeline's default;
            > 1 doubles the transformer rows per step).
        max_sequence_length: T5 tokens (the pipeline's default 512).
        Other arguments: ``StableDiffusion3Generator``'s.
    """

    family = "FLUX"
    pipeline_name = "FluxPipeline"
    layout = "transformer/, text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/, vae/, scheduler/"
    example = "black-forest-labs/FLUX.1-dev"
    components = (
        ("scheduler", None, True), ("vae", AutoencoderKL, True), ("text_encoder", CLIPTextModel, True),
        ("tokenizer", None, True), ("text_encoder_2", T5EncoderModel, True), ("tokenizer_2", None, True),
        ("transformer", FluxTransformer2DModel, True),
    )

    def __init__(
        self,
        pretrained: str,
        height: int = 1024,
        width: int = 1024,
        num_steps: int = 28,
        guidance_scale: float = 3.5,
        true_cfg_scale: float = 1.0,
        negative_prompt: str = "",
        sde_noise_level: float = 0.0,
        sde_window: list[int] | None = None,
        max_sequence_length: int = 512,
        gradient_checkpointing: bool = True,
        lora_rank: int | None = 8,
        lora_alpha: float | None = None,
        lora_targets: list[str] = list(DEFAULT_LORA_TARGETS),
        full_finetune: bool = False,
        lora_scale: float = 1.0,
        dtype: str | None = None,
        revision: str | None = None,
        _components: dict | None = None,
    ) -> None:
        if not 1 <= max_sequence_length <= 512:
            raise ValueError(f"max_sequence_length must be in [1, 512] (the pipelines' limit), got "
                             f"{max_sequence_length}")
        comps = dict(_components) if _components is not None else self.load_components(pretrained, revision, dtype)
        self.max_sequence_length = int(max_sequence_length)
        self.embedded_guidance_scale = float(guidance_scale)
        self.negative_prompt = str(negative_prompt)
        self.pretrained = pretrained
        self._build(comps, height, width, dtype, _components is not None, num_steps=num_steps,
                    guidance_scale=true_cfg_scale, gradient_checkpointing=gradient_checkpointing, lora_rank=lora_rank,
                    lora_alpha=lora_alpha, lora_targets=lora_targets, full_finetune=full_finetune,
                    lora_scale=lora_scale, sde_noise_level=sde_noise_level, sde_window=sde_window)
        if self.denoiser.config.in_channels != 4 * self.vae.config.latent_channels:
            raise ValueError(f"the transformer takes {self.denoiser.config.in_channels} channels per token; the VAE's "
                             f"{self.vae.config.latent_channels} latent channels pack (2x2) to "
                             f"{4 * self.vae.config.latent_channels}")

    @property
    def true_cfg_scale(self) -> float:
        return self.guidance_scale

    def _patch(self, comps: dict) -> int:
        return 2  # the 2x2 packing (the transformer's own patch_size is 1)

    def schedule_for(self, comps: dict, T: int) -> dict:
        """The pipeline's linear σ grid and μ from the image token count (FluxPipeline's defaults)."""
        cfg = comps["scheduler"].config
        sigmas = None if cfg.get("use_flow_sigmas", False) else np.linspace(1.0, 1 / T, T).tolist()
        return {"sigmas": sigmas, "mu": shift_from_config(cfg, self.image_seq_len(comps), default_max_shift=1.15)}

    def _uncond_raw(self) -> str:
        return self.negative_prompt

    @torch.no_grad()
    def _embed(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        ids = self._tokens(self.tokenizer, prompts, self.tokenizer.model_max_length, self.text_encoder.device)
        pooled = self.text_encoder(ids, output_hidden_states=False).pooler_output.to(self.text_encoder.dtype)
        ids = self._tokens(self.tokenizer_2, prompts, self.max_sequence_length, self.text_encoder_2.device)
        states = self.text_encoder_2(ids, output_hidden_states=False)[0]
        return {"encoder_hidden_states": states.to(pooled.device), "pooled_projections": pooled}

    @property
    def packed_hw(self) -> tuple[int, int]:
        """(rows, columns) of image tokens: the latent size halved by the 2x2 packing."""
        _, h, w = self.latent_shape
        return h // 2, w // 2

    def image_ids(self, device, dtype) -> torch.Tensor:
        """(rows·columns, 3) position ids (0, row, column) of the packed image tokens, row-major."""
        h, w = self.packed_hw
        rows = torch.arange(h, dtype=dtype).reshape(h, 1).expand(h, w)
        cols = torch.arange(w, dtype=dtype).reshape(1, w).expand(h, w)
        ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1)
        return rearrange(ids, "h w c -> (h w) c").to(device)

    def pack(self, z: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) latents -> (B, (h/2)(w/2), 4C) tokens: each 2x2 patch's channels (c, row, column)."""
        return rearrange(z, "b c (h p) (w q) -> b (h w) (c p q)", p=2, q=2)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """``pack``'s inverse: (B, (h/2)(w/2), 4C) -> (B, C, h, w)."""
        return rearrange(x, "b (h w) (c p q) -> b c (h p) (w q)", h=self.packed_hw[0], p=2, q=2)

    def _denoiser_output(self, denoiser, x, t, tensors):
        dtype = denoiser.dtype
        states = tensors["encoder_hidden_states"].to(dtype)
        guidance = None
        if denoiser.config.guidance_embeds:
            guidance = torch.full((x.shape[0],), self.embedded_guidance_scale, device=x.device, dtype=torch.float32)
        text_ids = torch.zeros(states.shape[1], 3, device=x.device, dtype=self.text_encoder.dtype)
        out = denoiser(hidden_states=x.to(dtype), timestep=t.to(x.dtype) / 1000, guidance=guidance,
                       pooled_projections=tensors["pooled_projections"].to(dtype), encoder_hidden_states=states,
                       txt_ids=text_ids, img_ids=self.image_ids(x.device, x.dtype), return_dict=False)[0]
        return out.to(x.dtype)

    def init_state(self, cond: Condition, generator: torch.Generator | None = None) -> torch.Tensor:
        """Packed noise: (B, C, h, w) drawn as the pipeline draws it, then packed."""
        return self.pack(self._noise((len(cond), *self.latent_shape), generator))

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """Packed latents (B, N, 4C) -> (B, 3, H, W) images in [0, 1]."""
        return self._decode_latents(self.unpack(x0))

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> packed latents ((z − shift) · scaling, then ``pack``)."""
        return self.pack(self._encode_latents(images))
