"""PrivateKernelBandit: data-independent exploration, the sensitivity bound, the symmetric noise, KRR at
epsilon = inf, replay, and the release's life cycle."""

from __future__ import annotations

import math

import pytest
import torch

from rewardopt.feedback.bandit import (
    PrivateKernelBandit,
    half_vec,
    joint_sensitivity,
    noise_spectral_bound,
    release_vector,
    simple_regret,
    symmetric_noise,
)
from rewardopt.feedback.kernels import RandomFourierFeatures
from rewardopt.feedback.simulate import RKHSFunction

DC, DA = 2, 3


def bandit(epsilon=1.0, explore_rounds=50, seed=0, m=32, **kw):
    return PrivateKernelBandit(RandomFourierFeatures(DC + DA, m, 0.8, seed=7), epsilon, explore_rounds=explore_rounds,
                               seed=seed, **kw)


def stream(n, seed=0, K=6):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(DC, generator=g), torch.randn(K, DA, generator=g), float(torch.rand(1, generator=g)) * 2 - 1)
            for _ in range(n)]


def run(b, data, k=1):
    """Play ``data`` (context, candidates, reward of whichever is shown); the queries asked."""
    queries = []
    for c, cand, y in data:
        idx = b.select(c, cand, k)
        queries.append(idx)
        for i in idx:
            b.observe(c, cand[i], y + 0.1 * i)
    return queries


def test_exploration_queries_are_identical_on_neighbouring_datasets():
    data = stream(40)
    other = list(data)
    c, cand, _ = data[17]
    other[17] = (c * -3 + 1, cand, -1.0)  # one user's context and reward replaced
    a, b = bandit(explore_rounds=40), bandit(explore_rounds=40)
    assert run(a, data) == run(b, other)
    assert not torch.equal(a.statistics()[0], b.statistics()[0])  # the data did differ
    # and with k > 1 shown per user, and a different number of candidates: still only (seed, t, K, k)
    assert run(bandit(explore_rounds=90), data, k=2) == run(bandit(explore_rounds=90), other, k=2)
    assert run(bandit(seed=1), data) != run(bandit(seed=0), data)  # the seed does matter


def test_exploration_draw_is_uniform():
    b = bandit(explore_rounds=10**6)
    counts = torch.zeros(5)
    for t in range(3000):
        b.t = t
        counts[b.select(torch.zeros(DC), torch.zeros(5, DA))[0]] += 1
    assert float((counts / 3000 - 0.2).abs().max()) < 0.03


def _neighbours(n, g, B, adversarial=False):
    """Two datasets of n (z, y) rows that differ in row 0 only."""
    z = torch.randn(n, DC + DA, generator=g) * 2
    y = (torch.rand(n, generator=g) * 2 - 1) * 1.5 * B  # beyond B: clipping is part of the mechanism
    z2, y2 = z.clone(), y.clone()
    z2[0] = torch.randn(DC + DA, generator=g) * 2
    y2[0] = (float(torch.rand(1, generator=g)) * 2 - 1) * 1.5 * B
    if adversarial:  # a replacement at a random distance (any feature inner product) with opposite extreme rewards
        step = torch.randn(DC + DA, generator=g)
        z2[0] = z[0] + step / step.norm() * 3 * float(torch.rand(1, generator=g))
        y[0], y2[0] = 10 * B, -10 * B
    return (z, y), (z2, y2)


def _stats(data, B, m=32):
    b = bandit(explore_rounds=10**6, reward_bound=B, m=m)
    z, y = data
    b.observe_batch(z[:, :DC], z[:, DC:], y)
    return b.statistics()


@pytest.mark.parametrize("B", [0.5, 1.0, 3.0])
def test_empirical_sensitivity_stays_within_the_analytic_bound(B):
    g = torch.Generator().manual_seed(int(B * 10))
    bound = joint_sensitivity(B)
    worst = 0.0
    for i in range(300):
        d1, d2 = _neighbours(8, g, B, adversarial=i % 2 == 0)
        gap = float((release_vector(*_stats(d1, B)) - release_vector(*_stats(d2, B))).norm())
        assert gap <= bound * (1 + 1e-9)
        worst = max(worst, gap)
    assert worst > 0.97 * bound, "the adversarial pairs come close to the bound: it is not loose"


def test_joint_sensitivity_formula():
    assert joint_sensitivity(1.0) == pytest.approx(3 / math.sqrt(2))
    assert joint_sensitivity(1.0) < math.sqrt(2 + 4)  # the sum of the two separate suprema is looser
    assert joint_sensitivity(3.0) == pytest.approx(6.0)
    assert joint_sensitivity(math.sqrt(2)) == pytest.approx(2 * math.sqrt(2))  # the two branches meet


