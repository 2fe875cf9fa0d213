"""What a generator can do beyond the sampling core, declared by inheritance.

``Generator`` (``base.py``) is the sampling core every method needs. Anything more is a capability
class a generator inherits; a method or callback that needs one checks it with ``isinstance`` when
it is built (``require``), so a wrong pairing fails at once with a message that names the
capability, what it provides, and the generators that declare it — never with an
``AttributeError`` mid-run, and no method probes attribute names.

=======================  ==============================================  =========================
capability               members                                         needed by
=======================  ==============================================  =========================
``Trainable``            setup_trainable, base_model, has_base_model,    every fine-tuning method
                         save_trained
``Renderable``           render                                          sample grids
``VideoSamples``         render (key frames), GIF/MP4 sample files       video grids, GIFs
``TextSerialisable``     to_text                                         text sample files
``TransitionLogProbs``   log_prob                                        DDPO
``DeterministicStep``    deterministic_step                              DSearch look-ahead
``SavesPretrained``      save_pretrained                                 pre-training
``PairedDenoisingLoss``  denoising_loss                                  DRaFT's denoising_weight
``EncodesImages``        encode_images, height, width                    SDS, pre-training
``ImagePrompted``        image_prompt_scale; ``ImagePrompt`` conditions  VP-SDS (a visual prompt)
=======================  ==============================================  =========================
"""

from __future__ import annotations

import copy
import os
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, ClassVar

import torch


class Capability(ABC):
    """Base of the capability classes (``provides`` names their members for error messages)."""

    provides: ClassVar[str] = ""


class Trainable(Capability):
    """A generator a fine-tuning method can train. The method calls ``setup_trainable()`` once when it
    is built (calling it again does nothing); afterwards ``trainable_parameters()`` are the weights
    to optimise and ``base_model()`` switches to the pretrained model (for KL terms)."""

    provides = "setup_trainable, base_model, has_base_model, save_trained"

    @abstractmethod
    def setup_trainable(self) -> None:
        """Freeze what is not trained and open what is (LoRA adapters, a whole network). Idempotent."""

    @abstractmethod
    def base_model(self) -> AbstractContextManager[None]:
        """A context in which the generator behaves as the frozen pretrained model."""

    @property
    @abstractmethod
    def has_base_model(self) -> bool:
        """Whether ``base_model()`` differs from the trained model (an adapter to disable, a frozen
        copy), so that a KL to the pretrained model means something."""

    @abstractmethod
    def save_trained(self, path: str | os.PathLike) -> Path | None:
        """Write what fine-tuning trained in the model family's own format (a LoRA adapter, the whole
        model); the path written, or None when nothing is trained."""


class Renderable(Capability):
    """Decoded samples have a picture (for grids): ``render(samples)`` -> (N, 3, H, W) in [0, 1]."""

    provides = "render"

    @abstractmethod
    def render(self, samples: Any) -> torch.Tensor:
        """Pictures of decoded samples, (N, 3, H, W) in [0, 1]."""


class ImageSamples(Renderable):
    """Decoded samples are images (B, C, H, W) in [0, 1] with C = 1 or 3: they are their own picture."""

    def render(self, samples: torch.Tensor) -> torch.Tensor:
        return samples.expand(-1, 3, -1, -1)


class VideoSamples(Renderable):
    """Decoded samples are videos (B, F, C, H, W) in [0, 1]. Their picture is the strip of 4 key frames
    (``rewardopt.media.key_frame_strip``); ``write_samples`` writes each as an animated GIF (and an MP4
    when ffmpeg is installed)."""

    #: frames per second of written GIFs / MP4s
    fps: float = 8.0

    def render(self, samples: torch.Tensor) -> torch.Tensor:
        from rewardopt.media import key_frame_strip

        return torch.stack([key_frame_strip(v) for v in samples])


class TextSerialisable(Capability):
    """Decoded samples have a text form, one line per sample (SMILES, DNA, codec codes)."""

    provides = "to_text"

    @abstractmethod
    def to_text(self, samples: Any) -> list[str]:
        """One string per decoded sample."""


class TransitionLogProbs(Capability):
    """The sampler's transitions have a density: ``log_prob(x_t, i, x_prev, cond)`` -> (B,)."""

    provides = "log_prob"

    @abstractmethod
    def log_prob(self, x_t: torch.Tensor, i: int, x_prev: torch.Tensor, cond: Any) -> torch.Tensor:
        """log p(x_prev | x_t, c) per sample, (B,)."""


class DeterministicStep(Capability):
    """A deterministic counterpart of ``step`` for look-ahead values (DSearch)."""

    provides = "deterministic_step"

    @abstractmethod
    def deterministic_step(self, x_t: torch.Tensor, i: int, cond: Any, out: torch.Tensor | None = None) -> torch.Tensor:
        """One step x_t -> x_{t-1} of the deterministic sampler: DDIM with η = 0 for continuous
        diffusion, greedy unmasking for masked diffusion, greedy decoding for token LMs. Not ``step``
        with zero noise (for diffusion that is the stochastic step's mean, with too little noise variance
        left; for masked diffusion it never unmasks). ``out`` as in ``step``."""


