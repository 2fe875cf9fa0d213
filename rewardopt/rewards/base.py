"""Rewards: ``reward(samples, cond) -> RewardOutput`` with a (B,) ``total`` and named ``terms``.

``Reward.differentiable`` says whether gradients flow from ``total`` back to the samples.
``Reward.__call__`` validates every output (shape (B,), finite) and raises ``RewardError`` naming
the reward, so a broken reward never silently corrupts training.

Excluded samples (a black-box reward's ``on_failure="exclude"``): ``RewardOutput.excluded`` is a
(B,) bool mask and those samples score ``total = -inf``, so no argmax, top-k or softmax over
candidates picks them; -inf is accepted exactly there and rejected anywhere else.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


class RewardError(RuntimeError):
    """A reward produced an invalid output or failed under the ``raise`` policy."""


@dataclass
class RewardOutput:
    """``total``: (B,) tensor, the quantity methods maximise. ``terms``: named (B,) components for
    logging (for an ensemble, the unweighted members). ``info``: counters and anything else.
    ``excluded``: None, or a (B,) bool tensor marking samples that must never be selected (their
    ``total`` is -inf)."""

    total: torch.Tensor
    terms: dict[str, torch.Tensor] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    excluded: torch.Tensor | None = None


def validate_output(name: str, out: Any, batch_size: int) -> RewardOutput:
    """Turn a tensor into a RewardOutput and check shape and finiteness; errors name the reward."""
    if isinstance(out, torch.Tensor):
        out = RewardOutput(out)
    if not isinstance(out, RewardOutput):
        raise RewardError(f"reward {name} returned {type(out).__name__}; expected a (B,) tensor or RewardOutput")
    t = out.total
    if not isinstance(t, torch.Tensor) or t.shape != (batch_size,):
        shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise RewardError(f"reward {name} returned shape {shape}; expected ({batch_size},) — one value per sample")
    exc = out.excluded
    if exc is not None:
        if not isinstance(exc, torch.Tensor) or exc.dtype != torch.bool or exc.shape != (batch_size,):
            raise RewardError(f"reward {name}: excluded must be a bool tensor of shape ({batch_size},), got "
                              f"{exc.dtype if isinstance(exc, torch.Tensor) else type(exc).__name__}")
        exc = exc.to(t.device)
    bad = ~torch.isfinite(t)
    if exc is not None:
        bad &= ~(exc & torch.isneginf(t))
    if bad.any():
        raise RewardError(f"reward {name} returned NaN/Inf for samples {bad.nonzero().flatten().tolist()[:10]}")
    if exc is not None and (exc & ~torch.isneginf(t)).any():
        idx = (exc & ~torch.isneginf(t)).nonzero().flatten().tolist()
        raise RewardError(f"reward {name}: excluded samples must score -inf; samples {idx[:10]} do not")
    return out


class Reward(nn.Module):
    """Base class. Subclasses implement ``score(samples, cond) -> Tensor (B,) | RewardOutput``.

    ``samples`` are the generator's decoded samples (images: (B, C, H, W) in [0, 1]); ``cond`` is
    the list of raw conditions (prompts), one per sample, or None.
    """

    differentiable: bool = False  # opt in: only rewards declared differentiable reach gradient methods

    def __init__(self, name: str | None = None) -> None:
        super().__init__()
        self.name = name or type(self).__name__
        self.calls = 0  # samples scored

    def score(self, samples: Any, cond: Sequence[Any] | None) -> torch.Tensor | RewardOutput:
        raise NotImplementedError

    def forward(self, samples: Any, cond: Sequence[Any] | None = None) -> RewardOutput:
        n = len(samples)
        out = validate_output(self.name, self.score(samples, cond), n)
        self.calls += n
        if not out.terms:
            out.terms = {self.name: out.total}
        return out

    def differentiable_part(self) -> "Reward | None":
        """The reward gradient methods may use: itself if differentiable, else None."""
        return self if self.differentiable else None

    def for_selection(self) -> "Reward":
        """Called by selection methods (``InferenceTimeSteering``) when they are built: every
        reward in this tree whose failure policy was left at its default switches to what selection
        needs (black-box rewards: ``on_failure="exclude"``, never selected). Returns self."""
        for m in self.modules():
            if isinstance(m, Reward):
                m._selection_defaults()
        return self

    def _selection_defaults(self) -> None:
        """This reward's own switch for ``for_selection`` (nothing for plain rewards)."""