def test_sensitivity_with_several_ratings_per_user():
    g = torch.Generator().manual_seed(3)
    k, B = 3, 1.0
    for _ in range(100):
        z = torch.randn(10, DC + DA, generator=g)
        y = torch.rand(10, generator=g) * 2 - 1
        z2, y2 = z.clone(), y.clone()
        z2[:k] = torch.randn(k, DC + DA, generator=g) * 3  # one user's k ratings replaced
        y2[:k] = -torch.sign(y[:k])
        gap = (release_vector(*_stats((z, y), B)) - release_vector(*_stats((z2, y2), B))).norm()
        assert gap <= joint_sensitivity(B, k) + 1e-9
    assert joint_sensitivity(1.0, 3) == pytest.approx(3 * 3 / math.sqrt(2))


def test_half_vectorisation_is_frobenius_and_symmetric_noise_is_isotropic_on_it():
    A = torch.randn(6, 6, dtype=torch.float64)
    S = A + A.T
    assert float(half_vec(S).norm()) == pytest.approx(float(S.norm()))
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([half_vec(symmetric_noise(6, 2.0, g)) for _ in range(4000)])
    E = symmetric_noise(6, 2.0, g)
    assert torch.equal(E, E.T)
    # every coordinate of h(E) is N(0, sigma^2): diagonal and sqrt(2)-scaled off-diagonal alike
    assert torch.allclose(draws.std(0), torch.full((21,), 2.0, dtype=torch.float64), rtol=0.06)
    corr = torch.corrcoef(draws.T) - torch.eye(21, dtype=torch.float64)
    assert float(corr.abs().max()) < 0.08


def test_release_noise_matches_the_calibrated_sigma():
    data = stream(30)
    gaps = []
    for seed in range(200):
        b = bandit(epsilon=2.0, explore_rounds=30, noise_seed=seed)
        run(b, data)
        S, bb = b.statistics()
        nS, nb = b.noisy_statistics
        gaps.append(release_vector(nS, nb) - release_vector(S, bb))
    gaps = torch.stack(gaps)
    assert b.sigma == pytest.approx(joint_sensitivity(1.0) / math.sqrt(2 * 0.0800454), rel=1e-4)  # rho(2, 1e-5)
    assert float(gaps.std()) == pytest.approx(b.sigma, rel=0.02)
    assert b.accountant.epsilon(b.delta) == pytest.approx(2.0)


def test_noise_spectral_bound_holds_and_lambda_absorbs_it():
    g = torch.Generator().manual_seed(1)
    m, sigma = 32, 5.0
    bound = noise_spectral_bound(m, sigma, beta=0.01)
    norms = [float(torch.linalg.matrix_norm(symmetric_noise(m, sigma, g), 2)) for _ in range(100)]
    assert max(norms) <= bound
    b = bandit(epsilon=1.0, m=m)
    assert b.lam == pytest.approx(1.0 + noise_spectral_bound(m, b.sigma))
    assert bandit(epsilon=1.0, m=m, noise_lambda=False).lam == 1.0


def test_epsilon_inf_is_kernel_ridge_regression_on_the_same_features():
    b = bandit(epsilon=math.inf, explore_rounds=60, lam=0.3)
    rows, ys = [], []
    for c, cand, y in stream(60, seed=4):
        i = b.select(c, cand)[0]
        rows.append(torch.cat([c, cand[i]]))
        ys.append(y)
        b.observe(c, cand[i], y)
    assert b.released and b.sigma == 0 and b.lam == 0.3
    # the dual (kernel) form on the rows the bandit saw: alpha = (K + lam I)^-1 y, f(x) = phi(x)^T Phi^T alpha
    Phi = b.features(torch.stack(rows)).double()
    alpha = torch.linalg.solve(Phi @ Phi.T + 0.3 * torch.eye(60, dtype=torch.float64), torch.tensor(ys).double())
    test = torch.randn(20, DA)
    krr = b.features(b.joint(torch.ones(DC), test)).double() @ (Phi.T @ alpha)
    assert torch.allclose(b.predict(torch.ones(DC), test).double(), krr, atol=1e-5)
    assert torch.allclose(b.statistics()[0], Phi.T @ Phi, atol=1e-5)
    assert krr.abs().max() > 0.05  # not trivially zero


