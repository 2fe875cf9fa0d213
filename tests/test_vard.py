"""VARD on tiny generators: the value phase learns, the policy gradient takes one differentiable denoiser
call per sampled step into the trainable weights only, the KL weight keeps the model near its base,
black-box rewards train, counters add up, and a resumed run continues exactly."""

import json

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from domains.images.rewards import ColourReward, JpegCompressibilityReward
from rewardopt.data import PromptDataModule, UnconditionalDataModule
from rewardopt.methods.draft import DRaFT, eps_penalty
from rewardopt.methods.vard import VARD
from rewardopt.rewards.base import Reward
from rewardopt.values import ConvValue, SequenceValue, ValueRegression, value_mse
from tests.conftest import tiny_generator
from tests.test_masked_diffusion import V
from tests.test_masked_diffusion import make as make_masked

TRAIN = ["one red circle", "two blue squares", "three green triangles", "one yellow square"]
VAL = ["two red circles"]


class BlackBoxCount(Reward):
    """How often token 3 occurs: a black-box reward of (B, L, V) one-hot sequences."""

    def score(self, samples, cond):
        return samples.detach().argmax(-1).eq(3).float().sum(1)


def image_vard(**kw):
    kw.setdefault("reward", ColourReward("blue"))
    gen = kw.pop("generator", None) or tiny_generator(eta=kw.pop("eta", 1.0))
    return VARD(gen, value=ConvValue(3, width=8), **kw)


def masked_vard(**kw):
    kw.setdefault("reward", BlackBoxCount())
    return VARD(make_masked(T=4, full_finetune=True), value=SequenceValue(V, width=16), **kw)


def fit(method, steps, tmp_path, data=None, ckpt_path=None, callbacks=(), **kw):
    """Train ``steps`` steps; the held-out evaluation before/after is skipped (not tested here)."""
    method.evaluate = lambda loader=None: 0.0
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=bool(callbacks),
                        callbacks=list(callbacks), enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=str(tmp_path), **kw)
    data = data or PromptDataModule(TRAIN, VAL, batch_size=2, val_batch_size=1, val_repeats=1, epoch_size=64)
    trainer.fit(method, datamodule=data, ckpt_path=ckpt_path)
    return trainer


def scored_rollouts(m, prompts, seed):
    """(trajectory, rewards, cond) of the current model from fixed noise."""
    g = m.generator
    cond = g.encode_condition(prompts)
    traj = m.rollout(cond, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        r = m.reward(g.decode(traj[-1]), prompts).total.float()
    return traj, r, cond


def heldout_mse(m, traj, r, cond):
    """Standardised value MSE over every visited state (levels 1..T) of held-out trajectories."""
    T, B = len(traj) - 1, len(r)
    states = torch.cat(traj[1:])
    levels = torch.arange(1, T + 1).repeat_interleave(B)
    with torch.no_grad():
        return float(value_mse(m.value, states, levels, r.repeat(T), cond.index(list(range(B)) * T)))


# ---------------------------------------------------------------------------------------------- value phase
def test_value_phase_reduces_value_mse_on_heldout_trajectories():
    torch.manual_seed(0)
    m = image_vard(value_updates=40, value_batch=64, buffer_size=64, value_lr=2e-3)
    held = scored_rollouts(m, TRAIN * 4, seed=99)  # 16 trajectories V never trains on
    for b in range(8):  # 8 batches of on-policy trajectories into the buffer
        traj, r, cond = scored_rollouts(m, TRAIN * 2, seed=b)
        m.remember(traj, r, cond.raw, torch.Generator().manual_seed(b))
    before = heldout_mse(m, *held)
    m.fit_value(torch.Generator().manual_seed(7))
    after = heldout_mse(m, *held)
    assert after < 0.8 * before, (before, after)  # measured: 1.96 -> 1.28
    assert m.value_calls == 40 * 64, "value-net rows counted"
    assert not any(p.requires_grad for p in m.value.parameters()), "V is frozen outside its phase"


def test_targets_are_standardised_once_from_the_first_rewards():
    m = image_vard()
    traj, r, cond = scored_rollouts(m, TRAIN, seed=0)
    m.remember(traj, r, cond.raw, torch.Generator().manual_seed(0))
    assert float(m.value.target_mean) == pytest.approx(float(r.mean()))
    assert float(m.value.target_std) == pytest.approx(float(r.std()))
    traj2, r2, _ = scored_rollouts(m, TRAIN, seed=1)
    m.remember(traj2, r2 + 5, cond.raw, torch.Generator().manual_seed(1))
    assert float(m.value.target_mean) == pytest.approx(float(r.mean())), "the scale is fixed after the first batch"


def test_buffer_keeps_recent_trajectories_and_the_chosen_levels():
    m = image_vard(buffer_size=3, levels_per_rollout=2)
    for b in range(2):
        traj, r, cond = scored_rollouts(m, TRAIN[:2], seed=b)
        m.remember(traj, r, cond.raw, torch.Generator().manual_seed(b))
    assert len(m.buffer) == 3, "oldest trajectories dropped"
    for entry in m.buffer:
        assert entry["states"].shape[0] == 2 and entry["levels"].min() >= 1 and entry["levels"].max() <= 4
    full = image_vard(buffer_size=3)
    traj, r, cond = scored_rollouts(full, TRAIN[:1], seed=0)
    full.remember(traj, r, cond.raw, torch.Generator().manual_seed(0))
    assert full.buffer[0]["levels"].tolist() == [1, 2, 3, 4], "by default every visited state x_{T-1}..x_0"


def test_value_regression_and_vard_share_the_value_loss():
    """ValueRegression's training loss is ``value_mse`` on the states it draws (one fitting function)."""
    g = tiny_generator(num_steps=2, lora_rank=None)
    v = ConvValue(3, num_steps=2, width=8)
    fit_module = ValueRegression(g, ColourReward(), v, levels_per_rollout=2)
    batch = ["a red circle"] * 3
    loss = fit_module.training_step(batch, 0)
    rng = torch.Generator().manual_seed(0)  # ValueRegression's stream at step 0 (seed 0)
    cond = g.encode_condition(batch)
    with torch.no_grad():
        x0, traj = g.sample(cond, generator=rng, return_trajectory=True)
        r = ColourReward()(g.decode(x0), batch).total.float()
    levels = torch.randint(0, 3, (2, 3), generator=rng)
    rows = torch.arange(3).repeat(2)
    states = torch.stack([traj[int(lv)][int(b)] for lv, b in zip(levels.flatten(), rows)])
    expected = value_mse(v, states, levels.flatten(), r[rows], cond.index(rows))
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)


