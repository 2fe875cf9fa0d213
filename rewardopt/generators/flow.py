"""Flow matching / rectified flow (the SD3 and FLUX families) over diffusers' ``FlowMatchEulerDiscreteScheduler``:
velocity prediction, classifier-free guidance, Euler ODE steps, and an SDE mode for steering and RL.

A rectified flow is a Gaussian diffusion whose forward process is x_σ = (1 − σ) x_0 + σ ε (σ from 1 = noise to 0 =
data; the network's timestep is t = σ · ``num_train_timesteps``) and whose network predicts the velocity
v = ε − x_0. So ``FlowMatchingGenerator`` *is* a ``DiffusionGenerator``: it keeps that class's LoRA (peft), full
fine-tuning, gradient checkpointing, CFG and counters, and its Gaussian-transition interface (``transition`` ->
(mean, std, x̂0), ``step_with_output``, ``base_model_output``, ``add_noise``, ``noise_prediction``), so every method
written against continuous diffusion runs on flow models unchanged. It replaces the DDIM/DDPM schedule by the flow's
σ schedule, set exactly as diffusers' pipelines set it: ``scheduler.set_timesteps(num_steps, sigmas=, mu=)`` with
the scheduler's own shift / dynamic shifting (``domains/images/flow.py`` computes ``sigmas`` and ``mu`` as
``StableDiffusion3Pipeline`` and ``FluxPipeline`` do).

With E[x_0 | x_σ] and E[ε | x_σ] read off the velocity (E[ε − x_0] = v, (1 − σ) E[x_0] + σ E[ε] = x_σ):

* x̂0 = x_σ − σ v  (``predict_x0``),  ε̂ = x_σ + (1 − σ) v  (``noise_prediction``),
* the ODE (Euler) step from σ_i to σ_{i+1}: x' = x + (σ_{i+1} − σ_i) v, as ``FlowMatchEulerDiscreteScheduler.step``.

SDE mode (Flow-GRPO: Liu et al. 2025, "Flow-GRPO: Training Flow Matching Models via Online RL", arXiv 2505.05470;
reference code yifan123/flow_grpo). The score of the flow's marginal p_σ is ∇ log p_σ(x) = −E[ε | x] / σ =
−(x + (1 − σ) v) / σ. Adding (g²/2)·(Δ log p) − ∇·(p (g²/2) ∇ log p) = 0 to the ODE's Fokker–Planck equation shows
that, for any diffusion coefficient g_σ, the reverse-time SDE

    dx = [v + g_σ² / (2σ) · (x + (1 − σ) v)] dσ + g_σ dw̄        (dσ < 0)

has the same marginals p_σ as the ODE dx = v dσ. Flow-GRPO takes g_σ = a·sqrt(σ / (1 − σ)) with a noise level ``a``
(paper: 0.7). Its Euler–Maruyama step from σ = σ_i to σ_{i+1} (dσ = σ_{i+1} − σ_i < 0) is the Gaussian

    mean = x · (1 + g² dσ / (2σ)) + v · (1 + g² (1 − σ) / (2σ)) · dσ,      std = g · sqrt(−dσ),

i.e. with g² = a² σ / (1 − σ): mean = x (1 + a² dσ / (2 (1 − σ))) + v (1 + a² / 2) dσ. At a = 0 it is the ODE step.
At σ = 1 (the first step) g diverges; as the reference code does, σ_1 (the schedule's second σ) stands for σ in the
denominator 1 − σ there. The discretisation is first order: marginals are preserved up to O(dσ) (a test checks them
on a Gaussian toy whose velocity is known in closed form). ``sde_window`` = [start, end) limits the SDE to those step
indices (MixGRPO / Flow-GRPO-Fast); the others are ODE steps. ``log_prob`` is the step's Gaussian log-density averaged
over dimensions, as the diffusion family's (and Flow-GRPO's code) is.

A subclass supplies the network call (``_denoiser_output(denoiser, x, t, tensors)``, ``t`` the float timestep
σ · ``num_train_timesteps``, one per row), the unconditional tensors for CFG, ``encode_condition``, ``init_state``
and ``decode``; see ``domains/images/flow.py``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from rewardopt.generators.base import Condition
from rewardopt.generators.diffusion import DiffusionGenerator


class FlowMatchingGenerator(DiffusionGenerator):
    """A rectified-flow sampler (velocity prediction) with Euler ODE steps and Flow-GRPO's SDE steps.

    Args (``DiffusionGenerator``'s, with these schedule options; ``eta`` must stay 0):
        scheduler: a diffusers ``FlowMatchEulerDiscreteScheduler`` (its shift, dynamic shifting, Karras/exponential
            sigmas and ``shift_terminal`` apply through its own ``set_timesteps``).
        sde_noise_level: Flow-GRPO's noise level a (0: the deterministic ODE sampler, the pipelines' own; the paper
            trains with 0.7).
        sde_window: [start, end) step indices where the SDE applies when ``sde_noise_level`` > 0 (None: every step).
        sigmas, mu: passed to ``scheduler.set_timesteps`` as the family's pipeline passes them (FLUX: a linear σ
            grid and a resolution-dependent ``mu``; SD3: none, or ``mu`` with dynamic shifting).
    """

    def init_schedule(self, scheduler: FlowMatchEulerDiscreteScheduler, num_steps: int,
                      sde_noise_level: float = 0.0, sde_window: Sequence[int] | None = None,
                      sigmas: Sequence[float] | None = None, mu: float | None = None) -> None:
        """The flow's σ schedule, set as the pipelines set it (``scheduler.set_timesteps(num_steps, sigmas=, mu=)``),
        and the SDE's options; called by ``DiffusionGenerator.__init__`` (which holds the knobs every continuous
        generator shares: guidance, checkpointing, LoRA, full fine-tuning)."""
        if not isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
            raise NotImplementedError(f"{type(scheduler).__name__} is not supported; FlowMatchingGenerator steps with "
                                      "FlowMatchEulerDiscreteScheduler's sigmas (DDIM/DDPM: DiffusionGenerator)")
        cfg = scheduler.config
        if cfg.invert_sigmas:
            raise NotImplementedError("invert_sigmas=True (Mochi's inverted schedule) is not supported")
        if cfg.stochastic_sampling:
            raise NotImplementedError("the scheduler's stochastic_sampling is not supported; use sde_noise_level > 0 "
                                      "(Flow-GRPO's marginal-preserving SDE) for a stochastic sampler")
        if self.eta != 0.0:
            raise ValueError(f"eta={self.eta} is DDIM's; a flow model's stochasticity is sde_noise_level (Flow-GRPO)")
        if sde_noise_level < 0:
            raise ValueError(f"sde_noise_level must be >= 0 (Flow-GRPO: 0.7), got {sde_noise_level}")
        if cfg.use_dynamic_shifting and mu is None:
            raise ValueError("the scheduler has use_dynamic_shifting=True: pass mu (the pipelines compute it from the "
                             "image's token count with diffusers' calculate_shift)")
        self.sde_noise_level = float(sde_noise_level)
        self.schedule_sigmas, self.mu = None if sigmas is None else [float(v) for v in sigmas], mu
        scheduler.set_timesteps(num_steps, sigmas=self.schedule_sigmas, mu=mu)
        if len(scheduler.timesteps) != num_steps:
            raise ValueError(f"sigmas has {len(scheduler.timesteps)} entries, num_steps is {num_steps}")
        self.sde_window = self._check_window(sde_window, num_steps)
        self.register_buffer("_timesteps", scheduler.timesteps.clone().float(), persistent=False)
        self.register_buffer("sigmas", scheduler.sigmas.clone().float(), persistent=False)  # (T + 1,), ends at 0
        # The VP-equivalent ᾱ of each training timestep t (σ = t / N): x_σ / sqrt((1-σ)² + σ²) = sqrt(ᾱ) x_0 +
        # sqrt(1 - ᾱ) ε with ᾱ = (1-σ)² / ((1-σ)² + σ²), for code that weighs by ᾱ_t (SDS's w = 1 - ᾱ_t).
        s = torch.arange(cfg.num_train_timesteps, dtype=torch.float32) / cfg.num_train_timesteps
        self.register_buffer("alphas_cumprod", (1 - s) ** 2 / ((1 - s) ** 2 + s**2), persistent=False)

    @staticmethod
    def _check_window(window: Sequence[int] | None, T: int) -> tuple[int, int]:
        if window is None:
            return (0, T)
        start, end = (int(v) for v in window)
        if not 0 <= start < end <= T:
            raise ValueError(f"sde_window={list(window)} must be [start, end) step indices with 0 <= start < end <= "
                             f"num_steps={T}")
        return (start, end)

    # ----------------------------------------------------------------------------- schedule
    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler.config.num_train_timesteps)

    def sde_at(self, i: int) -> bool:
        """Whether step i is an SDE step (noise level > 0 and i in ``sde_window``)."""
        return self.sde_noise_level > 0 and self.sde_window[0] <= i < self.sde_window[1]

    @property
    def stochastic(self) -> bool:
        return self.sde_noise_level > 0

    def step_is_deterministic(self, i: int) -> bool:
        return not self.sde_at(i)

    @contextmanager
    def ode_sampling(self) -> Iterator[None]:
        """Sample with the deterministic ODE (noise level 0) inside the block; the noise level is restored after,
        also on error. Flow-GRPO evaluates held-out samples this way."""
        saved = self.sde_noise_level
        self.sde_noise_level = 0.0
        try:
            yield
        finally:
            self.sde_noise_level = saved

    def _sigma_of(self, t: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
        """σ = t / N for a timestep ``t`` (a scalar, one per row (B,), or a shape that broadcasts against ``like``)."""
        s = torch.as_tensor(t, device=like.device, dtype=torch.float32) / self.num_train_timesteps
        if s.dim() == 1 and s.numel() == like.shape[0] and like.dim() > 1:
            s = s.reshape(-1, *[1] * (like.dim() - 1))
        return s.to(like.dtype)

    # ----------------------------------------------------------------------------- the network
    def predict_noise_at(self, x_t: torch.Tensor, t: torch.Tensor | float, cond: Condition) -> torch.Tensor:
        """The guided velocity v̂(x_t; c, t) at the float timestep ``t`` (a scalar, or one per row (B,)); counts one
        NFE per row (a CFG pass over B rows counts B). The name is the diffusion family's: it is the model output."""
        t = torch.as_tensor(t, device=x_t.device, dtype=torch.float32)
        self.counter.nfe += x_t.shape[0]
        if torch.is_grad_enabled():
            self.counter.nfe_grad += x_t.shape[0]
        t = t.expand(x_t.shape[0]) if t.dim() == 0 else t
        uncond = self._uncond_tensors(cond) if self.guidance_scale != 1.0 else None
        if uncond is None:
            return self._call_denoiser(x_t, t, cond.tensors)
        tensors = {k: torch.cat([uncond[k], cond.tensors[k]]) for k in cond.tensors}
        out = self._call_denoiser(torch.cat([x_t, x_t]), torch.cat([t, t]), tensors)
        out_u, out_c = out.chunk(2)
        return out_u + self.guidance_scale * (out_c - out_u)

    def noise_prediction(self, x_t: torch.Tensor, t: torch.Tensor | float, cond: Condition) -> torch.Tensor:
        """The guided ε̂ = x_t + (1 − σ) v̂ (E[ε | x_t]); ``t`` a scalar timestep or one per row (B,). Counts NFE as
        ``predict_noise_at``."""
        v = self.predict_noise_at(x_t, t, cond)
        return x_t + (1 - self._sigma_of(t, x_t)) * v

    def add_noise(self, x0: torch.Tensor, t: torch.Tensor | float, noise: torch.Tensor) -> torch.Tensor:
        """The flow's forward process x_t = (1 − σ) x0 + σ ε with σ = t / N (``FlowMatchEulerDiscreteScheduler.
        scale_noise``); ``t`` a scalar, one per row (B,), or a shape that broadcasts against ``x0``."""
        s = self._sigma_of(t, x0)
        return (1 - s) * x0 + s * noise

    def _split(self, x_t: torch.Tensor, out: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x̂0, ε̂) from the velocity at timestep t: (x_t − σ v, x_t + (1 − σ) v)."""
        s = self._sigma_of(t, x_t)
        return x_t - s * out, x_t + (1 - s) * out

    # ----------------------------------------------------------------------------- transitions
    def sde_coefficient(self, i: int) -> torch.Tensor:
        """g² = a² σ_i / (1 − σ_i) of step i (σ_1 in the denominator where σ_i = 1, as Flow-GRPO's code; "= 1" within
        1e-3, so a schedule starting at 0.9999 does not blow the first step's noise up 10⁴-fold)."""
        sigma = self.sigmas[i]
        near_one = i == 0 and float(sigma) > 1.0 - 1e-3
        if near_one and self.num_steps < 2:  # one step from σ ≈ 1 to 0: nothing to stand in for σ
            raise ValueError("the SDE needs at least 2 steps when the schedule starts at σ = 1")
        denom_sigma = self.sigmas[1] if near_one else sigma
        return self.sde_noise_level**2 * sigma / (1 - denom_sigma)

    def transition(self, x_t: torch.Tensor, i: int, cond: Condition,
                   out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Step i as a Gaussian: (mean, std, x̂0), std a scalar tensor (0 on ODE steps). Computed in float32 and cast
        back, as the scheduler's ``step`` does."""
        out = self.model_output(x_t, i, cond) if out is None else out
        sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
        dt = sigma_next - sigma
        x, v = x_t.float(), out.float()
        x0 = (x - sigma * v).to(x_t.dtype)
        if not self.sde_at(i):
            return (x + dt * v).to(x_t.dtype), sigma.new_zeros(()), x0
        g2 = self.sde_coefficient(i)
        mean = x * (1 + g2 * dt / (2 * sigma)) + v * (1 + g2 * (1 - sigma) / (2 * sigma)) * dt
        return mean.to(x_t.dtype), (g2 * -dt).sqrt(), x0

    def deterministic_step(self, x_t, i, cond, out=None):
        """The Euler ODE step x + (σ_{i+1} − σ_i) v (what the pipelines sample with), for look-ahead values."""
        out = self.model_output(x_t, i, cond) if out is None else out
        dt = self.sigmas[i + 1] - self.sigmas[i]
        return (x_t.float() + dt * out.float()).to(x_t.dtype)

    def predict_x0(self, x_t, i, cond, out=None):
        out = self.model_output(x_t, i, cond) if out is None else out
        return (x_t.float() - self.sigmas[i] * out.float()).to(x_t.dtype)

    # log_prob, step, step_with_output, base_model_output: DiffusionGenerator's, over this ``transition``.
