"""PSNR and SSIM (rewardopt.media): identities, a closed form on constant images, and monotonicity in noise."""

import pytest
import torch

from rewardopt.media import psnr, ssim


def test_psnr_closed_form():
    a = torch.zeros(2, 3, 8, 8)
    b = torch.full((2, 3, 8, 8), 0.1)
    assert psnr(a, b).tolist() == pytest.approx([20.0, 20.0], abs=1e-4)  # MSE 0.01


def test_ssim_on_constant_images_is_the_luminance_term():
    a, b = torch.full((1, 3, 16, 16), 0.2), torch.full((1, 3, 16, 16), 0.7)
    c1 = 0.01 ** 2
    expected = (2 * 0.2 * 0.7 + c1) / (0.2 ** 2 + 0.7 ** 2 + c1)  # no variance: the structure term is c2 / c2
    assert float(ssim(a, b)) == pytest.approx(expected, rel=1e-3)  # float32 variances


def test_ssim_identity_symmetry_and_noise():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, 3, 32, 32, generator=g)
    assert ssim(a, a).tolist() == pytest.approx([1.0, 1.0], abs=1e-5)
    noisy = [(a + s * torch.randn(a.shape, generator=g)).clamp(0, 1) for s in (0.05, 0.2, 0.5)]
    values = [float(ssim(a, n).mean()) for n in noisy]
    assert values[0] > values[1] > values[2]
    torch.testing.assert_close(ssim(a, noisy[1]), ssim(noisy[1], a))


def test_ssim_matches_torchmetrics_on_valid_windows():
    """Cross-check with an independent implementation (torchmetrics, a lightning dependency): its full SSIM map
    (reflect-padded) cropped to the windows that lie inside the image equals ours. Its default scalar differs by
    design: it also averages the padded border windows, which inflates SSIM on renders with flat backgrounds; ours
    averages valid windows only, as Wang et al.'s reference code ('valid' filtering) does."""
    tm = pytest.importorskip("torchmetrics.functional.image")
    g = torch.Generator().manual_seed(1)
    a = torch.rand(3, 3, 32, 32, generator=g)
    b = (a + 0.2 * torch.randn(a.shape, generator=g)).clamp(0, 1)
    b[:, :, :12] = a[:, :, :12] = 1.0  # a flat white band, where border windows matter
    _, full = tm.structural_similarity_index_measure(b, a, data_range=1.0, return_full_image=True)
    pad = 5  # (11 - 1) / 2
    expected = full[..., pad:-pad, pad:-pad].flatten(1).mean(1)
    torch.testing.assert_close(ssim(a, b), expected, rtol=1e-4, atol=1e-4)
    assert float(tm.structural_similarity_index_measure(b, a, data_range=1.0)) > float(ssim(a, b).mean()) + 1e-3
