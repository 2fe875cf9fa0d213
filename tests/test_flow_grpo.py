"""Flow-GRPO (Liu et al. 2025; yifan123/flow_grpo) on a tiny flow model: group-relative advantages (global or group
std, pooled across processes), the "Fast" SDE window (only its steps are SDE steps and trained), the KL to the base
model, the CFG-free option, on-policy ratios of 1 and the counted compute."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from domains.images.rewards import JpegCompressibilityReward
from rewardopt.methods.flow_grpo import FlowGRPO, group_relative_advantages
from tests.conftest import tiny_flow_generator, tiny_generator
from tests.test_ddpo import fit


def test_group_relative_advantages():
    prompts = ["a", "a", "b", "b", "b"]
    r = np.array([1.0, 3.0, 0.0, 2.0, 4.0])
    glob = group_relative_advantages(prompts, r, global_std=True, eps=0.0)
    assert np.allclose(glob, np.array([-1, 1, -2, 0, 2]) / r.std())
    grp = group_relative_advantages(prompts, r, global_std=False, eps=0.0)
    assert np.allclose(grp, [-1, 1, -2 / np.std([0, 2, 4]), 0, 2 / np.std([0, 2, 4])])
    out = group_relative_advantages(["a", "a", "a", "b", "b"], np.array([1.0, -np.inf, 3.0, 5.0, 5.0]), False)
    assert out[1] == 0 and np.allclose(out[[0, 2]], [-1, 1], atol=1e-3) and (out[3:] == 0).all()  # equal group: 0


def test_refusals():
    with pytest.raises(TypeError, match="FlowMatchingGenerator"):
        FlowGRPO(tiny_generator(eta=1.0), JpegCompressibilityReward())
    with pytest.raises(ValueError, match="sde_noise_level"):
        FlowGRPO(tiny_flow_generator(), JpegCompressibilityReward())
    g = tiny_flow_generator(sde_noise_level=0.7)
    with pytest.raises(ValueError, match="group_size"):
        FlowGRPO(g, JpegCompressibilityReward(), group_size=1)
    with pytest.raises(ValueError, match="sde_window_size"):
        FlowGRPO(g, JpegCompressibilityReward(), sde_window_size=3, sde_window_range=[0, 2])
    with pytest.raises(ValueError, match="needs sde_window_size"):
        FlowGRPO(g, JpegCompressibilityReward(), sde_window_range=[0, 2])


def test_advantages_are_pooled_across_processes(monkeypatch):
    """Under DDP each process's advantages are its slice of those computed on every process's samples (a group split
    across processes is one group)."""
    m = FlowGRPO(tiny_flow_generator(sde_noise_level=0.7), JpegCompressibilityReward(), group_size=2,
                 global_std=False)
    other = (["a", "b"], [5.0, 0.0])  # rank 1's samples
    monkeypatch.setattr(m, "rank_and_world", lambda: (0, 2))
    monkeypatch.setattr(m, "gather", lambda obj: [obj, other])
    adv = m.advantages(["a", "a"], torch.tensor([1.0, 3.0]))
    expected = group_relative_advantages(["a", "a", "a", "b"], np.array([1.0, 3.0, 5.0, 0.0]), global_std=False)
    assert np.allclose(adv.numpy(), expected[:2], atol=1e-6)
    assert not np.allclose(adv.numpy(), group_relative_advantages(["a", "a"], np.array([1.0, 3.0]), False)[:2])


def test_fast_window_trains_only_its_sde_steps(tmp_path):
    g = tiny_flow_generator(num_steps=6, sde_noise_level=0.7)
    m = FlowGRPO(g, JpegCompressibilityReward(), group_size=2, num_minibatches=1, sde_window_size=2,
                 sde_window_range=[1, 5], clip_range=0.2, lr=1e-2, output_dir=str(tmp_path))
    windows = [m.draw_window(torch.Generator().manual_seed(s)) for s in range(200)]
    assert {w for w in windows} == {(1, 3), (2, 4), (3, 5)}
    trained, sampled = [], []
    transition = g.transition

    def recording(x, i, cond, out=None):
        (trained if torch.is_grad_enabled() else sampled).append((i, g.sde_at(i)))
        return transition(x, i, cond, out=out)

    g.transition = recording
    before = [p.detach().clone() for p in g.trainable_parameters()]
    fit(m, 1, tmp_path, batch_size=2)
    window = [i for i, sde in sampled if sde]
    assert len(set(window)) == 2 and max(window) - min(window) == 1  # one window of 2 steps in the batch
    assert {i for i, _ in trained} == set(window) and all(sde for _, sde in trained)
    assert g.sde_window == (0, 6)  # restored after the step
    assert any(not torch.equal(a, b) for a, b in zip(before, g.trainable_parameters()))


def test_first_ratio_is_one_and_cfg_free_training_uses_the_unguided_policy(tmp_path):
    for cfg_training in (True, False):
        g = tiny_flow_generator(num_steps=3, sde_noise_level=0.7, guidance_scale=3.0)
        m = FlowGRPO(g, JpegCompressibilityReward(), group_size=2, num_minibatches=1, cfg_training=cfg_training,
                     output_dir=str(tmp_path))
        ratios, scales = [], []
        step_loss, transition = m.step_loss, g.transition

        def recording(*args, **kwargs):
            loss, diff, ratio = step_loss(*args, **kwargs)
            ratios.append(ratio.detach())
            return loss, diff, ratio

        def guidance(*args, **kwargs):
            scales.append(g.guidance_scale)
            return transition(*args, **kwargs)

        m.step_loss, g.transition = recording, guidance
        fit(m, 1, tmp_path, batch_size=1)
        torch.testing.assert_close(torch.cat(ratios), torch.ones(6), rtol=0, atol=1e-5)  # 1 minibatch: on-policy
        assert set(scales) == ({3.0} if cfg_training else {1.0})  # sampling and training alike
        assert g.guidance_scale == 3.0


def test_the_policy_gradient_raises_the_log_prob_of_positive_advantages(tmp_path):
    """At ratio 1 the loss's gradient is −Σ A·∇log p (PPO's surrogate), and one small step along it raises log p of
    the row with A > 0 and lowers it for A < 0 — a flipped sign fails both."""
    g = tiny_flow_generator(num_steps=3, sde_noise_level=0.7)
    m = FlowGRPO(g, JpegCompressibilityReward(), group_size=2, clip_range=10.0, output_dir=str(tmp_path))
    cond = g.encode_condition(["one red circle"] * 2)
    x = g.init_state(cond, torch.Generator().manual_seed(0))
    x_next = g.step(x, 0, cond, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # off zero, so the LoRA weights' gradients are not degenerate
        for p in g.trainable_parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    params = [p for p in g.trainable_parameters()]
    adv = torch.tensor([1.0, -1.0])
    old = g.log_prob(x, 0, x_next, cond).detach()
    loss, diff, ratio = m.step_loss(x, 0, x_next, cond, old, adv)
    torch.testing.assert_close(ratio.detach(), torch.ones(2), rtol=0, atol=1e-6)
    grads = torch.autograd.grad(loss, params)
    ref = torch.autograd.grad(-(adv * g.log_prob(x, 0, x_next, cond)).sum(), params)
    for a, b in zip(grads, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-8)
    with torch.no_grad():
        for p, d in zip(params, grads):
            p.sub_(1e-3 * d / max(float(torch.cat([q.flatten() for q in grads]).norm()), 1e-12))
        new = g.log_prob(x, 0, x_next, cond)
    assert new[0] > old[0] and new[1] < old[1]


def test_kl_to_the_base_model(tmp_path):
    g = tiny_flow_generator(num_steps=3, sde_noise_level=0.7)
    m = FlowGRPO(g, JpegCompressibilityReward(), group_size=2, beta=0.5, output_dir=str(tmp_path))
    cond = g.encode_condition(["one red circle"] * 2)
    x = g.init_state(cond, torch.Generator().manual_seed(0))
    x_next = g.step(x, 0, cond, generator=torch.Generator().manual_seed(1))
    zero_adv = torch.zeros(2)
    old = g.log_prob(x, 0, x_next, cond).detach()
    m._kl_sum, m._kl_pairs = torch.zeros(()), 0
    loss, _, _ = m.step_loss(x, 0, x_next, cond, old, zero_adv)
    assert float(m._kl_sum) == pytest.approx(0.0, abs=1e-10)  # LoRA starts at zero: the policy is the base model
    with torch.no_grad():  # move the LoRA weights off zero
        for p in g.trainable_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    m._kl_sum, m._kl_pairs = torch.zeros(()), 0
    loss, _, _ = m.step_loss(x, 0, x_next, cond, old, zero_adv)
    mean, std, _ = g.transition(x, 0, cond)
    with torch.no_grad(), g.base_model():
        ref, _, _ = g.transition(x, 0, cond)
    # the reference's term: the squared mean difference over 2 g², g² = a² σ / (1 − σ₁) at σ = 1 (std = g sqrt|dσ|)
    g2 = 0.7**2 * float(g.sigmas[0]) / (1 - float(g.sigmas[1]))
    assert float(std) ** 2 == pytest.approx(g2 * float(g.sigmas[0] - g.sigmas[1]), rel=1e-5)
    expected = ((mean - ref) ** 2).flatten(1).mean(1) / (2 * g2)
    assert float(expected.sum()) > 0
    torch.testing.assert_close(loss, 0.5 * expected.sum(), rtol=1e-5, atol=1e-8)  # advantage 0: the KL alone
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in g.trainable_parameters())


def test_counted_compute_and_ode_evaluation(tmp_path):
    T, G, prompts = 4, 2, 2
    g = tiny_flow_generator(num_steps=T, sde_noise_level=0.7)
    m = FlowGRPO(g, JpegCompressibilityReward(), group_size=G, num_minibatches=1, beta=0.1,
                 output_dir=str(tmp_path))
    fit(m, 1, tmp_path, batch_size=prompts)
    n = G * prompts
    # sampling: T steps per sample; training: each SDE step once per sample (+1 for the base model's KL)
    assert g.counter.nfe == n * T + n * T * 2 and g.counter.samples == n
    a = m.sample_decoded(["one red circle"], seed=3)
    b = m.sample_decoded(["one red circle"], seed=3)
    torch.testing.assert_close(a, b)
    m.eval_sde = True  # the same seed through the SDE: another sample, so ``a`` came from the ODE
    assert (m.sample_decoded(["one red circle"], seed=3) - a).abs().max() > 1e-3
    m.eval_sde = False
    with g.ode_sampling():
        assert g.sde_noise_level == 0.0 and not g.stochastic
    assert g.sde_noise_level == 0.7
