"""Regression tests for the review's steering findings (issue 12, items 2-5, 7, 8): selection without
replacement, DSearch look-ahead, FK-steering potentials, compute accounting, Free²Guide's step 0 and
SVDD's zero-variance last step."""

import math

import pytest
import torch

from rewardopt.methods.steering import group_sample


# ---------------------------------------------------------------------------------- item 2
def test_group_sample_without_replacement_keeps_the_best_when_alpha_is_small():
    """softmax(v/α) underflows to exact zeros at α = 0.01: multinomial then picked the third beam at
    random among the zeros ({0, 5, 6} in 200/200 draws). Gumbel-top-k in log space keeps {0, 5, 1}."""
    v = torch.tensor([0, -2, -3, -4, -5, -0.5, -6, -7.0])
    rng = torch.Generator().manual_seed(0)
    picks = [tuple(sorted(group_sample(v, 8, 0.01, rng, k=3, replacement=False).tolist())) for _ in range(200)]
    assert all(p == (0, 1, 5) for p in picks), set(picks)


def test_group_sample_first_pick_follows_the_softmax():
    """Gumbel-top-k's first pick is a draw from softmax(v/α); its later picks follow the
    Plackett-Luce order (sampling without replacement). Chi-square test over 20000 draws."""
    from scipy.stats import chisquare

    v = torch.tensor([0.3, -0.2, 0.1, -1.0, 0.0])
    alpha, n = 0.5, 20000
    rng = torch.Generator().manual_seed(1)
    vals = v.repeat(n)
    idx = group_sample(vals, 5, alpha, rng, k=3, replacement=False).view(n, 3) % 5
    first = torch.bincount(idx[:, 0], minlength=5).float()
    p = torch.softmax(v / alpha, 0)
    assert chisquare(first.numpy(), (p * n).numpy()).pvalue > 1e-3
    assert all(len(set(r)) == 3 for r in idx.tolist()), "without replacement: distinct picks"
    # second pick given first = 0 follows softmax over the rest
    rest = idx[idx[:, 0] == 0][:, 1]
    q = torch.softmax(v[1:] / alpha, 0)
    obs = torch.bincount(rest - 1, minlength=4).float()
    assert chisquare(obs.numpy(), (q * len(rest)).numpy()).pvalue > 1e-3


def test_group_sample_with_replacement_follows_the_softmax_and_survives_underflow():
    from scipy.stats import chisquare

    v = torch.tensor([0.3, -0.2, 0.1, -1.0])
    rng = torch.Generator().manual_seed(2)
    idx = group_sample(v, 4, 0.5, rng, k=20000, replacement=True)
    obs = torch.bincount(idx, minlength=4).float()
    assert chisquare(obs.numpy(), (torch.softmax(v / 0.5, 0) * 20000).numpy()).pvalue > 1e-3
    # a log-weight far below the others (exp underflows) is never drawn; -inf neither
    w = torch.tensor([0.0, -2000.0, float("-inf"), -1.0])
    idx = group_sample(w, 4, 1.0, rng, k=5000)
    assert set(idx.tolist()) <= {0, 3}


def test_dsearch_with_tiny_alpha_keeps_the_same_beams_as_alpha_zero():
    """Every caller of the shared draw: at α -> 0 sampling by exp(v/α) is the argmax / top-k."""
    from rewardopt.methods.dsearch import DSearch
    from rewardopt.methods.free2guide import Free2Guide
    from rewardopt.methods.svdd import SVDD
    from rewardopt.testing.toy import RandomWalkGenerator, SumReward

    g, r = RandomWalkGenerator(num_steps=5, dim=2), SumReward()
    for cls, kw in [(DSearch, {"width": 8, "search_start": 0.0}), (SVDD, {"num_children": 5}),
                    (Free2Guide, {"num_candidates": 5, "guide_steps": [0, 1, 2]})]:
        greedy, _ = cls(g, r, alpha=0.0, save_samples=False, **kw).generate(list(range(4)))
        cold, _ = cls(g, r, alpha=1e-4, save_samples=False, **kw).generate(list(range(4)))
        assert torch.allclose(greedy, cold), cls.__name__


