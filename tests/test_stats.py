"""rewardopt.stats: Spearman's rank correlation (average ranks for ties) and the seeded percentile bootstrap
of a paired statistic, against hand-computed values and scipy."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from rewardopt.stats import bootstrap_ci, correlation_table, pearson, rankdata, spearman


def test_ranks_average_ties():
    assert rankdata([10, 20, 20, 30]).tolist() == [1, 2.5, 2.5, 4]
    assert rankdata([3, 1, 2]).tolist() == [3, 1, 2]
    assert rankdata([5, 5, 5]).tolist() == [2, 2, 2]
    v = np.random.default_rng(0).integers(0, 5, 40)
    assert np.allclose(rankdata(v), sps.rankdata(v))


def test_spearman_hand_computed_cases():
    x = np.arange(1.0, 8.0)
    assert spearman(x, np.exp(x)) == pytest.approx(1.0)  # any increasing transform
    assert spearman(x, -x**3) == pytest.approx(-1.0)  # reversed
    # 1 - 6 sum d^2 / (n (n^2 - 1)) with d = (-1, 1, -1, 1, 0): 1 - 24 / 120
    assert spearman([1, 2, 3, 4, 5], [2, 1, 4, 3, 5]) == pytest.approx(0.8)
    # ties: ranks (1, 2.5, 2.5, 4) vs (1, 2, 3, 4): 4.5 / sqrt(4.5 * 5)
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(4.5 / math.sqrt(22.5))
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))  # a constant side has no ranking
    a, b = np.random.default_rng(1).normal(size=(2, 50))
    b = np.round(a + b, 1)  # with ties
    assert spearman(a, b) == pytest.approx(sps.spearmanr(a, b).statistic, abs=1e-12)
    assert pearson([1, 2, 3], [2, 4, 7]) == pytest.approx(sps.pearsonr([1, 2, 3], [2, 4, 7]).statistic)
    with pytest.raises(ValueError, match="length"):
        spearman([1, 2], [1, 2, 3])
    with pytest.raises(ValueError, match="NaN"):
        spearman([1, float("nan")], [1, 2])


def test_bootstrap_interval_is_seeded_and_resamples_pairs():
    rng = np.random.default_rng(2)
    x = rng.normal(size=60)
    y = x + rng.normal(size=60)
    a, b = bootstrap_ci(x, y, n_boot=300, seed=5), bootstrap_ci(x, y, n_boot=300, seed=5)
    assert (a.low, a.high) == (b.low, b.high)  # seeded
    assert bootstrap_ci(x, y, n_boot=300, seed=6).low != a.low
    assert a.value == pytest.approx(spearman(x, y))
    assert a.low < a.value < a.high and -1 <= a.low and a.high <= 1
    # the same resampling by hand: numpy's generator, pairs drawn together, percentile interval
    g = np.random.default_rng(5)
    vals = [spearman(x[i], y[i]) for i in (g.integers(0, 60, 60) for _ in range(300))]
    assert (a.low, a.high) == pytest.approx(tuple(np.quantile(vals, [0.025, 0.975])))
    # resampling pairs of a monotone relation keeps it monotone: the interval is the point
    m = bootstrap_ci(np.arange(20.0), np.arange(20.0) ** 2, n_boot=100)
    assert (m.value, m.low, m.high) == pytest.approx((1.0, 1.0, 1.0))
    # more data, narrower interval
    big = bootstrap_ci(np.tile(x, 8), np.tile(y, 8), n_boot=300, seed=5)
    assert big.high - big.low < a.high - a.low
    # undefined resamples (constant) are dropped and counted
    d = bootstrap_ci([0.0, 0.0, 0.0, 1.0], [1.0, 2.0, 3.0, 4.0], n_boot=200)
    assert d.dropped > 0 and d.n_boot == 200
    with pytest.raises(ValueError, match="level"):
        bootstrap_ci(x, y, level=1.5)


def test_correlation_table_uses_the_same_resamples():
    rng = np.random.default_rng(3)
    hs = rng.uniform(size=40)
    table = correlation_table({"good": -hs + 0.1 * rng.normal(size=40), "noise": rng.normal(size=40)}, hs,
                              n_boot=200)
    assert table["good"].value < -0.8 and table["good"].high < 0
    assert table["noise"].low < 0 < table["noise"].high
    assert "[" in str(table["good"])


def test_cluster_bootstrap_resamples_whole_groups_and_is_wider_for_duplicated_data():
    from rewardopt.stats import difference_ci

    rng = np.random.default_rng(4)
    x = rng.normal(size=30)
    y = x + rng.normal(size=30)
    xs, ys, groups = np.repeat(x, 8), np.repeat(y, 8), np.repeat(np.arange(30), 8)  # 8 copies of each item
    naive = bootstrap_ci(xs, ys, n_boot=300, seed=1)
    cluster = bootstrap_ci(xs, ys, n_boot=300, seed=1, groups=groups)
    per_item = bootstrap_ci(x, y, n_boot=300, seed=1)
    assert naive.high - naive.low < 0.6 * (cluster.high - cluster.low)  # copies are not evidence
    assert cluster.high - cluster.low == pytest.approx(per_item.high - per_item.low, rel=0.35)
    # by hand: the same generator draws cluster ids
    g = np.random.default_rng(1)
    vals = []
    for _ in range(300):
        idx = np.concatenate([np.flatnonzero(groups == k) for k in g.integers(0, 30, 30)])
        vals.append(spearman(xs[idx], ys[idx]))
    assert (cluster.low, cluster.high) == pytest.approx(tuple(np.quantile(vals, [0.025, 0.975])))
    with pytest.raises(ValueError, match="groups"):
        bootstrap_ci(xs, ys, groups=groups[:-1])
    # a difference of correlations on the same resamples: a good proxy minus noise is > 0
    noise = rng.normal(size=240)
    d = difference_ci(xs, noise, ys, n_boot=200, groups=groups)
    assert d.value == pytest.approx(spearman(xs, ys) - spearman(noise, ys)) and d.low > 0
