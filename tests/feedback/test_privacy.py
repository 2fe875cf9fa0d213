"""zCDP accounting of the Gaussian mechanism: the analytic epsilon, exact calibration, additive composition."""

from __future__ import annotations

import math

import pytest
import torch

from rewardopt.feedback.privacy import ZCDPAccountant, epsilon_for, gaussian_mechanism, gaussian_sigma, rho_for


@pytest.mark.parametrize("sensitivity, sigma, delta", [(1.0, 1.0, 1e-5), (math.sqrt(6), 12.0, 1e-6), (2.0, 0.5, 0.01)])
def test_accountant_epsilon_is_the_analytic_value(sensitivity, sigma, delta):
    acc = ZCDPAccountant()
    acc.add("q", sensitivity, sigma)
    rho = sensitivity**2 / (2 * sigma**2)
    assert acc.rho == pytest.approx(rho)
    assert acc.epsilon(delta) == pytest.approx(rho + 2 * math.sqrt(rho * math.log(1 / delta)))


@pytest.mark.parametrize("epsilon, delta", [(0.5, 1e-5), (1.0, 1e-5), (4.0, 1e-6), (10.0, 0.1)])
def test_calibration_inverts_the_conversion_exactly(epsilon, delta):
    sigma = gaussian_sigma(math.sqrt(6), epsilon, delta)
    acc = ZCDPAccountant()
    acc.add("S, b", math.sqrt(6), sigma)
    assert acc.epsilon(delta) == pytest.approx(epsilon, rel=1e-12)
    assert epsilon_for(rho_for(epsilon, delta), delta) == pytest.approx(epsilon, rel=1e-12)
    # more noise is strictly more private, less noise strictly less
    eps = lambda s: epsilon_for(6 / (2 * s**2), delta)  # noqa: E731
    assert eps(1.01 * sigma) < epsilon < eps(0.99 * sigma)


def test_calibration_known_number():
    # epsilon = 1, delta = 1e-5: L = ln 1e5, rho = (sqrt(L + 1) - sqrt(L))^2 ~ 0.02082; sigma = sqrt(6) / sqrt(2 rho)
    assert rho_for(1.0, 1e-5) == pytest.approx(0.0208199, rel=1e-5)
    assert gaussian_sigma(math.sqrt(6), 1.0, 1e-5) == pytest.approx(12.00386, rel=1e-5)


def test_composition_adds_rho_not_epsilon():
    one, two = ZCDPAccountant(), ZCDPAccountant()
    one.add("a", 1.0, 2.0)
    two.add("a", 1.0, 2.0)
    two.add("b", 3.0, 4.0)
    assert two.rho == pytest.approx(one.rho + 9 / 32)
    # k identical releases = one release with sigma / sqrt(k)
    k = ZCDPAccountant()
    for _ in range(4):
        k.add("x", 1.0, 2.0)
    single = ZCDPAccountant()
    single.add("x", 1.0, 1.0)
    assert k.epsilon(1e-5) == pytest.approx(single.epsilon(1e-5))
    assert k.epsilon(1e-5) < 4 * one.epsilon(1e-5)  # tighter than adding epsilons


def test_no_noise_is_infinite_epsilon_and_no_release_is_zero():
    assert ZCDPAccountant().epsilon(1e-5) == 0
    acc = ZCDPAccountant()
    acc.add("q", 1.0, 0.0)
    assert math.isinf(acc.epsilon(1e-5))
    assert gaussian_sigma(1.0, math.inf, 1e-5) == 0
    assert acc.record(1e-5)["epsilon"] == "inf"  # JSON has no infinity
    assert math.isinf(ZCDPAccountant.from_record(acc.record(1e-5)).rho)


def test_record_round_trips():
    acc = ZCDPAccountant()
    acc.add("S, b", 2.0, 3.0)
    back = ZCDPAccountant.from_record(acc.record(1e-5))
    assert back.releases == acc.releases and back.epsilon(1e-5) == acc.epsilon(1e-5)


def test_gaussian_mechanism_noise_has_sigma_and_replays():
    x = torch.zeros(200_000, dtype=torch.float64)
    a = gaussian_mechanism(x, 3.0, torch.Generator().manual_seed(5))
    b = gaussian_mechanism(x, 3.0, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    assert float(a.std()) == pytest.approx(3.0, rel=0.01) and abs(float(a.mean())) < 0.03


@pytest.mark.parametrize("bad", [dict(epsilon=0.0, delta=1e-5), dict(epsilon=1.0, delta=0.0),
                                 dict(epsilon=1.0, delta=1)])
def test_bad_budgets_are_refused(bad):
    with pytest.raises(ValueError):
        gaussian_sigma(1.0, **bad)