# ---------------------------------------------------------------------------------- item 4
# On the random walk x_0 = x_T + std·(ε_1 + ... + ε_T), x_T ~ N(0, 1): x_0 ~ N(0, s²) with
# s² = 1 + T·std², and r = x. The target p·exp(r/α) is N(s²/α, s²) in closed form.
# ``sum`` tilts the intermediate particles far more than the target, so after resampling its final
# correction is degenerate at small k (mean 1.40 instead of 1.0 at k = 256 resampling every step, the
# same in an independent numpy replay): it is checked without resampling (importance sampling).
@pytest.mark.parametrize("potential,resample", [("difference", "ess"), ("max", "ess"), ("max", 1), ("instant", "ess"),
                                                ("max_increment", "ess"), ("sum", 1000)])
def test_smc_output_sample_draws_from_the_tilted_target(potential, resample):
    from scipy.stats import kstest

    from rewardopt.methods.smc import SMC
    from rewardopt.testing.toy import RandomWalkGenerator, SumReward

    T, std, alpha, n = 4, 0.5, 2.0, 3000
    s2 = 1 + T * std**2
    g = RandomWalkGenerator(num_steps=T, dim=1, std=std)
    m = SMC(g, SumReward(), num_particles=32, potential=potential, alpha=alpha, output="sample", seed=3,
            resample=resample, save_samples=False)
    x, _ = m.generate(list(range(n)))
    x = x.flatten().double()
    mean, var = s2 / alpha, s2
    assert abs(float(x.mean()) - mean) < 4 * math.sqrt(var / n) + 0.03, (potential, float(x.mean()))
    assert abs(float(x.var()) - var) < 0.2 * var, (potential, float(x.var()))
    assert kstest(x.numpy(), "norm", args=(mean, math.sqrt(var))).pvalue > 1e-3


def test_smc_without_the_final_correction_targets_the_product_of_potentials():
    """FK's ``max`` and ``sum`` potentials do not telescope: without exp(λ r(x_0)) / ∏G the output is
    tilted further than p·exp(r/α) (the old behaviour, kept as ``final_correction=False``)."""
    from rewardopt.methods.smc import SMC
    from rewardopt.testing.toy import RandomWalkGenerator, SumReward

    g = RandomWalkGenerator(num_steps=4, dim=1, std=0.5)
    for potential in ("max", "sum"):
        m = SMC(g, SumReward(), num_particles=32, potential=potential, alpha=2.0, output="sample", seed=3,
                final_correction=False, resample=1000, save_samples=False)
        x, _ = m.generate(list(range(2000)))
        assert float(x.mean()) > 1.5, potential  # the target's mean is 1.0


def test_smc_potentials_follow_fk_steering_by_hand():
    """Log-potentials per step for one particle path with values r = (1, 3, 2) and λ = 1/α = 2."""
    from rewardopt.methods.smc import log_potential

    r = [torch.tensor([1.0]), torch.tensor([3.0]), torch.tensor([2.0])]
    want = {"max": [2, 6, 6], "sum": [2, 8, 12], "difference": [2, 4, -2], "instant": [2, 6, 4],
            "max_increment": [2, 4, 0]}
    for pot, expect in want.items():
        state = None
        got = []
        for v in r:
            lp, state = log_potential(pot, v, state, lam=2.0)
            got.append(float(lp))
        assert got == expect, pot


def test_smc_cumulative_is_a_clear_error():
    from rewardopt.methods.smc import SMC
    from rewardopt.testing.toy import RandomWalkGenerator, SumReward

    with pytest.raises(ValueError, match="'sum'.*'instant'"):
        SMC(RandomWalkGenerator(), SumReward(), potential="cumulative")


# ---------------------------------------------------------------------------------- item 3
def _tiny(**kw):
    from tests.conftest import tiny_generator

    kw.setdefault("lora_rank", None)
    return tiny_generator(**kw)


def _colour():
    from domains.images.rewards import ColourReward

    return ColourReward("blue")


