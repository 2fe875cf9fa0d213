"""Autoregressive generator: the Generator contract, sampling equal to an independent per-sample
reference on input_ids (left padding and positions right), greedy equal to ``generate``, EOS
padding, top-k/top-p, the teacher-forced Gumbel relaxation (one-hot forward, gradient backward),
KL to the reference, and Best-of-N on token sequences."""

import pytest
import torch

from rewardopt.generators.autoregressive import AutoregressiveGenerator, filter_logits
from rewardopt.testing.contracts import GeneratorContract

V, BOS, EOS, N = 12, 0, 1, 5


def tiny_lm(seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=16, n_layer=1, n_head=2, n_positions=32,
                                      bos_token_id=BOS, eos_token_id=EOS)).eval()


def make(**kw):
    kw.setdefault("max_new_tokens", N)
    return AutoregressiveGenerator(tiny_lm(), bos_token_id=BOS, **kw)


PROMPTS = [[3, 4, 5], [6], None]


class TestAutoregressiveContract(GeneratorContract):
    raw_conditions = PROMPTS

    @pytest.fixture
    def make_generator(self):
        def build():
            g = make(full_finetune=True)
            g.setup_trainable()
            return g
        return build


def test_sampling_matches_a_per_sample_reference_on_input_ids():
    """Each prompt alone, unpadded, through lm(input_ids=...), Gumbel-max with the same uniforms."""
    g = make(forbidden_token_ids=[BOS])
    with torch.no_grad():
        got = g.tokens(g.sample(g.encode_condition(PROMPTS), generator=torch.Generator().manual_seed(7)))
    rng = torch.Generator().manual_seed(7)
    seqs = [[BOS, *(p or [])] for p in PROMPTS]
    for i in range(N):
        u = torch.rand((len(PROMPTS), V), generator=rng).clamp(1e-10, 1 - 1e-7)
        for b, seq in enumerate(seqs):
            with torch.no_grad():
                logits = g.lm(input_ids=torch.tensor([seq])).logits[0, -1]
            logits[BOS] = float("-inf")
            seq.append(int((torch.log_softmax(logits, -1) - torch.log(-torch.log(u[b]))).argmax()))
    want = torch.tensor([s[-N:] for s in seqs])
    assert torch.equal(got, want)


def test_greedy_equals_transformers_generate():
    g = make(temperature=0.0)
    assert not g.stochastic
    with torch.no_grad():
        got = g.tokens(g.sample(g.encode_condition([[3, 4, 5]])))
        ref = g.lm.generate(torch.tensor([[BOS, 3, 4, 5]]), max_new_tokens=N, do_sample=False, pad_token_id=EOS,
                            eos_token_id=None, min_new_tokens=N)[0, -N:]
    assert torch.equal(got[0], ref)


def test_positions_after_eos_are_padding():
    g = make(eos_token_id=EOS, pad_token_id=2)
    cond = g.encode_condition([None])
    x = g.init_state(cond)
    noise = torch.zeros(1, N, V)
    noise[0, 0, EOS] = 1e4  # force EOS first
    with torch.no_grad():
        for i in range(N):
            x = g.step(x, i, cond, noise=noise)
    assert g.tokens(x)[0].tolist() == [EOS] + [2] * (N - 1)


def test_sampled_targets_mask_the_forced_padding_after_eos():
    g = make(eos_token_id=EOS, pad_token_id=2)
    x = g.from_tokens(torch.tensor([[5, EOS, 2, 2, 2], [5, 6, 7, 8, 9]]))
    ids, mask = g.sampled_targets(x)
    assert mask.tolist() == [[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]] and ids[0, :2].tolist() == [5, EOS]


def test_top_k_and_top_p_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.7)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.85)).tolist() == [[False, False, False, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.96)).tolist() == [[False, False, False, False]]
    g = make(top_k=1)
    with torch.no_grad():  # top-1 sampling is greedy whatever the noise
        a = g.tokens(g.sample(g.encode_condition(PROMPTS), generator=torch.Generator().manual_seed(0)))
        b = g.tokens(g.sample(g.encode_condition(PROMPTS), generator=torch.Generator().manual_seed(1)))
    assert torch.equal(a, b)