class SavesPretrained(Capability):
    """The whole model can be written to a folder its family's loader reads (``save_pretrained``)."""

    provides = "save_pretrained"

    @abstractmethod
    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write the model (weights, configs, tokenizer) under ``path``."""


class PairedDenoisingLoss(Capability):
    """The generator's own supervised training loss on paired data: ``denoising_loss(raw)`` -> a scalar,
    differentiable into the trainable weights, for raw conditions that carry their target (super-resolution:
    the ground-truth image of each low-resolution input). Fine-tuning methods add it to the reward loss
    (DRaFT's ``denoising_weight``), the SR papers' "denoising loss + λ·reward". Implementations count the
    denoiser rows they evaluate in ``counter`` (``nfe``, and ``nfe_grad`` with autograd on)."""

    provides = "denoising_loss"

    @abstractmethod
    def denoising_loss(self, raw: Any, generator: torch.Generator | None = None) -> torch.Tensor:
        """The diffusion training loss on the paired items of ``raw`` (a list of raw conditions)."""


class EncodesImages(Capability):
    """Images map to the sampler's states: ``encode_images`` (B, 3, H, W) in [0, 1] -> x_0 (latents through the VAE,
    or pixels in [-1, 1]), differentiably; ``height`` / ``width`` are the sizes it takes. Pretraining and score
    distillation (which noises an encoded render) need it."""

    provides = "encode_images"
    height: int
    width: int

    @abstractmethod
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> states x_0."""


class ImagePrompt(dict):
    """A text prompt with a reference image (an IP-Adapter-style visual prompt): a dict with ``prompt`` (str) and
    ``image`` ((3, H, W) in [0, 1]) whose text form is the prompt, so logs, CSV files and text rewards see the prompt.
    Rewards that compare with the reference (visual consistency) read ``cond["image"]``."""

    def __init__(self, prompt: str, image: torch.Tensor) -> None:
        if not isinstance(prompt, str):
            raise TypeError(f"ImagePrompt.prompt must be a string, got {type(prompt).__name__}")
        if not isinstance(image, torch.Tensor) or image.dim() != 3 or image.shape[0] != 3:
            shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
            raise ValueError(f"ImagePrompt.image must be a (3, H, W) tensor in [0, 1], got {shape}")
        super().__init__(prompt=prompt, image=image)

    def __str__(self) -> str:
        return self["prompt"]

    __repr__ = __str__


class ImagePrompted(Capability):
    """``encode_condition`` also accepts ``ImagePrompt`` items (text + a reference image, IP-Adapter style) and
    conditions the denoiser on both; plain strings mean no image. ``image_prompt_scale`` weighs the image branch
    (diffusers' ``set_ip_adapter_scale``). Score distillation with a visual prompt (VP-SDS) needs it."""

    provides = "image_prompt_scale"
    image_prompt_scale: float


class FrozenCopy:
    """A frozen copy of the trained network, the network named by ``network_attr``, kept as the
    pretrained model for full fine-tuning. The copy sits in a list so that it is not in
    ``state_dict`` (checkpoints stay small) yet follows ``.to()`` / ``.half()`` through ``_apply``.
    Mixed into ``nn.Module`` generators."""

    #: the attribute holding the network fine-tuning trains in full
    network_attr: ClassVar[str] = "denoiser"

    def freeze_copy(self) -> None:
        """Keep a frozen copy of the network (once) and make the live one trainable."""
        live = getattr(self, self.network_attr)
        if not self.__dict__.get("_frozen"):
            self._frozen = [copy.deepcopy(live).requires_grad_(False).eval()]
        live.requires_grad_(True)

    @property
    def has_frozen_copy(self) -> bool:
        return bool(self.__dict__.get("_frozen"))

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        for m in self.__dict__.get("_frozen", []):
            m._apply(fn, recurse)
        return out

    def save_full(self, path: str | os.PathLike) -> Path:
        """Save a generator trained in full: ``save_pretrained(path)`` (the family's folder layout) for
        ``SavesPretrained`` generators, else the network's state dict as ``<network_attr>.safetensors``
        (``safetensors.torch.load_model`` reads it). Returns what was written."""
        path = Path(path)
        if isinstance(self, SavesPretrained):
            self.save_pretrained(path)
            return path
        from safetensors.torch import save_model  # drops tied copies (an LM head tied to its embeddings)

        path.mkdir(parents=True, exist_ok=True)
        save_model(getattr(self, self.network_attr), str(path / f"{self.network_attr}.safetensors"))
        return path / f"{self.network_attr}.safetensors"

    @contextmanager
    def frozen_network(self) -> Iterator[None]:
        """Swap the frozen copy in for the live network (no-op without a copy)."""
        frozen = self.__dict__.get("_frozen")
        if not frozen:
            yield
            return
        live = getattr(self, self.network_attr)
        setattr(self, self.network_attr, frozen[0])
        try:
            yield
        finally:
            setattr(self, self.network_attr, live)


def _declared_by(capability: type) -> list[str]:
    """Names of the concrete generator classes imported so far that declare ``capability``."""
    from rewardopt.generators.base import Generator

    found, todo = [], list(capability.__subclasses__())
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if issubclass(cls, Generator) and not getattr(cls, "__abstractmethods__", None) and cls.__name__ not in found:
            found.append(cls.__name__)
    return sorted(found)


def require(generator: Any, capability: type[Capability], user: str) -> None:
    """Raise a TypeError unless ``generator`` declares ``capability``, naming the capability, its
    members and the generators that declare it. ``user``: the method or callback that needs it."""
    if isinstance(generator, capability):
        return
    have = _declared_by(capability)
    raise TypeError(
        f"{user} needs a {capability.__name__} generator ({capability.provides}); {type(generator).__name__} does "
        f"not declare {capability.__name__}. Generators that do: {', '.join(have) or 'none imported'}. "
        f"To add it to your own generator, inherit rewardopt.generators.capabilities.{capability.__name__} and "
        "implement its members."
    )


__all__ = ["Capability", "Trainable", "Renderable", "ImageSamples", "TextSerialisable", "TransitionLogProbs",
           "DeterministicStep", "SavesPretrained", "PairedDenoisingLoss", "EncodesImages", "ImagePrompt",
           "ImagePrompted", "FrozenCopy", "require"]