def test_diffusion_deterministic_step_is_diffusers_ddim_with_eta_zero():
    from diffusers import DDIMScheduler

    g = _tiny(eta=1.0)
    cond = g.encode_condition(["a red circle", "two blue squares"])
    x = torch.randn(2, *g.latent_shape, generator=torch.Generator().manual_seed(0))
    ref = DDIMScheduler.from_config(g.scheduler.config)
    ref.set_timesteps(g.num_steps)
    with torch.no_grad():
        for i in range(g.num_steps):
            out = g.model_output(x, i, cond)
            got = g.deterministic_step(x, i, cond, out=out)
            want = ref.step(out, g.timesteps[i], x, eta=0.0).prev_sample
            assert torch.allclose(got, want, atol=1e-5), i
            x = got


def test_dsearch_lookahead_values_children_after_deterministic_ddim_steps():
    """The look-ahead is K steps of the deterministic sampler (DDIM η = 0), not the stochastic step
    with its noise set to zero (the mean, which keeps too little of the noise variance)."""
    from rewardopt.methods.dsearch import DSearch

    g = _tiny(eta=1.0, num_steps=4)
    r = _colour()
    m = DSearch(g, r, width=2, lookahead=2, search_start=0.0, save_samples=False)
    cond = g.encode_condition(["a red circle", "two blue squares"])
    kids = torch.randn(2, *g.latent_shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        v, _ = m.lookahead_value(kids, 1, cond)
        y = kids
        for j in range(2):
            y = g.deterministic_step(y, 1 + j, cond)
        want = r(g.decode(g.predict_x0(y, 3, cond)), cond.raw).total
    assert torch.allclose(v, want, atol=1e-5)


def _masked(T=6):
    from rewardopt.generators.masked import MaskedDiffusionGenerator, tiny_denoiser

    return MaskedDiffusionGenerator(tiny_denoiser(6, 8, hidden=32, layers=2, heads=2), mask_token_id=5, seq_len=8,
                                    num_steps=T)


def test_masked_deterministic_step_unmasks_the_most_confident_positions():
    g = _masked(T=4)
    cond = g.encode_condition([None] * 3)
    x = g.init_state(cond)
    with torch.no_grad():
        out = g.model_output(x, 0, cond)
        y = g.deterministic_step(x, 0, cond, out=out)
    p_unmask, _ = g.transition_probs(0)
    k = round(8 * p_unmask)
    assert k >= 1
    unmasked = g.is_masked(y).squeeze(-1) == 0
    assert (unmasked.sum(1) == k).all()
    conf, tok = out.max(-1)
    for b in range(3):
        top = set(conf[b].topk(k).indices.tolist())
        assert set(unmasked[b].nonzero().flatten().tolist()) == top
        assert torch.equal(g.tokens(y)[b][unmasked[b]], tok[b][unmasked[b]])
    with torch.no_grad():  # the last step unmasks everything
        z = g.deterministic_step(y, 3, cond)
    assert not g.is_masked(z).any()


def test_dsearch_lookahead_on_masked_diffusion_changes_the_values():
    """A zero-noise step never unmasks (p_unmask <= p_stay), so the old look-ahead valued the child
    itself while charging K NFE; greedy unmasking makes the look-ahead see further."""
    from rewardopt.methods.dsearch import DSearch
    from rewardopt.rewards.base import Reward

    class Weighted(Reward):  # any change of x̂0's tokens changes the value
        def score(self, samples, cond):
            ids = samples.argmax(-1).double()
            return (ids * 7.0 ** torch.arange(ids.shape[1], dtype=torch.float64)).sum(-1)

    from types import SimpleNamespace

    from rewardopt.generators.masked import MaskedDiffusionGenerator

    class NextToken(torch.nn.Module):
        """A context-dependent masked LM: position l predicts (token at l-1) + 1 when that is known."""

        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(6, 6)
            self.emb.weight.data = torch.eye(6)

        def get_input_embeddings(self):
            return self.emb

        def forward(self, inputs_embeds):
            prev = torch.nn.functional.pad(inputs_embeds[:, :-1], (0, 0, 1, 0))[..., :5]
            bias = torch.linspace(0, 1, inputs_embeds.shape[1])[None, :, None] * torch.tensor([1.0, 0, 0, 0, 0])
            logits = 4 * prev.roll(1, dims=-1) + bias
            return SimpleNamespace(logits=torch.cat([logits, torch.zeros_like(logits[..., :1])], -1))

    g = MaskedDiffusionGenerator(NextToken(), mask_token_id=5, seq_len=8, num_steps=6)
    r = Weighted("weighted")
    cond = g.encode_condition([None] * 8)
    with torch.no_grad():
        kids = g.step(g.init_state(cond), 0, cond, generator=torch.Generator().manual_seed(0))
        v0, _ = DSearch(g, r, width=2, lookahead=0, search_start=0.0, save_samples=False).lookahead_value(kids, 1, cond)
        v2, _ = DSearch(g, r, width=2, lookahead=3, search_start=0.0, save_samples=False).lookahead_value(kids, 1, cond)
    assert not torch.equal(v0, v2)


# (DSearch look-ahead without a DeterministicStep generator: tests/test_capabilities.py)


# ---------------------------------------------------------------------------------- item 5
COST_KEYS = ("nfe", "nfe_grad", "backward", "decodes", "reward_calls", "value_calls")


def _counts(g, r, m):
    c = g.counter
    return {"nfe": c.nfe, "nfe_grad": c.nfe_grad, "backward": c.backward, "decodes": c.decodes,
            "reward_calls": r.calls, "value_calls": m.value_calls}


def _all_methods():
    from rewardopt.methods.best_of_n import BestOfN
    from rewardopt.methods.dps import DPS
    from rewardopt.methods.dsearch import DSearch
    from rewardopt.methods.free2guide import Free2Guide
    from rewardopt.methods.smc import SMC
    from rewardopt.methods.svdd import SVDD

    return [(BestOfN, {"n": 3}), (SVDD, {"num_children": 3}), (SMC, {"num_particles": 3, "resample": 1}),
            (SMC, {"num_particles": 3, "potential": "sum", "output": "sample"}),
            (Free2Guide, {"num_candidates": 3, "guide_steps": [0, 2, 3]}),
            (Free2Guide, {"num_candidates": 3, "guide_steps": [0, 1], "first_step": "children"}),
            (DPS, {"scale": 0.1}), (DPS, {"scale": 0.1, "num_chains": 2}),
            (DSearch, {"width": 4, "search_start": 0.0, "lookahead": 1}),
            (DSearch, {"width": 3, "search_start": 0.5, "lookahead": 2, "alpha": 0.5})]


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
@pytest.mark.parametrize("case", range(10))
def test_every_count_equals_the_analytic_cost(case, sampler):
    cls, kw = _all_methods()[case]
    g, r = _tiny(eta=1.0, sampler=sampler, num_steps=4), _colour()
    m = cls(g, r, seed=0, save_samples=False, **kw)
    before = _counts(g, r, m)
    samples, _ = m.generate(["a red circle", "two blue squares"])
    after = _counts(g, r, m)
    exp = m.expected_cost()
    assert set(exp) == set(COST_KEYS)
    assert {k: after[k] - before[k] for k in COST_KEYS} == {k: 2 * exp[k] for k in COST_KEYS}


def test_dps_reports_its_backward_passes_and_decodes():
    from rewardopt.methods.dps import DPS

    g = _tiny(eta=1.0, num_steps=3)
    exp = DPS(g, _colour(), num_chains=2, save_samples=False).expected_cost()
    assert exp["nfe_grad"] == exp["backward"] == 6 and exp["decodes"] == 6 + 2 + 1


def test_steering_summary_reports_every_count(tmp_path):
    import json

    import lightning as L

    from rewardopt.methods.dps import DPS
    from rewardopt.methods.svdd import SVDD
    from rewardopt.testing.toy import RandomWalkGenerator, SumReward

    for cls, kw in [(DPS, {"scale": 0.1, "num_chains": 2}), (SVDD, {"num_children": 3})]:
        g = RandomWalkGenerator(num_steps=3, dim=2)
        m = cls(g, SumReward(), output_dir=str(tmp_path), save_samples=False, **kw)
        trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
        trainer.predict(m, torch.utils.data.DataLoader(list(range(4)), batch_size=2, collate_fn=list))
        s = json.loads((tmp_path / "summary.json").read_text())
        exp = s["expected_cost_per_sample"]
        for k in COST_KEYS:
            assert s[k] == 4 * exp[k] and s[f"{k}_per_sample"] == exp[k], (cls.__name__, k)
        if cls is DPS:
            assert s["backward_per_sample"] == 6 and s["nfe_grad_per_sample"] == 6


def test_finetuning_summary_reports_decodes(tmp_path):
    import json

    from rewardopt.methods.draft import DRaFT
    from tests.conftest import tiny_generator
    from tests.test_methods import fit

    m = DRaFT(tiny_generator(), _colour(), k=1, output_dir=str(tmp_path))
    fit(m, 2, tmp_path)
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["decodes"] == 4 and s["decodes_grad"] == 4  # one differentiable decode per training sample


# ---------------------------------------------------------------------------------- item 7
def test_free2guide_step_zero_chooses_among_distinct_initial_noises():
    """As the public code (kjm981995/free2guide_code): at step 0 the n candidates are n initial
    noises x_T, valued by r(x̂0(x_T)); the best one takes the step. Replayed by hand on the walk."""
    from rewardopt.methods.free2guide import Free2Guide
    from rewardopt.testing.toy import RandomWalkGenerator, SumReward

    g, B, n, T = RandomWalkGenerator(num_steps=3, dim=2), 3, 4, 3
    m = Free2Guide(g, SumReward(), num_candidates=n, guide_steps=[0], save_samples=False)
    got, _ = m.generate(list(range(B)))
    rng, _ = m.rngs(0)
    xT = torch.randn((B * n, 2), generator=rng).view(B, n, 2)
    x = xT[torch.arange(B), xT.sum(-1).argmax(1)]
    for _ in range(T):
        x = x + torch.randn(x.shape, generator=rng)
    assert torch.allclose(got, x)


def test_free2guide_benchmark_guides_ten_percent():
    """The benchmark passes its own 10% (``--free2guide-frac``); the default (12%, the public code's
    steps 0-5 of 50) gives the same 2 of 20 steps here."""
    import sys

    from rewardopt.methods.free2guide import Free2Guide
    from rewardopt.testing.toy import RandomWalkGenerator, SumReward
    from tests.conftest import ROOT

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from inference_time import build

    g = RandomWalkGenerator(num_steps=20)
    assert Free2Guide(g, SumReward()).guided == [0, 1]
    assert build("Free2Guide", g, SumReward(), None, 0, 20).guided == [0, 1]


# ---------------------------------------------------------------------------------- item 8
def _alpha_to_one_generator():
    from diffusers import DDIMScheduler

    from domains.images.stable_diffusion import StableDiffusionGenerator
    from domains.images.tiny import build_tokenizer, tiny_text_encoder, tiny_unet

    torch.manual_seed(0)
    tok = build_tokenizer()
    sched = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          clip_sample=False, set_alpha_to_one=True, steps_offset=1, prediction_type="epsilon")
    return StableDiffusionGenerator.from_components(tiny_unet(16, channels=(8, 16)), tiny_text_encoder(len(tok)), tok,
                                                    sched, height=16, width=16, num_steps=3, guidance_scale=2.0,
                                                    eta=1.0, gradient_checkpointing=False)