def test_teacher_forced_gumbel_is_one_hot_forward_and_differentiable_backward():
    g = make(full_finetune=True)
    g.setup_trainable()
    cond = g.encode_condition(PROMPTS)
    targets = torch.randint(2, V, (3, N), generator=torch.Generator().manual_seed(0))
    soft, logp = g.teacher_forced(cond, targets, generator=torch.Generator().manual_seed(1))
    hard = torch.nn.functional.one_hot(soft.detach().argmax(-1), V).float()
    assert soft.shape == (3, N, V) and torch.allclose(soft.detach(), hard, atol=1e-6)  # one-hot up to rounding
    assert g.counter.nfe == 3  # one pass for all positions
    reward_weights = torch.randn(V)
    (soft @ reward_weights).sum().backward()
    grads = [p.grad for p in g.trainable_parameters()]
    assert any(gr is not None and gr.abs().sum() > 0 for gr in grads), "the reward's gradient must reach the LM"
    # the relaxation draws from the model's own conditionals: logp equals a teacher-forced pass on input_ids
    with torch.no_grad():
        ref = g.lm(input_ids=torch.cat([torch.tensor([[BOS, 6]]), targets[1:2, :-1]], 1)).logits[0, -N:]
    assert torch.allclose(logp[1].detach(), torch.log_softmax(ref, -1), atol=1e-5)


def test_kl_is_zero_for_identical_policies_and_positive_after_a_change():
    g = make(full_finetune=True)
    g.setup_trainable()
    cond = g.encode_condition(PROMPTS)
    targets = torch.randint(2, V, (3, N), generator=torch.Generator().manual_seed(0))
    _, logp = g.teacher_forced(cond, targets)
    assert torch.allclose(g.kl_to_reference(cond, targets, logp), torch.zeros(3), atol=1e-6)
    with torch.no_grad():
        g.lm.lm_head.weight.add_(0.5 * torch.randn_like(g.lm.lm_head.weight))
    _, logp = g.teacher_forced(cond, targets)
    kl = g.kl_to_reference(cond, targets, logp)
    assert (kl > 1e-3).all()
    kl.sum().backward()
    assert g.lm.lm_head.weight.grad.abs().sum() > 0


def test_bad_prompts_are_rejected():
    g = make()
    with pytest.raises(ValueError, match="outside the vocabulary"):
        g.encode_condition([[V + 3]])
    with pytest.raises(TypeError, match="override prompt_tokens"):
        g.encode_condition(["some text"])
    with pytest.raises(ValueError, match="max_new_tokens"):
        make(max_new_tokens=0)


def test_best_of_n_raises_a_token_count_reward():
    from rewardopt.methods.best_of_n import BestOfN
    from rewardopt.rewards.base import Reward

    class CountToken(Reward):
        def score(self, samples, cond):
            return samples[..., 3].sum(-1)

    g = make(forbidden_token_ids=[BOS])
    reward = CountToken("count3")
    m = BestOfN(g, reward, n=6, seed=0, save_samples=False)
    cond = g.encode_condition([None] * 40)
    with torch.no_grad():
        rng, srng = m.rngs(0)
        best = m.search(cond, rng, srng)
        assert g.counter.nfe == 6 * 40 * N
        plain = torch.cat([g.sample(cond, generator=torch.Generator().manual_seed(s)) for s in range(6)])
    assert best.shape == (40, N, V)
    assert reward(best).total.mean() > reward(plain).total.mean() + 0.5  # plain: about N/11 = 0.45 per sequence


