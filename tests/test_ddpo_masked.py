"""DDPO on masked discrete diffusion (the RL baseline VARD is compared with on molecules): the
categorical transition log-probability matches an independent computation and the sampler's own
frequencies, and PPO on it raises a black-box reward."""

import lightning as L
import pytest
import torch

from rewardopt.data import UnconditionalDataModule
from rewardopt.methods.ddpo import DDPO
from rewardopt.rewards.base import Reward
from tests.test_masked_diffusion import MASK, PAD, V, make


class BlackBoxCount(Reward):
    """r = how many times token 3 occurs; no gradient (DDPO only reads values)."""

    differentiable = False

    def score(self, samples, cond):
        return samples.detach().argmax(-1).eq(3).sum(1).float()


def test_transition_log_prob_matches_an_independent_computation():
    T, B = 4, 6
    g = make(T)
    cond = g.encode_condition([None] * B)
    rng = torch.Generator().manual_seed(0)
    with torch.no_grad():
        x = g.init_state(cond)
        for i in range(2):  # a state with masked and unmasked positions
            x = g.step(x, i, cond, generator=rng)
        i = 2
        x_next = g.step(x, i, cond, generator=rng)
        got = g.log_prob(x, i, x_next, cond)
        tokens, nxt = g.tokens(x), g.tokens(x_next)
        assert (tokens == MASK).any() and (tokens != MASK).any()
        logits = g.denoiser(input_ids=tokens).logits
        logits[..., [MASK, PAD]] = float("-inf")
        t, s = 1 - i / T, 1 - (i + 1) / T
        a_t, a_s = 1 - (1 - 1e-3) * t, 1 - (1 - 1e-3) * s
        q = torch.softmax(logits, -1) * (a_s - a_t) / (1 - a_t)
        q[..., MASK] = (1 - a_s) / (1 - a_t)
        per_pos = torch.where(tokens == MASK, q.gather(-1, nxt[..., None]).squeeze(-1).log(), torch.zeros(()))
    torch.testing.assert_close(got, per_pos.mean(-1), atol=1e-5, rtol=1e-5)


def test_transition_log_prob_is_the_frequency_the_sampler_draws_with():
    """From one fixed state, the empirical frequency of each position's outcome ≈ exp(L · log_prob) of a
    one-position change (positions are independent given x_t)."""
    g = make(T=3)
    n = 4000
    cond = g.encode_condition([None] * n)
    with torch.no_grad():
        x = g.init_state(cond)
        nxt = g.step(x, 1, cond, generator=torch.Generator().manual_seed(1))
        first = g.tokens(nxt)[:, 0]
        # change only position 0 of a one-row state to each outcome and read its probability
        probs = {}
        for tok in range(V):
            y = x[:1].clone()
            y[0, 0] = 0
            y[0, 0, tok] = 1
            lp = g.log_prob(x[:1], 1, y, g.encode_condition([None]))
            # positions 1.. stay [MASK] in y: subtract their log p_stay share to isolate position 0
            stay = torch.log(torch.tensor(g.transition_probs(1)[1]))
            probs[tok] = float(torch.exp(lp * g.seq_len - stay * (g.seq_len - 1)))
    assert probs[PAD] == 0.0
    assert sum(probs.values()) == pytest.approx(1.0, abs=1e-4)
    for tok, p in probs.items():
        assert float((first == tok).float().mean()) == pytest.approx(p, abs=0.03), tok


def test_ddpo_on_masked_diffusion_raises_a_black_box_reward(tmp_path):
    torch.manual_seed(0)
    g = make(T=4, full_finetune=True)
    reward = BlackBoxCount()
    m = DDPO(g, reward, samples_per_prompt=1, num_minibatches=2, clip_range=0.2, min_count=1000, lr=3e-3,
             weight_decay=0.0, seed=0, output_dir=str(tmp_path))
    cond = g.encode_condition([None] * 256)

    def mean_reward():
        with torch.no_grad():
            return float(reward(g.sample(cond, generator=torch.Generator().manual_seed(7))).total.mean())

    before = mean_reward()
    nfe0 = g.counter.nfe
    trainer = L.Trainer(max_steps=2 * 30, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0)
    m.evaluate = lambda loader=None: 0.0
    trainer.fit(m, datamodule=UnconditionalDataModule(batch_size=16, num_eval=1, val_batch_size=1))
    # 30 sampled batches of 16: 4 sampling calls each and 4 trained steps per sample (one call each)
    assert g.counter.nfe - nfe0 == 30 * 16 * 4 * 2
    assert g.counter.samples == 30 * 16
    after = mean_reward()
    assert after > before + 0.5, (before, after)


def test_recomputed_log_probs_equal_the_sampling_ones_so_the_first_ratio_is_one():
    g = make(T=4, full_finetune=True)
    m = DDPO(g, BlackBoxCount(), samples_per_prompt=1, num_minibatches=2, min_count=1000, seed=0)
    cond = g.encode_condition([None] * 6)
    states, old = m.sample_trajectories(cond, torch.Generator().manual_seed(0))
    rows = torch.tensor([1, 4, 5])
    with torch.no_grad():
        for i, lp in enumerate(old):
            new = g.log_prob(states[i][rows], i, states[i + 1][rows], cond.index(rows))
            assert torch.equal(new, lp[rows]), i  # exactly: ratio 1, nothing clipped before the first update
