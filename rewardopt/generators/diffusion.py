"""Continuous diffusion over diffusers schedulers (DDIM with eta, DDPM), with classifier-free
guidance, pixel or latent space, per-step gradient checkpointing and LoRA via peft.

The transition arithmetic is written out here (rather than calling ``scheduler.step``) because
DDPO needs the Gaussian mean and standard deviation of each step, and DRaFT needs the noise to be
injectable. It follows diffusers' ``DDIMScheduler.step`` / ``DDPMScheduler.step`` term by term
(``epsilon``, ``v_prediction`` and ``sample`` parameterisations, ``clip_sample``), and a test checks
it against diffusers' own pipeline to 1e-5.

A subclass supplies the denoiser (``_denoiser_output``), how conditions are encoded and how
states are decoded; see ``domains/images/stable_diffusion.py``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from diffusers import DDIMScheduler, DDPMScheduler
from torch import nn
from torch.utils.checkpoint import checkpoint

from rewardopt.generators.base import Condition, Generator
from rewardopt.generators.capabilities import DeterministicStep, FrozenCopy, Trainable, TransitionLogProbs

DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
PEFT_WEIGHTS, PEFT_CONFIG = "adapter_model.safetensors", "adapter_config.json"  # peft's own file names


def make_scheduler(kind: str, config: dict):
    """Build a diffusers scheduler of ``kind`` ("ddim" or "ddpm"; "flow": ``FlowMatchEulerDiscreteScheduler``) from
    another scheduler's config (a flow model's config carries its shift; a DDPM config gives the flow's defaults)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    kinds = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler, "flow": FlowMatchEulerDiscreteScheduler}
    if kind not in kinds:
        raise ValueError(f"sampler must be one of {sorted(kinds)}, got {kind!r}")
    return kinds[kind].from_config(config)


# ----------------------------------------------------------------------------- LoRA on any denoiser
def check_lora_targets(denoiser: nn.Module, targets: Sequence[str]) -> None:
    """Raise, naming the key and candidates, unless some module of ``denoiser`` is called one of
    ``targets`` (a full name, or its last components, as peft matches ``target_modules``)."""
    names = [n for n, _ in denoiser.named_modules()]
    if any(n == t or n.endswith("." + t) for n in names for t in targets):
        return
    kinds = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding)
    layers = [n for n, m in denoiser.named_modules() if isinstance(m, kinds) and n]
    short = sorted({".".join(n.split(".")[-2:]) if n.split(".")[-1].isdigit() else n.split(".")[-1] for n in layers})
    raise ValueError(
        f"generator.lora_targets: none of {list(targets)} names a module of {type(denoiser).__name__}; its "
        f"linear/conv layers are called {short[:16]}{' ...' if len(short) > 16 else ''}. Set lora_targets to "
        "some of them (attention projections are the usual choice), or train in full with full_finetune: true"
    )


def add_lora(denoiser: nn.Module, config) -> None:
    """Inject the LoRA adapter ``config`` (a peft ``LoraConfig``) into ``denoiser`` in place, as the
    adapter "default": diffusers' ``add_adapter`` for models that declare it (``PeftAdapterMixin``),
    peft's ``inject_adapter_in_model`` for any other ``nn.Module`` (a diffusers ``UNet2DModel``, a
    transformers backbone, your own network). Both leave peft layers and ``denoiser.peft_config``."""
    from diffusers.loaders.peft import PeftAdapterMixin
    from peft import inject_adapter_in_model

    check_lora_targets(denoiser, config.target_modules)
    if isinstance(denoiser, PeftAdapterMixin):
        denoiser.add_adapter(config)
    else:
        inject_adapter_in_model(config, denoiser, adapter_name="default")


