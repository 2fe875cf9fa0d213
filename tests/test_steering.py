"""Inference-time steering: width 1 is the plain sampler, argmax picks the best child, counters
equal the analytic costs, budgets pick the largest width that fits, bad configs fail clearly."""

import pytest
import torch

from rewardopt.methods.best_of_n import BestOfN
from rewardopt.methods.dps import DPS
from rewardopt.methods.dsearch import DSearch, beam_width
from rewardopt.methods.free2guide import Free2Guide
from rewardopt.methods.smc import SMC
from rewardopt.methods.steering import mean_pairwise_distance, replace_worst
from rewardopt.methods.svdd import SVDD
from rewardopt.rewards.ensembles import MinMaxSum, RankConsensus
from rewardopt.testing.toy import RandomWalkGenerator, SumReward
from rewardopt.writers import reward_stats
from tests.conftest import tiny_generator

PROMPTS = ["a red circle", "two blue squares", "three green triangles"]

WIDTH_ONE = {
    "best_of_n": (BestOfN, {"n": 1}),
    "svdd": (SVDD, {"num_children": 1}),
    "smc": (SMC, {"num_particles": 1}),
    "free2guide": (Free2Guide, {"num_candidates": 1, "guide_steps": 2}),
    "dps": (DPS, {"scale": 0.0}),
    "dsearch": (DSearch, {"width": 1, "lookahead": 2, "search_start": 0.0}),
}


@pytest.fixture(scope="module")
def gen():
    return tiny_generator(lora_rank=None, eta=1.0)


def reward():
    from domains.images.rewards import ColourReward

    return ColourReward("blue")


@pytest.mark.parametrize("name", list(WIDTH_ONE))
def test_width_one_reproduces_the_plain_sampler(gen, name):
    cls, kw = WIDTH_ONE[name]
    m = cls(gen, reward(), seed=5, save_samples=False, **kw)
    got, _ = m.generate(PROMPTS, batch_idx=0)
    rng, _ = m.rngs(0)
    with torch.no_grad():
        plain = gen.decode(gen.sample(gen.encode_condition(PROMPTS), generator=rng))
    assert torch.equal(got, plain)


def test_svdd_argmax_follows_the_known_best_child():
    """On a random walk with r = sum(x), SVDD-PM must keep, at every step, the child with the
    largest sum: replay the same noise stream by hand and compare."""
    g, r, M, B = RandomWalkGenerator(num_steps=5, dim=3), SumReward(), 6, 4
    m = SVDD(g, r, num_children=M, seed=0, save_samples=False, trace=True)
    got, _ = m.generate(list(range(B)))
    rng, _ = m.rngs(0)
    x = torch.randn((B, 3), generator=rng)
    for _ in range(5):
        kids = x.repeat_interleave(M, 0) + torch.randn((B * M, 3), generator=rng)
        x = kids.view(B, M, 3)[torch.arange(B), kids.sum(1).view(B, M).argmax(1)]
    assert torch.allclose(got, x)
    # and the trace agrees: each chosen index is the argmax of its group's values
    for t in m.traces:
        v = t["values"].view(B, M)
        assert torch.equal(t["chosen"] % M, v.argmax(1))


@pytest.mark.parametrize("cls,kw", [(Free2Guide, {"num_candidates": 5, "guide_steps": [0, 2]}),
                                    (DSearch, {"width": 6, "search_start": 0.0}),
                                    (BestOfN, {"n": 5})])
def test_selection_keeps_the_highest_values(cls, kw):
    g, r = RandomWalkGenerator(num_steps=4, dim=2), SumReward()
    m = cls(g, r, seed=1, save_samples=False, trace=True, **kw)
    out, _ = m.generate(list(range(3)))
    assert m.traces
    for t in m.traces:
        keep = t.get("keep", 1)
        n = t["values"].numel() // 3
        best = t["values"].view(3, n).topk(keep, dim=1).values
        assert torch.allclose(t["values"][t["chosen"]].view(3, keep), best)
    last = m.traces[-1]
    if last["step"] >= g.num_steps - 1:  # a selection at the last step: the output is the best final candidate
        assert torch.allclose(out.sum(1), last["values"].view(3, -1).max(1).values)