@pytest.mark.parametrize("rollout", [0, 2, None])
@pytest.mark.parametrize("method", ["svdd", "smc", "dsearch", "free2guide"])
def test_search_methods_count_the_nfe_of_rollout_x0_in_their_expected_cost(method, rollout):
    """x̂0 of a token LM is the prefix plus greedy tokens: with ``x0_rollout`` > 0 (None: to the
    end) each value spends more NFE, which the methods' analytic cost must include."""
    from rewardopt.methods.dsearch import DSearch
    from rewardopt.methods.free2guide import Free2Guide
    from rewardopt.methods.smc import SMC
    from rewardopt.methods.svdd import SVDD
    from rewardopt.rewards.base import Reward

    class CountToken(Reward):
        def score(self, samples, cond):
            return samples[..., 3].sum(-1)

    g = make(forbidden_token_ids=[BOS], x0_rollout=rollout)
    r = CountToken("count3")
    m = {"svdd": lambda: SVDD(g, r, num_children=3, save_samples=False),
         "smc": lambda: SMC(g, r, num_particles=3, save_samples=False),
         "dsearch": lambda: DSearch(g, r, width=4, lookahead=1, save_samples=False),
         "free2guide": lambda: Free2Guide(g, r, num_candidates=3, guide_steps=[0, 2, 4], save_samples=False)}[method]()
    cond = g.encode_condition([[3, 4], None])
    with torch.no_grad():
        rng, srng = m.rngs(0)
        m.search(cond, rng, srng)
    expected = m.expected_cost()
    assert g.counter.nfe == 2 * expected["nfe"]
    assert r.calls == 2 * expected["reward_calls"]
    if rollout != 0:
        assert expected["nfe"] > {"svdd": 1 + 3 * (N - 1), "smc": 3 * N}.get(method, 0)


def test_svdd_on_a_token_lm_raises_the_reward_over_plain_sampling():
    from rewardopt.methods.svdd import SVDD
    from rewardopt.rewards.base import Reward

    class CountToken(Reward):
        def score(self, samples, cond):
            return samples[..., 3].sum(-1)

    cond = None
    scores = {}
    for rollout in (0, None):
        g = make(forbidden_token_ids=[BOS], x0_rollout=rollout)
        cond = g.encode_condition([None] * 60)
        m = SVDD(g, CountToken("c"), num_children=4, save_samples=False)
        with torch.no_grad():
            scores[rollout] = CountToken("c")(m.search(cond, *m.rngs(0))).total.mean().item()
    with torch.no_grad():
        plain = CountToken("c")(g.sample(cond, generator=torch.Generator().manual_seed(0))).total.mean().item()
    assert scores[0] > plain + 0.5 and scores[None] > plain + 0.5, (scores, plain)


class TokenPreference(__import__("rewardopt.rewards.base", fromlist=["Reward"]).Reward):
    """Differentiable: mean over positions of a per-token score (token 3 scores 1, others 0)."""

    differentiable = True

    def score(self, samples, cond):
        w = torch.zeros(V)
        w[3] = 1.0
        return (samples @ w).mean(-1)


def test_diffro_changes_the_lm_and_raises_the_reward_within_bounded_kl(tmp_path):
    import lightning as L

    from rewardopt.data import PromptDataModule
    from rewardopt.methods.diffro import DiffRO

    torch.manual_seed(0)
    g = make(full_finetune=True, forbidden_token_ids=[BOS])
    targets = torch.randint(2, V, (32, N), generator=torch.Generator().manual_seed(0)).tolist()
    pairs = [([4 + k % 3], t) for k, t in enumerate(targets)]
    m = DiffRO(g, TokenPreference("prefers_3"), kl_weight=0.1, lr=3e-3, seed=0, output_dir=str(tmp_path))
    before = [p.detach().clone() for p in g.trainable_parameters()]
    cond = g.encode_condition([[4], [5], [6]] * 20)
    with torch.no_grad():
        r0 = m.reward(g.sample(cond, generator=torch.Generator().manual_seed(9))).total.mean()
    dm = PromptDataModule(pairs, [[4], [5]], batch_size=8, val_batch_size=4, val_repeats=1, epoch_size=64)
    L.Trainer(max_steps=30, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, limit_val_batches=0).fit(m, datamodule=dm)
    assert any(not torch.equal(a, b) for a, b in zip(g.trainable_parameters(), before))
    with torch.no_grad():
        r1 = m.reward(g.sample(cond, generator=torch.Generator().manual_seed(9))).total.mean()
        _, logp = g.teacher_forced(g.encode_condition([p[0] for p in pairs]), torch.tensor(targets))
        kl = g.kl_to_reference(g.encode_condition([p[0] for p in pairs]), torch.tensor(targets), logp).mean()
    assert r1 > r0 + 0.1, (r0, r1)  # free-running samples, not the training relaxation (measured 0.08 -> 0.26)
    assert 0 < kl < 20 * N