def set_lora_enabled(denoiser: nn.Module, enabled: bool) -> None:
    """Switch every peft adapter layer of ``denoiser`` on or off (what diffusers' and transformers'
    ``enable_adapters`` / ``disable_adapters`` do, for any module). Enabling makes them trainable again."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for m in denoiser.modules():
        if isinstance(m, BaseTunerLayer):
            m.enable_adapters(enabled)


class DiffusionGenerator(FrozenCopy, Trainable, TransitionLogProbs, DeterministicStep, Generator):
    """Generic continuous-diffusion sampler: ``Trainable`` (LoRA or in full), with transition
    log-probabilities (DDPO) and a deterministic DDIM step (look-ahead). Subclasses whose samples are
    images also inherit ``ImageSamples``.

    Args:
        scheduler: a diffusers ``DDIMScheduler`` or ``DDPMScheduler``.
        num_steps: sampling steps T.
        guidance_scale: classifier-free guidance weight w (1 = no guidance).
        eta: DDIM stochasticity (0 deterministic, 1 DDPM-like); ignored for DDPM.
        gradient_checkpointing: recompute each denoiser call in backward instead of storing it.
        lora_rank / lora_alpha / lora_targets: LoRA (peft) on the denoiser, any ``nn.Module``, on the
            modules named ``lora_targets`` (rank None: no LoRA). Saved in peft's format (``save_lora``).
        full_finetune: train all denoiser weights instead of LoRA (keeps a frozen copy for KL).
        lora_scale: strength of the LoRA update at sampling time (inference-time interpolation).
    """

    def __init__(
        self,
        scheduler: DDIMScheduler | DDPMScheduler,
        num_steps: int = 50,
        guidance_scale: float = 7.5,
        eta: float = 0.0,
        gradient_checkpointing: bool = True,
        lora_rank: int | None = None,
        lora_alpha: float | None = None,
        lora_targets: tuple[str, ...] | list[str] = DEFAULT_LORA_TARGETS,
        full_finetune: bool = False,
        lora_scale: float = 1.0,
        **schedule_options,
    ) -> None:
        super().__init__()
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        if lora_rank is not None and full_finetune:
            raise ValueError("choose LoRA (lora_rank) or full_finetune, not both")
        self.scheduler = scheduler
        self.guidance_scale = float(guidance_scale)
        self.eta = float(eta)
        self.gradient_checkpointing = gradient_checkpointing
        self.lora_rank, self.lora_alpha = lora_rank, lora_alpha
        self.lora_targets = list(lora_targets)
        self.full_finetune = full_finetune
        self.lora_scale = float(lora_scale)
        self.init_schedule(scheduler, num_steps, **schedule_options)

    def init_schedule(self, scheduler, num_steps: int, **options) -> None:
        """Check ``scheduler`` and set the sampling schedule's buffers (``alphas_cumprod``, ``_timesteps``). The
        family's hook: ``FlowMatchingGenerator`` sets a flow's σ schedule here instead, with its own ``options``."""
        if options:
            raise TypeError(f"{type(self).__name__} got unexpected schedule options {sorted(options)} (they belong "
                            "to FlowMatchingGenerator: sde_noise_level, sde_window, sigmas, mu)")
        if not isinstance(scheduler, (DDIMScheduler, DDPMScheduler)):
            raise NotImplementedError(
                f"{type(scheduler).__name__} is not supported; use DDIMScheduler or DDPMScheduler "
                "(build one from any config with rewardopt.generators.diffusion.make_scheduler), or a flow model's "
                "FlowMatchEulerDiscreteScheduler with rewardopt.generators.flow.FlowMatchingGenerator"
            )
        if isinstance(scheduler, DDPMScheduler):
            check_ddpm_variance_type(scheduler.config.variance_type)
        scheduler.set_timesteps(num_steps)
        self.register_buffer("alphas_cumprod", scheduler.alphas_cumprod.clone().float(), persistent=False)
        self.register_buffer("_timesteps", scheduler.timesteps.clone().long(), persistent=False)

    # ----------------------------------------------------------------------------- subclass API
    denoiser: nn.Module  # set by subclasses

    def _denoiser_output(self, denoiser: nn.Module, x: torch.Tensor, t: torch.Tensor, tensors: dict) -> torch.Tensor:
        """Raw model output for (x, t) given condition tensors (already batched with x)."""
        raise NotImplementedError

    def _uncond_tensors(self, cond: Condition) -> dict[str, torch.Tensor] | None:
        """Condition tensors for the unconditional branch of CFG, or None if unavailable."""
        return None

    # ----------------------------------------------------------------------------- trainable parts
    def setup_trainable(self) -> None:
        """Freeze everything, then open LoRA adapters or the full denoiser for training (once)."""
        if self.__dict__.get("_trainable_ready"):
            return
        self.requires_grad_(False)
        if self.lora_rank is not None:
            from peft import LoraConfig

            add_lora(self.denoiser, LoraConfig(r=self.lora_rank, lora_alpha=self.lora_alpha or self.lora_rank,
                                               init_lora_weights="gaussian", target_modules=self.lora_targets))
        elif self.full_finetune:
            self.freeze_copy()
        self._trainable_ready = True

    @contextmanager
    def base_model(self) -> Iterator[None]:
        """The frozen pretrained denoiser: adapters disabled, or the frozen copy swapped in."""
        if self.lora_rank is not None:
            set_lora_enabled(self.denoiser, False)
            try:
                yield
            finally:
                set_lora_enabled(self.denoiser, True)
        else:  # the frozen copy, or (nothing trained) the model itself
            with self.frozen_network():
                yield

    @property
    def has_base_model(self) -> bool:
        return self.lora_rank is not None or self.has_frozen_copy

    def save_trained(self, path: str | os.PathLike) -> Path | None:
        """The LoRA adapter (``save_lora``; returns the weights file), or, trained in full, the whole
        model (``FrozenCopy.save_full``); None when nothing is trained."""
        if self.lora_rank is not None:
            return self.save_lora(path)
        return self.save_full(path) if self.full_finetune else None

    # ----------------------------------------------------------------------------- LoRA files
    def save_lora(self, path: str | os.PathLike) -> Path:
        """Save the LoRA adapter in peft's own format — ``adapter_model.safetensors`` (the adapter state
        dict, keys as ``PeftModel`` writes them) and ``adapter_config.json`` (its ``LoraConfig``) — which
        ``load_lora`` and ``peft.PeftModel.from_pretrained(denoiser, path)`` load. Returns the weights
        file. Generators of a diffusers pipeline family override it with diffusers' LoRA format."""
        from peft.utils import get_peft_model_state_dict
        from safetensors.torch import save_file

        if self.lora_rank is None:
            raise ValueError(f"{type(self).__name__} has no LoRA adapter to save (lora_rank is None)")
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = get_peft_model_state_dict(self.denoiser)
        state = {f"base_model.model.{k}": v.detach().cpu().contiguous() for k, v in state.items()}  # as PeftModel
        save_file(state, path / PEFT_WEIGHTS)
        self.denoiser.peft_config["default"].save_pretrained(str(path))
        return path / PEFT_WEIGHTS

    def load_lora(self, path: str | os.PathLike) -> None:
        """Load an adapter written by ``save_lora``. Without adapters (lora_rank None) they are first
        injected from the saved ``LoraConfig``; with adapters, the saved rank, alpha and target modules
        (and peft's other output-changing fields) must match the generator's, else a ValueError names the
        field and the fix."""
        from peft import LoraConfig
        from peft.utils import set_peft_model_state_dict
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / PEFT_WEIGHTS).is_file() or not (path / PEFT_CONFIG).is_file():
            raise FileNotFoundError(f"no peft LoRA adapter at {str(path)!r} (expected {PEFT_WEIGHTS}, {PEFT_CONFIG})")
        config = LoraConfig.from_pretrained(str(path))
        if self.lora_rank is None:
            if self.full_finetune:
                raise ValueError("load_lora needs a generator without full_finetune")
            add_lora(self.denoiser, config)
            self.lora_rank, self.lora_alpha = config.r, config.lora_alpha
            self.lora_targets = sorted(config.target_modules)
        elif (mismatch := self._lora_mismatch(config)) is not None:
            raise ValueError(f"the adapter at {str(path)!r} {mismatch}")
        state = {k.removeprefix("base_model.model."): v for k, v in load_file(path / PEFT_WEIGHTS).items()}
        result = set_peft_model_state_dict(self.denoiser, state)
        missing = [k for k in result.missing_keys if "lora_" in k]
        if missing or result.unexpected_keys:
            raise ValueError(f"the adapter at {str(path)!r} does not fit {type(self.denoiser).__name__}: "
                             f"missing {missing[:3]}, unexpected {list(result.unexpected_keys)[:3]}")

    def _lora_mismatch(self, saved) -> str | None:
        """How the saved ``LoraConfig`` differs from this generator's adapter (the first field that
        does, with the fix), or None. Compared: rank, alpha (the scale alpha/r), target modules, and
        the adapter's other fields that change its output (rsLoRA, DoRA, per-module rank/alpha)."""
        take = "or generator.lora_rank to null to take the file's"
        if saved.r != self.lora_rank:
            return (f"has rank {saved.r}; this generator has generator.lora_rank={self.lora_rank} "
                    f"(set it to {saved.r}, or to null to take the file's)")
        live = getattr(self.denoiser, "peft_config", {}).get("default")
        alpha = live.lora_alpha if live is not None else (self.lora_alpha or self.lora_rank)
        if float(saved.lora_alpha) != float(alpha):
            return (f"has lora_alpha {saved.lora_alpha:g}; this generator has {alpha:g} "
                    f"(generator.lora_alpha={self.lora_alpha}; set it to {saved.lora_alpha:g}, {take})")
        targets = live.target_modules if live is not None else self.lora_targets
        as_set = lambda m: m if isinstance(m, str) else set(m or ())  # noqa: E731 (peft allows a regex string)
        if as_set(saved.target_modules) != as_set(targets):
            show = lambda m: repr(m) if isinstance(m, str) else repr(sorted(m))  # noqa: E731
            return (f"has target_modules {show(saved.target_modules)}; this generator has generator.lora_targets="
                    f"{show(targets)} (set it to {show(saved.target_modules)}, {take})")
        for field in ("use_rslora", "use_dora", "rank_pattern", "alpha_pattern"):
            if live is not None and getattr(saved, field, None) != getattr(live, field, None):
                return (f"has {field}={getattr(saved, field, None)!r}, this generator's adapter "
                        f"{getattr(live, field, None)!r} (set generator.lora_rank to null to take the file's)")
        return None

    # ----------------------------------------------------------------------------- schedule
    @property
    def timesteps(self) -> torch.Tensor:
        return self._timesteps

    def _alpha_prev(self, i: int) -> torch.Tensor:
        """ᾱ at the step after step i, exactly as diffusers' schedulers choose it."""
        t = int(self.timesteps[i])
        if isinstance(self.scheduler, DDIMScheduler):
            prev = t - self.scheduler.config.num_train_timesteps // self.num_steps
            if prev >= 0:
                return self.alphas_cumprod[prev]
            return self.alphas_cumprod.new_tensor(float(self.scheduler.final_alpha_cumprod))
        prev = int(self.timesteps[i + 1]) if i + 1 < self.num_steps else -1
        return self.alphas_cumprod[prev] if prev >= 0 else self.alphas_cumprod.new_tensor(1.0)

    # ----------------------------------------------------------------------------- denoiser
    def _call_denoiser(self, x: torch.Tensor, t: torch.Tensor, tensors: dict) -> torch.Tensor:
        if self.gradient_checkpointing and torch.is_grad_enabled() and self._needs_graph(x):
            keys = sorted(tensors)
            fn = lambda x_, *vals: self._scaled_denoiser_output(x_, t, dict(zip(keys, vals)))  # noqa: E731
            return checkpoint(fn, x, *[tensors[k] for k in keys], use_reentrant=False)
        return self._scaled_denoiser_output(x, t, tensors)

    def _scaled_denoiser_output(self, x: torch.Tensor, t: torch.Tensor, tensors: dict) -> torch.Tensor:
        """``_denoiser_output`` with the LoRA update scaled by ``lora_scale`` (inside the checkpointed
        function, so the recomputation in backward sees the same weights)."""
        if self.lora_rank is None or self.lora_scale == 1.0:
            return self._denoiser_output(self.denoiser, x, t, tensors)
        from diffusers.utils import scale_lora_layers, unscale_lora_layers

        scale_lora_layers(self.denoiser, self.lora_scale)
        try:
            return self._denoiser_output(self.denoiser, x, t, tensors)
        finally:
            unscale_lora_layers(self.denoiser, self.lora_scale)

    def _needs_graph(self, x: torch.Tensor) -> bool:
        return x.requires_grad or any(p.requires_grad for p in self.denoiser.parameters())

    def model_output(self, x_t: torch.Tensor, i: int, cond: Condition) -> torch.Tensor:
        """Guided model output (ε, v or x0 per the scheduler's prediction_type) at step index i."""
        return self.predict_noise_at(x_t, self.timesteps[i], cond)

    def predict_noise_at(self, x_t: torch.Tensor, t: torch.Tensor | int, cond: Condition) -> torch.Tensor:
        """The guided model output at timestep ``t`` (a scalar, or one per row (B,))."""
        t = torch.as_tensor(t, device=x_t.device).long()
        self.counter.nfe += x_t.shape[0]
        if torch.is_grad_enabled():
            self.counter.nfe_grad += x_t.shape[0]
        uncond = self._uncond_tensors(cond) if self.guidance_scale != 1.0 else None
        if uncond is None:
            return self._call_denoiser(x_t, t, cond.tensors)
        tensors = {k: torch.cat([uncond[k], cond.tensors[k]]) for k in cond.tensors}
        t2 = torch.cat([t, t]) if t.dim() == 1 and t.numel() > 1 else t  # one timestep per row: both halves
        out = self._call_denoiser(torch.cat([x_t, x_t]), t2, tensors)
        out_u, out_c = out.chunk(2)
        return out_u + self.guidance_scale * (out_c - out_u)

    def noise_prediction(self, x_t: torch.Tensor, t: torch.Tensor | int, cond: Condition) -> torch.Tensor:
        """The guided ε̂(x_t; c, t) whatever the scheduler's parameterisation (ε, v or x0: converted as diffusers'
        schedulers convert it; the conversion is affine in the model output, so guiding then converting equals
        converting then guiding). ``t``: a scalar or one timestep per row (B,). Counts NFE as ``predict_noise_at``."""
        t = torch.as_tensor(t, device=x_t.device).long()
        out = self.predict_noise_at(x_t, t, cond)
        kind = self.scheduler.config.prediction_type
        if kind == "epsilon":
            return out
        a = self.alphas_cumprod[t].to(x_t.dtype)
        a = a.reshape(-1, *[1] * (x_t.dim() - 1)) if a.dim() == 1 else a
        if kind == "sample":
            return (x_t - a.sqrt() * out) / (1 - a).sqrt()
        if kind == "v_prediction":
            return a.sqrt() * out + (1 - a).sqrt() * x_t
        raise ValueError(f"unsupported prediction_type {kind!r}")

    def add_noise(self, x0: torch.Tensor, t: torch.Tensor | int, noise: torch.Tensor) -> torch.Tensor:
        """Forward process q(x_t | x_0) = sqrt(ᾱ_t) x0 + sqrt(1-ᾱ_t) ε; ``t`` a scalar, one timestep per row (B,),
        or any shape that broadcasts against ``x0``."""
        a = self.alphas_cumprod[torch.as_tensor(t, device=self.alphas_cumprod.device).long()].to(x0.dtype)
        if a.dim() == 1 and a.numel() == x0.shape[0] and x0.dim() > 1:
            a = a.reshape(-1, *[1] * (x0.dim() - 1))
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    # ----------------------------------------------------------------------------- transitions
    def _split(self, x_t: torch.Tensor, out: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0_pred, eps_pred) from the model output, as diffusers does, before clipping."""
        a_t = self.alphas_cumprod[t].to(x_t.dtype)
        b_t = 1 - a_t
        kind = self.scheduler.config.prediction_type
        if kind == "epsilon":
            return (x_t - b_t.sqrt() * out) / a_t.sqrt(), out
        if kind == "sample":
            return out, (x_t - a_t.sqrt() * out) / b_t.sqrt()
        if kind == "v_prediction":
            return a_t.sqrt() * x_t - b_t.sqrt() * out, a_t.sqrt() * out + b_t.sqrt() * x_t
        raise ValueError(f"unsupported prediction_type {kind!r}")

    def _clip(self, x0: torch.Tensor) -> torch.Tensor:
        cfg = self.scheduler.config
        if getattr(cfg, "thresholding", False):
            raise NotImplementedError("dynamic thresholding is not supported; set thresholding=False")
        if cfg.clip_sample:
            r = cfg.clip_sample_range
            return x0.clamp(-r, r)
        return x0

    def transition(self, x_t: torch.Tensor, i: int, cond: Condition,
                   out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Gaussian transition at step i: (mean, std, x0_pred) with std a scalar tensor.
        ``out`` is the guided model output if already computed."""
        t = self.timesteps[i]
        out = self.model_output(x_t, i, cond) if out is None else out
        x0, eps = self._split(x_t, out, t)
        x0 = self._clip(x0)
        a_t = self.alphas_cumprod[t].to(x_t.dtype)
        a_prev = self._alpha_prev(i).to(x_t.dtype)
        if isinstance(self.scheduler, DDIMScheduler):
            variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
            std = self.eta * variance.sqrt()
            mean = a_prev.sqrt() * x0 + (1 - a_prev - std**2).sqrt() * eps
            return mean, std, x0
        # DDPM: the posterior mean of q(x_{t-1} | x_t, x0); the std per the scheduler's variance_type
        beta = 1 - a_t / a_prev
        mean = (a_prev.sqrt() * beta / (1 - a_t)) * x0 + ((1 - beta).sqrt() * (1 - a_prev) / (1 - a_t)) * x_t
        return mean, ddpm_std(a_t, a_prev, int(t), self.scheduler.config.variance_type), x0

    @property
    def stochastic(self) -> bool:
        return isinstance(self.scheduler, DDPMScheduler) or self.eta > 0

    def step_is_deterministic(self, i: int) -> bool:
        """Whether step i adds no noise (std 0: DDIM with η = 0; the last step of DDPM and of DDIM
        with ``set_alpha_to_one``), read from ``transition`` itself with a dummy output (no NFE)."""
        z = self.alphas_cumprod.new_zeros(1)
        return float(self.transition(z, i, None, out=z)[1]) == 0.0

    def deterministic_step(self, x_t, i, cond, out=None):
        """The DDIM η = 0 step from x_t at step i (for either scheduler: DDPM's next timestep is
        ``timesteps[i + 1]``), as diffusers' ``DDIMScheduler.step(eta=0)``; for look-ahead values."""
        out = self.model_output(x_t, i, cond) if out is None else out
        x0, eps = self._split(x_t, out, self.timesteps[i])
        a_prev = self._alpha_prev(i).to(x_t.dtype)
        return a_prev.sqrt() * self._clip(x0) + (1 - a_prev).sqrt() * eps

    def step(self, x_t, i, cond, noise=None, generator=None, out=None):
        return self.step_with_output(x_t, i, cond, noise, generator, out=out)[0]

    def step_with_output(self, x_t, i, cond, noise=None, generator=None, out=None) -> tuple[torch.Tensor, torch.Tensor]:
        """``step`` that also returns the guided model output (for ε-space KL regularisers)."""
        out = self.model_output(x_t, i, cond) if out is None else out
        mean, std, _ = self.transition(x_t, i, cond, out=out)
        if float(std) == 0.0:
            return mean, out
        if noise is None:
            dev = generator.device if generator is not None else x_t.device
            noise = torch.randn(x_t.shape, generator=generator, device=dev, dtype=x_t.dtype).to(x_t.device)
        return mean + std * noise, out

    @torch.no_grad()
    def base_model_output(self, x_t: torch.Tensor, i: int, cond: Condition) -> torch.Tensor:
        """The frozen pretrained model's guided output at step i (counted as NFE)."""
        with self.base_model():
            return self.model_output(x_t.detach(), i, cond)

    def predict_x0(self, x_t, i, cond, out=None):
        out = self.model_output(x_t, i, cond) if out is None else out
        return self._clip(self._split(x_t, out, self.timesteps[i])[0])

    def log_prob(self, x_t, i, x_prev, cond):
        """Gaussian log-density of x_prev, averaged over all non-batch dims (as DDPO's code does)."""
        mean, std, _ = self.transition(x_t, i, cond)
        return gaussian_log_prob(x_prev, mean, std)