class WeightedSum(Reward):
    """A weighted ensemble ``sum_k w_k r_k``; members may mix differentiable and black-box.

    Gradient methods call ``differentiable_part()`` (the differentiable members only);
    value/search methods use the whole sum. Terms are logged unweighted under member names.
    """

    def __init__(self, rewards: Mapping[str, Reward] | Sequence[Reward],
                 weights: Mapping[str, float] | Sequence[float] | None = None, name: str | None = None) -> None:
        super().__init__(name or "WeightedSum")
        if not isinstance(rewards, Mapping):
            rewards = {r.name: r for r in rewards}
        if not rewards:
            raise ValueError("WeightedSum needs at least one reward")
        self.members = nn.ModuleDict(dict(rewards))
        if weights is None:
            weights = {k: 1.0 for k in rewards}
        elif not isinstance(weights, Mapping):
            weights = dict(zip(rewards, weights, strict=True))
        missing = set(rewards) - set(weights)
        if missing:
            raise ValueError(f"WeightedSum: no weight for {sorted(missing)}")
        self.weights = {k: float(weights[k]) for k in rewards}
        self.differentiable = all(r.differentiable for r in rewards.values())

    def score(self, samples, cond):
        """Members' totals weighted and summed. A sample excluded by any member is excluded from the
        sum (total -inf, whatever the sign of the weight); its other terms are logged as they are."""
        terms: dict[str, torch.Tensor] = {}
        total = excluded = None
        device = samples.device if isinstance(samples, torch.Tensor) else None
        for k, r in self.members.items():
            out = r(samples, cond)
            v = out.total.to(device) if device is not None else out.total
            terms[k] = v
            if out.excluded is not None:
                e = out.excluded.to(v.device)
                excluded = e if excluded is None else excluded | e
                v = torch.where(e, torch.zeros_like(v), v)  # no -inf·w (+inf or NaN for w <= 0) in the sum
            total = self.weights[k] * v if total is None else total + self.weights[k] * v
        if excluded is not None:
            total = torch.where(excluded, torch.full_like(total, float("-inf")), total)
        return RewardOutput(total, terms, excluded=excluded)

    def differentiable_part(self) -> Reward | None:
        """Itself if every member is differentiable; else a ``DifferentiablePart`` (the
        differentiable members, same weights) whose calls are counted on this ensemble."""
        diff = [k for k, r in self.members.items() if r.differentiable]
        if not diff:
            return None
        if len(diff) == len(self.members):
            return self
        return DifferentiablePart(self, diff)


class DifferentiablePart(WeightedSum):
    """The differentiable members of a mixed ``WeightedSum`` (what gradient methods call).

    Its ``calls`` *are* the parent's: reading or setting them reads or sets the ensemble the user
    configured, which is what methods log as ``compute/reward_calls`` — a separate counter would
    read 0 there. The parent is held outside the module tree (the part does not own the black-box
    members)."""

    _parent: tuple[WeightedSum, ...] = ()

    def __init__(self, parent: WeightedSum, keys: Sequence[str]) -> None:
        super().__init__({k: parent.members[k] for k in keys}, {k: parent.weights[k] for k in keys},
                         name=f"{parent.name}[differentiable]")
        self._parent = (parent,)

    @property
    def calls(self) -> int:
        return self._parent[0].calls if self._parent else 0

    @calls.setter
    def calls(self, value: int) -> None:
        if self._parent:  # Reward.__init__ sets 0 before the parent is attached: not the parent's count
            self._parent[0].calls = value


def require_gradient(method: str, reward: Reward) -> Reward:
    """The differentiable part of ``reward``, or a TypeError naming the alternatives."""
    part = reward.differentiable_part() if isinstance(reward, Reward) else None
    if part is None:
        raise TypeError(
            f"{method} needs a differentiable reward; {getattr(reward, 'name', type(reward).__name__)} is black-box. "
            "Use DDPO (policy gradient) or VARD (a learned value) for fine-tuning with a black-box reward, or the "
            "inference-time methods (Best-of-N, SVDD, DSearch) that only need reward values."
        )
    if part is not reward and isinstance(reward, WeightedSum):
        import warnings

        dropped = [k for k, r in reward.members.items() if not r.differentiable]
        warnings.warn(f"{method} trains on the differentiable members of {reward.name} only; {dropped} are not "
                      "declared differentiable (set `differentiable = True` on a reward class whose gradient flows)",
                      stacklevel=2)
    return part