@pytest.mark.parametrize("kind", ["ddpm", "ddim_alpha_to_one", "ddim"])
def test_svdd_spends_one_reward_call_on_a_zero_variance_step(kind):
    from rewardopt.methods.svdd import SVDD

    g = _alpha_to_one_generator() if kind == "ddim_alpha_to_one" else _tiny(eta=1.0, sampler=kind, num_steps=3)
    zero_last = kind != "ddim"
    assert [g.step_is_deterministic(i) for i in range(3)] == [False, False, zero_last]
    r, M = _colour(), 4
    m = SVDD(g, r, num_children=M, save_samples=False)
    c0 = r.calls
    m.generate(["a red circle", "two blue squares"])
    calls = M * 2 + (1 if zero_last else M)
    assert m.expected_cost()["reward_calls"] == calls and r.calls - c0 == 2 * calls


# ================================================================================== second review
# (issue 12, review of the landed fixes: excluded SMC particles, masked look-ahead, evaluation
# failures, group_sample's edge cases, Free²Guide's default)
class _ExcludeAt:
    """Wraps r(x) = sum(x) - 10 (negative, as JPEG's -kB) and excludes the given rows of the given
    reward calls (the call index counts scoring calls of this reward: SMC scores once per step)."""

    @staticmethod
    def make(rows_at_call: dict[int, list[int]], group: int | None = None):
        from rewardopt.rewards.base import Reward, RewardOutput

        class ExcludeAt(Reward):
            differentiable = False

            def __init__(self):
                super().__init__("sum_minus_10")
                self.n_calls = 0

            def score(self, samples, cond):
                total = samples.sum(dim=tuple(range(1, samples.ndim))) - 10.0
                exc = torch.zeros(len(total), dtype=torch.bool)
                rows = rows_at_call.get(self.n_calls, [])
                for r in rows:  # r: a row within each group (group given) or a flat row
                    if group:
                        exc[r::group] = True
                    else:
                        exc[r] = True
                self.n_calls += 1
                return RewardOutput(total.masked_fill(exc, float("-inf")), excluded=exc)

        return ExcludeAt()