DDPM_VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log")


def check_ddpm_variance_type(variance_type: str) -> None:
    """Raise unless ``variance_type`` is one ``ddpm_std`` implements (the model-predicted ones are not)."""
    if variance_type in DDPM_VARIANCE_TYPES:
        return
    why = (" (the model predicts its variance in extra output channels; rewardopt's transitions take one output "
           "channel per state channel)" if variance_type in ("learned", "learned_range") else "")
    raise NotImplementedError(
        f"DDPMScheduler variance_type={variance_type!r} is not supported{why}. Set the scheduler's variance_type to "
        f"one of {', '.join(DDPM_VARIANCE_TYPES)} (e.g. DDPMScheduler.from_config(config, variance_type='fixed_small')"
        "), or sample with DDIM."
    )


def ddpm_std(a_t: torch.Tensor, a_prev: torch.Tensor, t: int, variance_type: str) -> torch.Tensor:
    """Standard deviation (scalar tensor) of the DDPM step from ᾱ_t to ᾱ_prev (scalar tensors) at
    timestep t, as diffusers' ``DDPMScheduler.step`` draws it: no noise at t = 0; otherwise with
    β_t = 1 - ᾱ_t / ᾱ_prev,

    * ``fixed_small`` / ``fixed_small_log``: the posterior variance (1 - ᾱ_prev) / (1 - ᾱ_t) · β_t
      (exactly 0 when ᾱ_prev = 1, the last step, where diffusers clamps it to 1e-20: std 1e-10);
    * ``fixed_large``: β_t (so the last step adds noise when its timestep is not 0, as in diffusers);
    * ``fixed_large_log``: GLIDE's log-variance log β_t, which is diffusers' ``_get_variance`` — so
      std = exp(½ log β_t) = sqrt(β_t). Our reading: diffusers' ``step`` takes the square root of the
      log itself there (NaN), which we do not reproduce.
    """
    check_ddpm_variance_type(variance_type)
    beta = 1 - a_t / a_prev
    var = (1 - a_prev) / (1 - a_t) * beta if variance_type.startswith("fixed_small") else beta
    if t == 0 or float(var) <= 0:
        return a_t.new_zeros(())
    return var.clamp(min=1e-20).sqrt()


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Per-sample mean over dims of log N(x; mean, std²). Shapes: x, mean (B, ...); std scalar."""
    std = std.clamp(min=1e-12)
    lp = -((x.detach() - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return lp.flatten(1).mean(1)
