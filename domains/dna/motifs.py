"""DNA sequences over ACGT with liver transcription-factor motifs from JASPAR (``pyjaspar``,
offline): position weight matrices, a corpus with motifs planted in background sequence, and
enhancer-activity-style oracles.

Oracle (``MotifActivity``): for each motif m, a soft maximum over positions of its log-odds score
against the background, s_m(x) = τ·log Σ_pos exp(LLR_m(x, pos)/τ); activity = Σ_m w_m · s_m(x).
It is a convolution of the one-hot sequence with log-odds filters, so it is differentiable and
DRAKES can fine-tune on it. The *evaluation* oracle uses different motif weights and counts
motif hits with saturation, so a model that over-optimises the training oracle's exact form
shows a gap (as DRAKES reports with separate fine-tuning and evaluation oracles).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from rewardopt.rewards.base import Reward

BASES = "ACGT"
LIVER_TFS = ("HNF4A", "CEBPA", "FOXA2", "HNF1A")
BACKGROUND = np.array([0.29, 0.21, 0.21, 0.29])  # A C G T, GC 0.42


@lru_cache(maxsize=None)
def jaspar_pwm(name: str, pseudocount: float = 0.5) -> np.ndarray:
    """(length, 4) probabilities of the first JASPAR CORE matrix named ``name``."""
    from pyjaspar import jaspardb

    motifs = jaspardb().fetch_motifs_by_name(name)
    if not motifs:
        raise ValueError(f"JASPAR has no motif named {name!r}")
    counts = np.array([[motifs[0].counts[b][i] for b in BASES] for i in range(motifs[0].length)], dtype=np.float64)
    counts += pseudocount
    return counts / counts.sum(1, keepdims=True)


def log_odds(name: str) -> torch.Tensor:
    """(4, length) log2 odds of the PWM against the background (a conv filter)."""
    pwm = jaspar_pwm(name)
    return torch.tensor(np.log2(pwm / BACKGROUND).T, dtype=torch.float32)


def generate_corpus(n: int, seq_len: int = 64, seed: int = 0, motifs: tuple[str, ...] = LIVER_TFS,
                    max_sites: int = 3, min_sites: int = 0) -> list[str]:
    """n sequences: background bases with min_sites..max_sites motif instances sampled from the PWMs
    (a later site may overwrite part of an earlier one)."""
    rng = np.random.default_rng(seed)
    pwms = [jaspar_pwm(m) for m in motifs]
    out = []
    for _ in range(n):
        seq = rng.choice(4, size=seq_len, p=BACKGROUND)
        for _ in range(rng.integers(min_sites, max_sites + 1)):
            pwm = pwms[rng.integers(len(pwms))]
            if len(pwm) > seq_len:
                continue
            start = rng.integers(0, seq_len - len(pwm) + 1)
            seq[start:start + len(pwm)] = [rng.choice(4, p=row) for row in pwm]
        out.append("".join(BASES[i] for i in seq))
    return out


def bases_of(samples) -> torch.Tensor:
    """(B, L, 4) one-hot bases from (B, L, V) one-hots (extra tokens such as [MASK] dropped) or strings."""
    if isinstance(samples, (list, tuple)):
        ids = torch.tensor([[BASES.index(c) for c in s] for s in samples])
        return F.one_hot(ids, 4).float()
    if samples.ndim != 3 or samples.shape[-1] < 4:
        raise ValueError(f"expected DNA one-hots (B, L, >=4) or strings; got {tuple(samples.shape)}")
    return samples[..., :4].float()


class MotifActivity(Reward):
    """Σ_m w_m · τ·logsumexp_pos(LLR_m / τ) over the given motifs (differentiable).

    Args:
        weights: motif name -> weight (default: the four liver TFs, weight 1).
        tau: softness of the maximum over positions (bits).
    """

    differentiable = True

    def __init__(self, weights: dict[str, float] | None = None, tau: float = 1.0, name: str | None = None) -> None:
        super().__init__(name or "motif_activity")
        self.weights = dict(weights or {m: 1.0 for m in LIVER_TFS})
        self.tau = tau
        self.filters = [log_odds(m) for m in self.weights]

    def score(self, samples, cond):
        x = bases_of(samples).transpose(1, 2)  # (B, 4, L)
        total = x.new_zeros(x.shape[0])
        for (m, w), f in zip(self.weights.items(), self.filters):
            llr = F.conv1d(x, f.to(x)[None])[:, 0]  # (B, L - len + 1)
            total = total + w * self.tau * torch.logsumexp(llr / self.tau, dim=1)
        return total


class MotifHitActivity(Reward):
    """The evaluation oracle: Σ_m w_m · min(hits_m, cap), hits = positions whose log-odds exceed
    ``threshold`` bits (hard counts; not differentiable, different weights than the training oracle)."""

    differentiable = False

    def __init__(self, weights: dict[str, float] | None = None, threshold: float = 6.0, cap: int = 2,
                 name: str | None = None) -> None:
        super().__init__(name or "motif_hits_eval")
        self.weights = dict(weights or {"HNF4A": 1.5, "CEBPA": 1.0, "FOXA2": 0.5, "HNF1A": 1.0})
        self.threshold, self.cap = threshold, cap
        self.filters = [log_odds(m) for m in self.weights]

    def score(self, samples, cond):
        with torch.no_grad():
            x = bases_of(samples).transpose(1, 2)
            total = x.new_zeros(x.shape[0])
            for (m, w), f in zip(self.weights.items(), self.filters):
                hits = (F.conv1d(x, f.to(x)[None])[:, 0] > self.threshold).sum(1).clamp(max=self.cap)
                total = total + w * hits
        return total


class GCContent(Reward):
    """Fraction of G or C (differentiable on one-hots)."""

    differentiable = True

    def score(self, samples, cond):
        x = bases_of(samples)
        return x[..., 1:3].sum(-1).mean(-1)
