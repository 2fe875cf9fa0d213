"""A jointly differentially private kernelized contextual bandit (explore, release once, exploit).

Paper: Pavlovic, Salgia & Zhao, "Differentially Private Kernelized Contextual Bandits", AISTATS 2025
(arXiv 2501.07046). The reward f(context, action) lies in a known RKHS, contexts are i.i.d., and the
sequence of queries must be jointly DP with respect to every user's context and reward. The paper's
recipe: data-independent exploration (the queries of the learning phase do not look at anyone's data,
so they are private for free), then one low-sensitivity, covariance-based estimate of f released with
the Gaussian mechanism; error O(sqrt(gamma_T / T) + gamma_T / (T epsilon)) after T queries.

Our reading (the paper's constants and some steps are not available to us; what follows is derived here
and tested in tests/feedback/test_bandit.py):

**Features.** A (context c, action a) pair is one input z = [c; a] (concatenated embeddings) to a
``KernelFeatures`` map phi with ||phi(z)|| <= 1. For the RBF kernel this is exactly the product kernel
k_c(c, c') k_a(a, a') with one lengthscale (exp(-||z - z'||^2 / 2l^2) factorises over the blocks); for
Matérn it is the Matérn kernel of the joint distance. Scale the embeddings to weigh the two parts.

**Exploration.** While t < explore_rounds, ``select`` returns k distinct candidates drawn uniformly by a
generator seeded with (seed, t) alone: the query at round t depends on nothing but (seed, t, K, k).

**Statistics.** S = sum_t phi_t phi_t^T (m x m) and b = sum_t phi_t y_t, with y clipped to [-B, B]. The
neighbouring notion is *replace one user*: one user's (context, action, reward) rows are replaced by
anything else (the action is a function of the public seed during exploration, but we do not need that:
the bound below holds for arbitrary rows). For one row per user, with u = phi, v = phi' (||u||, ||v|| <= 1)
and p = |u^T v|:

    ||u u^T - v v^T||_F^2 = ||u||^4 + ||v||^4 - 2 (u^T v)^2                 <= 2 - 2 p^2  (unit norms)
    ||u y - v y'||^2      = y^2 ||u||^2 + y'^2 ||v||^2 - 2 y y' u^T v        <= 2 B^2 (1 + p)

(both grow with ||u||, ||v|| at fixed p, and p <= ||u|| ||v||, so unit norms are the worst case). The sum of
the two separate suprema, 2 + 4 B^2, is a valid bound but is never attained: the first needs u
perpendicular to v, the second v = -u. Jointly, the squared L2 distance between the (S, b) of neighbours is
at most F(p) = 2 - 2 p^2 + 2 B^2 (1 + p), maximised at p* = min(B^2 / 2, 1):

    Delta = (B^2 + 2) / sqrt(2)   for B^2 <= 2      (B = 1: 3 / sqrt(2) ~ 2.121, vs sqrt(6) ~ 2.449)
    Delta = 2 B                   for B^2 >= 2      (p* = 1: v = u, y = -y' = B, S unchanged)

which is attained (any p in [0, 1] is a feature inner product of two inputs some distance apart; the test
finds pairs within 3% of it). With k ratings per user (``ratings_per_user``) replace them one at a time: by
the triangle inequality Delta_k = k Delta.

**The symmetric noise.** S is symmetric, so its information is the half-vectorisation
h(S) = (S_ii; sqrt(2) S_ij for i < j), whose Euclidean norm is the Frobenius norm of S: the Frobenius bound
above *is* the L2 sensitivity of h(S). The Gaussian mechanism adds N(0, sigma^2) to every coordinate of
(h(S), b); mapped back to a matrix this is S + E with E = (G + G^T)/2, G an i.i.d. N(0, sigma^2) m x m matrix:
diagonal entries of E are N(0, sigma^2) and off-diagonal N(0, sigma^2 / 2), which is sigma^2 on the
sqrt(2)-scaled coordinate. (Noising the upper triangle with variance sigma^2 and mirroring it would also
be private but adds twice the needed variance off the diagonal; noising all m^2 entries independently
would not give a symmetric release.) sigma comes from ``gaussian_sigma(Delta, epsilon, delta)``.

**The estimate.** S~ is projected onto the PSD cone (negative eigenvalues clipped to 0: post-processing,
no privacy cost) and theta~ = (S~_+ + lambda I)^-1 b~. lambda = lam + (the noise's spectral-norm bound):
||E|| <= ||G|| <= sigma (2 sqrt(m) + sqrt(2 ln(1/beta))) with probability >= 1 - beta (Gordon's bound
E||G|| <= 2 sigma sqrt(m) and Gaussian concentration of the 1-Lipschitz map G -> ||G||), so with that
probability S + lambda I - ||E|| I >= lam I: the regulariser absorbs the noise as in Shariff & Sheffet's
private linear bandits, and S~_+ + lambda I >= lambda I is well conditioned always. With epsilon = inf
there is no noise, lambda = lam and theta~ is kernel ridge regression on the same features.

**Exploitation and joint DP.** After the release ``select`` is greedy (top-k of phi(z)^T theta~). The
release is (epsilon, delta)-DP; every later query is a function of the public release and that user's own
context only (the billboard lemma, Hsu et al. 2016), so the sequence of all queries is jointly DP.
Observations after the release are counted (``t``) but do not change the estimate.

**The noise seed is a secret.** The Gaussian mechanism's guarantee assumes the noise is unknown: whoever knows
the generator's seed regenerates (E, e), subtracts it and reads the exact statistics (the audit in
benchmarks/dp_bandit.py finds an epsilon lower bound above 5 at nominal 1 with a known seed). So the release noise
has a seed of its own, ``noise_seed``: by default 128 bits drawn from the operating system (``secrets``; the noise
generator, PCG64, uses all of them — a torch CPU generator would keep 32, few enough to search) when the bandit is
built, never derived from the public ``seed`` and never written by ``save_release``. Replaying a bandit needs the
same noise seed; the rating server keeps it in its store, beside the answers, and nowhere else. Pass an integer
only where reproducible releases matter more than privacy (simulated raters, benchmarks, tests). Not addressed:
floating-point side channels of sampled Gaussians (Mironov 2012, for the Laplace case).
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable

import torch
from einops import rearrange

from rewardopt.feedback.kernels import KernelFeatures
from rewardopt.feedback.privacy import ZCDPAccountant, gaussian_mechanism, gaussian_sigma, noise_generator
from rewardopt.run import derived_seed


def secret_seed() -> int:
    """A fresh 128-bit seed from the operating system's CSPRNG (for the release noise; ``noise_generator`` uses all
    of its bits)."""
    return secrets.randbits(128)


def joint_sensitivity(reward_bound: float, ratings_per_user: int = 1) -> float:
    """L2 sensitivity of (h(S), b) under replace-one-user (module docstring): k (B^2 + 2) / sqrt(2) for
    B^2 <= 2, else 2 k B."""
    B2 = reward_bound**2
    one = (B2 + 2) / math.sqrt(2) if B2 <= 2 else 2 * reward_bound
    return ratings_per_user * one


def half_vec(S: torch.Tensor) -> torch.Tensor:
    """h(S) = (S_ii; sqrt(2) S_ij for i < j): ||h(S)|| = ||S||_F for symmetric S. (m, m) -> (m(m+1)/2,)."""
    i, j = torch.triu_indices(len(S), len(S))
    scale = torch.where(i == j, 1.0, math.sqrt(2)).to(S.dtype)
    return S[i, j] * scale


def release_vector(S: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The vector the Gaussian mechanism noises: (h(S), b)."""
    return torch.cat([half_vec(S), b])


