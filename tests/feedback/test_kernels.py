"""Feature maps: phi(z)^T phi(z') approximates k(z, z') (better with more features) and ||phi|| <= 1 always."""

from __future__ import annotations

import math

import pytest
import torch

from rewardopt.feedback.kernels import (
    KERNELS,
    NystromFeatures,
    RandomFourierFeatures,
    build_features,
    features_config,
    kernel_matrix,
)


def points(n=40, d=3, scale=0.6, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


def test_kernel_formulas_at_known_distances():
    x, y = torch.zeros(1, 2), torch.tensor([[0.6, 0.8]])  # r = 1
    k = {name: float(kernel_matrix(x, y, 2.0, name)) for name in KERNELS}  # r / l = 0.5
    assert k["rbf"] == pytest.approx(math.exp(-1 / 8))
    assert k["matern12"] == pytest.approx(math.exp(-0.5))
    assert k["matern32"] == pytest.approx((1 + math.sqrt(3) / 2) * math.exp(-math.sqrt(3) / 2))
    s = math.sqrt(5) / 2
    assert k["matern52"] == pytest.approx((1 + s + s**2 / 3) * math.exp(-s))
    for name in KERNELS:
        assert torch.allclose(kernel_matrix(y, y, 1.0, name), torch.ones(1, 1))


@pytest.mark.parametrize("kernel", sorted(KERNELS))
def test_rff_approximates_the_kernel_and_improves_with_m(kernel):
    z = points()
    exact = kernel_matrix(z, z, 0.8, kernel)
    errs = []
    for m in (64, 1024, 16384):
        phi = RandomFourierFeatures(3, m, 0.8, kernel, seed=1)(z).double()
        errs.append(float((phi @ phi.T - exact).abs().max()))
    # a mean of m/2 bounded i.i.d. terms: the max error over 1,600 pairs shrinks like 1/sqrt(m)
    assert errs[2] < errs[1] < errs[0]
    assert errs[2] < 0.05 and errs[0] > 2 * errs[2]


@pytest.mark.parametrize("kernel", sorted(KERNELS))
def test_rff_spectral_sampling_matches_the_kernel_on_average(kernel):
    """Bochner: E_w cos(w^T r) = k(r). Many frequencies, one pair at a few distances: the Student-t
    draws for Matérn (a wrong degrees-of-freedom or scale shows up here, not in the norm)."""
    feats = RandomFourierFeatures(2, 2 * 200_000, 1.0, kernel, seed=3)
    for r in (0.3, 1.0, 2.0):
        delta = torch.tensor([r, 0.0])
        est = torch.cos(feats.frequencies.double() @ delta.double()).mean()
        assert float(est) == pytest.approx(float(kernel_matrix(delta[None], torch.zeros(1, 2), 1.0, kernel)), abs=0.01)


@pytest.mark.parametrize("kernel", sorted(KERNELS))
def test_rff_rows_have_unit_norm_for_any_input(kernel):
    feats = RandomFourierFeatures(5, 64, 0.3, kernel)
    z = torch.cat([torch.randn(100, 5) * 100, torch.zeros(1, 5), torch.rand(50, 5)])
    norms = feats(z).norm(dim=1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)


def test_rff_refuses_odd_feature_count_and_unknown_kernel():
    with pytest.raises(ValueError, match="even"):
        RandomFourierFeatures(2, 7)
    with pytest.raises(ValueError, match="kernel must be one of"):
        RandomFourierFeatures(2, 8, kernel="laplace")
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        RandomFourierFeatures(2, 8)(torch.zeros(3, 4))


@pytest.mark.parametrize("kernel", sorted(KERNELS))
def test_nystrom_is_exact_on_landmarks_and_norm_bounded(kernel):
    landmarks = points(60, 2, 0.8, seed=1)
    feats = NystromFeatures(landmarks, 0.7, kernel, rtol=1e-9)
    phi = feats(landmarks).double()
    assert torch.allclose(phi @ phi.T, kernel_matrix(landmarks, landmarks, 0.7, kernel), atol=2e-3)
    far = torch.cat([torch.randn(200, 2) * 3, landmarks.float() + 0.01])
    assert float(feats(far).norm(dim=1).max()) <= 1 + 1e-6


def test_nystrom_error_shrinks_with_more_landmarks():
    z = points(50, 2, 0.7, seed=2)
    exact = kernel_matrix(z, z, 0.8, "matern32")
    errs = []
    for m in (8, 32, 128):
        phi = NystromFeatures(points(m, 2, 0.7, seed=10 + m), 0.8, "matern32")(z).double()
        errs.append(float((phi @ phi.T - exact).abs().max()))
    assert errs[2] < errs[1] < errs[0]


@pytest.mark.parametrize("make", [lambda: RandomFourierFeatures(3, 16, 0.5, "matern52", seed=4),
                                  lambda: NystromFeatures(points(10, 3), 0.5, "rbf")])
def test_feature_maps_round_trip_through_config_and_buffers(make):
    feats = make()
    again = build_features(features_config(feats), feats.state_dict())
    z = points(5, 3).float()
    assert torch.equal(feats(z), again(z))


def test_features_are_differentiable_in_the_input():
    z = points(4, 3).float().requires_grad_()
    RandomFourierFeatures(3, 32)(z).sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
