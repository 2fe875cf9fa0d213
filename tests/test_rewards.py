"""Core reward machinery: validation, ensembles, black-box execution."""

import threading
import time

import pytest
import torch

from rewardopt.rewards.base import Reward, RewardError, WeightedSum, require_gradient
from rewardopt.rewards.blackbox import BlackBoxReward


class MeanReward(Reward):
    differentiable = True
    def score(self, samples, cond):
        return samples.flatten(1).mean(1)


class ConstantShape(Reward):
    differentiable = True
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


# --- black-box execution: timeouts, concurrency, circuit breaker, exclusion (issue 12.9) ---------------------------

class Hanging(BlackBoxReward):
    """The first ``hang`` calls block until ``release`` is set (a hung backend); later calls take ``delay``."""

    def __init__(self, hang=0, delay=0.0, **kw):
        super().__init__(**kw)
        self.hang, self.delay, self.release = hang, delay, threading.Event()
        self.started = 0
        self.active = self.max_active = 0
        self.lock = threading.Lock()

    def score_object(self, obj, cond):
        with self.lock:
            self.started += 1
            n = self.started
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            if n <= self.hang:
                self.release.wait(30)
            time.sleep(self.delay)
            return float(obj.sum())
        finally:
            with self.lock:
                self.active -= 1


def test_hung_calls_do_not_starve_retries():
    """Two hung calls used to occupy the 2-worker pool forever: every retry then 'timed out' in the queue."""
    r = Hanging(hang=2, max_workers=2, timeout_s=0.3, retries=2, backoff_s=0.01, cache_size=0, on_failure=-1.0)
    try:
        out = r(torch.arange(2.0).view(2, 1), None)
        assert out.total.tolist() == [0.0, 1.0] and out.info["failed"] == 0
        assert r.stats["timeouts"] == 2 and r.stats["abandoned"] == 2 and r.stats["retries"] == 2
        assert r.started == 4, "each retry ran"
    finally:
        r.release.set()