@pytest.mark.parametrize("call", [0, 1])
@pytest.mark.parametrize("potential", ["max", "sum", "difference"])
def test_smc_particle_excluded_once_is_never_output(potential, call):
    """The review's scenario: r = sum(x) - 10, particle 0 of every group excluded once (at the first
    step; also at the second), k = 4, α = 1, output = sample, 200 groups. Its -1e30 value entered the
    path state, the final correction λv - (logG - lg) cancelled ±5e29 and lost λr: its final log-weight
    was exactly 0, the largest of its group (the others are λ·r < 0) in 100% of groups, so it was
    output most often. (Excluded at a later step, ``max`` ignored the exclusion altogether.)"""
    from rewardopt.methods.smc import SMC
    from rewardopt.testing.toy import RandomWalkGenerator

    k, B = 4, 200
    g = RandomWalkGenerator(num_steps=4, dim=1, std=0.5)
    r = _ExcludeAt.make({call: [0]}, group=k)
    m = SMC(g, r, num_particles=k, potential=potential, alpha=1.0, output="sample", resample=1000, seed=0,
            save_samples=False, trace=True)
    x, _ = m.generate(list(range(B)))
    final = m.traces[-1]
    logw, v = final["log_weights"].view(B, k), final["values"].view(B, k)
    assert torch.isneginf(logw[:, 0]).all(), logw[:5]
    assert torch.isfinite(logw[:, 1:]).all()
    # without resampling particle j stays at index j: the output is the particle whose final value it has
    chosen = (v - (x.flatten().double() - 10.0)[:, None]).abs().argmin(1)
    assert (chosen != 0).all(), f"the excluded particle was output in {int((chosen == 0).sum())}/{B} groups"
    assert m.dead_particles == B and m.all_dead_outputs == 0