def test_sequence_value_reads_hard_and_soft_sequences():
    v = SequenceValue(V, num_steps=4, width=8)
    hard = torch.nn.functional.one_hot(torch.randint(0, V, (3, 6)), V).float()
    soft = torch.softmax(torch.randn(3, 6, V), -1).requires_grad_(True)
    assert v(hard, 2).shape == (3,)
    v(soft, torch.tensor([1, 2, 3])).sum().backward()
    assert soft.grad is not None and soft.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="one-hot sequences"):
        v(torch.zeros(3, 6, V + 1), 1)


# ---------------------------------------------------------------------------------------------- policy phase
@pytest.mark.parametrize("family", ["diffusion", "masked"])
def test_policy_gradient_reaches_only_trainable_weights_through_one_call_per_sampled_step(family):
    torch.manual_seed(0)
    m = image_vard(steps_per_rollout=2, kl_weight=1.0) if family == "diffusion" else \
        masked_vard(steps_per_rollout=2, kl_weight=1.0)
    g = m.generator
    B = 3
    cond = g.encode_condition(TRAIN[:B] if family == "diffusion" else [None] * B)
    rng = torch.Generator().manual_seed(0)
    traj = m.rollout(cond, rng)
    assert not any(s.requires_grad for s in traj), "on-policy states are detached"
    before = g.counter.state_dict()
    calls = m.value_calls
    loss, stats = m.policy_loss(traj, cond, rng)
    after = g.counter.state_dict()
    assert after["nfe_grad"] - before["nfe_grad"] == B * 2, "one differentiable denoiser call per sampled step"
    assert after["nfe"] - before["nfe"] == B * 2 * 2, "plus one frozen-base call per sampled step for the KL"
    assert m.value_calls - calls == B * 2
    loss.backward()
    trainable = set(map(id, g.trainable_parameters()))
    assert trainable
    for p in g.parameters():
        if id(p) in trainable:
            assert p.grad is not None
        else:
            assert p.grad is None, "frozen generator weights get no gradient"
    assert any(float(p.grad.abs().sum()) > 0 for p in g.trainable_parameters())
    assert all(p.grad is None for p in m.value.parameters()), "V is frozen in the policy phase"
    assert stats["kl"] >= 0


