"""Finite feature maps phi with phi(z)^T phi(z') ~ k(z, z') and ||phi(z)|| <= 1 for every input.

The private bandit (``rewardopt.feedback.bandit``) releases the statistics sum phi phi^T and
sum phi y; their sensitivity is only bounded because every feature row has norm at most one, so
that bound is part of the contract here, not a convenience.

Kernels (r = ||z - z'||, l the lengthscale; all stationary with k(z, z) = 1):

    rbf        exp(-r^2 / (2 l^2))
    matern12   exp(-r / l)
    matern32   (1 + sqrt(3) r / l) exp(-sqrt(3) r / l)
    matern52   (1 + sqrt(5) r / l + 5 r^2 / (3 l^2)) exp(-sqrt(5) r / l)

**Random Fourier features** (Rahimi & Recht 2007). By Bochner's theorem k(z - z') = E_w[cos(w^T (z - z'))]
with w drawn from the kernel's normalised spectral density: for the RBF kernel w ~ N(0, I / l^2); for
Matérn-nu the density is proportional to (2 nu / l^2 + ||w||^2)^-(nu + d/2), which is the multivariate
Student-t with 2 nu degrees of freedom and scale matrix I / l^2 (its density is proportional to
(1 + l^2 ||w||^2 / (2 nu))^-(2 nu + d)/2, the same function of ||w||), drawn as w = g / l * sqrt(2 nu / u)
with g ~ N(0, I) and u ~ chi^2_{2 nu}.

Normalisation: the common map sqrt(2/m) cos(W z + b) with a random phase b has
||phi||^2 = (2/m) sum_j cos^2(.) which lies anywhere in [0, 2] — it breaks the bound. We use the
paired map instead: D = m/2 frequencies, phi(z) = [cos(W z), sin(W z)] / sqrt(D). Then
||phi(z)||^2 = (1/D) sum_j (cos^2 + sin^2) = 1 exactly, for every z, and
phi(z)^T phi(z') = (1/D) sum_j cos(w_j^T (z - z')), an unbiased Monte-Carlo estimate of k(z, z') (a mean
of D i.i.d. terms in [-1, 1]: error O(1/sqrt(D)), Hoeffding). ``num_features`` must therefore be even.

**Nyström** (Williams & Seeger 2001). With landmarks Z_M and K_MM = U diag(s) U^T, the features
phi(z) = diag(s_r)^-1/2 U_r^T k_M(z) over the r eigenvalues above ``rtol * max(s)`` give
phi(z)^T phi(z') = k_M(z)^T K_MM^+ k_M(z'): the RKHS inner product of the projections of k(z, .) and
k(z', .) onto span{k(z_i, .)}. A projection does not increase norms, so ||phi(z)||^2 = ||P k(z, .)||_H^2
<= k(z, z) = 1. Dropping small eigenvalues keeps this (it projects onto a smaller subspace); the bound
can only fail by rounding, so rows are rescaled to norm 1 where the float error would exceed it.
"""

from __future__ import annotations

import math

import torch
from torch import nn

#: the kernels this module knows, with the Matérn smoothness nu (None: the RBF kernel)
KERNELS: dict[str, float | None] = {"rbf": None, "matern12": 0.5, "matern32": 1.5, "matern52": 2.5}


def _check_kernel(kernel: str) -> float | None:
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {sorted(KERNELS)}, got {kernel!r}")
    return KERNELS[kernel]


def kernel_matrix(x: torch.Tensor, y: torch.Tensor, lengthscale: float = 1.0, kernel: str = "rbf") -> torch.Tensor:
    """The exact kernel k(x_i, y_j): x (N, d), y (M, d) -> (N, M). k(z, z) = 1."""
    _check_kernel(kernel)
    d2 = (x.unsqueeze(1) - y.unsqueeze(0)).pow(2).sum(-1)
    if kernel == "rbf":
        return torch.exp(-d2 / (2 * lengthscale**2))
    r = d2.clamp_min(0).sqrt() / lengthscale
    if kernel == "matern12":
        return torch.exp(-r)
    if kernel == "matern32":
        s = math.sqrt(3) * r
        return (1 + s) * torch.exp(-s)
    s = math.sqrt(5) * r
    return (1 + s + s**2 / 3) * torch.exp(-s)


