"""Core reward machinery: validation, ensembles, black-box execution."""

import threading
import time

import pytest
import torch

from rewardopt.rewards.base import Reward, RewardError, WeightedSum, require_gradient
from rewardopt.rewards.blackbox import BlackBoxReward


class MeanReward(Reward):
    def score(self, samples, cond):
        return samples.flatten(1).mean(1)


class ConstantShape(Reward):
    def __init__(self, out):
        super().__init__("BrokenReward")
        self.out = out

    def score(self, samples, cond):
        return self.out


class Flaky(BlackBoxReward):
    """Fails the first ``fail_times`` calls per sample, sleeps ``delay`` seconds per call."""

    def __init__(self, fail_times=0, delay=0.0, **kw):
        super().__init__(**kw)
        self.fail_times, self.delay = fail_times, delay
        self.seen: dict = {}
        self.active = 0
        self.max_active = 0
        self.lock = threading.Lock()

    def score_object(self, obj, cond):
        key = float(obj.sum())
        with self.lock:
            self.seen[key] = self.seen.get(key, 0) + 1
            n = self.seen[key]
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            time.sleep(self.delay)
            if n <= self.fail_times:
                raise ConnectionError("server said 500")
            return key
        finally:
            with self.lock:
                self.active -= 1


@pytest.mark.parametrize("bad,match", [
    (torch.zeros(3), r"shape \(3,\); expected \(4,\)"),
    (torch.zeros(4, 1), r"shape \(4, 1\)"),
    (torch.tensor([0.0, float("nan"), 0.0, 0.0]), "NaN/Inf for samples \\[1\\]"),
    (torch.tensor([0.0, 0.0, float("inf"), 0.0]), "NaN/Inf"),
    ([1, 2, 3, 4], "returned list"),
])
def test_invalid_outputs_raise_naming_the_reward(bad, match):
    with pytest.raises(RewardError, match="BrokenReward") as e:
        ConstantShape(bad)(torch.zeros(4, 3, 2, 2))
    assert e.match(match)


def test_weighted_sum_terms_and_differentiable_part():
    x = torch.rand(5, 3, 4, 4)
    diff = MeanReward("mean")
    bb = Flaky(name="bb", cache_size=0)
    ens = WeightedSum({"mean": diff, "bb": bb}, {"mean": 2.0, "bb": 0.5})
    out = ens(x, None)
    assert set(out.terms) == {"mean", "bb"}
    expected = 2.0 * x.flatten(1).mean(1) + 0.5 * x.flatten(1).sum(1)
    assert torch.allclose(out.total, expected, atol=1e-5)
    assert not ens.differentiable
    part = ens.differentiable_part()
    assert set(part.members) == {"mean"} and part.weights == {"mean": 2.0}
    with pytest.raises(TypeError, match="DDPO"):
        require_gradient("DRaFT", bb)
    assert require_gradient("DRaFT", ens) is not None


def test_weighted_sum_rejects_missing_weights():
    with pytest.raises(ValueError, match="no weight"):
        WeightedSum({"a": MeanReward("a"), "b": MeanReward("b")}, {"a": 1.0})


def test_blackbox_runs_concurrently():
    r = Flaky(delay=0.2, max_workers=4, cache_size=0)
    x = torch.arange(8.0).view(8, 1, 1, 1)
    t0 = time.perf_counter()
    out = r(x, None)
    elapsed = time.perf_counter() - t0
    assert torch.equal(out.total, torch.arange(8.0))
    assert r.max_active >= 3
    assert elapsed < 8 * 0.2 * 0.6  # far below the serial time


def test_blackbox_retries_with_backoff_and_counts():
    r = Flaky(fail_times=2, retries=2, backoff_s=0.01)
    out = r(torch.arange(3.0).view(3, 1), None)
    assert torch.equal(out.total, torch.arange(3.0))
    assert r.stats["retries"] == 6 and r.stats["failures"] == 0


def test_blackbox_failure_policy_raise():
    r = Flaky(fail_times=5, retries=1, backoff_s=0.0, name="judge")
    with pytest.raises(RewardError, match="judge failed after 2 attempts"):
        r(torch.zeros(2, 1), None)


def test_blackbox_failure_policy_value_is_counted_not_silent():
    r = Flaky(fail_times=5, retries=1, backoff_s=0.0, on_failure=-3.0)
    out = r(torch.arange(2.0).view(2, 1), None)
    assert out.total.tolist() == [-3.0, -3.0]
    assert out.info["failed"] == 2 and r.stats["failures"] == 2


def test_blackbox_timeout_counts_as_failure():
    r = Flaky(delay=0.5, timeout_s=0.05, retries=0, on_failure=-1.0)
    out = r(torch.zeros(1, 1), None)
    assert out.total.item() == -1.0
    assert r.stats["timeouts"] == 1 and r.stats["failures"] == 1


def test_blackbox_cache_by_content():
    r = Flaky()
    x = torch.arange(4.0).view(4, 1)
    r(x, ["a", "b", "c", "d"])
    r(x, ["a", "b", "c", "d"])
    assert r.stats["calls"] == 4 and r.stats["cache_hits"] == 4
    r(x, ["z", "b", "c", "d"])  # a different condition is a different key
    assert r.stats["calls"] == 5
    r(x + 1, ["a", "b", "c", "d"])  # different content, same conditions
    assert r.stats["calls"] == 9


def test_bad_failure_policy_is_rejected():
    with pytest.raises(ValueError, match="on_failure"):
        Flaky(on_failure="ignore")


def test_differentiable_part_counts_calls_on_the_configured_ensemble():
    """Issue 12.6: calls of the gradient part are the ensemble's calls (the object the logs read)."""
    x = torch.rand(5, 3, 4, 4)
    ens = WeightedSum({"mean": MeanReward("mean"), "bb": Flaky(name="bb", cache_size=0)})
    part = require_gradient("DRaFT", ens)
    part(x, None)
    part(x[:3], None)
    assert ens.calls == 8 and part.calls == 8 and ens.members["mean"].calls == 8
    ens(x, None)
    assert ens.calls == 13 and part.calls == 13 and ens.members["bb"].calls == 5
    saved = part.calls
    part(x, None)
    part.calls = saved  # the "reporting is not charged" idiom of the methods restores the ensemble's count
    assert ens.calls == 13


def test_mixed_ensemble_under_a_gradient_method_counts_on_the_top_level_reward():
    from domains.images.rewards import ColourReward, JpegCompressibilityReward
    from rewardopt.methods.draft import DRaFT
    from tests.conftest import tiny_generator

    ens = WeightedSum({"colour": ColourReward("blue"), "jpeg": JpegCompressibilityReward(max_workers=1)},
                      {"colour": 1.0, "jpeg": 0.01})
    m = DRaFT(tiny_generator(), ens, k=1)
    logged: dict = {}
    m.log = lambda *a, **k: None
    m.log_dict = lambda d, **k: logged.update(d)  # what the loggers receive
    for _ in range(2):
        m.training_step(["one red circle", "two blue squares"], 0).backward()
    assert m.reward is ens and ens.calls == 2 * 2  # 2 steps of batch 2, on the configured object
    assert logged["compute/reward_calls"] == 2 * 2
    assert ens.members["jpeg"].calls == 0, "DRaFT's gradient path never calls the black-box member"