COST_CASES = [
    (BestOfN, {"n": 3}),
    (SVDD, {"num_children": 3}),
    (SVDD, {"num_children": 2, "replace_frac": 0.25, "num_samples": 4}),
    (SMC, {"num_particles": 3, "resample": 1}),
    (SMC, {"num_particles": 3, "potential": "max", "resample": "ess"}),
    (Free2Guide, {"num_candidates": 3, "guide_steps": [0, 3]}),
    (DPS, {"scale": 0.5, "num_chains": 2}),
    (DSearch, {"width": 4, "search_start": 0.25, "lookahead": 1}),
    (DSearch, {"width": 5, "schedule": "linear", "search_start": 0.0, "replace_frac": 0.5, "num_samples": 2}),
]


@pytest.mark.parametrize("cls,kw", COST_CASES, ids=lambda v: v.__name__ if isinstance(v, type) else str(v))
def test_counters_equal_the_analytic_cost(gen, cls, kw):
    r = reward()
    m = cls(gen, r, seed=0, save_samples=False, **kw)
    n0, c0 = gen.counter.nfe, r.calls
    samples, _ = m.generate(PROMPTS[:2])
    n_out = 2 * m.num_samples
    assert len(samples) == n_out
    exp = m.expected_cost()
    assert gen.counter.nfe - n0 == exp["nfe"] * n_out
    assert r.calls - c0 == exp["reward_calls"] * n_out


@pytest.mark.parametrize("cls", [BestOfN, SVDD, SMC, Free2Guide, DPS, DSearch])
@pytest.mark.parametrize("budget", [16, 33])
def test_budget_picks_the_largest_width_that_fits(gen, cls, budget):
    m = cls(gen, reward(), budget=budget, save_samples=False)
    w = getattr(m, m.width_name)
    assert m.expected_cost()["nfe"] <= budget
    setattr(m, m.width_name, w + 1)
    assert m.expected_cost()["nfe"] > budget


def test_budget_below_width_one_is_an_error(gen):
    with pytest.raises(ValueError, match="below the cost of width 1"):
        BestOfN(gen, reward(), budget=3)


@pytest.mark.parametrize("cls", [SVDD, SMC, Free2Guide, DSearch])
def test_deterministic_sampler_is_rejected(cls):
    g = tiny_generator(lora_rank=None, eta=0.0)
    with pytest.raises(ValueError, match="eta > 0"):
        cls(g, reward())


def test_dps_needs_a_differentiable_reward(gen):
    from domains.images.rewards import JpegCompressibilityReward

    with pytest.raises(TypeError, match="DPS needs a differentiable reward"):
        DPS(gen, JpegCompressibilityReward())


def test_dps_moves_along_the_reward_gradient():
    g = RandomWalkGenerator(num_steps=3, dim=2)
    plain, _ = DPS(g, SumReward(), scale=0.0, save_samples=False).generate([0, 1])
    guided, _ = DPS(g, SumReward(), scale=0.5, save_samples=False).generate([0, 1])
    # ∇ sum(x) = 1 in every coordinate: each of 3 steps adds 0.5
    assert torch.allclose(guided - plain, torch.full_like(plain, 1.5))


def test_smc_resamples_toward_high_value_particles():
    g = RandomWalkGenerator(num_steps=6, dim=1)
    m = SMC(g, SumReward(), num_particles=8, alpha=0.05, resample=1, save_samples=False, trace=True)
    out, _ = m.generate([0])
    assert m.resamples == 5  # every step but the last
    # with near-greedy potentials the survivors after the first resampling descend from the best particle
    first = m.traces[0]["values"]
    second = m.traces[1]["values"]
    assert second.std() < first.std() + 2.0 and out.sum() >= first.max() - 3.0