def test_smc_dead_particles_are_resampled_away_and_an_all_dead_group_is_counted(tmp_path):
    """With resampling every step a dead particle is never a parent; a group whose particles all
    died outputs one drawn uniformly, counted in summary.json ("smc_all_dead_outputs")."""
    import json

    import lightning as L

    from rewardopt.methods.smc import SMC
    from rewardopt.testing.toy import RandomWalkGenerator

    k, B = 4, 6
    g = RandomWalkGenerator(num_steps=4, dim=1, std=0.5)
    # call 1: particle 0 of every group dies; call 2: all 4 particles of the first group (rows 0..3)
    r = _ExcludeAt.make({1: list(range(0, B * k, k)), 2: [0, 1, 2, 3]})
    m = SMC(g, r, num_particles=k, potential="max", alpha=1.0, output="sample", resample=1, seed=0,
            output_dir=str(tmp_path), save_samples=False, trace=True)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.predict(m, torch.utils.data.DataLoader(list(range(B)), batch_size=B, collate_fn=list))
    lw = [t["log_weights"].view(B, k) for t in m.traces]
    # after step 1 (trace 1: resampled, weights reset) no group holds a dead particle: the dead
    # particle 0 of each group was never drawn as a parent
    assert torch.isfinite(lw[1]).all()
    assert torch.isneginf(lw[2][0]).all() and torch.isfinite(lw[2][1:]).all()
    assert torch.isneginf(lw[3][0]).all(), "an all-dead group stays dead through (uniform) resampling"
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["smc_dead_particles"] == B + k and s["smc_all_dead_outputs"] == 1


