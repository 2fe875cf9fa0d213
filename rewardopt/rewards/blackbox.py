"""Black-box rewards: Python-side scoring (JPEG size, RDKit, a judge server, a docking program).

``BlackBoxReward`` turns each sample into a Python object (``to_object``), scores objects with
``score_object`` concurrently — at most ``max_workers`` calls in flight (plus at most
``max_abandoned`` timed-out ones still running, see below), a timeout per call, retries with
exponential backoff, a content-hash cache — and applies an explicit failure policy to a sample that
still fails after its retries:

* ``on_failure="raise"``: ``RewardError`` naming the reward and the error;
* ``on_failure=<float>``: that value is used instead, and the failure is counted
  (``self.stats["failures"]``, ``RewardOutput.info["failed"]``) — never a silent zero. Beware a
  value that beats real scores: 0.0 on a negative reward (JPEG's −kB) would *win* a selection;
* ``on_failure="exclude"``: the sample scores -inf and is marked in ``RewardOutput.excluded``, so
  selection methods never pick it; counted in ``stats["excluded"]`` and ``info["excluded"]``;
* ``on_failure=None`` (the default): "raise" for fine-tuning, "exclude" for selection — the
  inference-time methods call ``Reward.for_selection()`` when they are built, which switches it.

Execution (our design). Each attempt takes one of ``max_workers`` slots (a semaphore shared by all
callers of this reward, created with the object — no lazily created pool to race on); waiting for
a slot is not part of the timeout. With ``timeout_s`` set, the attempt runs in a fresh daemon thread
and the clock starts when it starts. A call that exceeds ``timeout_s`` is abandoned and counts as a
failed attempt (``stats["timeouts"]``, ``stats["abandoned"]``); Python threads cannot be killed, so
it keeps running in the background, but it gives its slot back at once: a few hung calls never
starve the retries, which run in new threads. ``hung_calls`` is the number of abandoned calls still
running (a backend that ignores timeouts shows here); network backends should pass the timeout to
their client so abandoned calls end. Without a timeout an attempt runs in the caller's worker thread.

The backend therefore sees more than ``max_workers`` calls at once while abandoned calls are still
running — but never more than ``max_workers + max_abandoned``: each call also holds one of that many
backend places until it really ends. Once abandoned calls hold the spare places, a new attempt waits
(up to ``timeout_s``) for a call to end; if none does, the attempt fails without calling the backend
(``stats["saturated"]``) and goes through the retries, the failure policy and the circuit breaker
like a timeout — a backend that hangs for good opens the breaker instead of piling up threads.
``max_abandoned=0`` keeps the backend at ``max_workers`` calls strictly (a hung call keeps its place).

Circuit breaker (``breaker_threshold``): after that many samples in a row fail (after retries),
the breaker opens for ``breaker_cooldown_s``: samples fail at once under the failure policy,
without reaching the backend (``stats["breaker_rejections"]``), and samples mid-retry stop retrying.
After the cool-down it is half-open: exactly one sample makes one trial attempt while the others
wait for its outcome; a success closes the breaker (the waiting samples proceed), a failure
re-opens it (they are rejected).
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from rewardopt.rewards.base import Reward, RewardError, RewardOutput

log = logging.getLogger(__name__)


def content_hash(obj: Any, cond: Any) -> str:
    """A stable key for (sample, condition): bytes of arrays/tensors, repr of the rest."""
    h = hashlib.sha256()
    for part in (obj, cond):
        if isinstance(part, torch.Tensor):
            part = part.detach().cpu().numpy()
        if isinstance(part, np.ndarray):
            h.update(str(part.dtype).encode() + str(part.shape).encode())
            h.update(np.ascontiguousarray(part).tobytes())
        elif isinstance(part, bytes):
            h.update(part)
        else:
            h.update(repr(part).encode())
        h.update(b"\x00")
    return h.hexdigest()


class _Attempt:
    """One call of ``score_object`` in its own thread; its state is guarded by the reward's lock."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.value: Any = None
        self.error: BaseException | None = None
        self.abandoned = False


