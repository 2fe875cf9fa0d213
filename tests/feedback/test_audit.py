"""The privacy audit's statistics (Clopper-Pearson, the epsilon lower bound, the exact Gaussian curve), the audit of
the bandit's real release, and the output-perturbation baseline's sensitivity."""

from __future__ import annotations

import math

import pytest
import torch

from rewardopt.feedback.audit import (
    audit,
    binom_cdf,
    clopper_pearson,
    epsilon_lower_bound,
    gaussian_delta,
    gaussian_epsilon,
)
from rewardopt.feedback.bandit import PrivateKernelBandit, release_vector
from rewardopt.feedback.kernels import RandomFourierFeatures
from rewardopt.feedback.output_perturbation import krr_sensitivity, output_perturbation, ridge_estimate
from rewardopt.feedback.privacy import rho_for


@pytest.mark.parametrize(("k", "n", "lo", "hi"), [  # scipy.stats.beta.ppf reference values
    (0, 100, 0.0, 0.036216692645176),
    (3, 100, 0.006229971538306, 0.085176052974280),
    (50, 100, 0.398321129503301, 0.601678870496699),
    (67, 50000, 0.001038627834629, 0.001701444763564),
    (100, 100, 0.963783307354823, 1.0),
])
def test_clopper_pearson_matches_the_beta_quantiles(k, n, lo, hi):
    got = clopper_pearson(k, n, 0.05)
    assert got[0] == pytest.approx(lo, rel=1e-9, abs=1e-12) and got[1] == pytest.approx(hi, rel=1e-9)


def test_binomial_cdf_and_bad_counts():
    assert binom_cdf(2, 4, 0.5) == pytest.approx(11 / 16)
    assert binom_cdf(-1, 4, 0.5) == 0.0 and binom_cdf(4, 4, 0.3) == 1.0
    with pytest.raises(ValueError):
        clopper_pearson(5, 4)


def test_epsilon_lower_bound_from_counts():
    perfect = epsilon_lower_bound(1000, 1000, 0, 1000, 1e-5)
    lo, _ = clopper_pearson(1000, 1000, 0.025)  # four one-sided ends, jointly 95%: each interval at 97.5%
    _, hi = clopper_pearson(0, 1000, 0.025)
    assert lo < clopper_pearson(1000, 1000, 0.05)[0]  # wider than the single-interval 95% bound
    assert perfect["epsilon_lb"] == pytest.approx(math.log((lo - 1e-5) / hi))
    assert perfect["tpr"] == 1.0 and perfect["fpr"] == 0.0
    assert perfect["epsilon_point"] == math.inf  # never wrong on either side: unbounded point evidence, finite bound
    one_sided = epsilon_lower_bound(2000, 2000, 1887, 2000, 1e-5)  # "say D" never happens on D'
    assert one_sided["epsilon_point"] == math.inf and 0 < one_sided["epsilon_lb"] < math.inf
    assert epsilon_lower_bound(500, 1000, 500, 1000, 1e-5)["epsilon_lb"] == 0.0  # a coin: no evidence
    # the complement direction counts too: a test that rarely fires on D but misses on D' shows epsilon via TNR/FNR
    swapped = epsilon_lower_bound(100, 1000, 900, 1000, 1e-5)
    assert swapped["epsilon_lb"] > 1.5


def test_gaussian_curve_inverts_and_sits_below_the_zcdp_conversion():
    for eps in (0.5, 1.0, 4.0):
        mu = math.sqrt(2 * rho_for(eps, 1e-5))  # sensitivity / sigma of the calibrated mechanism
        e = gaussian_epsilon(mu, 1e-5)
        assert gaussian_delta(mu, e) == pytest.approx(1e-5, rel=1e-6)
        assert 0.6 * eps < e < eps  # the zCDP conversion is conservative, not by much
    assert gaussian_epsilon(0.5, 1e-5) < gaussian_epsilon(1.0, 1e-5)
    assert gaussian_epsilon(1e-4, 0.5) == 0.0


def test_audit_of_a_known_gaussian_stays_below_its_exact_epsilon_and_detects_a_large_one():
    g = torch.Generator().manual_seed(1)
    for mu in (0.5, 3.0):
        null, alt = torch.randn(40000, generator=g), torch.randn(40000, generator=g) + mu
        res = audit(null, alt, 1e-5)
        assert res["epsilon_lb"] <= gaussian_epsilon(mu, 1e-5)
        assert res["n_null"] == res["n_alt"] == 20000
    assert res["epsilon_lb"] > 4.0  # mu = 3 is plainly visible (its exact epsilon, 16.7, needs far more trials)