def symmetric_noise(m: int, sigma: float, generator, dtype=torch.float64) -> torch.Tensor:
    """E = (G + G^T)/2 with G i.i.d. N(0, sigma^2): h(E) is i.i.d. N(0, sigma^2) in every coordinate."""
    G = gaussian_mechanism(torch.zeros(m, m, dtype=dtype), sigma, generator)
    return (G + G.T) / 2


def noise_spectral_bound(m: int, sigma: float, beta: float = 0.01) -> float:
    """A bound on ||E||_2 that holds with probability >= 1 - beta: sigma (2 sqrt(m) + sqrt(2 ln(1/beta)))."""
    return sigma * (2 * math.sqrt(m) + math.sqrt(2 * math.log(1 / beta)))


def psd_project(S: torch.Tensor) -> torch.Tensor:
    """The nearest PSD matrix in Frobenius norm: eigenvalues clipped at 0."""
    s, U = torch.linalg.eigh((S + S.T) / 2)
    return (U * s.clamp_min(0)) @ U.T


class PrivateKernelBandit:
    """Explore uniformly for ``explore_rounds`` observations, release a private estimate, then be greedy.

    Args:
        features: phi over the concatenation [context; action] (``features.in_dim`` = dc + da).
        epsilon, delta: the release's (epsilon, delta)-DP (epsilon = inf: no noise, the non-private baseline).
        reward_bound: B; rewards are clipped to [-B, B] (ratings 1-9 map to (s - 5)/4 in [-1, 1]: B = 1).
        lam: the ridge; the noise's spectral bound is added to it (``noise_lambda``) unless that is False.
        explore_rounds: observations gathered before the one release.
        seed: fixes the exploration draws (stream t of it); public (it is in the recipe and the saved release).
        noise_seed: the release noise's seed. None (default): a secret one from ``secret_seed()``, kept in
            ``self.noise_seed`` only (see "The noise seed is a secret" above). An int: reproducible releases, for
            simulations and tests only — a known noise seed voids the privacy guarantee.
        ratings_per_user: how many observations one user contributes (scales the sensitivity).
        noise_lambda: add ``noise_spectral_bound(m, sigma, beta)`` to lam.
        beta: failure probability of that bound.
    """

    def __init__(self, features: KernelFeatures, epsilon: float, delta: float = 1e-5, reward_bound: float = 1.0,
                 lam: float = 1.0, explore_rounds: int = 256, seed: int = 0, ratings_per_user: int = 1,
                 noise_lambda: bool = True, beta: float = 0.01, noise_seed: int | None = None) -> None:
        if explore_rounds < 1:
            raise ValueError(f"explore_rounds must be >= 1, got {explore_rounds}")
        if reward_bound <= 0 or lam <= 0:
            raise ValueError(f"reward_bound and lam must be > 0; got {reward_bound}, {lam}")
        if ratings_per_user < 1:
            raise ValueError(f"ratings_per_user must be >= 1, got {ratings_per_user}")
        self.features = features
        self.epsilon, self.delta, self.reward_bound = float(epsilon), float(delta), float(reward_bound)
        self.explore_rounds, self.seed, self.ratings_per_user = int(explore_rounds), int(seed), int(ratings_per_user)
        self.noise_seed = secret_seed() if noise_seed is None else int(noise_seed)
        self.sensitivity = joint_sensitivity(self.reward_bound, self.ratings_per_user)
        self.sigma = gaussian_sigma(self.sensitivity, self.epsilon, self.delta)
        m = features.dim
        self.lam = float(lam) + (noise_spectral_bound(m, self.sigma, beta) if noise_lambda else 0.0)
        self.accountant = ZCDPAccountant()
        self.t = 0
        self._S = torch.zeros(m, m, dtype=torch.float64)
        self._b = torch.zeros(m, dtype=torch.float64)
        self._n = 0  # observations in the statistics
        self.theta: torch.Tensor | None = None  # theta~, (m,), once released
        #: the Gaussian mechanism's output (S + E, b + e), once released; theta is post-processing of it
        self.noisy_statistics: tuple[torch.Tensor, torch.Tensor] | None = None
        self.observed_rewards: list[float] = []  # every clipped reward seen (for reporting; never released)

    # --- queries ------------------------------------------------------------------------------
    def exploration_generator(self, t: int) -> torch.Generator:
        """The generator of round t's exploration draw: seeded by (seed, t) only."""
        return torch.Generator().manual_seed(derived_seed(self.seed, t))

    def select(self, context: torch.Tensor, candidates: torch.Tensor, k: int = 1) -> list[int]:
        """Indices of the k candidates (K, da) to show for ``context`` (dc,).

        Before the release: k distinct uniform draws depending only on (seed, t, K, k). After: the
        top-k of the released estimate."""
        K = len(candidates)
        if not 1 <= k <= K:
            raise ValueError(f"k must be in [1, {K}] (the number of candidates), got {k}")
        if not self.released:
            return torch.randperm(K, generator=self.exploration_generator(self.t))[:k].tolist()
        scores = self.predict(context, candidates)
        return torch.topk(scores, k).indices.tolist()

    # --- data ---------------------------------------------------------------------------------
    def joint(self, context: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """z = [c; a]: context (dc,) or (N, dc), actions (N, da) -> (N, dc + da)."""
        # (N, da) or (N, ...) flattened; a 1-D tensor is one action
        actions = rearrange(actions, "n ... -> n (...)") if actions.ndim > 1 else actions.unsqueeze(0)
        context = context.to(actions.dtype)
        if context.ndim == 1:
            context = context.unsqueeze(0).expand(len(actions), -1)
        if len(context) != len(actions):
            raise ValueError(f"{len(context)} contexts for {len(actions)} actions")
        return torch.cat([context, actions], dim=1)

    def clip(self, reward: float) -> float:
        B = self.reward_bound
        return float(min(max(float(reward), -B), B))

    def observe(self, context: torch.Tensor, action: torch.Tensor, reward: float) -> None:
        """Record one rating: clipped to [-B, B] and added to the statistics until the release, which
        happens once, when t reaches ``explore_rounds``."""
        if not math.isfinite(float(reward)):
            raise ValueError(f"reward must be finite, got {reward}")
        y = self.clip(reward)
        self.observed_rewards.append(y)
        if not self.released:
            with torch.no_grad():
                phi = self.features(self.joint(context, action.reshape(1, -1))).to(torch.float64)[0]
            self._S += torch.outer(phi, phi)
            self._b += phi * y
            self._n += 1
        self.t += 1
        if self.t == self.explore_rounds and not self.released:
            self.release()

    def observe_batch(self, contexts: torch.Tensor, actions: torch.Tensor, rewards: torch.Tensor) -> None:
        """``observe`` for N ratings at once (contexts (N, dc), actions (N, da), rewards (N,)), in order:
        the same statistics and the same release as N ``observe`` calls (the release still happens once,
        at t = explore_rounds, on the first explore_rounds rows; later rows are only counted)."""
        rewards = torch.as_tensor(rewards, dtype=torch.float64).flatten()
        if not torch.isfinite(rewards).all():
            raise ValueError("rewards must be finite")
        y = rewards.clamp(-self.reward_bound, self.reward_bound)
        self.observed_rewards.extend(y.tolist())
        n_stat = 0 if self.released else min(len(y), self.explore_rounds - self.t)
        if n_stat:
            with torch.no_grad():
                phi = self.features(self.joint(contexts[:n_stat], actions[:n_stat])).to(torch.float64)
            self._S += phi.T @ phi
            self._b += phi.T @ y[:n_stat]
            self._n += n_stat
        self.t += len(y)
        if n_stat and self.t >= self.explore_rounds:
            self.release()

    def statistics(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The exact (S, b) gathered so far — private data: tests and audits only, never publish it."""
        return self._S.clone(), self._b.clone()

    # --- the release ----------------------------------------------------------------------------
    @property
    def released(self) -> bool:
        return self.theta is not None

    def release(self) -> torch.Tensor:
        """Release theta~ once (called by ``observe`` at t = explore_rounds; call it yourself to release
        fewer observations). The noise is drawn from a generator seeded by ``noise_seed``: same data and noise seed,
        same release."""
        if self.released:
            raise RuntimeError("the statistics were already released once; a second release would spend "
                               "more privacy (build a new bandit with its own budget)")
        g = noise_generator(self.noise_seed)  # PCG64 over the whole seed (a torch CPU generator keeps 32 bits)
        m = len(self._b)
        E = symmetric_noise(m, self.sigma, g)
        b = gaussian_mechanism(self._b, self.sigma, g)
        S = self._S + E
        self.noisy_statistics = (S.clone(), b.clone())
        if self.sigma > 0:
            S = psd_project(S)
        self.accountant.add("S, b", self.sensitivity, self.sigma)
        self.theta = torch.linalg.solve(S + self.lam * torch.eye(m, dtype=S.dtype), b)
        return self.theta

    def predict(self, context: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """phi([c; a])^T theta~: context (dc,) or (N, dc), actions (N, da) -> (N,). Differentiable in both."""
        if not self.released:
            raise RuntimeError(f"nothing released yet: {self.t} of {self.explore_rounds} exploration observations")
        phi = self.features(self.joint(context, actions))
        return phi @ self.theta.to(phi.dtype)


def simple_regret(predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                  f: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                  contexts: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Simple regret of the greedy policy of ``predict`` against the true ``f``, per context:
    max_a f(c, a) - f(c, argmax_a predict(c, a)). contexts (N, dc), candidates (N, K, da) -> (N,)."""
    out = []
    for c, cand in zip(contexts, candidates):
        with torch.no_grad():
            true = f(c, cand)
            chosen = int(predict(c, cand).argmax())
        out.append(true.max() - true[chosen])
    return torch.stack(out)
