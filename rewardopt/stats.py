"""Statistics for validating proxies against an oracle: rank correlation with bootstrap intervals.

``spearman(x, y)``: Spearman's rank correlation — Pearson's correlation of the ranks, ties given
their average rank (the textbook definition; equal to ``scipy.stats.spearmanr``). NaN when either
side is constant (no ranking to correlate).

``bootstrap_ci(x, y, stat=spearman, n_boot=1000, level=0.95, seed=0)``: the percentile bootstrap
interval of a paired statistic: resample the (x_i, y_i) pairs with replacement ``n_boot`` times
(numpy's seeded generator), compute the statistic on each resample, take the (1-level)/2 and
(1+level)/2 quantiles (linear interpolation). Resamples whose statistic is undefined (a constant
resample: NaN) are dropped and counted. ``correlation_table`` gives, per proxy, rho and its interval.

``groups``: when observations come in dependent clusters (several SR outputs of one input), resample
the clusters instead of the pairs (the cluster bootstrap: every observation of a drawn cluster enters,
as often as the cluster is drawn), so the interval is not narrowed by treating them as independent.
``difference_ci`` is the interval of rho(a, t) - rho(b, t) on the same resamples (is one proxy better?).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np


def _vector(name: str, v) -> np.ndarray:
    a = np.asarray(v.detach().cpu() if hasattr(v, "detach") else v, dtype=np.float64).reshape(-1)
    if not np.isfinite(a).all():
        raise ValueError(f"{name} holds NaN or Inf values")
    return a


def rankdata(v) -> np.ndarray:
    """Ranks 1..n of ``v``; tied values get the average of the ranks they span."""
    a = _vector("rankdata", v)
    order = np.argsort(a, kind="mergesort")
    sorted_a = a[order]
    ranks = np.empty(len(a), dtype=np.float64)
    i = 0
    while i < len(a):
        j = i
        while j + 1 < len(a) and sorted_a[j + 1] == sorted_a[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1  # positions i..j hold ranks i+1..j+1
        i = j + 1
    return ranks


def pearson(x, y) -> float:
    """Pearson's correlation; NaN when either side is constant."""
    x, y = _vector("x", x), _vector("y", y)
    if len(x) != len(y):
        raise ValueError(f"x and y differ in length ({len(x)} vs {len(y)})")
    if len(x) < 2:
        raise ValueError(f"a correlation needs at least 2 pairs, got {len(x)}")
    dx, dy = x - x.mean(), y - y.mean()
    den = np.sqrt((dx * dx).sum() * (dy * dy).sum())
    return float((dx * dy).sum() / den) if den > 0 else float("nan")


def spearman(x, y) -> float:
    """Spearman's rank correlation (ties: average ranks); NaN when either side is constant."""
    x, y = _vector("x", x), _vector("y", y)
    if len(x) != len(y):
        raise ValueError(f"x and y differ in length ({len(x)} vs {len(y)})")
    return pearson(rankdata(x), rankdata(y))


@dataclass
class Interval:
    """A statistic on the full sample, its percentile bootstrap interval and how many resamples counted."""

    value: float
    low: float
    high: float
    level: float
    n_boot: int
    dropped: int = 0  # resamples whose statistic was undefined (NaN)

    def __str__(self) -> str:
        return f"{self.value:+.3f} [{self.low:+.3f}, {self.high:+.3f}]"


def _resamples(n: int, n_boot: int, seed: int, groups=None):
    """Index arrays of ``n_boot`` bootstrap resamples of n observations (of whole groups when given)."""
    rng = np.random.default_rng(seed)
    if groups is None:
        for _ in range(n_boot):
            yield rng.integers(0, n, n)
        return
    g = np.asarray(groups).reshape(-1)
    if len(g) != n:
        raise ValueError(f"groups has {len(g)} entries for {n} observations")
    members = [np.flatnonzero(g == u) for u in np.unique(g)]
    for _ in range(n_boot):
        pick = rng.integers(0, len(members), len(members))
        yield np.concatenate([members[k] for k in pick])


def _interval(full: float, values: list[float], level: float, n_boot: int) -> Interval:
    values = np.asarray(values, dtype=np.float64)
    ok = values[np.isfinite(values)]
    if not len(ok):
        raise ValueError("every bootstrap resample gave an undefined statistic (constant values?)")
    lo, hi = np.quantile(ok, [(1 - level) / 2, (1 + level) / 2])
    return Interval(float(full), float(lo), float(hi), level, n_boot, int(len(values) - len(ok)))


def _check(level: float, n_boot: int) -> None:
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")


def bootstrap_ci(x, y, stat: Callable[[np.ndarray, np.ndarray], float] = spearman, n_boot: int = 1000,
                 level: float = 0.95, seed: int = 0, groups=None) -> Interval:
    """The percentile bootstrap interval of ``stat(x, y)``, resampling the pairs (seeded), or whole
    ``groups`` of pairs (the cluster bootstrap)."""
    x, y = _vector("x", x), _vector("y", y)
    if len(x) != len(y):
        raise ValueError(f"x and y differ in length ({len(x)} vs {len(y)})")
    _check(level, n_boot)
    values = [stat(x[idx], y[idx]) for idx in _resamples(len(x), n_boot, seed, groups)]
    return _interval(stat(x, y), values, level, n_boot)


def difference_ci(a, b, target, stat: Callable[[np.ndarray, np.ndarray], float] = spearman, n_boot: int = 1000,
                  level: float = 0.95, seed: int = 0, groups=None) -> Interval:
    """The bootstrap interval of stat(a, target) - stat(b, target), both on each same resample."""
    a, b, t = _vector("a", a), _vector("b", b), _vector("target", target)
    if not len(a) == len(b) == len(t):
        raise ValueError(f"a, b and target differ in length ({len(a)}, {len(b)}, {len(t)})")
    _check(level, n_boot)
    values = [stat(a[i], t[i]) - stat(b[i], t[i]) for i in _resamples(len(t), n_boot, seed, groups)]
    return _interval(stat(a, t) - stat(b, t), values, level, n_boot)


def correlation_table(proxies: Mapping[str, Sequence[float]], target: Sequence[float], n_boot: int = 1000,
                      level: float = 0.95, seed: int = 0, groups=None) -> dict[str, Interval]:
    """Spearman's rho of each proxy with ``target`` (e.g. oracle HS), with its bootstrap interval; every
    proxy is resampled with the same indices (one seed; ``groups``: the cluster bootstrap), so the intervals
    are comparable."""
    return {k: bootstrap_ci(v, target, spearman, n_boot, level, seed, groups) for k, v in proxies.items()}