class BlackBoxReward(Reward):
    """Base class for rewards computed without gradients on Python objects.

    Subclasses implement ``score_object(obj, cond) -> float`` (and, optionally, ``to_object``).

    Args:
        max_workers: calls in flight at once (across all callers of this reward).
        max_abandoned: timed-out calls that may still be running on top of those (None: max_workers);
            the backend sees at most max_workers + max_abandoned calls at once. When they are all
            taken, attempts wait up to timeout_s for one to end, then fail (``stats["saturated"]``).
        timeout_s: per-call limit in seconds, counted from when the call starts (None: wait forever).
        retries: extra attempts after a failure; backoff_s: first wait, doubled each retry.
        cache_size: entries kept in the content-hash LRU cache (0 disables).
        on_failure: None (default: "raise" for fine-tuning, "exclude" under selection methods),
            "raise", "exclude" (never selected, counted), or a float used for failed samples (counted).
        breaker_threshold: consecutive failed samples that open the circuit breaker (None: off).
        breaker_cooldown_s: how long an open breaker rejects calls before one trial call.
    """

    differentiable = False
    POLICIES = ("raise", "exclude")

    def __init__(self, max_workers: int = 4, timeout_s: float | None = 60.0, retries: int = 2, backoff_s: float = 0.5,
                 cache_size: int = 10_000, on_failure: str | float | None = None, breaker_threshold: int | None = None,
                 breaker_cooldown_s: float = 30.0, max_abandoned: int | None = None, name: str | None = None) -> None:
        super().__init__(name)
        if not (on_failure is None or on_failure in self.POLICIES
                or (isinstance(on_failure, (int, float)) and not isinstance(on_failure, bool))):
            raise ValueError(f"{self.name}: on_failure must be 'raise', 'exclude', a number or null (raise for "
                             f"fine-tuning, exclude for selection), got {on_failure!r}")
        if isinstance(on_failure, (int, float)) and not np.isfinite(on_failure):
            raise ValueError(f"{self.name}: on_failure must be finite, got {on_failure}; use 'exclude' for a "
                             "sample that must never be selected")
        if max_workers < 1:
            raise ValueError(f"{self.name}: max_workers must be >= 1, got {max_workers}")
        if max_abandoned is not None and (isinstance(max_abandoned, bool) or not isinstance(max_abandoned, int)
                                          or max_abandoned < 0):
            raise ValueError(f"{self.name}: max_abandoned must be an integer >= 0 or null (= max_workers), "
                             f"got {max_abandoned!r}")
        self.max_abandoned = max_workers if max_abandoned is None else max_abandoned
        self.max_workers, self.timeout_s, self.retries, self.backoff_s = max_workers, timeout_s, retries, backoff_s
        self.cache_size, self.on_failure = cache_size, on_failure
        self._cache: OrderedDict[str, float] = OrderedDict()
        if breaker_threshold is not None and breaker_threshold < 1:
            raise ValueError(f"{self.name}: breaker_threshold must be >= 1 or None, got {breaker_threshold}")
        self.breaker_threshold, self.breaker_cooldown_s = breaker_threshold, breaker_cooldown_s
        self._consecutive_failures, self._open_until, self._trial = 0, 0.0, False
        self._hung = 0
        self.stats = {"calls": 0, "cache_hits": 0, "retries": 0, "failures": 0, "timeouts": 0, "abandoned": 0,
                      "saturated": 0, "excluded": 0, "breaker_opened": 0, "breaker_rejections": 0}
        self._make_sync()

    def _make_sync(self) -> None:
        self._lock = threading.Lock()
        self._breaker_changed = threading.Condition(self._lock)
        self._slots = threading.BoundedSemaphore(self.max_workers)
        # a call holds a place until it really ends, also after it was abandoned
        self._places = threading.BoundedSemaphore(self.max_workers + self.max_abandoned)

    def _selection_defaults(self) -> None:
        if self.on_failure is None:
            self.on_failure = "exclude"

    @property
    def failure_policy(self) -> str | float:
        """What happens to a sample that still fails: "raise", "exclude" or the value used."""
        return "raise" if self.on_failure is None else self.on_failure

    # --- subclass API -------------------------------------------------------------------------
    def to_object(self, sample: Any) -> Any:
        """One decoded sample -> what ``score_object`` takes. Default: a CPU numpy array."""
        return sample.detach().float().cpu().numpy() if isinstance(sample, torch.Tensor) else sample

    def score_object(self, obj: Any, cond: Any) -> float:
        raise NotImplementedError

    # --- execution ------------------------------------------------------------------------------
    def __getstate__(self):  # picklable for DDP spawn / checkpoint hparams
        state = self.__dict__.copy()
        for k in ("_lock", "_breaker_changed", "_slots", "_places"):
            state[k] = None
        state["_hung"], state["_trial"] = 0, False
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.__dict__.setdefault("max_abandoned", self.max_workers)  # objects pickled before the knob
        self.stats.setdefault("saturated", 0)
        self._make_sync()

    @property
    def hung_calls(self) -> int:
        """Abandoned (timed-out) calls whose threads are still running."""
        return self._hung

    def _run(self, call: _Attempt, obj: Any, cond: Any) -> None:
        try:
            call.value = self.score_object(obj, cond)
        except BaseException as e:  # noqa: BLE001 - handed to the waiting thread
            call.error = e
        finally:
            self._places.release()
            with self._lock:
                call.done.set()
                if call.abandoned:
                    self._hung -= 1

    def _attempt(self, obj: Any, cond: Any) -> float:
        """One call of ``score_object`` in a slot and a backend place; the timeout runs from its start."""
        self._slots.acquire()  # queueing for a slot is not part of the timeout
        try:
            if not self._places.acquire(timeout=self.timeout_s):
                with self._lock:
                    self.stats["saturated"] += 1
                    hung = self._hung
                log.warning("%s: %d abandoned calls are still running and hold every spare backend place "
                            "(max_abandoned=%d); the backend ignores timeouts", self.name, hung, self.max_abandoned)
                raise TimeoutError(f"{self.name}: not called: {hung} abandoned calls still running (max_workers "
                                   f"{self.max_workers} + max_abandoned {self.max_abandoned} backend places taken)")
            if self.timeout_s is None:
                try:
                    value = self.score_object(obj, cond)
                finally:
                    self._places.release()
            else:
                call = _Attempt()
                try:
                    threading.Thread(target=self._run, args=(call, obj, cond), daemon=True,
                                     name=f"reward-{self.name}").start()
                except BaseException:
                    self._places.release()
                    raise
                if not call.done.wait(self.timeout_s):
                    with self._lock:
                        if not call.done.is_set():
                            call.abandoned = True
                            self._hung += 1
                            self.stats["timeouts"] += 1
                            self.stats["abandoned"] += 1
                    if call.abandoned:
                        raise TimeoutError(f"{self.name}: call exceeded {self.timeout_s}s")
                if call.error is not None:
                    raise call.error
                value = call.value
        finally:
            self._slots.release()  # also for an abandoned call: its thread no longer holds a slot
        value = float(value)
        if not np.isfinite(value):
            raise ValueError(f"{self.name}: non-finite score {value}")
        return value

    # --- circuit breaker ------------------------------------------------------------------------
    @property
    def breaker_open(self) -> bool:
        return time.monotonic() < self._open_until

    @property
    def breaker_state(self) -> str:
        """"closed", "open" (rejecting until the cool-down ends) or "half-open" (a trial may run)."""
        if not self._open_until:
            return "closed"
        return "open" if self.breaker_open else "half-open"

    def _admit(self) -> str:
        """"go" (closed), "trial" (half-open: this sample makes the one trial attempt) or "reject".
        While a trial runs, other samples wait for its outcome."""
        with self._breaker_changed:
            while True:
                if not self._open_until:
                    return "go"
                if time.monotonic() < self._open_until:
                    return "reject"
                if not self._trial:
                    self._trial = True
                    return "trial"
                self._breaker_changed.wait()

    def _record(self, ok: bool, trial: bool = False) -> None:
        """A sample's outcome, for the breaker (called under no lock)."""
        with self._breaker_changed:
            if ok:
                self._consecutive_failures = 0
                if trial or self._open_until:
                    self._open_until = 0.0
            else:
                self.stats["failures"] += 1
                self._consecutive_failures += 1
                if trial:  # the trial failed: open again
                    self._open_until = time.monotonic() + self.breaker_cooldown_s
                    log.warning("%s: trial call after the cool-down failed; circuit breaker open for %.0fs more",
                                self.name, self.breaker_cooldown_s)
                elif (self.breaker_threshold is not None and not self._open_until
                      and self._consecutive_failures >= self.breaker_threshold):
                    self.stats["breaker_opened"] += 1
                    self._open_until = time.monotonic() + self.breaker_cooldown_s
                    log.warning("%s: %d failures in a row; circuit breaker open for %.0fs", self.name,
                                self._consecutive_failures, self.breaker_cooldown_s)
            if trial:
                self._trial = False
            self._breaker_changed.notify_all()

    # --- failure policy -------------------------------------------------------------------------
    def _fail(self, err: BaseException | None, what: str) -> tuple[float, bool]:
        policy = self.failure_policy
        if policy == "raise":
            hint = " (on_failure: a number, or 'exclude' for selection methods)" if self.on_failure is None else ""
            raise RewardError(f"reward {self.name} failed {what}: {err!r}{hint}") from err
        log.warning("%s: sample failed %s (%r); using on_failure=%s", self.name, what, err, policy)
        if policy == "exclude":
            with self._lock:
                self.stats["excluded"] += 1
            return float("-inf"), True
        return float(policy), True

    def _score_with_retries(self, obj: Any, cond: Any) -> tuple[float, bool]:
        """(value, failed). Retries with exponential backoff; applies the failure policy."""
        admission = self._admit()
        if admission == "reject":
            with self._lock:
                self.stats["breaker_rejections"] += 1
            return self._fail(RuntimeError(f"circuit breaker open for {self._open_until - time.monotonic():.1f}s more"),
                              "(circuit breaker open)")
        trial = admission == "trial"
        attempts = 1 if trial else self.retries + 1  # half-open: exactly one trial call
        delay = self.backoff_s
        err: BaseException | None = None
        tried, recorded = 0, False
        try:
            for attempt in range(attempts):
                if attempt:
                    if self._open_until:  # the breaker opened meanwhile: stop calling the backend
                        break
                    with self._lock:
                        self.stats["retries"] += 1
                    time.sleep(delay)
                    delay *= 2
                tried += 1
                try:
                    value = self._attempt(obj, cond)
                except Exception as e:  # noqa: BLE001 - every failure goes through the policy
                    err = e
                    log.debug("%s attempt %d failed: %r", self.name, attempt + 1, e)
                    continue
                self._record(True, trial)
                recorded = True
                return value, False
            self._record(False, trial)
            recorded = True
        finally:
            if trial and not recorded:  # a BaseException (KeyboardInterrupt) ended the trial: no outcome,
                with self._breaker_changed:  # but the next sample may make the trial instead of waiting forever
                    self._trial = False
                    self._breaker_changed.notify_all()
        return self._fail(err, f"after {tried} attempts" + (" (half-open trial)" if trial else ""))

    def score(self, samples: Any, cond: Sequence[Any] | None) -> RewardOutput:
        n = len(samples)
        conds = list(cond) if cond is not None else [None] * n
        objs = [self.to_object(samples[i]) for i in range(n)]
        keys = [content_hash(o, c) for o, c in zip(objs, conds)] if self.cache_size else [None] * n
        values: list[float | None] = [None] * n
        todo = []
        with self._lock:
            for i, k in enumerate(keys):
                if k is not None and k in self._cache:
                    values[i] = self._cache[k]
                    self._cache.move_to_end(k)
                    self.stats["cache_hits"] += 1
                else:
                    todo.append(i)
            self.stats["calls"] += len(todo)
        failed = [False] * n
        # Each sample's retry loop runs in its own worker so that slow retries overlap; the slots
        # inside ``_attempt`` bound the calls running at once.
        with cf.ThreadPoolExecutor(max(1, min(self.max_workers, len(todo)))) as outer:
            futures = {i: outer.submit(self._score_with_retries, objs[i], conds[i]) for i in todo}
            for i, fut in futures.items():
                values[i], failed[i] = fut.result()
        with self._lock:
            for i in todo:
                if not failed[i] and keys[i] is not None:
                    self._cache[keys[i]] = values[i]
                    if len(self._cache) > self.cache_size:
                        self._cache.popitem(last=False)
        device = samples.device if isinstance(samples, torch.Tensor) else None
        total = torch.tensor(values, dtype=torch.float32, device=device)
        info = {**self.stats, "failed": sum(failed), "excluded": 0}  # failed / excluded: this batch
        excluded = None
        if self.failure_policy == "exclude":
            excluded = torch.tensor(failed, dtype=torch.bool, device=device)
            info["excluded"] = int(excluded.sum())
        return RewardOutput(total, {self.name: total}, info, excluded=excluded)