def test_diffro_rejects_what_it_cannot_train():
    from rewardopt.methods.diffro import DiffRO
    from rewardopt.testing.toy import RandomWalkGenerator

    with pytest.raises(TypeError, match="DiffRO needs a Trainable generator"):
        DiffRO(RandomWalkGenerator(), TokenPreference("p"))
    with pytest.raises(ValueError, match="full_finetune"):
        DiffRO(make(), TokenPreference("p"))
    m = DiffRO(make(full_finetune=True), TokenPreference("p"))
    with pytest.raises(ValueError, match="pairs"):
        m.loss_terms(["just a condition"])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        m.loss_terms([([4], [V + 1])])


def test_causal_lm_pretraining_learns_a_prompt_to_tokens_map(tmp_path):
    import lightning as L

    from rewardopt.data import PromptDataModule
    from rewardopt.generators.autoregressive import CausalLMPretraining

    g = make(eos_token_id=EOS, pad_token_id=2, temperature=0.0)
    pairs = [([k], [k + 4] * (1 + k % 3)) for k in range(3, 6)]  # prompt k -> (k+4) repeated 1..3 times, then EOS
    ids, mask = g.pad_targets([pairs[2][1]], append_eos=True)
    assert ids[0].tolist() == [9, 9, 9, EOS, 2] and mask[0].tolist() == [1, 1, 1, 1, 0]
    m = CausalLMPretraining(g, lr=1e-2, output_dir=str(tmp_path))
    before = float(m.loss(pairs))
    dm = PromptDataModule(pairs, [p[0] for p in pairs], batch_size=3, epoch_size=3)
    L.Trainer(max_steps=150, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, limit_val_batches=0).fit(m, datamodule=dm)
    g.lm.eval()
    assert float(m.loss(pairs)) < 0.1 * before
    with torch.no_grad():
        out = g.tokens(g.sample(g.encode_condition([p[0] for p in pairs])))
    for (_, target), row in zip(pairs, out.tolist()):
        assert row[:len(target) + 1] == target + [EOS] and set(row[len(target) + 1:]) <= {2}


def test_reinforce_raises_a_black_box_reward(tmp_path):
    import lightning as L

    from rewardopt.data import PromptDataModule
    from rewardopt.methods.reinforce import Reinforce
    from rewardopt.rewards.blackbox import BlackBoxReward

    class Count3(BlackBoxReward):  # a number per sequence, no gradient
        def score_object(self, obj, cond):
            return float((torch.as_tensor(obj).argmax(-1) == 3).float().mean())

    g = make(full_finetune=True, forbidden_token_ids=[BOS])
    m = Reinforce(g, Count3(max_workers=1, name="count3"), samples_per_prompt=4, kl_weight=0.01, lr=1e-2, seed=0,
                  output_dir=str(tmp_path))
    cond = g.encode_condition([[4], [5]] * 30)
    with torch.no_grad():
        r0 = m.reward(g.sample(cond, generator=torch.Generator().manual_seed(9))).total.mean()
    dm = PromptDataModule([[4], [5]], [[4]], batch_size=2, val_batch_size=1, val_repeats=1, epoch_size=64)
    L.Trainer(max_steps=40, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, limit_val_batches=0).fit(m, datamodule=dm)
    with torch.no_grad():
        r1 = m.reward(g.sample(cond, generator=torch.Generator().manual_seed(9))).total.mean()
    assert r1 > r0 + 0.1, (r0, r1)
