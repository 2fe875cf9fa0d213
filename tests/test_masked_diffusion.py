"""Masked discrete diffusion: sampling matches an independent reference, tokens are valid,
straight-through Gumbel steps are one-hot forward and differentiable backward, KL to the base."""

import pytest
import torch

from rewardopt.generators.masked import MaskedDiffusionGenerator
from rewardopt.testing.contracts import GeneratorContract

V, MASK, PAD, L = 8, 7, 0, 6


def tiny_denoiser(seed=0, arch="bert"):
    from rewardopt.generators.masked import tiny_denoiser as build

    return build(V, L, hidden=16, layers=1, heads=2, seed=seed, arch=arch).eval()


def make(T=5, arch="bert", **kw):
    return MaskedDiffusionGenerator(tiny_denoiser(arch=arch), mask_token_id=MASK, seq_len=L, num_steps=T,
                                    forbidden_token_ids=[PAD], **kw)


class TestMaskedDiffusionContract(GeneratorContract):
    raw_conditions = [None, None, None]

    @pytest.fixture
    def make_generator(self):
        def build():
            g = make(full_finetune=True)
            g.setup_trainable()
            return g
        return build


@pytest.mark.parametrize("arch", ["bert", "roformer"])
def test_sampling_matches_an_independent_reference(arch):
    """Integer-token reference: MDLM's reverse probabilities written out, Gumbel-max with the same
    uniform draws, the denoiser called on input_ids (not the generator's one-hot path)."""
    T, B = 6, 4
    g = make(T, arch=arch)
    with torch.no_grad():
        got = g.tokens(g.sample(g.encode_condition([None] * B), generator=torch.Generator().manual_seed(3)))
    den, rng = g.denoiser, torch.Generator().manual_seed(3)
    tokens = torch.full((B, L), MASK)
    for i in range(T):
        t, s = 1 - i / T, 1 - (i + 1) / T
        a_t, a_s = 1 - (1 - 1e-3) * t, 1 - (1 - 1e-3) * s
        with torch.no_grad():
            logits = den(input_ids=tokens).logits
        logits[..., [MASK, PAD]] = float("-inf")
        q = torch.softmax(logits, -1) * (a_s - a_t) / (1 - a_t)
        q[..., MASK] = (1 - a_s) / (1 - a_t)
        u = torch.rand((B, L, V), generator=rng).clamp(1e-10, 1 - 1e-7)
        choice = (q.log() - torch.log(-torch.log(u))).argmax(-1)
        tokens = torch.where(tokens == MASK, choice, tokens)
    assert torch.equal(got, tokens)


def test_tiny_denoiser_rejects_unknown_architectures():
    with pytest.raises(ValueError, match="arch must be"):
        tiny_denoiser(arch="lstm")


def test_every_token_is_valid_and_unmasked():
    g = make(T=3)
    with torch.no_grad():
        ids = g.tokens(g.sample(g.encode_condition([None] * 64), generator=torch.Generator().manual_seed(0)))
    assert ids.shape == (64, L)
    assert not (ids == MASK).any() and not (ids == PAD).any()
    assert ((ids >= 0) & (ids < V)).all()


def test_partial_unmasking_follows_the_schedule():
    g = make(T=4)
    p_unmask, p_stay = g.transition_probs(0)
    assert p_unmask + p_stay == pytest.approx(1.0)
    assert g.transition_probs(3)[1] == 0.0, "the last step unmasks everything"
    with torch.no_grad():
        x = g.step(g.init_state(g.encode_condition([None] * 2000)), 0, None, generator=torch.Generator().manual_seed(0))
    frac = float(g.is_masked(x).mean())
    assert frac == pytest.approx(p_stay, abs=0.01)


def test_gumbel_steps_are_one_hot_forward_and_differentiable_backward():
    g = make(T=3, full_finetune=True)
    g.setup_trainable()
    cond = g.encode_condition([None] * 4)
    x = g.sample(cond, generator=torch.Generator().manual_seed(1), grad_last_k=2)
    hard = torch.nn.functional.one_hot(x.argmax(-1), V).float()
    assert torch.allclose(x, hard, atol=1e-6), "forward values are one-hot (up to hard + soft - soft rounding)"
    assert x.requires_grad
    w = torch.randn(V)
    (x @ w).sum().backward()
    grads = [p.grad for p in g.trainable_parameters() if p.grad is not None]
    assert grads and sum(float(gr.abs().sum()) for gr in grads) > 0
    with torch.no_grad():
        same = g.sample(cond, generator=torch.Generator().manual_seed(1))
    assert torch.equal(same.argmax(-1), x.detach().argmax(-1)), \
        "grad mode draws the same trajectory as no-grad sampling"