@pytest.mark.parametrize("family", ["diffusion", "masked"])
def test_value_reads_the_differentiable_steps_own_output_at_the_next_level(family):
    """β = 0: the only path from θ to the loss is V(x_{t-1}(θ), i + 1) — V is queried on the exact tensor
    the step with grad returned, at the level after that step, and the loss gradient reaches θ through it."""
    m = image_vard(steps_per_rollout=2, kl_weight=0.0) if family == "diffusion" else \
        masked_vard(steps_per_rollout=2, kl_weight=0.0)
    g = m.generator
    cond = g.encode_condition(TRAIN[:3] if family == "diffusion" else [None] * 3)
    rng = torch.Generator().manual_seed(0)
    traj = m.rollout(cond, rng)
    stepped, valued = [], []
    step, value = m.differentiable_step, m.value.forward

    def recording_step(x_t, i, c, r):
        x_prev, kl = step(x_t, i, c, r)
        stepped.append((i, x_prev))
        return x_prev, kl

    def recording_value(x, level, c=None):
        valued.append((level, x))
        return value(x, level, c)

    m.differentiable_step, m.value.forward = recording_step, recording_value
    loss, _ = m.policy_loss(traj, cond, rng)
    assert len(stepped) == len(valued) > 0
    for (i, x_prev), (level, x) in zip(stepped, valued):
        assert level == i + 1 and x is x_prev and x.requires_grad
    loss.backward()
    assert any(float(p.grad.abs().sum()) > 0 for p in g.trainable_parameters() if p.grad is not None)


def test_policy_steps_are_drawn_per_sample_without_repeats():
    m = image_vard(steps_per_rollout=3)
    seen = []
    original = m.differentiable_step

    def recording(x_t, i, cond, rng):
        seen.append((i, x_t.shape[0]))
        return original(x_t, i, cond, rng)

    m.differentiable_step = recording
    cond = m.generator.encode_condition(TRAIN)
    rng = torch.Generator().manual_seed(0)
    m.policy_loss(m.rollout(cond, rng), cond, rng)
    assert sum(n for _, n in seen) == 4 * 3 and len({i for i, _ in seen}) == len(seen) <= 4


def test_hybrid_uses_the_exact_reward_at_the_last_step():
    m = image_vard(steps_per_rollout=4, hybrid=True)  # every step, so the last one is drawn
    cond = m.generator.encode_condition(TRAIN[:2])
    rng = torch.Generator().manual_seed(0)
    traj = m.rollout(cond, rng)
    calls, vcalls = m.reward.calls, m.value_calls
    m.policy_loss(traj, cond, rng)
    assert m.reward.calls - calls == 2, "the last step's x_0 is scored by the reward itself"
    assert m.value_calls - vcalls == 2 * 3, "V at the other three steps"
    with pytest.raises(TypeError, match="differentiable"):
        image_vard(hybrid=True, reward=JpegCompressibilityReward())


