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