def test_smc_ess_trigger():
    g = RandomWalkGenerator(num_steps=4, dim=1, std=1e-3)  # particles almost equal: weights stay flat
    m = SMC(g, SumReward(), num_particles=4, alpha=10.0, resample="ess", save_samples=False)
    m.generate([0, 1])
    assert m.resamples == 0
    m2 = SMC(RandomWalkGenerator(num_steps=4, dim=1, std=5.0), SumReward(), num_particles=4, alpha=0.01,
             resample="ess", save_samples=False)
    m2.generate([0, 1])
    assert m2.resamples > 0


def test_svdd_r_replaces_the_worst_chains():
    g = RandomWalkGenerator(num_steps=3, dim=1)
    m = SVDD(g, SumReward(), num_children=2, replace_frac=0.5, num_samples=4, save_samples=False)
    out, _ = m.generate([0])
    # same noise stream without replacement: copying the best chains over the worst raises the total
    plain, _ = SVDD(g, SumReward(), num_children=2, num_samples=4, save_samples=False).generate([0])
    assert out.sum() > plain.sum()


def test_replace_worst_and_stats():
    v = torch.tensor([1.0, 5.0, 3.0, 0.0, 2.0, 2.5, 9.0, -1.0])
    idx = replace_worst(v, 4, 0.25)
    assert idx.tolist() == [0, 1, 2, 1, 4, 5, 6, 6]
    idx = replace_worst(v, 4, 0.5)
    assert idx.tolist() == [2, 1, 2, 1, 5, 5, 6, 6]
    s = reward_stats(torch.arange(20.0))
    assert s["median"] == 9.0 and s["top10"] == 18.5
    x = torch.zeros(4, 1, 2, 2)
    x[1] += 2.0
    assert mean_pairwise_distance(x, 2) == pytest.approx(1.0)
    assert mean_pairwise_distance(x, 1) is None


def test_beam_schedules_shrink_from_width_to_one():
    for s in ("exponential", "quadratic", "linear", "sigmoid"):
        widths = [beam_width(p / 10, 16, s) for p in range(11)]
        assert widths[0] == 16 and widths[-1] == 1
        assert all(a >= b for a, b in zip(widths, widths[1:]))
    assert beam_width(0.5, 16, "exponential") < beam_width(0.5, 16, "quadratic")
    with pytest.raises(ValueError, match="schedule"):
        beam_width(0.5, 4, "cosine")


def test_batch_relative_ensembles():
    a, b = SumReward(name="a"), SumReward(name="b")
    x = torch.tensor([[0.0], [1.0], [3.0]])
    mm = MinMaxSum({"a": a, "b": b}, {"a": 0.75, "b": 0.25})
    assert torch.allclose(mm(x).total, torch.tensor([0.0, 1 / 3, 1.0]))
    rc = RankConsensus([a])
    assert torch.allclose(rc(torch.tensor([[2.0], [0.0], [2.0]])).total, torch.tensor([0.75, 0.0, 0.75]))
    assert mm.differentiable_part() is None and mm.batch_relative


@pytest.mark.parametrize("cls,kw,calls", [(Free2Guide, {"num_candidates": 4, "guide_steps": [0, 1]}, 6),
                                          (SVDD, {"num_children": 4}, 9), (SMC, {"num_particles": 4}, 9)])
def test_batch_relative_rewards_are_scored_per_decision(cls, kw, calls):
    seen = []

    class Spy(RankConsensus):
        def score(self, samples, cond):
            seen.append(len(samples))
            return super().score(samples, cond)

    g = RandomWalkGenerator(num_steps=3, dim=1)
    m = cls(g, Spy([SumReward()]), save_samples=False, **kw)
    m.generate([0, 1, 2])
    assert seen == [4] * calls  # each chain's 4 candidates scored alone, never mixed with another chain's


from rewardopt.testing.contracts import GeneratorContract  # noqa: E402


class TestRandomWalkContract(GeneratorContract):
    raw_conditions = [0, 1, 2]

    @pytest.fixture
    def make_generator(self):
        return lambda: RandomWalkGenerator(num_steps=3, dim=2)
