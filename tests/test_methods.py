"""Fine-tuning methods on a tiny random generator: what they compute, count and change."""

import json
from collections import defaultdict, deque

import lightning as L
import numpy as np
import pytest
import torch

from domains.images.rewards import ColourReward, JpegCompressibilityReward
from rewardopt.data import PromptDataModule
from rewardopt.methods.alignprop import AlignProp
from rewardopt.methods.ddpo import DDPO, normalize_per_prompt
from rewardopt.methods.draft import DRaFT
from tests.conftest import tiny_generator

TRAIN = ["one red circle", "two blue squares", "three green triangles", "one yellow square"]
VAL = ["two red circles", "one white triangle"]


def data(batch_size=2):
    return PromptDataModule(TRAIN, VAL, batch_size=batch_size, val_batch_size=4, val_repeats=1, epoch_size=64)


def fit(method, steps=2, tmp_path=None, **kw):
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, default_root_dir=str(tmp_path), **kw)
    trainer.fit(method, datamodule=data())
    return trainer


def snapshot(method):
    return [p.detach().clone() for p in method.generator.trainable_parameters()]


def all_changed(before, method):
    return all(not torch.equal(a, b) for a, b in zip(before, method.generator.trainable_parameters()))


def test_draft_k1_trains_only_lora_and_writes_summary(tmp_path):
    m = DRaFT(tiny_generator(), ColourReward("blue"), k=1, lr=1e-2, output_dir=str(tmp_path))
    frozen = {n: p.detach().clone() for n, p in m.generator.named_parameters() if not p.requires_grad}
    before = snapshot(m)
    fit(m, 2, tmp_path)
    assert all_changed(before, m), "every LoRA tensor should move"
    assert all(torch.equal(p, frozen[n]) for n, p in m.generator.named_parameters() if n in frozen)
    s = json.loads((tmp_path / "summary.json").read_text())
    T, B = m.generator.num_steps, 2
    assert s["samples"] == 2 * B and s["nfe"] == 2 * B * T and s["nfe_grad"] == 2 * B * 1
    assert s["reward_calls"] == 2 * B
    assert (tmp_path / "adapter" / "pytorch_lora_weights.safetensors").is_file()


def test_draft_lv_performs_n_renoisings(tmp_path):
    g = tiny_generator()
    calls = []
    original = g.add_noise
    g.add_noise = lambda *a, **k: calls.append(1) or original(*a, **k)
    m = DRaFT(g, ColourReward("blue"), k=1, lv_samples=3, output_dir=str(tmp_path))
    fit(m, 2, tmp_path)
    assert len(calls) == 2 * 3
    T, B = g.num_steps, 2
    assert g.counter.nfe == 2 * B * (T + 3)  # T no-grad steps + n differentiable re-denoisings
    assert g.counter.nfe_grad == 2 * B * 3
    assert m.reward.calls == 2 * B * 3


def test_draft_kl_regulariser_queries_the_frozen_base(tmp_path):
    m = DRaFT(tiny_generator(), ColourReward("blue"), k=2, kl_weight=1.0, output_dir=str(tmp_path))
    fit(m, 1, tmp_path)
    T, B = m.generator.num_steps, 2
    assert m.generator.counter.nfe == B * (T + 2)  # 2 extra base-model evaluations


def test_draft_raises_reward(tmp_path):
    torch.manual_seed(0)
    m = DRaFT(tiny_generator(), ColourReward("blue"), k=1, lr=3e-2, weight_decay=0.0, output_dir=str(tmp_path))
    fit(m, 12, tmp_path)
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["reward_after"] > s["reward_before"] + 0.005  # fixed eval noise: the change is training's


def test_draft_rejects_black_box_reward_naming_alternatives():
    with pytest.raises(TypeError, match="DDPO.*Best-of-N, SVDD, DSearch"):
        DRaFT(tiny_generator(), JpegCompressibilityReward())
    with pytest.raises(TypeError, match="AlignProp needs a differentiable reward"):
        AlignProp(tiny_generator(), JpegCompressibilityReward())


