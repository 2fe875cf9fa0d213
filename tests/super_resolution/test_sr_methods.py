"""Methods on the SR generator: DRaFT-K with the denoising loss + λ·proxy (what is trained, counted and
logged), and selection with the GT-free proxy."""

import pytest
import torch

from domains.super_resolution.rewards import FeatureDistance, LRFeatureDistance
from rewardopt.methods.best_of_n import BestOfN
from rewardopt.methods.draft import DRaFT
from tests.super_resolution.test_upscaler import conditions, perturb, tiny_sr


def quiet(m):
    m.log = lambda *a, **k: None
    m.training_rng = lambda: torch.Generator().manual_seed(0)
    return m


@pytest.mark.parametrize("lam", [0.0, 2.0])
def test_draft_on_sr_trains_lora_with_denoising_loss_plus_lambda_proxy(lam):
    g = tiny_sr(lora_rank=2, guidance_scale=1.0)
    perturb(g.denoiser)
    m = quiet(DRaFT(g, FeatureDistance(), k=1, reward_weight=lam, denoising_weight=1.0))
    raw = conditions(2)
    loss = m.training_step(raw, 0)
    T = g.num_steps
    if lam == 0:  # supervised only: one UNet row per pair, no rollout, no reward call
        assert g.counter.nfe == 2 and m.reward.calls == 0
    else:  # the pairs' rows + the rollout (T steps, the last with grad); the proxy scores each sample once
        assert g.counter.nfe == 2 + 2 * T and g.counter.nfe_grad == 2 + 2 and m.reward.calls == 2
        assert m._last_train_reward < 0  # minus a distance
    loss.backward()
    lora = [(n, p) for n, p in g.denoiser.named_parameters() if "lora_B" in n]
    assert lora and all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in lora)
    assert all(p.grad is None for n, p in g.named_parameters() if not p.requires_grad)


def test_draft_on_sr_refuses_unpaired_conditions():
    g = tiny_sr(lora_rank=2, guidance_scale=1.0)
    m = quiet(DRaFT(g, LRFeatureDistance(), k=1, denoising_weight=1.0))
    raw = [{"image": c["image"], "prompt": c["prompt"]} for c in conditions(2)]
    with pytest.raises(KeyError, match="hr"):
        m.training_step(raw, 0)


def test_best_of_n_with_the_gt_free_proxy_keeps_the_best_child():
    g = tiny_sr(eta=1.0, guidance_scale=1.0)
    perturb(g.denoiser)
    reward = LRFeatureDistance()
    seen = []
    score = reward.score
    reward.score = lambda samples, cond: seen.append((samples.detach().clone(), score(samples, cond))) or seen[-1][1]
    m = BestOfN(g, reward, n=3, seed=0, save_samples=False)
    raw = [{k: v for k, v in c.items() if k != "hr"} for c in conditions(2)]  # no ground truth needed
    best, _ = m.generate(raw, batch_idx=0)
    assert best.shape == (2, 3, 16, 16)
    assert g.counter.nfe == 2 * 3 * g.num_steps and reward.calls == 2 * 3
    assert len(seen) == 1  # the 3 candidates of both conditions in one call, condition j's at rows 3j..3j+2
    samples, out = seen[0]
    for j in range(2):  # the kept output is the candidate of condition j the proxy scored highest
        top = 3 * j + int(out.total[3 * j:3 * j + 3].argmax())
        torch.testing.assert_close(best[j], samples[top], atol=1e-6, rtol=0)


def test_a_vae_with_another_scaling_factor_is_forced_to_the_pipelines(tmp_path):
    from diffusers import AutoencoderKL

    from domains.super_resolution.upscaler import PIPELINE_SCALING_FACTOR, SuperResolutionGenerator

    g = tiny_sr()
    g.save_pretrained(tmp_path / "m")
    vae = AutoencoderKL.from_pretrained(tmp_path / "m", subfolder="vae")
    vae.register_to_config(scaling_factor=0.18215)
    vae.save_pretrained(tmp_path / "m" / "vae")
    with pytest.warns(UserWarning, match="forces 0.08333"):
        g2 = SuperResolutionGenerator(str(tmp_path / "m"), num_steps=2, lora_rank=None)
    assert g2.vae.config.scaling_factor == PIPELINE_SCALING_FACTOR
