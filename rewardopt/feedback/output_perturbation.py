"""Output perturbation: the non-private kernel ridge estimate theta with Gaussian noise calibrated to theta's own
sensitivity — the naive baseline the private kernel bandit (``rewardopt.feedback.bandit``) is compared with.

The estimate is theta = A^-1 b with A = Phi^T Phi + lam I and b = Phi^T y over n rows with ||phi_t|| <= 1 and
|y_t| <= B (the bandit's features and clipped rewards). The neighbouring notion is the bandit's: one row
(phi, y) = (u, y) replaced by (v, y'), n fixed and public. Then A' = A - u u^T + v v^T, b' = b - y u + y' v and,
from A^-1 - A'^-1 = A^-1 (A' - A) A'^-1,

    theta - theta' = A^-1 [ (b - b') + (A' - A) theta' ].

The three factors, each bounded for any data:

    ||A^-1||_2 <= 1 / lam                                      (A >= lam I)
    ||b - b'|| = ||y u - y' v|| <= 2 B
    ||(A' - A) theta'|| <= ||v v^T - u u^T||_2 ||theta'|| <= ||theta'||
        (-u u^T <= v v^T - u u^T <= v v^T: a difference of two PSD matrices has spectral norm at most the
         larger of theirs, max(||u||^2, ||v||^2) <= 1)

and for theta' itself, with the singular values s_i of Phi' (Phi'^T Phi' + lam I)^-1 Phi'^T has singular values
s_i / (s_i^2 + lam) <= 1 / (2 sqrt(lam)), while ||y'|| <= sqrt(n) B, so ||theta'|| <= sqrt(n) B / (2 sqrt(lam));
also ||theta'|| <= ||b'|| / lam <= n B / lam. Together

    Delta_theta(n, lam, B) = (B / lam) (2 + min(sqrt(n / lam) / 2, n / lam)).

It is an upper bound (every step is a worst case taken separately;
tests/feedback/test_audit.py::test_krr_sensitivity_bounds_neighbouring_estimates checks it against neighbouring
pairs), so the baseline is (epsilon, delta)-DP with sigma = ``gaussian_sigma(Delta_theta, epsilon, delta)`` on each of
theta's m coordinates (the same zCDP calibration as the bandit).
What makes it naive: the sensitivity grows like sqrt(n) / lam^(3/2) — more data, more noise at a fixed
ridge — because theta's scale is set by the data through A^-1, while the bandit releases the statistics (S, b),
whose sensitivity does not depend on n, and lets the noise enter A and b where the ridge absorbs it. A ridge that
grows with n (lam ~ n, as in private ERM) shrinks Delta_theta like 1/n; ``benchmarks/dp_bandit.py`` reports the
fixed KRR ridge, the bandit's own (noise-inflated) ridge, and the data-independent ridges sqrt(T) and T.
"""

from __future__ import annotations

import math

import torch

from rewardopt.feedback.privacy import gaussian_sigma


def krr_sensitivity(n: int, lam: float, reward_bound: float = 1.0) -> float:
    """Delta_theta: an upper bound on ||theta(D) - theta(D')|| for kernel ridge regression over n rows with
    ||phi|| <= 1 and |y| <= B, one row replaced (module docstring): (B / lam) (2 + min(sqrt(n/lam)/2, n/lam))."""
    if n < 1 or lam <= 0 or reward_bound <= 0:
        raise ValueError(f"need n >= 1, lam > 0 and reward_bound > 0; got {n}, {lam}, {reward_bound}")
    return reward_bound / lam * (2 + min(math.sqrt(n / lam) / 2, n / lam))


def ridge_estimate(S: torch.Tensor, b: torch.Tensor, lam: float) -> torch.Tensor:
    """theta = (S + lam I)^-1 b: S (m, m), b (m,) -> (m,)."""
    return torch.linalg.solve(S + lam * torch.eye(len(b), dtype=S.dtype), b)


def output_perturbation(S: torch.Tensor, b: torch.Tensor, n: int, lam: float, epsilon: float, delta: float,
                        reward_bound: float, generator: torch.Generator) -> tuple[torch.Tensor, float, float]:
    """(theta + N(0, sigma^2 I), sigma, Delta_theta) for the exact statistics S = Phi^T Phi, b = Phi^T y of n
    rows; sigma = 0 at epsilon = inf (plain kernel ridge regression). The noise comes from ``generator``."""
    theta = ridge_estimate(S, b, lam)
    sens = krr_sensitivity(n, lam, reward_bound)
    sigma = gaussian_sigma(sens, epsilon, delta)
    if sigma == 0:
        return theta, 0.0, sens
    noise = torch.randn(theta.shape, generator=generator, dtype=theta.dtype)
    return theta + sigma * noise, sigma, sens