# ---------------------------------------------------------------------------------- masked look-ahead
class _CheapMaskedLM(torch.nn.Module):
    """A seeded linear masked LM (embedding -> logits plus a per-position bias): 128 steps in ms."""

    def __init__(self, vocab=6, seq_len=8):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.head = torch.nn.Embedding(vocab, 8), torch.nn.Linear(8, vocab)
        self.bias = torch.nn.Parameter(torch.randn(seq_len, vocab))

    def get_input_embeddings(self):
        return self.emb

    def forward(self, inputs_embeds):
        from types import SimpleNamespace

        return SimpleNamespace(logits=self.head(inputs_embeds) + self.bias)


@pytest.mark.parametrize("L_,T", [(8, 32), (48, 128)])
def test_masked_deterministic_step_follows_the_schedule_when_few_positions_per_step(L_, T):
    """L/T < 0.5: round(n·p_unmask) was 0 at every step but the last (8/32: nothing unmasked at 31/31
    steps; 48/128: 127/127), so a look-ahead changed nothing while charging K NFE. The masked count
    after step i now follows the schedule: round(L·(1 - α(t_{i+1})))."""
    from rewardopt.generators.masked import MaskedDiffusionGenerator

    g = MaskedDiffusionGenerator(_CheapMaskedLM(6, L_), mask_token_id=5, seq_len=L_, num_steps=T)
    cond = g.encode_condition([None] * 2)
    x = g.init_state(cond)
    counts = []
    with torch.no_grad():
        for i in range(T):
            y = g.deterministic_step(x, i, cond)
            assert ((g.is_masked(y) <= g.is_masked(x)).all()), "an unmasked position never re-masks"
            counts.append(int(g.is_masked(y).sum(1).max()))
            assert (g.is_masked(y).sum((1, 2)) == g.is_masked(y).sum((1, 2))[0]).all()
            x = y
    want = [round(L_ * (1 - float(g.alpha(g._t[i + 1])))) for i in range(T)]
    assert counts == want
    assert counts[-1] == 0, "the final step unmasks everything"
    changed = sum(counts[i] < (counts[i - 1] if i else L_) for i in range(T - 1))
    assert changed >= L_ - 1, f"the look-ahead changed the state at only {changed} of {T - 1} steps"


def test_dsearch_masked_lookahead_changes_the_state_when_few_positions_per_step():
    """DSearch's K-step look-ahead from level 1 with L = 8, T = 32 (L/T = 0.25) unmasks positions."""
    from rewardopt.generators.masked import MaskedDiffusionGenerator

    g = MaskedDiffusionGenerator(_CheapMaskedLM(6, 8), mask_token_id=5, seq_len=8, num_steps=32)
    cond = g.encode_condition([None] * 3)
    with torch.no_grad():
        kids = g.step(g.init_state(cond), 0, cond, generator=torch.Generator().manual_seed(0))
        y = kids
        for j in range(4):
            y = g.deterministic_step(y, 1 + j, cond)
    assert not torch.equal(y, kids)
    assert (g.is_masked(y).sum((1, 2)) <= 7).all()


# ---------------------------------------------------------------------------------- evaluation failures
def _predict_with_failing_eval(tmp_path, fail_below: float):
    """Best-of-1 on the walk; the evaluation reward sum(x) excludes (fails on) samples below ``fail_below``
    — a judge that crashes on the bad outputs."""
    import csv
    import json

    import lightning as L

    from rewardopt.methods.best_of_n import BestOfN
    from rewardopt.rewards.base import Reward, RewardOutput
    from rewardopt.testing.toy import RandomWalkGenerator, SumReward

    class CrashesOnBad(Reward):
        differentiable = False

        def score(self, samples, cond):
            v = samples.sum(1)
            exc = v < fail_below
            return RewardOutput(v.masked_fill(exc, float("-inf")), excluded=exc)

    m = BestOfN(RandomWalkGenerator(num_steps=3, dim=2), SumReward(), n=1, eval_reward=CrashesOnBad("sum"),
                output_dir=str(tmp_path), save_samples=False)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.predict(m, torch.utils.data.DataLoader(list(range(40)), batch_size=10, collate_fn=list))
    return json.loads((tmp_path / "summary.json").read_text()), list(csv.DictReader((tmp_path / "rewards.csv").open()))


