"""The rectified-flow core (``rewardopt.generators.flow``): the ODE step is diffusers' FlowMatchEulerDiscreteScheduler
step, the SDE mode keeps the ODE's marginals on a Gaussian toy whose velocity is known in closed form, ``log_prob``
matches an independent Gaussian density, NFE is counted, and bad configurations are refused."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

from rewardopt.generators.base import Condition
from rewardopt.generators.flow import FlowMatchingGenerator  # noqa: F401  (ToyFlow's base)

MEAN, STD, DIM = 1.5, 0.5, 4  # the toy's data: x0 ~ N(MEAN, STD^2) per dimension


class ExactVelocity(torch.nn.Module):
    """v(x, σ) = E[ε − x0 | x_σ = x] for x0 ~ N(MEAN, STD²), x_σ = (1 − σ) x0 + σ ε (joint Gaussian)."""

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        s = (t / 1000.0).reshape(-1, *[1] * (x.dim() - 1)).to(x.dtype)
        var = (1 - s) ** 2 * STD**2 + s**2
        centred = x - (1 - s) * MEAN
        e_x0 = MEAN + (1 - s) * STD**2 / var * centred
        e_eps = s / var * centred
        return e_eps - e_x0


class ToyFlow(FlowMatchingGenerator):
    """A flow generator over (B, DIM) states whose network is the exact velocity (conditions are ignored)."""

    def __init__(self, **kwargs) -> None:
        kwargs.setdefault("guidance_scale", 1.0)
        super().__init__(FlowMatchEulerDiscreteScheduler(shift=kwargs.pop("shift", 1.0)), **kwargs)
        self.denoiser = ExactVelocity()

    def encode_condition(self, raw) -> Condition:
        return Condition(list(raw), {"dummy": torch.zeros(len(raw), 1)})

    def _denoiser_output(self, denoiser, x, t, tensors):
        return denoiser(x, t)

    def init_state(self, cond, generator=None):
        return torch.randn(len(cond), DIM, generator=generator)

    def decode(self, x0):
        return x0


def marginal(sigma: float) -> tuple[float, float]:
    """Mean and std of x_σ."""
    return (1 - sigma) * MEAN, math.sqrt((1 - sigma) ** 2 * STD**2 + sigma**2)


def test_ode_step_is_the_schedulers_step_and_the_sampler_reaches_the_data():
    g = ToyFlow(num_steps=10, shift=3.0)
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(10)
    torch.testing.assert_close(g.timesteps, sched.timesteps.float())
    torch.testing.assert_close(g.sigmas, sched.sigmas.float())
    cond = g.encode_condition(["a"] * 3)
    x = torch.randn(3, DIM, generator=torch.Generator().manual_seed(0))
    for i, t in enumerate(sched.timesteps):
        out = g.model_output(x, i, cond)
        ours = g.step(x, i, cond, out=out)
        theirs = sched.step(out, t, x, return_dict=False)[0]
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
        x = theirs
    assert g.counter.nfe == 10 * 3
    # the exact velocity's ODE carries N(0, 1) to N(MEAN, STD^2) (up to the Euler error: 200 steps)
    g = ToyFlow(num_steps=200)
    x = g.sample(g.encode_condition(["a"] * 4000), generator=torch.Generator().manual_seed(1), grad_last_k=0)
    assert float(x.mean()) == pytest.approx(MEAN, abs=0.02) and float(x.std()) == pytest.approx(STD, abs=0.02)


def test_x0_and_noise_are_read_off_the_velocity():
    g = ToyFlow(num_steps=4)
    x0 = torch.randn(5, DIM, generator=torch.Generator().manual_seed(2))
    eps = torch.randn(5, DIM, generator=torch.Generator().manual_seed(3))
    i = 1
    t = g.timesteps[i]
    s = float(g.sigmas[i])
    x_t = g.add_noise(x0, t, eps)
    torch.testing.assert_close(x_t, (1 - s) * x0 + s * eps)
    torch.testing.assert_close(x_t, FlowMatchEulerDiscreteScheduler().scale_noise(x0, t[None], eps))
    v = eps - x0  # a network that knew the pair would predict this velocity
    torch.testing.assert_close(g.predict_x0(x_t, i, None, out=v), x0, rtol=1e-5, atol=1e-5)
    x0_hat, eps_hat = g._split(x_t, v, t)
    torch.testing.assert_close(eps_hat, eps, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("noise_level", [0.5, 0.7])
def test_sde_preserves_the_odes_marginals_on_a_gaussian_toy(noise_level):
    """Flow-GRPO's SDE with the exact velocity: the samples' mean and std follow the flow's marginal
    N((1 − σ) m, (1 − σ)² s² + σ²) step by step, and end at the data's. Near σ = 1 the diffusion coefficient
    g² = a² σ / (1 − σ) diverges, so the first steps inject O(a) noise whatever the step size (Flow-GRPO's σ_1
    stand-in at σ = 1 included): a few-% start-up error that decays as σ falls — measured, not hidden."""
    steps = 160  # the ODE's own Euler error at the end: 0.95% of the std at 160 steps, 3.7% at 40
    g = ToyFlow(num_steps=steps, sde_noise_level=noise_level)
    cond = g.encode_condition(["a"] * 20000)
    rng = torch.Generator().manual_seed(0)
    x = g.init_state(cond, rng)
    errors = []  # (σ, |mean error|, relative std error)
    for i in range(steps):
        assert not g.step_is_deterministic(i)
        x = g.step(x, i, cond, generator=rng)
        s = float(g.sigmas[i + 1])
        m, sd = marginal(s)
        errors.append((s, abs(float(x.mean()) - m), abs(float(x.std()) - sd) / sd))
    assert max(max(e[1], e[2]) for e in errors) < 0.07  # the start-up error stays bounded (measured 0.05 at a=0.7)
    assert max(max(e[1], e[2]) for e in errors if e[0] <= 0.6) < 0.02
    assert errors[-1][1] < 0.005 and errors[-1][2] < 0.01  # the data's N(m, s²) at the end
    # and the SDE is not the ODE: children of one state differ
    x = g.init_state(g.encode_condition(["a"]), torch.Generator().manual_seed(5)).expand(2, -1)
    a, b = g.step(x, 3, cond, generator=torch.Generator().manual_seed(6)).unbind(0)
    assert not torch.allclose(a, b)


def test_sde_without_the_marginal_correction_would_drift():
    """Control for the test above: noise added to the ODE step without the score correction inflates the variance
    well beyond the tolerance (so the marginal check can fail)."""
    steps, a = 40, 0.7
    g = ToyFlow(num_steps=steps, sde_noise_level=a)
    cond = g.encode_condition(["a"] * 20000)
    rng = torch.Generator().manual_seed(0)
    x = g.init_state(cond, rng)
    for i in range(steps):
        out = g.model_output(x, i, cond)
        _, std, _ = g.transition(x, i, cond, out=out)
        x = g.deterministic_step(x, i, cond, out=out) + std * torch.randn(x.shape, generator=rng)
    assert float(x.std()) > 1.2 * STD


def test_log_prob_matches_an_independent_gaussian_density():
    g = ToyFlow(num_steps=10, sde_noise_level=0.7, sde_window=[2, 6])
    cond = g.encode_condition(["a"] * 6)
    x = torch.randn(6, DIM, generator=torch.Generator().manual_seed(0))
    for i in (0, 3, 5):
        v = ExactVelocity()(x, g.timesteps[i].expand(6))
        s, s_next = float(g.sigmas[i]), float(g.sigmas[i + 1])
        d = s_next - s
        denom = float(g.sigmas[1]) if s == 1.0 else s  # Flow-GRPO's stand-in at σ = 1
        g2 = 0.7**2 * s / (1 - denom)
        mean = x + (v + g2 / (2 * s) * (x + (1 - s) * v)) * d  # dx = [v + g²/(2σ)(x + (1 − σ)v)] dσ
        std = math.sqrt(g2 * -d)
        x_prev = mean + std * torch.randn(x.shape, generator=torch.Generator().manual_seed(i))
        if not 2 <= i < 6:  # outside the window: ODE steps, no density
            assert g.step_is_deterministic(i)
            torch.testing.assert_close(g.step(x, i, cond), x + d * v, rtol=1e-5, atol=1e-6)
            continue
        expected = torch.distributions.Normal(mean, std).log_prob(x_prev).mean(1)
        torch.testing.assert_close(g.log_prob(x, i, x_prev, cond), expected, rtol=1e-5, atol=1e-5)
        m, sd, _ = g.transition(x, i, cond)
        torch.testing.assert_close(m, mean, rtol=1e-5, atol=1e-6)
        assert float(sd) == pytest.approx(std, rel=1e-5)


def test_sde_window_and_counts():
    g = ToyFlow(num_steps=6, sde_noise_level=0.7, sde_window=[1, 3])
    assert [g.step_is_deterministic(i) for i in range(6)] == [True, False, False, True, True, True]
    assert g.stochastic
    g.sample(g.encode_condition(["a"] * 5), generator=torch.Generator().manual_seed(0), grad_last_k=0)
    assert g.counter.nfe == 6 * 5


def test_bad_configurations_are_refused():
    with pytest.raises(NotImplementedError, match="FlowMatchEulerDiscreteScheduler"):
        ToyFlow.__mro__[1].init_schedule(ToyFlow(num_steps=2), DDIMScheduler(), 4)
    with pytest.raises(ValueError, match="eta"):
        ToyFlow(num_steps=4, eta=0.5)
    with pytest.raises(ValueError, match="sde_noise_level"):
        ToyFlow(num_steps=4, sde_noise_level=-1)
    with pytest.raises(ValueError, match="sde_window"):
        ToyFlow(num_steps=4, sde_noise_level=0.7, sde_window=[3, 9])
    g = ToyFlow(num_steps=2)
    with pytest.raises(ValueError, match="mu"):
        g.init_schedule(FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True), 4)
    with pytest.raises(NotImplementedError, match="stochastic_sampling"):
        g.init_schedule(FlowMatchEulerDiscreteScheduler(stochastic_sampling=True), 4)
    from rewardopt.generators.diffusion import DiffusionGenerator

    with pytest.raises(TypeError, match="schedule options"):
        DiffusionGenerator.init_schedule(g, DDIMScheduler(), 4, sde_noise_level=0.7)


def test_a_schedule_starting_just_below_one_gets_the_sigma_one_stand_in():
    """σ₀ = 0.9999 (a user's sigmas) takes σ₁ in the first step's denominator as σ₀ = 1 does, instead of a noise
    variance 10⁴ times the next step's; later steps keep their own σ."""
    exact = ToyFlow(num_steps=4, sde_noise_level=0.7, sigmas=[1.0, 0.75, 0.5, 0.25])
    near = ToyFlow(num_steps=4, sde_noise_level=0.7, sigmas=[0.9999, 0.75, 0.5, 0.25])
    assert float(near.sigmas[0]) == pytest.approx(0.9999)
    assert float(near.sde_coefficient(0)) == pytest.approx(0.49 * 0.9999 / 0.25, rel=1e-4)
    assert float(near.sde_coefficient(0)) == pytest.approx(float(exact.sde_coefficient(0)), rel=1e-3)
    assert float(near.sde_coefficient(1)) == pytest.approx(0.49 * 0.75 / 0.25, rel=1e-5)
    later = ToyFlow(num_steps=3, sde_noise_level=0.7, sigmas=[1.0, 0.9995, 0.5])
    assert float(later.sde_coefficient(1)) == pytest.approx(0.49 * 0.9995 / 0.0005, rel=1e-3)  # i > 0: its own σ
    with pytest.raises(ValueError, match="at least 2 steps"):
        ToyFlow(num_steps=1, sde_noise_level=0.7, sigmas=[0.9995]).sde_coefficient(0)


def test_ode_sampling_restores_the_noise_level_on_error():
    g = ToyFlow(num_steps=4, sde_noise_level=0.7)
    with pytest.raises(RuntimeError, match="inside"):
        with g.ode_sampling():
            assert g.sde_noise_level == 0.0
            raise RuntimeError("inside")
    assert g.sde_noise_level == 0.7 and g.stochastic