def test_replay_gives_the_same_release():
    data = stream(50, seed=2)
    a, b = bandit(noise_seed=5), bandit(noise_seed=5)
    run(a, data)
    run(b, data)
    assert torch.equal(a.theta, b.theta) and torch.equal(a.noisy_statistics[0], b.noisy_statistics[0])
    c = bandit(noise_seed=6)
    run(c, data)
    assert not torch.allclose(a.theta, c.theta)


def test_the_release_noise_is_secret_by_default():
    """The public seed fixes the queries, not the noise: two default bandits with one seed release differently
    from the same data (their noise seeds come from the OS), while their exploration queries agree."""
    data = stream(50, seed=2)
    a, b = bandit(seed=3), bandit(seed=3)
    assert a.noise_seed != b.noise_seed
    assert run(a, data) == run(b, data)
    assert torch.equal(a.statistics()[0], b.statistics()[0]) and not torch.allclose(a.theta, b.theta)
    assert a.noise_seed.bit_length() > 64  # 128 secret bits (this fails with probability 2^-64)
    # every bit of the seed matters: seeds equal in their low 32 (or 64) bits give different releases
    s = 12345
    r = [bandit(noise_seed=seed) for seed in (s, s + 2**32, s + 2**64)]
    for x in r:
        run(x, data)
    assert not torch.allclose(r[0].theta, r[1].theta) and not torch.allclose(r[0].theta, r[2].theta)


def test_observe_batch_equals_sequential_observes():
    data = stream(70, seed=5)
    seq = bandit(explore_rounds=50, noise_seed=1)
    rows = []
    for c, cand, y in data:
        i = seq.select(c, cand)[0]
        seq.observe(c, cand[i], y)
        rows.append((c, cand[i], y))
    batch = bandit(explore_rounds=50, noise_seed=1)
    batch.observe_batch(torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows]),
                        torch.tensor([r[2] for r in rows]))
    assert batch.t == seq.t == 70 and batch._n == seq._n == 50
    assert torch.allclose(batch.theta, seq.theta, atol=1e-10)


def test_release_life_cycle():
    b = bandit(explore_rounds=5)
    with pytest.raises(RuntimeError, match="nothing released yet"):
        b.predict(torch.zeros(DC), torch.zeros(3, DA))
    run(b, stream(5))
    theta = b.theta.clone()
    assert b.released and b.accountant.epsilon(b.delta) == pytest.approx(1.0)
    run(b, stream(20, seed=9))  # later users: counted, greedy, never added to the statistics
    assert torch.equal(b.theta, theta) and b.t == 25 and b._n == 5
    assert len(b.accountant.releases) == 1
    with pytest.raises(RuntimeError, match="already released"):
        b.release()
    c, cand = torch.randn(DC), torch.randn(8, DA)
    assert b.select(c, cand, k=3) == torch.topk(b.predict(c, cand), 3).indices.tolist()
    with pytest.raises(ValueError, match="finite"):
        b.observe(c, cand[0], float("nan"))


def test_rewards_are_clipped_to_the_bound():
    b = bandit(explore_rounds=100, reward_bound=1.0)
    c, cand = torch.zeros(DC), torch.zeros(1, DA)
    b.observe(c, cand[0], 7.0)
    b.observe(c, cand[0], -7.0)
    assert b.observed_rewards == [1.0, -1.0]
    assert float(b.statistics()[1].norm()) < 1e-9  # +1 and -1 on the same features cancel


def test_non_private_bandit_learns_a_known_rkhs_function():
    f = RKHSFunction(DC + DA, num_centres=12, lengthscale=1.0, norm=1.0, seed=1)
    g = torch.Generator().manual_seed(0)
    actions = torch.randn(10, DA, generator=g)
    b = PrivateKernelBandit(RandomFourierFeatures(DC + DA, 256, 1.0, seed=3), math.inf, explore_rounds=1500, lam=1.0)
    for _ in range(1500):
        c = torch.randn(DC, generator=g)
        i = b.select(c, actions)[0]
        b.observe(c, actions[i], float(f(b.joint(c, actions[i:i + 1]))) + 0.1 * float(torch.randn(1, generator=g)))
    contexts = torch.randn(100, DC, generator=g)
    truth = lambda c, a: f(b.joint(c, a))  # noqa: E731
    learned = simple_regret(b.predict, truth, contexts, actions.expand(100, -1, -1)).mean()
    random_choice = torch.stack([truth(c, actions).max() - truth(c, actions).mean() for c in contexts]).mean()
    assert f.rkhs_norm == pytest.approx(1.0)
    assert float(learned) < 0.2 * float(random_choice)
