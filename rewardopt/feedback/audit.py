"""An empirical privacy audit: a lower bound on epsilon from a distinguishing test between neighbouring datasets.

If a mechanism M is (epsilon, delta)-DP then for every pair of neighbours D, D' and every event E of its output,
P[M(D') in E] <= e^epsilon P[M(D) in E] + delta, and the same with D and D' swapped. A test that says "D'" when a
statistic of the release exceeds a threshold has TPR = P[say D' | D'] and FPR = P[say D' | D], so

    epsilon >= ln((TPR - delta) / FPR)        and        epsilon >= ln((1 - FPR - delta) / (1 - TPR))

(the second: E = "say D", D and D' swapped). Measured over finitely many trials these are estimates; with
Clopper-Pearson intervals the bound

    epsilon_lb = max(ln((TPR_lo - delta) / FPR_hi), ln((1 - FPR_hi - delta) / (1 - TPR_lo)), 0)

and the same two with D and D' in the other order (with TPR_hi, FPR_lo, for a test that fires more often on D:
neighbouring is symmetric). The maximum uses four one-sided ends (TPR_lo, TPR_hi, FPR_lo, FPR_hi), so each is taken
at 1 - alpha/4 (two-sided Clopper-Pearson intervals at level 1 - alpha/2): by the union bound all four hold at once
with probability >= 1 - alpha, and so does epsilon_lb. An audit passes when epsilon_lb <= the nominal epsilon; a
bound above it would prove the accounting wrong (a bug in the sensitivity, the noise or the conversion). The
threshold must not be chosen on the trials that measure it (that would bias the bound upward): ``audit_threshold``
picks it on one half of the trials, ``epsilon_lower_bound`` measures it on the other.

For a Gaussian mechanism whose two outputs differ by mu noise standard deviations along one direction, the
likelihood-ratio test is a threshold on the projection onto that direction (Neyman-Pearson), and the exact privacy
curve is (Balle & Wang 2018, "Improving the Gaussian Mechanism for Differential Privacy", Theorem 8)

    delta(epsilon) = Phi(mu/2 - epsilon/mu) - e^epsilon Phi(-mu/2 - epsilon/mu);

``gaussian_epsilon(mu, delta)`` inverts it: the smallest epsilon any test could ever show, which sits below the
zCDP conversion's epsilon (``rewardopt.feedback.privacy`` notes the conversion is not the tightest).
"""

from __future__ import annotations

import math

import torch


def _binom_cdf_at(k: int, n: int, p: torch.Tensor) -> torch.Tensor:
    """P[X <= k] for X ~ Binomial(n, p) at every p of a 1-D tensor in (0, 1), summed in log space."""
    j = torch.arange(k + 1, dtype=torch.float64)
    logc = math.lgamma(n + 1) - torch.lgamma(j + 1) - torch.lgamma(n - j + 1)
    p = p.double().clamp(1e-300, 1 - 1e-16).unsqueeze(1)
    return torch.logsumexp(logc + j * p.log() + (n - j) * torch.log1p(-p), dim=1).exp().clamp(0, 1)


def binom_cdf(k: int, n: int, p: float) -> float:
    """P[X <= k] for X ~ Binomial(n, p) (exact to float rounding for n up to ~10^7)."""
    if k < 0:
        return 0.0
    if k >= n or p <= 0:
        return 1.0
    if p >= 1:
        return 0.0
    return float(_binom_cdf_at(k, n, torch.tensor([p]))[0])


def _solve_decreasing(f, target: float) -> float:
    """The p in [0, 1] with f(p) = target for f decreasing: each round evaluates f on a grid of 32 points of the
    bracket (one vectorised call) and keeps the cell that holds the root; 12 rounds narrow it to 32^-12."""
    a, b = 0.0, 1.0
    for _ in range(12):
        grid = torch.linspace(a, b, 33, dtype=torch.float64)
        above = f(grid[1:-1]) > target
        i = int(above.sum())  # f decreasing: the first i interior points are above the target
        a, b = float(grid[i]), float(grid[i + 1])
    return (a + b) / 2