def test_audit_of_the_bandit_release_is_within_its_nominal_epsilon():
    """Neighbours attaining the sensitivity; fresh noise seeds per trial; epsilon = 4 (the most visible)."""
    feats = RandomFourierFeatures(4, 8, 1.0, seed=3)
    g = torch.Generator().manual_seed(4)
    z, y = torch.randn(6, 4, generator=g), torch.rand(6, generator=g) * 2 - 1
    z2, y2 = z.clone(), y.clone()
    z2[0] = z[0] + 5.0  # far: features nearly orthogonal
    y[0], y2[0] = 1.0, -1.0

    def release(zz, yy, seed):
        b = PrivateKernelBandit(feats, 4.0, explore_rounds=6, noise_seed=seed)
        b.observe_batch(zz[:, :2], zz[:, 2:], yy)
        return release_vector(*b.noisy_statistics), b

    e0 = PrivateKernelBandit(feats, math.inf, explore_rounds=7)
    e0.observe_batch(z[:, :2], z[:, 2:], y)
    e1 = PrivateKernelBandit(feats, math.inf, explore_rounds=7)
    e1.observe_batch(z2[:, :2], z2[:, 2:], y2)
    exact = [release_vector(*e0.statistics()), release_vector(*e1.statistics())]
    w = exact[1] - exact[0]
    w = w / w.norm()
    null = torch.stack([w @ (release(z, y, s)[0] - exact[0]) for s in range(600)])
    alt = torch.stack([w @ (release(z2, y2, 600 + s)[0] - exact[0]) for s in range(600)])
    sigma = release(z, y, 0)[1].sigma
    assert float(null.std()) / sigma == pytest.approx(1.0, abs=0.1)  # the projection carries sigma, no more
    res = audit(null, alt, 1e-5)
    assert res["epsilon_lb"] <= 4.0


def test_krr_sensitivity_bounds_neighbouring_estimates():
    g = torch.Generator().manual_seed(5)
    feats = RandomFourierFeatures(3, 16, 0.7, seed=6)
    for n, lam in ((5, 0.5), (40, 1.0), (40, 30.0), (200, 2.0)):
        bound = krr_sensitivity(n, lam, 1.0)
        worst = 0.0
        for trial in range(60):
            z = torch.randn(n, 3, generator=g)
            y = torch.sign(torch.randn(n, generator=g))  # extreme rewards
            z2, y2 = z.clone(), y.clone()
            z2[0] = z[0] + torch.randn(3, generator=g) * (0.2 if trial % 2 else 3.0)
            y2[0] = -y[0]
            thetas = []
            for zz, yy in ((z, y), (z2, y2)):
                phi = feats(zz).double()
                thetas.append(ridge_estimate(phi.T @ phi, phi.T @ yy.double(), lam))
            gap = float((thetas[0] - thetas[1]).norm())
            assert gap <= bound * (1 + 1e-9)
            worst = max(worst, gap)
        assert worst > 0.05 * bound  # the bound is an upper bound, but not a vacuous one
    assert krr_sensitivity(4096, 1.0) == pytest.approx(2 + 32)  # sqrt(n / lam) / 2 grows with n
    assert krr_sensitivity(1, 4.0) == pytest.approx(0.25 * (2 + 0.25))  # n / lam is the smaller bound
    with pytest.raises(ValueError):
        krr_sensitivity(0, 1.0)


def test_output_perturbation_is_ridge_regression_plus_calibrated_noise():
    m = 600
    g = torch.Generator().manual_seed(7)
    A = torch.randn(50, m, generator=g, dtype=torch.float64) / math.sqrt(m)
    S, b = A.T @ A, A.T @ torch.rand(50, generator=g, dtype=torch.float64)
    theta, sigma, sens = output_perturbation(S, b, 50, 2.0, math.inf, 1e-5, 1.0, torch.Generator().manual_seed(0))
    assert sigma == 0.0 and torch.allclose(theta, ridge_estimate(S, b, 2.0))
    noisy, sigma, sens = output_perturbation(S, b, 50, 2.0, 1.0, 1e-5, 1.0, torch.Generator().manual_seed(0))
    assert sens == pytest.approx(krr_sensitivity(50, 2.0))
    assert sigma == pytest.approx(sens / math.sqrt(2 * rho_for(1.0, 1e-5)))
    assert float((noisy - theta).std()) == pytest.approx(sigma, rel=0.1)
    again, *_ = output_perturbation(S, b, 50, 2.0, 1.0, 1e-5, 1.0, torch.Generator().manual_seed(0))
    assert torch.equal(noisy, again)  # the noise comes from the generator