class KernelFeatures(nn.Module):
    """A feature map phi: (N, in_dim) -> (N, dim) with ||phi(z)|| <= 1 for every row.

    ``config`` holds the constructor's arguments (so a saved map is rebuilt by ``cls(**config)`` and
    its buffers loaded); ``kernel_fn(x, y)`` is the exact kernel the features approximate.
    """

    in_dim: int
    dim: int
    config: dict

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # pragma: no cover - the subclasses define it
        raise NotImplementedError(f"{type(self).__name__} does not define its feature map")

    def kernel_fn(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return kernel_matrix(x, y, self.lengthscale, self.kernel)

    def _check_input(self, z: torch.Tensor) -> torch.Tensor:
        if z.ndim != 2 or z.shape[1] != self.in_dim:
            raise ValueError(f"{type(self).__name__} expects inputs shaped (N, {self.in_dim}); got {tuple(z.shape)}")
        return z.to(self.reference_dtype)

    @property
    def reference_dtype(self) -> torch.dtype:
        return next(iter(self.buffers())).dtype


class RandomFourierFeatures(KernelFeatures):
    """Random Fourier features [cos(W z), sin(W z)] / sqrt(m/2): ||phi(z)|| = 1 exactly.

    Args:
        in_dim: input dimension d.
        num_features: m, the output dimension (even: m/2 frequencies, each a cos and a sin).
        lengthscale: l of the kernel.
        kernel: "rbf", "matern12", "matern32" or "matern52".
        seed: the frequencies' seed (a fixed map: replaying a bandit needs the same features).
    """

    def __init__(self, in_dim: int, num_features: int = 256, lengthscale: float = 1.0, kernel: str = "rbf",
                 seed: int = 0) -> None:
        super().__init__()
        nu = _check_kernel(kernel)
        if num_features < 2 or num_features % 2:
            raise ValueError(f"num_features must be even and >= 2 (cos and sin of each frequency), got {num_features}")
        if lengthscale <= 0:
            raise ValueError(f"lengthscale must be > 0, got {lengthscale}")
        self.config = {"in_dim": in_dim, "num_features": num_features, "lengthscale": lengthscale,
                       "kernel": kernel, "seed": seed}
        self.in_dim, self.dim, self.lengthscale, self.kernel = in_dim, num_features, float(lengthscale), kernel
        g = torch.Generator().manual_seed(seed)
        half = num_features // 2
        w = torch.randn(half, in_dim, generator=g, dtype=torch.float64)
        if nu is not None:  # multivariate Student-t with 2 nu degrees of freedom: a Gaussian over sqrt(chi^2 / 2 nu)
            u = _chi2(2 * nu, half, g)
            w = w * torch.sqrt(2 * nu / u).unsqueeze(1)
        self.register_buffer("frequencies", (w / lengthscale).float())

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """z (N, in_dim) -> (N, num_features), every row of norm 1."""
        proj = self._check_input(z) @ self.frequencies.T
        return torch.cat([proj.cos(), proj.sin()], dim=1) / math.sqrt(self.dim // 2)


def _chi2(df: float, n: int, g: torch.Generator) -> torch.Tensor:
    """n draws of chi^2_df from ``g``: 2 * Gamma(df / 2, 1). torch's Gamma sampler takes no generator, so for
    the half-integer df of the Matérn kernels (1, 3, 5) we sum squared normals: chi^2_k = sum of k N(0,1)^2."""
    k = int(round(df))
    if abs(k - df) > 1e-9:
        raise ValueError(f"chi^2 with non-integer df={df} is not needed by the Matérn kernels here")
    return torch.randn(n, k, generator=g, dtype=torch.float64).pow(2).sum(1)


class NystromFeatures(KernelFeatures):
    """Nyström features K_MM^{-1/2} k_M(z) over landmarks: ||phi(z)|| <= sqrt(k(z, z)) = 1.

    Args:
        landmarks: (M, d) inputs the features are built from. They are saved with every release (the feature
            map's buffers), so they must be public — drawn from the generator, or a public sample — never raters'
            contexts or actions: a release built on people's inputs would publish them outside the DP guarantee.
        lengthscale, kernel: as ``RandomFourierFeatures``.
        rtol: eigenvalues of K_MM below ``rtol * max`` are dropped (dim = the rank kept).
    """

    def __init__(self, landmarks: torch.Tensor, lengthscale: float = 1.0, kernel: str = "rbf",
                 rtol: float = 1e-6) -> None:
        super().__init__()
        _check_kernel(kernel)
        if landmarks.ndim != 2 or len(landmarks) < 1:
            raise ValueError(f"landmarks must be (M, d) with M >= 1; got {tuple(landmarks.shape)}")
        if lengthscale <= 0:
            raise ValueError(f"lengthscale must be > 0, got {lengthscale}")
        z = landmarks.detach().to(torch.float64)
        self.in_dim, self.lengthscale, self.kernel = z.shape[1], float(lengthscale), kernel
        self.config = {"landmarks": None, "lengthscale": lengthscale, "kernel": kernel, "rtol": rtol}
        s, u = torch.linalg.eigh(kernel_matrix(z, z, lengthscale, kernel))
        keep = s > rtol * s.max()
        proj = u[:, keep] / s[keep].sqrt()  # (M, r): phi(z) = proj^T k_M(z)
        self.dim = int(keep.sum())
        self.register_buffer("landmarks", z.float())
        self.register_buffer("projection", proj.float())

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """z (N, in_dim) -> (N, dim) with every row of norm <= 1."""
        phi = self.kernel_fn(self._check_input(z), self.landmarks) @ self.projection
        norm = phi.norm(dim=1, keepdim=True)
        return phi / norm.clamp_min(1.0)  # rounding only: the exact map has norm <= 1


def build_features(config: dict, state: dict[str, torch.Tensor]) -> KernelFeatures:
    """A saved feature map back from its ``config`` (with ``type``) and buffers (``state``)."""
    kind = config.get("type")
    args = {k: v for k, v in config.items() if k != "type"}
    if kind == "RandomFourierFeatures":
        feats = RandomFourierFeatures(**args)
    elif kind == "NystromFeatures":
        args["landmarks"] = state["landmarks"]
        feats = NystromFeatures(**args)
    else:
        raise ValueError(f"unknown feature map type {kind!r}; expected RandomFourierFeatures or NystromFeatures")
    feats.load_state_dict(state)
    return feats


def features_config(features: KernelFeatures) -> dict:
    """``features.config`` with its ``type``: what ``build_features`` reads back."""
    return {"type": type(features).__name__, **{k: v for k, v in features.config.items() if k != "landmarks"}}