def test_timeout_counts_from_when_the_call_starts_running():
    """Calls queued behind max_workers running ones do not spend their timeout waiting."""
    r = Hanging(delay=0.1, max_workers=1, timeout_s=0.35, retries=0, cache_size=0, on_failure=-1.0)
    outs = [None] * 5  # the last runs 0.4 s after the first starts: past the timeout if queueing counted
    threads = [threading.Thread(target=lambda i=i: outs.__setitem__(i, r(torch.full((1, 1), float(i)), None)))
               for i in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [o.total.item() for o in outs] == [0.0, 1.0, 2.0, 3.0, 4.0], "queued calls ran and succeeded"
    assert r.stats["timeouts"] == 0 and r.max_active == 1


def test_concurrent_callers_share_one_limit_of_max_workers(monkeypatch):
    """The concurrency limit is created once, under a lock: callers in several threads never run more
    than max_workers calls at once (a slow lazy pool creation used to give each racing thread its own pool)."""
    import concurrent.futures as cf

    init = cf.ThreadPoolExecutor.__init__

    def slow_init(self, *a, **k):
        time.sleep(0.05)
        init(self, *a, **k)

    monkeypatch.setattr(cf.ThreadPoolExecutor, "__init__", slow_init)
    r = Hanging(delay=0.05, max_workers=2, timeout_s=5.0, cache_size=0)
    threads = [threading.Thread(target=lambda i=i: r(torch.arange(4.0).view(4, 1) + 10 * i, None)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert r.started == 12 and r.max_active <= 2


class Switchable(BlackBoxReward):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.dead, self.requests, self.lock = True, 0, threading.Lock()

    def score_object(self, obj, cond):
        with self.lock:
            self.requests += 1
        time.sleep(0.05)
        if self.dead:
            raise ConnectionError("connection refused")
        return float(obj.sum())


def test_breaker_half_open_lets_exactly_one_trial_call_through():
    r = Switchable(max_workers=4, retries=0, breaker_threshold=2, breaker_cooldown_s=0.6, cache_size=0,
                   on_failure=-1.0)
    r(torch.arange(2.0).view(2, 1), None)
    assert r.stats["breaker_opened"] == 1 and r.requests == 2 and r.breaker_open
    time.sleep(0.65)
    out = r(torch.arange(4.0).view(4, 1) + 10, None)  # still dead: one trial, the other 3 rejected
    assert r.requests == 3, f"{r.requests - 2} calls went through after the cool-down; expected one trial"
    assert out.info["failed"] == 4 and r.stats["breaker_rejections"] == 3 and r.breaker_open
    time.sleep(0.65)
    r.dead = False
    out = r(torch.arange(4.0).view(4, 1) + 20, None)  # recovered: the trial closes it, the others follow
    assert out.total.tolist() == [20.0, 21.0, 22.0, 23.0] and r.requests == 7 and not r.breaker_open


def test_reward_output_accepts_minus_inf_only_where_excluded():
    from rewardopt.rewards.base import RewardOutput, validate_output

    t = torch.tensor([0.0, float("-inf"), 1.0])
    ok = validate_output("r", RewardOutput(t, excluded=torch.tensor([False, True, False])), 3)
    assert ok.excluded.tolist() == [False, True, False]
    with pytest.raises(RewardError, match=r"NaN/Inf for samples \[1\]"):
        validate_output("r", RewardOutput(t, excluded=torch.tensor([True, False, False])), 3)
    with pytest.raises(RewardError, match=r"NaN/Inf for samples \[1\]"):
        validate_output("r", RewardOutput(t), 3)
    with pytest.raises(RewardError, match="NaN/Inf"):
        plus_inf = torch.tensor([0.0, float("inf"), 1.0])
        validate_output("r", RewardOutput(plus_inf, excluded=torch.ones(3, dtype=torch.bool)), 3)
    with pytest.raises(RewardError, match="excluded samples must score -inf"):
        validate_output("r", RewardOutput(torch.zeros(3), excluded=torch.tensor([False, True, False])), 3)
    with pytest.raises(RewardError, match=r"excluded must be a bool tensor of shape \(3,\)"):
        validate_output("r", RewardOutput(t, excluded=torch.tensor([0, 1, 0])), 3)


def test_exclude_policy_marks_and_counts_failed_samples():
    r = Flaky(fail_times=1, retries=0, on_failure="exclude", cache_size=0)
    out = r(torch.arange(3.0).view(3, 1), None)
    assert out.excluded.tolist() == [True] * 3 and torch.isneginf(out.total).all()
    out = r(torch.arange(4.0).view(4, 1), None)  # 0..2 have failed once: they now succeed; 3 fails
    assert out.total[:3].tolist() == [0.0, 1.0, 2.0] and out.excluded.tolist() == [False, False, False, True]
    assert out.info["excluded"] == 1 and r.stats["excluded"] == 4 and r.stats["failures"] == 4


def test_ensembles_propagate_exclusion():
    from rewardopt.rewards.ensembles import MinMaxSum, RankConsensus

    x = torch.arange(4.0).view(4, 1)
    for weight in (0.5, -0.5):
        bb = Flaky(fail_times=1, retries=0, on_failure="exclude", cache_size=0, name="bb")
        bb.seen[2.0] = 5  # sample 2 succeeds, the others fail once
        ens = WeightedSum({"mean": MeanReward("mean"), "bb": bb}, {"mean": 1.0, "bb": weight})
        out = ens(x, None)
        assert out.excluded.tolist() == [True, True, False, True]
        assert torch.isneginf(out.total[[0, 1, 3]]).all() and out.total[2].item() == 2.0 + weight * 2.0
    for cls in (MinMaxSum, RankConsensus):
        bb = Flaky(fail_times=1, retries=0, on_failure="exclude", cache_size=0, name="bb")
        bb.seen[3.0] = 5  # sample 3 fails once
        for k in (0.0, 1.0, 2.0):
            bb.seen[k] = 5
        out = cls({"mean": MeanReward("mean"), "bb": bb})(x, None)
        assert out.excluded.tolist() == [False, False, False, False]
        bb2 = Flaky(fail_times=1, retries=0, on_failure="exclude", cache_size=0, name="bb")
        bb2.seen.update({0.0: 5, 1.0: 5, 2.0: 5})
        out = cls({"mean": MeanReward("mean"), "bb": bb2})(x, None)
        assert out.excluded.tolist() == [False, False, False, True] and torch.isneginf(out.total[3])
        assert torch.allclose(out.total[:3], torch.tensor([0.0, 1.0, 2.0])), "normalised over the valid samples"


def test_default_failure_policy_raises_but_selection_methods_exclude():
    from rewardopt.methods.best_of_n import BestOfN
    from rewardopt.testing.toy import RandomWalkGenerator

    r = Flaky(fail_times=5, retries=0)
    assert r.on_failure is None
    with pytest.raises(RewardError, match="on_failure"):
        r(torch.zeros(1, 1), None)
    ens = WeightedSum({"mean": MeanReward("mean"), "bb": Flaky(fail_times=5, retries=0, name="bb")})
    explicit = Flaky(fail_times=5, retries=0, on_failure="raise", name="explicit")
    BestOfN(RandomWalkGenerator(), ens, n=2, save_samples=False)
    BestOfN(RandomWalkGenerator(), explicit, n=2, save_samples=False)
    assert ens.members["bb"].on_failure == "exclude", "a policy left at its default becomes exclude"
    assert explicit.on_failure == "raise", "an explicit policy is kept"


class NegativeSizeReward(BlackBoxReward):
    """JPEG-like: a negative score (-|sum| - 1), failing on samples whose first entry is above 1."""

    def score_object(self, obj, cond):
        if obj[0] > 1.0:
            raise RuntimeError("encoder crashed")
        return -abs(float(obj.sum())) - 1.0


def test_best_of_n_never_selects_an_excluded_sample(tmp_path):
    import json

    import lightning as L

    from rewardopt.methods.best_of_n import BestOfN
    from rewardopt.testing.toy import RandomWalkGenerator

    def run(reward, **kw):
        m = BestOfN(RandomWalkGenerator(num_steps=4, dim=2), reward, n=4, seed=3, save_samples=False, trace=True, **kw)
        out, _ = m.generate(list(range(6)))
        return m, out

    m, out = run(NegativeSizeReward(retries=0, on_failure=0.0))
    assert (out[:, 0] > 1.0).any(), "the failure value 0.0 beats every real (negative) score"
    m, out = run(NegativeSizeReward(retries=0))
    v = m.traces[-1]["values"].view(6, 4)
    failed = torch.isneginf(v) | (v < -1e29)
    assert failed.any() and not failed.all(1).any()
    assert (out[:, 0] <= 1.0).all(), "an excluded candidate is never selected"
    assert torch.equal(m.traces[-1]["chosen"] % 4, v.argmax(1))
    assert m.excluded_samples == int(failed.sum())
    # all candidates of a group failing: the first is kept, counted
    m = BestOfN(RandomWalkGenerator(num_steps=4, dim=2), Flaky(fail_times=99, retries=0), n=3, seed=0,
                output_dir=str(tmp_path), save_samples=False, trace=True)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.predict(m, torch.utils.data.DataLoader(list(range(4)), batch_size=2, collate_fn=list))
    assert all(torch.equal(t["chosen"] % 3, torch.zeros(2, dtype=torch.long)) for t in m.traces)
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["excluded"] == 4 * 3 and s["all_excluded"] == 4


# --- black-box review findings: an interrupted half-open trial, abandoned calls bounded by max_abandoned ----------

class _Interrupt(BaseException):
    """KeyboardInterrupt-like: escapes ``except Exception``."""


class Interruptible(Switchable):
    """``Switchable`` whose next call raises ``_Interrupt`` while ``interrupt`` is set."""

    interrupt = False

    def score_object(self, obj, cond):
        if self.interrupt:
            self.interrupt = False
            raise _Interrupt()
        return super().score_object(obj, cond)


@pytest.mark.parametrize("timeout_s", [None, 5.0])  # in the caller's worker / in an attempt thread
def test_breaker_trial_interrupted_by_a_base_exception_lets_the_next_sample_try(timeout_s):
    r = Interruptible(max_workers=2, retries=0, breaker_threshold=1, breaker_cooldown_s=0.2, cache_size=0,
                      on_failure=-1.0, timeout_s=timeout_s)
    r(torch.zeros(1, 1), None)
    assert r.breaker_open
    time.sleep(0.25)
    r.interrupt = True
    with pytest.raises(_Interrupt):
        r(torch.ones(1, 1), None)  # the half-open trial is interrupted
    r.dead = False
    outs = []
    t = threading.Thread(target=lambda: outs.append(r(torch.arange(2.0).view(2, 1) + 5, None)), daemon=True)
    t.start()
    t.join(5)
    try:
        assert not t.is_alive(), "the interrupted trial left the breaker half-open with a trial 'running' forever"
        assert outs[0].total.tolist() == [5.0, 6.0] and r.breaker_state == "closed"
    finally:
        with r._breaker_changed:  # unblock the waiting workers if the test failed
            r._trial = False
            r._breaker_changed.notify_all()
        t.join(5)


@pytest.mark.parametrize("max_abandoned", [None, 0, 1])
def test_abandoned_calls_still_running_are_bounded_by_max_abandoned(max_abandoned):
    """Calls that ignore their timeout keep running: the backend sees at most max_workers +
    max_abandoned of them; further attempts wait for one to end, then fail (counted, never called)."""
    kw = {} if max_abandoned is None else {"max_abandoned": max_abandoned}
    r = Hanging(hang=10**6, max_workers=2, timeout_s=0.1, retries=1, backoff_s=0.01, cache_size=0, on_failure=-1.0,
                **kw)
    bound = 2 + (2 if max_abandoned is None else max_abandoned)
    try:
        out = r(torch.arange(6.0).view(6, 1), None)
        assert r.max_active <= bound, f"{r.max_active} calls ran at once; max_workers + max_abandoned = {bound}"
        assert r.max_active == bound and r.hung_calls == bound
        assert out.total.tolist() == [-1.0] * 6 and out.info["failed"] == 6
        assert r.stats["saturated"] == 12 - bound and r.stats["timeouts"] == bound == r.stats["abandoned"]
    finally:
        r.release.set()
    deadline = time.monotonic() + 5
    while r.hung_calls and time.monotonic() < deadline:
        time.sleep(0.01)
    r.hang = 0  # the backend recovers: the places of the ended calls are free again
    assert r(torch.arange(4.0).view(4, 1) + 10, None).total.tolist() == [10.0, 11.0, 12.0, 13.0]
    with pytest.raises(ValueError, match="max_abandoned"):
        Hanging(max_abandoned=-1)
