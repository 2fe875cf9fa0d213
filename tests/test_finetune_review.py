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
