"""Regression tests for the fine-tuning review (issue 12, items 16-18): AlignProp's truncation
schedules as in the reference code, REINFORCE's single pass under the sampler's distribution, DDPM
variance types stepped as diffusers does, and the DRaFT+ penalty on ε."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler

from domains.images.rewards import ColourReward
from domains.images.stable_diffusion import StableDiffusionGenerator
from domains.images.tiny import build_tokenizer, tiny_text_encoder, tiny_unet
from rewardopt.methods.alignprop import AlignProp
from rewardopt.methods.draft import DRaFT
from rewardopt.rewards.base import Reward
from tests.conftest import tiny_generator

SD_BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                clip_sample=False, steps_offset=1)


def generator_with(scheduler, **kw):
    """The tiny 16 px text-to-image generator over a given diffusers scheduler (seeded weights)."""
    torch.manual_seed(0)
    tok = build_tokenizer()
    kw.setdefault("num_steps", 4)
    kw.setdefault("guidance_scale", 2.0)
    kw.setdefault("lora_rank", 4)
    kw.setdefault("gradient_checkpointing", False)
    sampler = "ddpm" if isinstance(scheduler, DDPMScheduler) else "ddim"
    return StableDiffusionGenerator.from_components(tiny_unet(16, channels=(8, 16)), tiny_text_encoder(len(tok)), tok,
                                                    scheduler, sampler=sampler, height=16, width=16, **kw)


# ---------------------------------------------------------------------------------------- item 16: AlignProp
def draws(method, n, seed=0):
    rng = torch.Generator().manual_seed(seed)
    return np.array([method.choose_k(rng) for _ in range(n)])


def test_alignprop_uniform_k_is_one_to_twenty_of_fifty_steps():
    """Reference: threshold ~ randint(30, 50), i.e. 30..49, K = 50 - threshold in 1..20 (never full backprop)."""
    ks = draws(AlignProp(tiny_generator(num_steps=50), ColourReward(), truncation="uniform"), 2000)
    assert ks.min() == 1 and ks.max() == 20
    assert set(ks.tolist()) == set(range(1, 21))
    counts = np.bincount(ks, minlength=21)[1:]
    assert counts.min() > 2000 / 20 * 0.6 and abs(ks.mean() - 10.5) < 0.5


def test_alignprop_uniform_k_scales_to_the_configured_steps():
    ks = draws(AlignProp(tiny_generator(num_steps=10), ColourReward(), truncation="uniform"), 500)
    assert ks.min() == 1 and ks.max() == 4  # thresholds 30..49 of 50 -> 6..10 of 10 -> K 1..4


def test_alignprop_gaussian_k_is_fifty_minus_the_truncated_threshold():
    """Reference: threshold = int(N(42, 5)), redrawn until 1 <= threshold < 50; K = 50 - threshold."""
    ks = draws(AlignProp(tiny_generator(num_steps=50), ColourReward(), truncation="gaussian"), 8000)
    assert 1 <= ks.min() and ks.max() <= 49
    phi = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))  # noqa: E731
    thr = np.arange(1, 50)
    p = np.array([phi((j + 1 - 42) / 5) - phi((j - 42) / 5) for j in thr])  # P(int(X) = j), X ~ N(42, 5)
    p /= p.sum()
    mean, sd = (p * (50 - thr)).sum(), np.sqrt((p * (50 - thr - (p * (50 - thr)).sum()) ** 2).sum())
    assert abs(mean - 9.09) < 0.01 and abs(sd - 4.47) < 0.01  # the reference's law (clamped round: mean ~8.0)
    assert abs(ks.mean() - mean) < 0.2 and abs(ks.std() - sd) < 0.25
    exact = AlignProp(tiny_generator(num_steps=50), ColourReward(), truncation="gaussian", threshold_mean=42.7,
                      threshold_std=0.0)
    assert exact.choose_k(torch.Generator().manual_seed(0)) == 8  # int(42.7) = 42, not round -> 43


def test_alignprop_gaussian_redraws_out_of_range_thresholds_instead_of_clamping():
    m = AlignProp(tiny_generator(num_steps=50), ColourReward(), truncation="gaussian", threshold_mean=1.0,
                  threshold_std=3.0)
    ks = draws(m, 500)
    assert ks.max() <= 49  # threshold 0 or below is redrawn: never K = 50 (full backprop)
    never = AlignProp(tiny_generator(num_steps=50), ColourReward(), truncation="gaussian", threshold_mean=80.0,
                      threshold_std=0.0)
    with pytest.raises(ValueError, match="threshold_mean"):
        never.choose_k(torch.Generator().manual_seed(0))


def test_alignprop_fixed_49_is_k1_at_any_step_count():
    for T in (50, 10, 4):
        m = AlignProp(tiny_generator(num_steps=T), ColourReward(), truncation="fixed")
        assert set(draws(m, 20).tolist()) == {1}


@pytest.mark.parametrize("kw,match", [
    (dict(truncation="fixed", fixed_threshold=50), "fixed_threshold"),
    (dict(truncation="fixed", fixed_threshold=0), "fixed_threshold"),
    (dict(truncation="uniform", uniform_min=0), "uniform_min"),
    (dict(truncation="uniform", uniform_min=30, uniform_max=30), "uniform_min"),
    (dict(truncation="gaussian", threshold_std=-1.0), "threshold_std"),
])
def test_alignprop_rejects_thresholds_outside_the_reference_range(kw, match):
    with pytest.raises(ValueError, match=match):
        AlignProp(tiny_generator(num_steps=4), ColourReward(), **kw)


# ---------------------------------------------------------------------------------------- item 17: REINFORCE
class Count3(Reward):
    """A number per sequence (no gradient): the fraction of positions holding token 3, plus a little
    for token 4 first (so that the advantages are rarely all zero)."""

    def score(self, samples, cond):
        x = samples.detach()
        return (x.argmax(-1) == 3).float().mean(-1) + 0.1 * x[:, 0, 4]


def reinforce_setup(kl_weight, **gen_kw):
    from rewardopt.methods.reinforce import Reinforce
    from tests.test_autoregressive import BOS, make

    g = make(full_finetune=kl_weight > 0, forbidden_token_ids=[BOS], **gen_kw)
    m = Reinforce(g, Count3(), samples_per_prompt=2, kl_weight=kl_weight, seed=3)
    return g, m


def test_reinforce_runs_one_teacher_forced_pass_with_grad_per_step():
    g, m = reinforce_setup(kl_weight=0.1)
    batch = [[4], [5], [6]]
    rows = len(batch) * m.samples_per_prompt
    nfe0, grad0 = g.counter.nfe, g.counter.nfe_grad
    loss = m.training_step(batch, 0)
    assert g.counter.nfe_grad - grad0 == rows  # one pass over the sampled rows (was 2: NLL pass + KL pass)
    assert g.counter.nfe - nfe0 == rows * (g.max_new_tokens + 2)  # sampling + the grad pass + the frozen reference
    loss.backward()
    assert all(p.grad is not None for p in g.trainable_parameters())


def test_reinforce_log_prob_is_the_samplers_filtered_tempered_distribution():
    """The loss's log π(y|c) is Σ_i log of the distribution ``step`` drew token i from (temperature,
    top-k, top-p), not the unfiltered policy."""
    g, m = reinforce_setup(kl_weight=0.0, temperature=0.7, top_k=4, top_p=0.9)
    seen = {}
    sample, reward = g.sample, m.reward.score
    g.sample = lambda *a, **k: seen.setdefault("x", sample(*a, **k))
    m.reward.score = lambda x, c=None: seen.setdefault("r", reward(x, c))
    batch = [[4], [5], [6]]
    loss = m.training_step(batch, 0)
    raw = [c for c in batch for _ in range(2)]
    cond, x, r = g.encode_condition(raw), seen["x"], seen["r"].float()
    ids, mask = g.sampled_targets(x)
    logp = torch.stack([g.model_output(x, i, cond).gather(-1, ids[:, i:i + 1]).squeeze(-1)
                        for i in range(g.max_new_tokens)], 1)  # the sampler's own per-step log-probs
    assert torch.isfinite(logp[mask > 0]).all()
    seq = logp.masked_fill(mask == 0, 0.0).sum(-1)
    adv = (r.view(-1, 2) - r.view(-1, 2).mean(1, keepdim=True)).reshape(-1)
    want = -(adv * seq).mean()
    assert adv.abs().sum() > 0
    assert torch.allclose(loss, want, atol=1e-5), (float(loss), float(want))
    grads = torch.autograd.grad(loss, g.trainable_parameters())
    want_grads = torch.autograd.grad(want, g.trainable_parameters())
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(grads, want_grads))


def test_reinforce_refuses_a_greedy_generator():
    from rewardopt.methods.reinforce import Reinforce
    from tests.test_autoregressive import make

    with pytest.raises(ValueError, match="temperature > 0"):
        Reinforce(make(temperature=0.0), Count3(), kl_weight=0.0)


# ---------------------------------------------------------------------------------------- item 18: DDPM variance
PROMPTS = ["one red circle", "two blue squares"]


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_small_log", "fixed_large"])
def test_ddpm_step_matches_diffusers_for_each_variance_type(variance_type, spacing):
    g = generator_with(DDPMScheduler(**SD_BETAS, variance_type=variance_type, timestep_spacing=spacing), lora_rank=None,
                       guidance_scale=1.0)
    ref = DDPMScheduler.from_config(g.scheduler.config)
    ref.set_timesteps(g.num_steps)
    assert torch.equal(ref.timesteps, g.timesteps)
    cond = g.encode_condition(PROMPTS)
    x = g.init_state(cond, torch.Generator().manual_seed(0))
    with torch.no_grad():
        for i, t in enumerate(g.timesteps):
            out = g.model_output(x, i, cond)
            noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(100 + i))
            ours = g.step(x, i, cond, noise=noise, out=out)
            theirs = ref.step(out, t, x, generator=torch.Generator().manual_seed(100 + i)).prev_sample
            assert torch.allclose(ours, theirs, atol=1e-5), (variance_type, spacing, i, (ours - theirs).abs().max())
            x = theirs


def test_ddpm_fixed_large_log_is_glides_log_variance():
    """diffusers' ``_get_variance`` gives log β for fixed_large_log (GLIDE's max_log), so the std is
    exp(0.5 log β) = sqrt(β) — its ``step`` takes the square root of the log itself (NaN)."""
    g = generator_with(DDPMScheduler(**SD_BETAS, variance_type="fixed_large_log"), lora_rank=None, guidance_scale=1.0)
    ref = DDPMScheduler.from_config(g.scheduler.config)
    ref.set_timesteps(g.num_steps)
    cond = g.encode_condition(PROMPTS)
    x = g.init_state(cond, torch.Generator().manual_seed(0))
    with torch.no_grad():
        for i, t in enumerate(g.timesteps):
            _, std, _ = g.transition(x, i, cond)
            want = torch.exp(0.5 * ref._get_variance(int(t), variance_type="fixed_large_log"))
            assert torch.allclose(std, want, rtol=1e-5), (i, float(std), float(want))
            x = g.step(x, i, cond, generator=torch.Generator().manual_seed(i))
    assert torch.isfinite(x).all()


@pytest.mark.parametrize("variance_type", ["learned", "learned_range"])
def test_ddpm_learned_variance_is_refused_clearly(variance_type):
    with pytest.raises(NotImplementedError, match=f"variance_type={variance_type!r}.*fixed_small"):
        generator_with(DDPMScheduler(**SD_BETAS, variance_type=variance_type), lora_rank=None)


# ---------------------------------------------------------------------------------------- item 18: DRaFT+ penalty
def test_draft_plus_penalty_is_the_eps_mse_on_a_v_prediction_model():
    g = generator_with(DDIMScheduler(**SD_BETAS, set_alpha_to_one=False, prediction_type="v_prediction"))
    with torch.no_grad():  # move the LoRA off the base model (B starts at zero)
        for p in g.trainable_parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    m = DRaFT(g, ColourReward("blue"), k=None, kl_weight=1.0)
    cond = g.encode_condition(PROMPTS)
    x_T = g.init_state(cond, torch.Generator().manual_seed(0))
    _, kl = m.rollout(cond, torch.Generator().manual_seed(1), None, x_T=x_T)  # DDIM eta=0: deterministic
    eps_mse, v_mse, x = 0.0, 0.0, x_T
    with torch.no_grad():
        for i, t in enumerate(g.timesteps):
            a = g.alphas_cumprod[t]
            v = g.model_output(x, i, cond)
            with g.base_model():
                v_b = g.model_output(x, i, cond)
            eps, eps_b = a.sqrt() * v + (1 - a).sqrt() * x, a.sqrt() * v_b + (1 - a).sqrt() * x  # ε from v
            eps_mse, v_mse = eps_mse + F.mse_loss(eps, eps_b), v_mse + F.mse_loss(v, v_b)
            x = g.step(x, i, cond)
    assert float(eps_mse) > 0 and abs(float(v_mse) / float(eps_mse) - 1) > 0.2  # the two penalties differ here
    assert torch.allclose(kl, eps_mse, rtol=1e-4), (float(kl), float(eps_mse), float(v_mse))