def clopper_pearson(k: int, n: int, alpha: float = 0.05) -> tuple[float, float]:
    """The exact (Clopper-Pearson) two-sided 1 - alpha interval of a binomial proportion: k successes in n trials.

    lo solves P[X >= k | lo] = alpha / 2 (0 when k = 0), hi solves P[X <= k | hi] = alpha / 2 (1 when k = n);
    found by bracketing on the binomial CDF (no scipy needed)."""
    if not 0 <= k <= n or n < 1:
        raise ValueError(f"need 0 <= k <= n and n >= 1; got k={k}, n={n}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    # P[X >= k | p] = 1 - P[X <= k-1 | p] rises with p: in q = 1 - p it falls
    lo = 0.0 if k == 0 else 1 - _solve_decreasing(lambda q: 1 - _binom_cdf_at(k - 1, n, 1 - q), alpha / 2)
    hi = 1.0 if k == n else _solve_decreasing(lambda p: _binom_cdf_at(k, n, p), alpha / 2)
    return lo, hi


def epsilon_lower_bound(positives_alt: int, n_alt: int, positives_null: int, n_null: int, delta: float,
                        alpha: float = 0.05) -> dict[str, float]:
    """The audit's epsilon lower bound (module docstring) from a test's counts: it said "D'" ``positives_alt`` times
    in ``n_alt`` trials on D' (true positives) and ``positives_null`` times in ``n_null`` trials on D (false
    positives). Returns the point rates, their Clopper-Pearson bounds (two-sided at 1 - alpha/2, so each of the four
    ends at 1 - alpha/4 and all jointly >= 1 - alpha) and ``epsilon_lb`` (0 when the test shows nothing)."""
    tpr, fpr = positives_alt / n_alt, positives_null / n_null
    tpr_lo, tpr_hi = clopper_pearson(positives_alt, n_alt, alpha / 2)
    fpr_lo, fpr_hi = clopper_pearson(positives_null, n_null, alpha / 2)
    return {"tpr": tpr, "fpr": fpr, "tpr_lo": tpr_lo, "fpr_hi": fpr_hi,
            "epsilon_point": _ratio_bound(tpr, tpr, fpr, fpr, delta),
            "epsilon_lb": _ratio_bound(tpr_lo, tpr_hi, fpr_lo, fpr_hi, delta)}


def _ratio_bound(tpr_lo: float, tpr_hi: float, fpr_lo: float, fpr_hi: float, delta: float) -> float:
    """The largest of the four DP inequalities' epsilons (events "say D'" and "say D", neighbours in either order),
    each with the pessimistic end of every rate; 0 when none is positive."""
    best = 0.0
    for num, den in ((tpr_lo, fpr_hi), (1 - fpr_hi, 1 - tpr_lo), (fpr_lo, tpr_hi), (1 - tpr_hi, 1 - fpr_lo)):
        if num - delta > 0:  # den = 0 (an event never seen on one side) is unbounded evidence: the point estimate's
            best = max(best, math.log((num - delta) / den) if den > 0 else math.inf)  # CP ends are never 0 or 1 there
    return best


def _counts(null: torch.Tensor, alt: torch.Tensor, tau: float) -> tuple[int, int]:
    return int((alt > tau).sum()), int((null > tau).sum())


def _wilson_epsilon(tp: int, n_alt: int, fp: int, n_null: int, delta: float, z: float = 2.24) -> float:
    """``epsilon_lower_bound`` with Wilson score intervals in place of Clopper-Pearson (z = 2.24: about 98.75%
    one-sided each, 1 - alpha/4 at alpha = 0.05): cheap, and only used to *choose* a threshold, which any rule may
    do."""
    def wilson(k, n, sign):
        p = k / n
        centre = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
        return min(max(centre + sign * half, 0.0), 1.0)

    return _ratio_bound(wilson(tp, n_alt, -1), wilson(tp, n_alt, +1), wilson(fp, n_null, -1), wilson(fp, n_null, +1),
                        delta)


def audit_threshold(null: torch.Tensor, alt: torch.Tensor, delta: float, quantiles: int = 200) -> float:
    """The threshold (a "say D'" test: statistic > tau) with the largest epsilon lower bound on these trials
    (Wilson intervals: a selection rule), over ``quantiles`` quantiles of the pooled statistics. Choose it on
    trials that are not used to report."""
    pooled = torch.cat([null, alt]).double()
    taus = torch.quantile(pooled, torch.linspace(0.005, 0.995, quantiles, dtype=torch.float64)).tolist()
    best, best_tau = -1.0, taus[len(taus) // 2]
    for tau in taus:
        tp, fp = _counts(null, alt, tau)
        e = _wilson_epsilon(tp, len(alt), fp, len(null), delta)
        if e > best:
            best, best_tau = e, tau
    return float(best_tau)


def audit(null: torch.Tensor, alt: torch.Tensor, delta: float, alpha: float = 0.05) -> dict[str, float]:
    """Split each set of trials' statistics (1-D; larger means "D'") in halves: pick the threshold on the first
    halves (``audit_threshold``), report ``epsilon_lower_bound`` on the second. Returns its dict plus ``tau`` and
    the trial counts used to report."""
    if null.ndim != 1 or alt.ndim != 1 or len(null) < 4 or len(alt) < 4:
        raise ValueError("audit needs two 1-D tensors of at least 4 trial statistics each")
    hn, ha = len(null) // 2, len(alt) // 2
    tau = audit_threshold(null[:hn], alt[:ha], delta)
    tp, fp = _counts(null[hn:], alt[ha:], tau)
    out = epsilon_lower_bound(tp, len(alt) - ha, fp, len(null) - hn, delta, alpha)
    return {**out, "tau": tau, "n_alt": len(alt) - ha, "n_null": len(null) - hn}


def _phi(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2))


def gaussian_delta(mu: float, epsilon: float) -> float:
    """delta(epsilon) of a Gaussian mechanism with sensitivity / sigma = mu (Balle & Wang 2018, Theorem 8)."""
    if mu <= 0:
        raise ValueError(f"mu must be > 0, got {mu}")
    return _phi(mu / 2 - epsilon / mu) - math.exp(epsilon) * _phi(-mu / 2 - epsilon / mu)


def gaussian_epsilon(mu: float, delta: float) -> float:
    """The exact epsilon of a Gaussian mechanism with sensitivity / sigma = mu at this delta (inverts
    ``gaussian_delta`` by bisection; 0 when delta(0) <= delta already)."""
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if gaussian_delta(mu, 0.0) <= delta:
        return 0.0
    lo, hi = 0.0, 1.0
    while gaussian_delta(mu, hi) > delta:
        hi *= 2
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if gaussian_delta(mu, mid) > delta else (lo, mid)
    return hi