@pytest.mark.parametrize("kw,match", [
    (dict(k=0), "k must be in"), (dict(k=9), "k must be in"), (dict(k=2, lv_samples=2), "k=1 only"),
])
def test_draft_rejects_bad_knobs(kw, match):
    with pytest.raises(ValueError, match=match):
        DRaFT(tiny_generator(), ColourReward(), **kw)


def test_alignprop_truncation_drawn_once_per_rollout():
    g = tiny_generator(num_steps=50)
    fixed = AlignProp(g, ColourReward(), truncation="fixed")
    assert fixed.choose_k(torch.Generator().manual_seed(0)) == 1  # threshold 49 of 50 == K=1
    gauss = AlignProp(g, ColourReward(), truncation="gaussian")
    ks = np.array([gauss.choose_k(torch.Generator().manual_seed(s)) for s in range(400)])
    assert abs(ks.mean() - 9.1) < 1.0 and 3 < ks.std() < 7  # 50 - int(N(42, 5)), redrawn outside [1, 49]
    uni = AlignProp(g, ColourReward(), truncation="uniform")
    ku = np.array([uni.choose_k(torch.Generator().manual_seed(s)) for s in range(400)])
    assert ku.min() == 1 and ku.max() == 20 and abs(ku.mean() - 10.5) < 1.5  # thresholds 30..49 (reference)
    short = AlignProp(tiny_generator(num_steps=10), ColourReward(), truncation="gaussian")
    assert all(1 <= short.choose_k(torch.Generator().manual_seed(s)) <= 10 for s in range(50))


def test_alignprop_backprops_through_drawn_k(tmp_path):
    g = tiny_generator(num_steps=4)
    grad_modes, in_step = [], [False]

    def record(module, args):
        if in_step[0]:
            grad_modes.append(torch.is_grad_enabled())

    g.denoiser.register_forward_pre_hook(record)
    m = AlignProp(g, ColourReward(), truncation="uniform", output_dir=str(tmp_path))
    step = m.training_step

    def tracked(*a):
        in_step[0] = True
        try:
            return step(*a)
        finally:
            in_step[0] = False

    m.training_step = tracked
    before = snapshot(m)
    fit(m, 1, tmp_path)
    assert len(grad_modes) == 4 and grad_modes == [False] * (4 - m.last_k) + [True] * m.last_k
    assert all_changed(before, m)


def test_ddpo_needs_stochastic_sampler():
    with pytest.raises(ValueError, match="eta > 0"):
        DDPO(tiny_generator(eta=0.0), JpegCompressibilityReward())


def test_ddpo_logprob_of_own_samples_gives_unit_ratio():
    g = tiny_generator(eta=1.0)
    m = DDPO(g, JpegCompressibilityReward())
    cond = g.encode_condition(TRAIN[:2])
    states, logps = m.sample_trajectories(cond, torch.Generator().manual_seed(0))
    for i, lp in enumerate(logps):
        if lp is None:
            continue
        with torch.no_grad():
            again = g.log_prob(states[i], i, states[i + 1], cond)
        assert torch.allclose(again, lp, atol=1e-5)
        other = g.log_prob(states[i], i, torch.randn_like(states[i + 1]) * 3, cond)
        assert (other < lp).all()


def test_per_prompt_normalisation():
    buffers = defaultdict(lambda: deque(maxlen=8))
    adv = normalize_per_prompt(["a", "a", "b", "b"], np.array([1.0, 3.0, 10.0, 30.0]), buffers, min_count=2)
    assert np.allclose(adv, [-1, 1, -1, 1], atol=1e-5)
    early = normalize_per_prompt(["c", "d"], np.array([0.0, 2.0]), buffers, min_count=2)
    assert np.allclose(early, [-1, 1], atol=1e-5)  # batch statistics until a prompt has min_count


