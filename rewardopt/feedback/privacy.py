"""The Gaussian mechanism, accounted in zero-concentrated differential privacy (zCDP).

Accounting (Bun & Steinke 2016, "Concentrated Differential Privacy: Simplifications, Extensions, and
Lower Bounds"): a release q(D) + N(0, sigma^2 I) of a query with L2 sensitivity Delta (the largest
||q(D) - q(D')|| over neighbouring datasets D, D') is rho-zCDP with

    rho = Delta^2 / (2 sigma^2)                                     (Prop. 1.6)

releases compose by adding their rho (Lemma 2.3), and rho-zCDP implies (epsilon, delta)-DP for every
delta in (0, 1) with

    epsilon(delta) = rho + 2 sqrt(rho ln(1/delta))                 (Prop. 1.3)

We chose zCDP over RDP because one number per release composes exactly and the conversion has a
closed-form inverse. **Calibration**: for a target (epsilon, delta) put L = ln(1/delta) and s = sqrt(rho):
s^2 + 2 sqrt(L) s - epsilon = 0 has the one positive root s = sqrt(L + epsilon) - sqrt(L), so

    rho(epsilon, delta) = (sqrt(L + epsilon) - sqrt(L))^2,   sigma = Delta / sqrt(2 rho)

and the accountant's epsilon(delta) of that one release is exactly the target (up to float rounding).
The conversion is not the tightest known (Canonne, Kamath & Steinke 2020 give a smaller epsilon for the
same rho); it is the standard, easily checked one, so the noise is slightly conservative.

epsilon = inf means "no privacy": sigma = 0 and rho = inf (a non-private baseline that uses the same code).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch


def rho_for(epsilon: float, delta: float) -> float:
    """The zCDP rho whose (epsilon, delta) conversion is exactly ``epsilon`` (inf for epsilon = inf)."""
    _check(epsilon, delta)
    if math.isinf(epsilon):
        return math.inf
    L = math.log(1 / delta)
    return (math.sqrt(L + epsilon) - math.sqrt(L)) ** 2


def epsilon_for(rho: float, delta: float) -> float:
    """(epsilon, delta)-DP of a rho-zCDP mechanism: rho + 2 sqrt(rho ln(1/delta))."""
    if rho < 0:
        raise ValueError(f"rho must be >= 0, got {rho}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if math.isinf(rho):
        return math.inf
    return rho + 2 * math.sqrt(rho * math.log(1 / delta))


def gaussian_sigma(sensitivity: float, epsilon: float, delta: float) -> float:
    """The Gaussian mechanism's noise standard deviation for one release of a query with L2
    ``sensitivity`` at (epsilon, delta): sigma = Delta / sqrt(2 rho(epsilon, delta)); 0 for epsilon = inf."""
    if sensitivity <= 0:
        raise ValueError(f"sensitivity must be > 0, got {sensitivity}")
    rho = rho_for(epsilon, delta)
    return 0.0 if math.isinf(rho) else sensitivity / math.sqrt(2 * rho)


def _check(epsilon: float, delta: float) -> None:
    if not epsilon > 0:
        raise ValueError(f"epsilon must be > 0 (inf: no privacy), got {epsilon}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")


def noise_generator(seed: int) -> np.random.Generator:
    """The release noise's generator: numpy's PCG64 seeded with all bits of ``seed`` (``torch.Generator`` on CPU keeps
    only a seed's low 32 bits, which a determined adversary could search; a 128-bit secret seed here cannot be)."""
    return np.random.Generator(np.random.PCG64(int(seed)))


def gaussian_mechanism(value: torch.Tensor, sigma: float,
                       generator: torch.Generator | np.random.Generator) -> torch.Tensor:
    """value + N(0, sigma^2) in every coordinate, drawn from ``generator`` (so a release replays exactly): a numpy
    ``Generator`` (``noise_generator``, what releases use) or a ``torch.Generator``."""
    if sigma == 0:
        return value.clone()
    if isinstance(generator, np.random.Generator):
        noise = torch.from_numpy(generator.standard_normal(tuple(value.shape))).to(value.dtype)
    else:
        noise = torch.randn(value.shape, generator=generator, dtype=value.dtype, device=generator.device)
    return value + sigma * noise.to(value.device)


@dataclass
class Release:
    """One Gaussian-mechanism release: its name, L2 sensitivity, noise sigma and zCDP rho."""

    name: str
    sensitivity: float
    sigma: float
    rho: float


@dataclass
class ZCDPAccountant:
    """The releases made so far and their composed privacy: rho adds up, epsilon(delta) converts it.

    ``record()`` gives what is saved next to a released estimate (JSON-able)."""

    releases: list[Release] = field(default_factory=list)

    def add(self, name: str, sensitivity: float, sigma: float) -> Release:
        """Account one release of a query with L2 ``sensitivity`` and Gaussian noise ``sigma`` (0: none)."""
        if sensitivity <= 0 or sigma < 0:
            raise ValueError(f"need sensitivity > 0 and sigma >= 0; got {sensitivity}, {sigma}")
        rho = math.inf if sigma == 0 else sensitivity**2 / (2 * sigma**2)
        r = Release(name, float(sensitivity), float(sigma), rho)
        self.releases.append(r)
        return r

    @property
    def rho(self) -> float:
        return sum(r.rho for r in self.releases)

    def epsilon(self, delta: float) -> float:
        """epsilon of everything released so far at this delta (0 before any release)."""
        return epsilon_for(self.rho, delta)

    def record(self, delta: float) -> dict:
        return {"accounting": "zCDP (Bun & Steinke 2016): rho adds; epsilon = rho + 2 sqrt(rho ln(1/delta))",
                "rho": _json_float(self.rho), "delta": delta, "epsilon": _json_float(self.epsilon(delta)),
                "releases": [{k: _json_float(v) for k, v in asdict(r).items()} for r in self.releases]}

    @classmethod
    def from_record(cls, record: dict) -> "ZCDPAccountant":
        return cls([Release(r["name"], float(r["sensitivity"]), float(r["sigma"]), _read_float(r["rho"]))
                    for r in record.get("releases", [])])


def _json_float(v):
    """inf as the string "inf": JSON has no infinity (and the project's reports must hold finite numbers)."""
    return "inf" if isinstance(v, float) and math.isinf(v) else v


def _read_float(v) -> float:
    return math.inf if v == "inf" else float(v)
