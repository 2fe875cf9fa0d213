"""The frozen 2D prior of text-to-3D: a text-to-image UNet that also takes a reference image (IP-Adapter).

``MultiViewPrior`` is a ``StableDiffusionGenerator`` whose UNet carries diffusers' IP-Adapter layers (Ye et al. 2023,
"IP-Adapter: Text Compatible Image Prompt Adapter"): a CLIP vision tower (``CLIPVisionModelWithProjection``) embeds the
reference image, the UNet's ``encoder_hid_proj`` (``ImageProjection``) maps that one vector to 4 extra context tokens,
and every cross-attention layer (``IPAdapterAttnProcessor2_0``) attends to them with its own keys and values
(``to_k_ip`` / ``to_v_ip``, "decoupled cross-attention"), added to the text attention times ``image_prompt_scale``.
It is the prior VP3D's visual-prompted score distillation (``rewardopt.methods.sds.VPSDS``) queries.

Conditions: ``encode_condition`` takes prompts (str: no image) and ``ImagePrompt`` items (a prompt and a (3, H, W)
image in [0, 1]); ``Condition.tensors`` holds ``encoder_hidden_states`` (B, L, D) and, when the prior has an
IP-Adapter, ``image_embeds`` (B, 1, E): the vision tower's projected embedding, computed once per
``encode_condition``; rows without an image hold zeros, diffusers' embedding of "no image" (the negative image of
its IP-Adapter pipelines, and what the tiny prior's image dropout trains zeros to mean). Classifier-free guidance
contrasts with the empty prompt *and* the zero image, as diffusers' pipelines do.

Loading: the base model is a diffusers folder or hub id (``unet/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``,
optional ``vae/``: latent space, else pixels); the IP-Adapter is read by diffusers' own
``StableDiffusionPipeline.load_ip_adapter`` from ``ip_adapter`` (a folder or hub id) / ``ip_adapter_subfolder`` /
``ip_adapter_weight_name``, with the vision tower in ``image_encoder_folder`` (under the subfolder) — the layout of
``h94/IP-Adapter`` (``models/ip-adapter_sd15.safetensors``, ``models/image_encoder/``). ``ip_adapter="auto"`` takes
the base folder's own IP-Adapter when it has one there (the embedded ``embedded:tiny-multiview-prior`` does), else
none; ``None``: a plain text prior. ``save_pretrained`` writes both layouts into one folder, the IP-Adapter weights in
the original key format (``image_proj.*``, ``ip_adapter.<i>.to_k_ip.weight``) that ``load_ip_adapter`` reads.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0, IPAdapterAttnProcessor2_0
from diffusers.models.embeddings import ImageProjection, MultiIPAdapterImageProjection
from torch import nn

from domains.images.stable_diffusion import StableDiffusionGenerator
from rewardopt.generators.base import Condition
from rewardopt.generators.capabilities import ImagePrompted
from rewardopt.generators.diffusion import DEFAULT_LORA_TARGETS

ASSETS = Path(__file__).parent / "assets"
EMBEDDED = {"embedded:tiny-multiview-prior": ASSETS / "tiny_multiview_prior"}
RECIPE = "recipes/text_to_3d/pretrain_prior_tiny.yaml"
#: h94/IP-Adapter's layout, which the embedded prior also uses
IP_SUBFOLDER, IP_WEIGHTS, IMAGE_ENCODER = "models", "ip-adapter_sd15.safetensors", "image_encoder"
#: the context tokens diffusers' ImageProjection makes of one image embedding (IP-Adapter's, fixed by its loader)
IP_TOKENS = 4


# ----------------------------------------------------------------------------- IP-Adapter layers on a UNet
def has_ip_adapter(unet: UNet2DConditionModel) -> bool:
    """Whether ``unet`` carries IP-Adapter layers (diffusers' ``encoder_hid_proj`` of type "ip_image_proj")."""
    return (isinstance(unet.encoder_hid_proj, MultiIPAdapterImageProjection)
            and unet.config.encoder_hid_dim_type == "ip_image_proj")


def _cross_attention_processors(unet: UNet2DConditionModel) -> list[str]:
    """The cross-attention processors' names, in ``attn_processors`` order (as diffusers' loader numbers them)."""
    return [n for n in unet.attn_processors if not n.endswith("attn1.processor") and "motion_modules" not in n]


def ip_adapter_state_dict(unet: UNet2DConditionModel) -> dict[str, torch.Tensor]:
    """The UNet's IP-Adapter weights in the original IP-Adapter format that ``load_ip_adapter`` reads:
    ``image_proj.proj.*`` / ``image_proj.norm.*`` and ``ip_adapter.<i>.to_k_ip.weight`` / ``to_v_ip.weight``, where
    the i-th cross-attention layer is number 2i + 1 (diffusers' ``_convert_ip_adapter_attn_to_diffusers`` read
    backwards). One plain IP-Adapter (``ImageProjection``) only."""
    if not has_ip_adapter(unet):
        raise ValueError("this UNet has no IP-Adapter layers")
    layers = unet.encoder_hid_proj.image_projection_layers
    if len(layers) != 1 or not isinstance(layers[0], ImageProjection):
        raise NotImplementedError("saving supports one plain IP-Adapter (ImageProjection); got "
                                  f"{[type(m).__name__ for m in layers]}")
    proj = layers[0]
    state = {"image_proj.proj.weight": proj.image_embeds.weight, "image_proj.proj.bias": proj.image_embeds.bias,
             "image_proj.norm.weight": proj.norm.weight, "image_proj.norm.bias": proj.norm.bias}
    procs = unet.attn_processors
    for i, name in enumerate(_cross_attention_processors(unet)):
        proc = procs[name]
        state[f"ip_adapter.{2 * i + 1}.to_k_ip.weight"] = proc.to_k_ip[0].weight
        state[f"ip_adapter.{2 * i + 1}.to_v_ip.weight"] = proc.to_v_ip[0].weight
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def init_ip_adapter(unet: UNet2DConditionModel, image_embed_dim: int) -> None:
    """Fresh IP-Adapter layers on ``unet`` (in place), loaded by diffusers' own ``_load_ip_adapter_weights``:
    a random ``ImageProjection`` (``image_embed_dim`` -> 4 tokens of the cross-attention width) and each cross-attention
    layer's ``to_k_ip`` / ``to_v_ip`` initialised from its text ``to_k`` / ``to_v`` (IP-Adapter's initialisation)."""
    if has_ip_adapter(unet):
        raise ValueError("this UNet already has IP-Adapter layers")
    cross = unet.config.cross_attention_dim
    proj = ImageProjection(image_embed_dim=image_embed_dim, cross_attention_dim=cross, num_image_text_embeds=IP_TOKENS)
    image_proj = {"proj.weight": proj.image_embeds.weight.detach(), "proj.bias": proj.image_embeds.bias.detach(),
                  "norm.weight": proj.norm.weight.detach(), "norm.bias": proj.norm.bias.detach()}
    ip_layers = {}
    for i, name in enumerate(_cross_attention_processors(unet)):
        attn = unet.get_submodule(name.removesuffix(".processor"))
        ip_layers[f"{2 * i + 1}.to_k_ip.weight"] = attn.to_k.weight.detach().clone()
        ip_layers[f"{2 * i + 1}.to_v_ip.weight"] = attn.to_v.weight.detach().clone()
    unet._load_ip_adapter_weights([{"image_proj": image_proj, "ip_adapter": ip_layers}], low_cpu_mem_usage=False)


@contextmanager
def without_ip_adapter(unet: UNet2DConditionModel) -> Iterator[None]:
    """The base UNet, for ``save_pretrained``: IP-Adapter processors swapped for plain ones, ``encoder_hid_proj``
    and its config entry removed (as diffusers' ``unload_ip_adapter`` does); all put back afterwards."""
    if not has_ip_adapter(unet):
        yield
        return
    procs, proj = unet.attn_processors, unet.encoder_hid_proj
    unet.set_attn_processor({n: AttnProcessor2_0() if isinstance(p, IPAdapterAttnProcessor2_0) else p
                             for n, p in procs.items()})
    unet.encoder_hid_proj = None
    unet.register_to_config(encoder_hid_dim_type=None)
    try:
        yield
    finally:
        unet.set_attn_processor(procs)
        unet.encoder_hid_proj = proj
        unet.register_to_config(encoder_hid_dim_type="ip_image_proj")


def load_ip_adapter(comps: dict, source: str, subfolder: str, weight_name: str, image_encoder_folder: str,
                    **kwargs) -> nn.Module:
    """Load an IP-Adapter into ``comps["unet"]`` (in place) with diffusers' own ``StableDiffusionPipeline.
    load_ip_adapter`` over the loaded components; returns the image encoder it loaded
    (``CLIPVisionModelWithProjection`` from ``<subfolder>/<image_encoder_folder>``, or ``image_encoder_folder`` itself
    when it names a path with a "/"). ``kwargs`` go to ``load_ip_adapter`` (revision, cache_dir, ...)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=comps.get("vae"), text_encoder=comps["text_encoder"], tokenizer=comps["tokenizer"], unet=comps["unet"],
        scheduler=DDIMScheduler.from_config(comps["scheduler"].config),  # the pipeline may rewrite its config
        safety_checker=None, feature_extractor=None, image_encoder=None, requires_safety_checker=False,
    )
    try:
        pipe.load_ip_adapter(source, subfolder=subfolder, weight_name=weight_name,
                             image_encoder_folder=image_encoder_folder, **kwargs)
    except (OSError, EnvironmentError) as e:
        raise FileNotFoundError(
            f"could not load the IP-Adapter {source!r} (generator.ip_adapter; expected "
            f"{subfolder}/{weight_name} and the vision tower in {subfolder}/{image_encoder_folder}/, the layout of "
            f"h94/IP-Adapter): {e}. Offline machines need a local folder (or a filled HF cache with HF_HUB_OFFLINE=1)."
        ) from e
    return pipe.image_encoder


def _resolve_ip_adapter(ip_adapter: str | None, base: str, subfolder: str, weight_name: str) -> str | None:
    """The folder / hub id to read the IP-Adapter from (None: no IP-Adapter)."""
    if ip_adapter is None:
        return None
    if ip_adapter == "auto":
        own = Path(base) / subfolder / weight_name
        return base if own.is_file() else None
    if ip_adapter in EMBEDDED:
        return str(EMBEDDED[ip_adapter])
    if ip_adapter.startswith("embedded:"):
        raise ValueError(f"unknown embedded IP-Adapter {ip_adapter!r}; known: {sorted(EMBEDDED)}")
    looks_local = ip_adapter.startswith((".", "/", "~")) or ip_adapter.count("/") > 1 or Path(ip_adapter).exists()
    if looks_local:
        path = Path(ip_adapter).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"generator.ip_adapter: no folder at {ip_adapter!r}. Pass a folder or hub id with "
                                    f"{subfolder}/{weight_name} and {subfolder}/{IMAGE_ENCODER}/ (e.g. "
                                    "'h94/IP-Adapter'), 'auto', or null for a text-only prior.")
        return str(path)
    return ip_adapter


# ----------------------------------------------------------------------------- the generator
class MultiViewPrior(ImagePrompted, StableDiffusionGenerator):
    """A text-to-image prior conditioned on an optional reference image through diffusers' IP-Adapter.

    Args:
        pretrained: the base model: ``embedded:tiny-multiview-prior``, a local diffusers folder or a hub id
            (``stable-diffusion-v1-5/stable-diffusion-v1-5``).
        ip_adapter: where the IP-Adapter is: "auto" (the base folder's own, if it has
            ``<ip_adapter_subfolder>/<ip_adapter_weight_name>``; else none), a folder or hub id (``h94/IP-Adapter``),
            an ``embedded:`` id, or None (a text-only prior: ``ImagePrompt`` conditions are then an error).
        ip_adapter_subfolder, ip_adapter_weight_name, image_encoder_folder: as diffusers' ``load_ip_adapter`` takes
            them (h94's: "models", "ip-adapter_sd15.safetensors", "image_encoder").
        image_prompt_scale: the image branch's weight in every cross-attention layer (diffusers'
            ``set_ip_adapter_scale``; 0 switches the image off). Settable later.
        lora_rank: None by default — a prior is frozen (score distillation); LoRA works as for any
            ``StableDiffusionGenerator`` (on the text/self-attention projections, not the IP-Adapter's).
        Other arguments: see ``StableDiffusionGenerator`` (height / width: 32 for the tiny prior, 512 for SD 1.5).
    """

    family = "Stable Diffusion (multi-view prior)"

    def __init__(
        self,
        pretrained: str = "embedded:tiny-multiview-prior",
        ip_adapter: str | None = "auto",
        ip_adapter_subfolder: str = IP_SUBFOLDER,
        ip_adapter_weight_name: str = IP_WEIGHTS,
        image_encoder_folder: str = IMAGE_ENCODER,
        image_prompt_scale: float = 1.0,
        height: int = 32,
        width: int = 32,
        sampler: str = "ddim",
        num_steps: int = 50,
        guidance_scale: float = 7.5,
        eta: float = 0.0,
        gradient_checkpointing: bool = True,
        lora_rank: int | None = None,
        lora_alpha: float | None = None,
        lora_targets: list[str] = list(DEFAULT_LORA_TARGETS),
        full_finetune: bool = False,
        lora_scale: float = 1.0,
        revision: str | None = None,
        _components: dict | None = None,
    ) -> None:
        from domains.images.stable_diffusion import resolve_pretrained

        if _components is None:
            path = resolve_pretrained(pretrained, EMBEDDED, RECIPE, family="multi-view prior")
            comps = self.load_components(path, revision)
            source = _resolve_ip_adapter(ip_adapter, path, ip_adapter_subfolder, ip_adapter_weight_name)
            if source is not None:
                if not image_encoder_folder:
                    raise ValueError("generator.image_encoder_folder is needed: the prior embeds reference images "
                                     "itself (h94/IP-Adapter: 'image_encoder')")
                comps["image_encoder"] = load_ip_adapter(comps, source, ip_adapter_subfolder, ip_adapter_weight_name,
                                                         image_encoder_folder)
        else:
            comps = _components
        self._check_ip_components(comps["unet"], comps.get("image_encoder"))
        super().__init__(pretrained, height=height, width=width, sampler=sampler, num_steps=num_steps,
                         guidance_scale=guidance_scale, eta=eta, gradient_checkpointing=gradient_checkpointing,
                         lora_rank=lora_rank, lora_alpha=lora_alpha, lora_targets=lora_targets,
                         full_finetune=full_finetune, lora_scale=lora_scale, revision=revision, _components=comps)
        self.ip_adapter_subfolder, self.ip_adapter_weight_name = ip_adapter_subfolder, ip_adapter_weight_name
        self.image_encoder_folder = image_encoder_folder or IMAGE_ENCODER
        self.image_encoder: nn.Module | None = comps.get("image_encoder")
        if self.image_encoder is not None:
            from transformers import CLIPImageProcessor

            self.image_encoder.requires_grad_(False).eval()
            # the preprocessing diffusers' load_ip_adapter sets up (CLIPImageProcessor at the tower's size), in torch
            proc = CLIPImageProcessor()
            self.register_buffer("clip_mean", torch.tensor(proc.image_mean).view(3, 1, 1), persistent=False)
            self.register_buffer("clip_std", torch.tensor(proc.image_std).view(3, 1, 1), persistent=False)
        self.image_prompt_scale = image_prompt_scale

    @staticmethod
    def _check_ip_components(unet: UNet2DConditionModel, image_encoder: nn.Module | None) -> None:
        if has_ip_adapter(unet) != (image_encoder is not None):
            raise ValueError("a MultiViewPrior needs both IP-Adapter layers on the UNet and an image encoder, or "
                             f"neither; got IP-Adapter layers: {has_ip_adapter(unet)}, image encoder: "
                             f"{image_encoder is not None}")
        if image_encoder is not None:
            want = unet.encoder_hid_proj.image_projection_layers[0].image_embeds.in_features
            have = image_encoder.config.projection_dim
            if want != have:
                raise ValueError(f"the image encoder's projection_dim is {have}, the IP-Adapter takes {want}")

    @classmethod
    def from_components(cls, unet, text_encoder, tokenizer, scheduler, vae=None, image_encoder=None,
                        **kwargs) -> "MultiViewPrior":
        """Build from in-memory components; ``unet`` carries IP-Adapter layers iff ``image_encoder`` is given."""
        comps = {"unet": unet, "text_encoder": text_encoder, "tokenizer": tokenizer, "scheduler": scheduler,
                 "vae": vae, "image_encoder": image_encoder}
        return cls(pretrained=kwargs.pop("pretrained", "<in-memory>"), _components=comps, **kwargs)

    # ------------------------------------------------------------------ the image branch
    @property
    def has_ip_adapter(self) -> bool:
        """Whether the prior takes reference images (an IP-Adapter was loaded)."""
        return self.image_encoder is not None

    @property
    def image_prompt_scale(self) -> float:
        return self._image_prompt_scale

    @image_prompt_scale.setter
    def image_prompt_scale(self, scale: float) -> None:
        from diffusers.loaders.ip_adapter import IPAdapterMixin

        self._image_prompt_scale = float(scale)
        if not self.has_ip_adapter:
            return
        for unet in [self.denoiser, *self.__dict__.get("_frozen", [])]:  # the live UNet and a frozen copy
            IPAdapterMixin.set_ip_adapter_scale(SimpleNamespace(unet=unet), self._image_prompt_scale)

    @property
    def image_embed_dim(self) -> int:
        if not self.has_ip_adapter:
            raise ValueError("this prior has no IP-Adapter")
        return int(self.image_encoder.config.projection_dim)

    def preprocess_images(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        """(3, H, W) images in [0, 1] -> the vision tower's (N, 3, S, S) input, as ``CLIPImageProcessor`` makes it:
        the short side resized to S (bicubic, antialiased), a centre crop, CLIP's mean / std."""
        size = int(self.image_encoder.config.image_size)
        out = []
        for im in images:
            h, w = im.shape[-2:]
            if (h, w) != (size, size):
                s = size / min(h, w)
                nh, nw = max(size, int(h * s)), max(size, int(w * s))
                im = F.interpolate(im[None].float(), size=(nh, nw), mode="bicubic", antialias=True,
                                   align_corners=False)[0].clamp(0, 1)
                top, left = (nh - size) // 2, (nw - size) // 2
                im = im[:, top:top + size, left:left + size]
            out.append(im.float())
        x = torch.stack(out).to(self.clip_mean.device)
        return (x - self.clip_mean) / self.clip_std

    def embed_images(self, images: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """Reference images ((N, 3, H, W) or a list of (3, H, W), in [0, 1]) -> ``image_embeds`` (N, 1, E): the
        vision tower's projected embedding, one image per row (diffusers' layout). Differentiable w.r.t. the
        tower (pretraining trains it); ``encode_condition`` calls it without grad."""
        if not self.has_ip_adapter:
            raise ValueError(self._no_adapter_message())
        enc = self.image_encoder
        pixels = self.preprocess_images(list(images)).to(next(enc.parameters()).dtype)
        return enc(pixels).image_embeds.unsqueeze(1)

    def _no_adapter_message(self) -> str:
        return (f"{type(self).__name__} was loaded without an IP-Adapter (generator.ip_adapter=null, or 'auto' found "
                f"none at {self.pretrained!r}), so it cannot take ImagePrompt conditions; set generator.ip_adapter to "
                "a folder or hub id with an IP-Adapter (e.g. 'h94/IP-Adapter' for SD 1.5), or pass plain prompts")

    # ------------------------------------------------------------------ contract
    def encode_condition(self, raw: Sequence[str | Mapping]) -> Condition:
        """Prompts (str) and ``ImagePrompt`` items -> ``encoder_hidden_states`` (B, L, D) and, with an IP-Adapter,
        ``image_embeds`` (B, 1, E) (zeros in rows without an image)."""
        if isinstance(raw, (str, Mapping)):
            raise TypeError("encode_condition takes a list of prompts / ImagePrompts, not one item")
        raw = list(raw)
        prompts, rows, images = [], [], []
        for i, item in enumerate(raw):
            if isinstance(item, str):
                prompts.append(item)
            elif isinstance(item, Mapping) and "prompt" in item and "image" in item:
                prompts.append(str(item["prompt"]))
                rows.append(i)
                images.append(self._checked_image(item["image"], i))
            else:
                raise TypeError(f"condition {i}: expected a prompt (str) or an ImagePrompt(prompt, image), got "
                                f"{type(item).__name__}")
        if images and not self.has_ip_adapter:
            raise ValueError(self._no_adapter_message())
        tensors = {"encoder_hidden_states": self._embed(prompts)}
        if self.has_ip_adapter:
            emb = tensors["encoder_hidden_states"].new_zeros(len(raw), 1, self.image_embed_dim)
            if images:
                # each distinct image tensor embedded once (a visual prompt repeated over views: one row, so the
                # views' embeddings are equal bit for bit, and cheaper)
                distinct = list({id(im): im for im in images}.values())  # first occurrences, in order
                position = {id(im): j for j, im in enumerate(distinct)}
                index = [position[id(im)] for im in images]
                with torch.no_grad():
                    emb[rows] = self.embed_images(distinct).to(emb.dtype)[index]
            tensors["image_embeds"] = emb
        return Condition(raw, tensors)

    @staticmethod
    def _checked_image(image, i: int) -> torch.Tensor:
        if not isinstance(image, torch.Tensor) or image.dim() != 3 or image.shape[0] != 3:
            shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
            raise ValueError(f"condition {i}: the reference image must be a (3, H, W) tensor in [0, 1], got {shape}")
        lo, hi = float(image.min()), float(image.max())
        if lo < -1e-3 or hi > 1 + 1e-3:
            raise ValueError(f"condition {i}: the reference image's values span [{lo:.3g}, {hi:.3g}]; images are in "
                             "[0, 1] (divide uint8 images by 255; map [-1, 1] images with x / 2 + 0.5)")
        return image

    def _uncond_tensors(self, cond: Condition) -> dict[str, torch.Tensor]:
        """The empty prompt and, with an IP-Adapter, the zero image (diffusers' negative image embedding)."""
        out = super()._uncond_tensors(cond)
        if "image_embeds" in cond.tensors:
            out["image_embeds"] = torch.zeros_like(cond.tensors["image_embeds"])
        return out

    def _denoiser_output(self, denoiser, x, t, tensors):
        # as StableDiffusionPipeline calls the UNet with ip_adapter_image_embeds: one tensor per IP-Adapter
        kwargs = {"added_cond_kwargs": {"image_embeds": [tensors["image_embeds"]]}} if "image_embeds" in tensors else {}
        return denoiser(x, t, encoder_hidden_states=tensors["encoder_hidden_states"], return_dict=False, **kwargs)[0]

    # ------------------------------------------------------------------ saving
    def save_pretrained(self, path: str | os.PathLike) -> None:
        """The diffusers layout of the base model and, with an IP-Adapter, h94's layout inside it:
        ``<ip_adapter_subfolder>/<ip_adapter_weight_name>`` (the original key format) and the vision tower in
        ``<ip_adapter_subfolder>/<image_encoder_folder>/`` — so ``MultiViewPrior(path)`` (ip_adapter "auto") and
        ``StableDiffusionPipeline.from_pretrained(path).load_ip_adapter(path, ...)`` read it back."""
        from safetensors.torch import save_file

        path = Path(path)
        with without_ip_adapter(self.denoiser):
            super().save_pretrained(path)
        meta = {"height": self.height, "width": self.width}
        if self.has_ip_adapter:
            folder = path / self.ip_adapter_subfolder
            folder.mkdir(parents=True, exist_ok=True)
            save_file(ip_adapter_state_dict(self.denoiser), str(folder / self.ip_adapter_weight_name))
            enc = (folder / self.image_encoder_folder if "/" not in self.image_encoder_folder
                   else path / self.image_encoder_folder)
            self.image_encoder.save_pretrained(enc)
            meta.update(ip_adapter_subfolder=self.ip_adapter_subfolder,
                        ip_adapter_weight_name=self.ip_adapter_weight_name,
                        image_encoder_folder=self.image_encoder_folder)
        (path / "rewardopt.json").write_text(json.dumps(meta))


__all__ = ["MultiViewPrior", "EMBEDDED", "has_ip_adapter", "init_ip_adapter", "ip_adapter_state_dict",
           "load_ip_adapter", "without_ip_adapter"]