def test_ddpo_updates_with_black_box_reward(tmp_path):
    g = tiny_generator(eta=1.0)
    m = DDPO(g, JpegCompressibilityReward(), samples_per_prompt=2, num_minibatches=2, clip_range=0.2, lr=1e-2,
             output_dir=str(tmp_path))
    before = snapshot(m)
    fit(m, 2, tmp_path)  # 2 optimiser steps = one sampled batch split in two minibatches
    assert all_changed(before, m)
    assert g.counter.samples == 4
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["reward_calls"] == 4 and s["method"] == "DDPO"


# --------------------------------------------------------------------------- DRaFT + paired denoising loss
class _PairedLoss:
    """Gives a tiny text-to-image generator a ``denoising_loss`` (ε-MSE towards an all-blue image),
    recording each value it returns."""

    def __init__(self, g):
        self.g, self.values = g, []

    def __call__(self, raw, generator=None):
        g = self.g
        x0 = torch.zeros(len(raw), 3, g.height, g.width)
        x0[:, 2] = 1.0
        noise = torch.randn(x0.shape, generator=generator)
        t = g.timesteps[:1].expand(len(raw))
        xt = g.add_noise(x0, t.view(-1, 1, 1, 1), noise)
        g.counter.nfe += len(raw)
        g.counter.nfe_grad += len(raw)
        cond = g.encode_condition(list(raw))
        loss = torch.nn.functional.mse_loss(g._denoiser_output(g.denoiser, xt, t, cond.tensors), noise)
        self.values.append(float(loss))
        return loss


def paired_generator():
    from rewardopt.generators.capabilities import PairedDenoisingLoss

    g = tiny_generator()
    cls = type("PairedTiny", (PairedDenoisingLoss, type(g)), {"denoising_loss": lambda self, raw, generator=None:
                                                             self._paired(raw, generator)})
    g.__class__ = cls
    g._paired = _PairedLoss(g)
    return g


def test_draft_denoising_weight_needs_the_capability_and_something_to_train():
    with pytest.raises(TypeError, match="PairedDenoisingLoss"):
        DRaFT(tiny_generator(), ColourReward("blue"), denoising_weight=1.0)
    with pytest.raises(ValueError, match="nothing to train"):
        DRaFT(paired_generator(), ColourReward("blue"), reward_weight=0.0)
    with pytest.raises(ValueError, match=">= 0"):
        DRaFT(paired_generator(), ColourReward("blue"), reward_weight=-1.0)


def test_draft_reward_weight_zero_is_supervised_only():
    g = paired_generator()
    m = DRaFT(g, ColourReward("blue"), k=1, reward_weight=0.0, denoising_weight=0.5)
    m.training_rng = lambda: torch.Generator().manual_seed(0)
    m.log = lambda *a, **k: None
    loss = m.training_step(["one red circle", "two blue squares"], 0)
    assert loss.item() == pytest.approx(0.5 * g._paired.values[-1], rel=1e-6)
    assert g.counter.samples == 0 and m.reward.calls == 0  # no rollout, no reward
    assert g.counter.nfe == 2 and g.counter.nfe_grad == 2  # the paired loss's own rows
    loss.backward()
    named = [(n, p) for n, p in g.named_parameters() if p.requires_grad]
    assert all(p.grad is not None for _, p in named)
    assert all(p.grad.abs().sum() > 0 for n, p in named if "lora_B" in n)  # lora_A's is 0 while B is 0


def test_draft_loss_is_denoising_plus_lambda_reward():
    g = paired_generator()
    m = DRaFT(g, ColourReward("blue"), k=1, reward_weight=3.0, denoising_weight=2.0)
    m.training_rng = lambda: torch.Generator().manual_seed(0)
    m.log = lambda *a, **k: None
    loss = m.training_step(["one red circle", "two blue squares"], 0)
    expected = 2.0 * g._paired.values[-1] - 3.0 * m._last_train_reward
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    T = g.num_steps
    assert g.counter.nfe == 2 + 2 * T and g.counter.nfe_grad == 2 + 2  # paired rows + K=1 grad steps