def test_failed_evaluations_are_counted_and_cannot_improve_the_median(tmp_path):
    """A failed evaluation was dropped from reward_stats (the median went up when the judge crashed on
    the bad samples) while ``samples`` still counted it and nothing said so. Now failures are counted
    (``eval_excluded``, ``reward_stats.failed`` / ``failed_frac``) and rank below every valid reward in
    the median and top-10%: a failure can only lower them."""
    s_all, rows_all = _predict_with_failing_eval(tmp_path / "none", fail_below=-1e9)
    s, rows = _predict_with_failing_eval(tmp_path / "some", fail_below=-2.0)
    true = sorted(float(r["reward"]) for r in rows_all)
    n_failed = sum(v < -2.0 for v in true)
    assert 0 < n_failed < 20
    assert s["samples"] == 40 and s["eval_excluded"] == n_failed
    assert s["reward_stats"]["failed"] == n_failed and s["reward_stats"]["failed_frac"] == n_failed / 40
    assert s_all["eval_excluded"] == 0 and s_all["reward_stats"]["failed"] == 0
    # the same samples (same seeds): the median with failures at the bottom is the true median's order
    # statistic, never above it
    ranked = sorted([float("-inf")] * n_failed + [v for v in true if v >= -2.0])
    assert s["reward_stats"]["median"] == pytest.approx(ranked[(40 - 1) // 2])
    assert s["reward_stats"]["median"] <= s_all["reward_stats"]["median"]
    assert s["reward_stats"]["top10"] == pytest.approx(s_all["reward_stats"]["top10"])
    assert sum(r["eval_excluded"] == "1" for r in rows) == n_failed


def test_a_median_that_falls_on_failed_evaluations_is_null(tmp_path):
    s, _ = _predict_with_failing_eval(tmp_path, fail_below=1e9)  # every evaluation fails
    assert s["eval_excluded"] == 40
    assert s["reward_stats"]["median"] is None and s["reward_stats"]["top10"] is None
    assert s["reward_stats"]["mean"] is None and s["reward_stats"]["failed_frac"] == 1.0


# ---------------------------------------------------------------------------------- group_sample edge cases
@pytest.mark.parametrize("replacement", [False, True])
def test_group_sample_draws_uniformly_when_no_value_is_finite(replacement):
    """Without replacement an all -inf group always gave the same indices (top-k of -inf + Gumbel)."""
    v = torch.full((4,), float("-inf"))
    rng = torch.Generator().manual_seed(0)
    picks = torch.stack([group_sample(v, 4, 1.0, rng, k=2, replacement=replacement) for _ in range(800)])
    counts = torch.bincount(picks.flatten(), minlength=4)
    assert (counts > 300).all(), counts  # 400 expected each


@pytest.mark.parametrize("replacement", [False, True])
def test_group_sample_rejects_nan(replacement):
    """A NaN value was always picked first without replacement (and made the group uniform with)."""
    v = torch.tensor([0.0, float("nan"), -1.0, -2.0])
    with pytest.raises(ValueError, match="NaN"):
        group_sample(v, 4, 1.0, torch.Generator().manual_seed(0), k=2, replacement=replacement)


# ---------------------------------------------------------------------------------- Free²Guide default
def test_free2guide_default_guides_steps_0_to_5_of_50_as_the_public_code():
    """kjm981995/free2guide_code path_integral_video.py guides ``i >= 0 and i <= 5`` of ddim_steps=50:
    6 steps (12%), scaled to T; the default guided 5 of 50."""
    from rewardopt.methods.free2guide import Free2Guide
    from rewardopt.testing.toy import RandomWalkGenerator, SumReward

    assert Free2Guide(RandomWalkGenerator(num_steps=50), SumReward()).guided == list(range(6))
    assert Free2Guide(RandomWalkGenerator(num_steps=25), SumReward()).guided == list(range(3))
    assert Free2Guide(RandomWalkGenerator(num_steps=4), SumReward()).guided == [0]