def test_kl_to_base_is_zero_before_training_and_positive_after_a_change():
    g = make(T=3, full_finetune=True)
    g.setup_trainable()
    cond = g.encode_condition([None] * 3)
    x = g.init_state(cond)
    assert torch.allclose(g.kl_to_base(x, 0, cond), torch.zeros(3), atol=1e-6)
    with torch.no_grad():
        for p in g.denoiser.parameters():
            p.add_(0.05 * torch.randn_like(p))
    kl = g.kl_to_base(x, 0, cond)
    assert (kl > 0).all()


class CountToken(__import__("rewardopt.rewards.base", fromlist=["Reward"]).Reward):
    """r = how many times token 3 occurs (on decoded token ids)."""

    differentiable = True

    def score(self, samples, cond):
        return samples[..., 3].sum(1)


def _methods():
    from rewardopt.methods.best_of_n import BestOfN
    from rewardopt.methods.dsearch import DSearch
    from rewardopt.methods.free2guide import Free2Guide
    from rewardopt.methods.smc import SMC
    from rewardopt.methods.svdd import SVDD

    return [(BestOfN, "n"), (SVDD, "num_children"), (SMC, "num_particles"), (DSearch, "width"),
            (Free2Guide, "num_candidates")]


@pytest.mark.parametrize("cls,width", _methods(), ids=lambda v: v.__name__ if isinstance(v, type) else v)
def test_steering_methods_run_on_discrete_sequences(cls, width):
    g, r = make(T=4), CountToken()
    kw = {"lookahead": 1, "search_start": 0.0} if width == "width" else {}
    plain_m = cls(g, r, save_samples=False, **{width: 1}, **kw)
    got, _ = plain_m.generate([None] * 4)
    rng, _ = plain_m.rngs(0)
    with torch.no_grad():
        plain = g.decode(g.sample(g.encode_condition([None] * 4), generator=rng))
    assert torch.equal(got, plain), "width 1 is the plain sampler"
    m = cls(g, r, save_samples=False, **{width: 6}, **kw)
    n0, c0 = g.counter.nfe, r.calls
    steered, _ = m.generate([None] * 4)
    assert g.counter.nfe - n0 == 4 * m.expected_cost()["nfe"] and r.calls - c0 == 4 * m.expected_cost()["reward_calls"]
    assert not (g.tokens(steered) == MASK).any()


def test_drakes_changes_parameters_and_raises_the_reward(tmp_path):
    import json

    import lightning as L

    from rewardopt.data import PromptDataModule
    from rewardopt.methods.drakes import DRAKES

    g = make(T=4, full_finetune=True)
    method = DRAKES(g, CountToken(), truncate=2, kl_weight=1e-3, lr=3e-3, samples_per_prompt=1,
                    output_dir=str(tmp_path))
    cond = g.encode_condition([None] * 32)

    def mean_reward():
        with torch.no_grad():
            return float(CountToken()(g.sample(cond, generator=torch.Generator().manual_seed(99))).total.mean())

    before_r = mean_reward()
    before = [p.detach().clone() for p in g.trainable_parameters()]
    data = PromptDataModule(list(range(16)), list(range(8)), batch_size=16, val_batch_size=16, epoch_size=16 * 12)
    L.Trainer(max_steps=12, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, limit_val_batches=0).fit(method, datamodule=data)
    summary = json.loads((tmp_path / "summary.json").read_text())
    # the KL: one forward with grad per step
    assert summary["reward_after"] > summary["reward_before"] and summary["nfe_grad"] == 12 * 16 * 4
    after = g.trainable_parameters()
    assert any(not torch.equal(a, b) for a, b in zip(after, before))
    assert mean_reward() > before_r + 0.3, "token 3 becomes more frequent"
    with torch.no_grad(), g.base_model():  # the frozen copy is untouched
        assert all(torch.equal(p, b) for p, b in zip(g.denoiser.parameters(), before))


def test_drakes_rejects_black_box_rewards_and_continuous_generators():
    from rewardopt.methods.drakes import DRAKES
    from rewardopt.testing.toy import RandomWalkGenerator, SumReward

    class BlackBox(CountToken):
        differentiable = False

    with pytest.raises(TypeError, match="DRAKES needs a differentiable reward"):
        DRAKES(make(full_finetune=True), BlackBox())
    with pytest.raises(TypeError, match="DRAKES needs a Trainable generator .*RandomWalkGenerator does not declare"):
        DRAKES(RandomWalkGenerator(), SumReward())