def kl_to_base(m, prompts, seed=5):
    """Mean ε-MSE to the frozen base along the model's own trajectories from fixed noise."""
    g = m.generator
    cond = g.encode_condition(prompts)
    traj = m.rollout(cond, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return sum(float(eps_penalty(g, x, i, g.model_output(x, i, cond), g.base_model_output(x, i, cond)))
                   for i, x in enumerate(traj[:-1])) / (len(traj) - 1)


def test_kl_weight_keeps_the_model_closer_to_the_base(tmp_path):
    kls = {}
    for beta in (0.0, 30.0):
        torch.manual_seed(0)
        m = image_vard(kl_weight=beta, steps_per_rollout=2, lr=3e-2, output_dir=str(tmp_path / str(beta)))
        fit(m, 4, tmp_path / str(beta))
        kls[beta] = kl_to_base(m, TRAIN)
    assert kls[0.0] > 0
    assert kls[30.0] < 0.5 * kls[0.0], kls


# ---------------------------------------------------------------------------------------------- end to end
def test_black_box_reward_trains_where_draft_refuses(tmp_path):
    with pytest.raises(TypeError, match="differentiable reward"):
        DRaFT(tiny_generator(), JpegCompressibilityReward())
    m = image_vard(reward=JpegCompressibilityReward(), steps_per_rollout=2, kl_weight=0.1, value_updates=2,
                   value_batch=8, lr=1e-2, output_dir=str(tmp_path))
    before = [p.detach().clone() for p in m.generator.trainable_parameters()]
    fit(m, 2, tmp_path)
    assert all(not torch.equal(a, b) for a, b in zip(before, m.generator.trainable_parameters()))
    s = json.loads((tmp_path / "summary.json").read_text())
    T, B, k = 4, 2, 2
    assert s["samples"] == 2 * B and s["reward_calls"] == 2 * B, "one reward call per rollout, none in the policy"
    assert s["nfe"] == 2 * B * (T + k + k) and s["nfe_grad"] == 2 * B * k
    assert s["value_calls"] == 2 * (2 * 8 + B * T + B * k), "fitting, calibration (every level), policy queries"


def test_vard_raises_the_reward_through_the_value_alone(tmp_path):
    """ColourReward's gradient is never used (hybrid off): the policy climbs V, refitted as it goes."""
    torch.manual_seed(0)
    m = image_vard(steps_per_rollout=2, kl_weight=0.0, lr=3e-2, value_updates=8, value_batch=32, warmup_steps=2,
                   value_lr=3e-3, output_dir=str(tmp_path))
    data = PromptDataModule(TRAIN, VAL + ["one white triangle"], batch_size=4, val_batch_size=4, val_repeats=2,
                            epoch_size=64)
    trainer = L.Trainer(max_steps=12, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, default_root_dir=str(tmp_path))
    trainer.fit(m, datamodule=data)
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["reward_after"] > s["reward_before"] + 0.005, s  # fixed eval noise: the change is training's


def test_value_every_refreshes_the_value_net_on_that_schedule(tmp_path):
    m = image_vard(value_every=2, value_updates=1, value_batch=4, output_dir=str(tmp_path))
    fit(m, 3, tmp_path)
    assert m.value_updates_done == 2, "steps 0 and 2"


def test_warmup_steps_fit_the_value_only(tmp_path):
    m = image_vard(warmup_steps=2, output_dir=str(tmp_path))
    before = [p.detach().clone() for p in m.generator.trainable_parameters()]
    trainer = fit(m, 2, tmp_path)
    assert trainer.global_step == 2
    assert all(torch.equal(a, b) for a, b in zip(before, m.generator.trainable_parameters()))
    assert m.value_updates_done == 2 and m.generator.counter.nfe_grad == 0


def test_masked_generator_trains_on_a_black_box_reward(tmp_path):
    m = masked_vard(steps_per_rollout=2, kl_weight=0.1, lr=1e-2, output_dir=str(tmp_path))
    before = [p.detach().clone() for p in m.generator.trainable_parameters()]
    fit(m, 2, tmp_path, data=UnconditionalDataModule(batch_size=3, num_eval=2, val_batch_size=2, epoch_size=16))
    assert any(not torch.equal(a, b) for a, b in zip(before, m.generator.trainable_parameters()))
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["nfe_grad"] == 2 * 3 * 2 and s["reward_calls"] == 2 * 3


def test_resume_is_exact(tmp_path):
    """A run resumed from its step-1 checkpoint ends where the uninterrupted 3-step run ends: the same
    policy and value weights, buffer and counters (the value net, its optimiser and the buffer travel in
    the checkpoint)."""
    def run(phase):
        torch.manual_seed(0)
        m = image_vard(steps_per_rollout=2, kl_weight=0.5, value_updates=2, value_batch=8, buffer_size=3, lr=1e-2,
                       output_dir=str(tmp_path / phase))
        ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1, filename="{step}")
        fit(m, 3, tmp_path / phase, callbacks=[ckpt] if phase == "straight" else [],
            ckpt_path=str(tmp_path / "ckpt" / "step=1.ckpt") if phase == "resumed" else None)
        return m

    straight, resumed = run("straight"), run("resumed")
    for a, b in zip(straight.generator.trainable_parameters(), resumed.generator.trainable_parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    for (n, a), b in zip(straight.value.state_dict().items(), resumed.value.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), n
    assert len(straight.buffer) == len(resumed.buffer)
    for e1, e2 in zip(straight.buffer, resumed.buffer):
        assert torch.equal(e1["states"], e2["states"]) and e1["reward"] == e2["reward"]
    assert straight.value_calls == resumed.value_calls and straight.value_updates_done == resumed.value_updates_done
    assert straight.generator.counter.state_dict() == resumed.generator.counter.state_dict()
    ck = torch.load(tmp_path / "ckpt" / "step=1.ckpt", map_location="cpu", weights_only=False)
    assert "vard" in ck and all("lora_" in k for k in ck["state_dict"]), "value net beside the trainable weights"


# ---------------------------------------------------------------------------------------------- bad inputs
def test_bad_pairings_and_knobs_name_the_fix():
    from rewardopt.testing.toy import RandomWalkGenerator, SumReward

    with pytest.raises(TypeError, match="Trainable"):
        VARD(RandomWalkGenerator(), SumReward(), ConvValue(3, width=8))
    with pytest.raises(ValueError, match="value.init_args.num_steps"):
        VARD(tiny_generator(), ColourReward(), ConvValue(3, num_steps=7, width=8))
    with pytest.raises(ValueError, match="steps_per_rollout"):
        image_vard(steps_per_rollout=5)
    with pytest.raises(ValueError, match="kl_weight > 0 needs"):
        VARD(make_masked(T=4), BlackBoxCount(), SequenceValue(V, width=8), kl_weight=1.0)
    with pytest.raises(ValueError, match="relaxation"):
        masked_vard(relaxation="gumbel")
