"""Contract test mixins. A domain's test class inherits one and provides a factory fixture:

    class TestMyGenerator(GeneratorContract):
        @pytest.fixture
        def make_generator(self):
            return lambda: MyGenerator(...)
        raw_conditions = ["a prompt", "another"]

Every generator and reward subclass then gets the same checks.
"""

from __future__ import annotations

import pytest
import torch

from rewardopt.generators.capabilities import (
    DeterministicStep,
    Renderable,
    TextSerialisable,
    Trainable,
    TransitionLogProbs,
)
from rewardopt.rewards.base import RewardError, RewardOutput


class GeneratorContract:
    """Checks every ``Generator`` must pass. Needs fixture ``make_generator`` and ``raw_conditions``."""

    raw_conditions: list = []

    def test_shapes_and_determinism(self, make_generator):
        g = make_generator()
        cond = g.encode_condition(self.raw_conditions)
        x = g.init_state(cond, torch.Generator().manual_seed(0))
        assert x.shape[0] == len(self.raw_conditions)
        x2 = g.init_state(cond, torch.Generator().manual_seed(0))
        assert torch.equal(x, x2), "init_state must be a pure function of the seed"
        with torch.no_grad():
            y = g.step(x, 0, cond, generator=torch.Generator().manual_seed(1))
            assert y.shape == x.shape
            assert g.predict_x0(x, 0, cond).shape == x.shape
            out = g.sample(cond, generator=torch.Generator().manual_seed(3))
            again = g.sample(cond, generator=torch.Generator().manual_seed(3))
        assert torch.allclose(out, again), "sampling must be reproducible for a seed"
        assert len(g.decode(out)) == len(self.raw_conditions)

    def test_injected_noise_is_used(self, make_generator):
        g = make_generator()
        cond = g.encode_condition(self.raw_conditions)
        x = g.init_state(cond, torch.Generator().manual_seed(0))
        n1, n2 = torch.randn_like(x), torch.randn_like(x)
        with torch.no_grad():
            a, b, a2 = g.step(x, 0, cond, noise=n1), g.step(x, 0, cond, noise=n2), g.step(x, 0, cond, noise=n1)
        assert torch.equal(a, a2)
        if not torch.equal(a, b):  # deterministic samplers ignore noise; stochastic must use it
            assert not torch.allclose(a, b)

    def test_model_output_is_reused_without_nfe(self, make_generator):
        """``step``/``predict_x0`` given ``out=model_output(...)`` equal the plain calls and spend no NFE
        (steering methods rely on this to value a candidate and step from it with one evaluation)."""
        g = make_generator()
        cond = g.encode_condition(self.raw_conditions)
        x = g.init_state(cond, torch.Generator().manual_seed(0))
        noise = torch.randn_like(x)
        with torch.no_grad():
            out = g.model_output(x, 0, cond)
            n0 = g.counter.nfe
            a, x0 = g.step(x, 0, cond, noise=noise, out=out), g.predict_x0(x, 0, cond, out=out)
            assert g.counter.nfe == n0, "passing out= must not evaluate the model again"
            assert torch.allclose(a, g.step(x, 0, cond, noise=noise), atol=1e-6)
            assert torch.allclose(x0, g.predict_x0(x, 0, cond), atol=1e-6)

    def test_nfe_counted(self, make_generator):
        g = make_generator()
        cond = g.encode_condition(self.raw_conditions)
        before = g.counter.nfe
        with torch.no_grad():
            g.sample(cond, generator=torch.Generator().manual_seed(0))
        assert g.counter.nfe - before == g.num_steps * len(self.raw_conditions)

    def test_gradient_reaches_trainable_parameters(self, make_generator):
        g = make_generator()
        params = g.trainable_parameters()
        assert params, "a generator used for fine-tuning must expose trainable parameters"
        cond = g.encode_condition(self.raw_conditions)
        x = g.sample(cond, generator=torch.Generator().manual_seed(0), grad_last_k=1)
        x.float().square().mean().backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)

    def test_declared_capabilities_behave(self, make_generator):
        """Each capability the generator declares does what it says (shapes, determinism, idempotence)."""
        g = make_generator()
        cond = g.encode_condition(self.raw_conditions)
        x = g.init_state(cond, torch.Generator().manual_seed(0))
        B = len(self.raw_conditions)
        with torch.no_grad():
            if isinstance(g, DeterministicStep):
                y = g.deterministic_step(x, 0, cond)
                assert y.shape == x.shape and torch.equal(y, g.deterministic_step(x, 0, cond))
            if isinstance(g, TransitionLogProbs):
                lp = g.log_prob(x, 0, g.step(x, 0, cond, generator=torch.Generator().manual_seed(1)), cond)
                assert lp.shape == (B,) and torch.isfinite(lp).all()
            samples = g.decode(g.sample(cond, generator=torch.Generator().manual_seed(2)))
            if isinstance(g, Renderable):
                pics = g.render(samples)
                assert pics.ndim == 4 and pics.shape[:2] == (B, 3) and 0 <= float(pics.min()) <= float(pics.max()) <= 1
            if isinstance(g, TextSerialisable):
                texts = g.to_text(samples)
                assert len(texts) == B and all(isinstance(t, str) and "\n" not in t for t in texts)
        if isinstance(g, Trainable):
            g.setup_trainable()
            first = [id(p) for p in g.trainable_parameters()]
            g.setup_trainable()  # idempotent: a method calls it again
            assert first and [id(p) for p in g.trainable_parameters()] == first
            with g.base_model():
                pass


class RewardContract:
    """Checks every ``Reward`` must pass. Needs fixtures ``make_reward`` and ``make_samples``
    (returning (samples, conditions))."""

    def test_output_shape_and_finite(self, make_reward, make_samples):
        r = make_reward()
        samples, cond = make_samples()
        out = r(samples, cond)
        assert isinstance(out, RewardOutput)
        assert out.total.shape == (len(samples),)
        assert torch.isfinite(out.total).all()
        assert out.terms, "rewards report named terms for logging"

    def test_deterministic(self, make_reward, make_samples):
        r = make_reward()
        samples, cond = make_samples()
        with torch.no_grad():
            assert torch.allclose(r(samples, cond).total, r(samples, cond).total)

    def test_gradient_matches_declaration(self, make_reward, make_samples):
        r = make_reward()
        samples, cond = make_samples()
        if not r.differentiable:
            pytest.skip("black-box reward")
        samples = samples.clone().requires_grad_(True)
        r(samples, cond).total.sum().backward()
        assert samples.grad is not None and samples.grad.abs().sum() > 0

    def test_wrong_batch_is_rejected(self, make_reward, make_samples):
        r = make_reward()
        samples, cond = make_samples()
        original = r.score
        r.score = lambda s, c: (original(s, c)[:-1] if isinstance(original(s, c), torch.Tensor)
                                else original(s, c).total[:-1])
        with pytest.raises(RewardError, match=r.name):
            r(samples, cond)
