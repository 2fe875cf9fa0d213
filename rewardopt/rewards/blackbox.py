"""Black-box rewards: Python-side scoring (JPEG size, RDKit, a judge server, a docking program).

``BlackBoxReward`` turns each sample into a Python object (``to_object``), scores objects with
``score_object`` in a thread pool — batched, concurrent, with a timeout per call, retries with
exponential backoff, a content-hash cache — and applies an explicit failure policy:

* ``on_failure="raise"``: the first sample that still fails after its retries raises ``RewardError``;
* ``on_failure=<float>``: that value is used instead, and the failure is counted
  (``self.stats["failures"]``) and reported in ``RewardOutput.info`` — never a silent zero.

Timeouts: a call that exceeds ``timeout_s`` is abandoned (Python threads cannot be killed; the
worker finishes in the background) and counts as a failed attempt. Network backends should also
pass the timeout to their client so abandoned workers end.

Circuit breaker (``breaker_threshold``): after that many samples in a row fail (after retries),
the breaker opens for ``breaker_cooldown_s``: calls fail at once under the failure policy, without
reaching the backend (counted in ``stats["breaker_rejections"]``). After the cool-down one call is
let through; a success closes the breaker, a failure re-opens it.
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


class BlackBoxReward(Reward):
    """Base class for rewards computed without gradients on Python objects.

    Subclasses implement ``score_object(obj, cond) -> float`` (and, optionally, ``to_object``).

    Args:
        max_workers: thread-pool size (concurrent calls in flight).
        timeout_s: per-call limit in seconds (None: wait forever).
        retries: extra attempts after a failure; backoff_s: first wait, doubled each retry.
        cache_size: entries kept in the content-hash LRU cache (0 disables).
        on_failure: "raise", or a float used for samples that still fail (counted).
        breaker_threshold: consecutive failed samples that open the circuit breaker (None: off).
        breaker_cooldown_s: how long an open breaker rejects calls.
    """

    differentiable = False

    def __init__(self, max_workers: int = 4, timeout_s: float | None = 60.0, retries: int = 2, backoff_s: float = 0.5,
                 cache_size: int = 10_000, on_failure: str | float = "raise", breaker_threshold: int | None = None,
                 breaker_cooldown_s: float = 30.0, name: str | None = None) -> None:
        super().__init__(name)
        if on_failure != "raise" and not isinstance(on_failure, (int, float)):
            raise ValueError(f"{self.name}: on_failure must be 'raise' or a number, got {on_failure!r}")
        self.max_workers, self.timeout_s, self.retries, self.backoff_s = max_workers, timeout_s, retries, backoff_s
        self.cache_size, self.on_failure = cache_size, on_failure
        self._cache: OrderedDict[str, float] = OrderedDict()
        self._lock = threading.Lock()
        self._pool: cf.ThreadPoolExecutor | None = None
        if breaker_threshold is not None and breaker_threshold < 1:
            raise ValueError(f"{self.name}: breaker_threshold must be >= 1 or None, got {breaker_threshold}")
        self.breaker_threshold, self.breaker_cooldown_s = breaker_threshold, breaker_cooldown_s
        self._consecutive_failures, self._open_until = 0, 0.0
        self.stats = {"calls": 0, "cache_hits": 0, "retries": 0, "failures": 0, "timeouts": 0,
                      "breaker_opened": 0, "breaker_rejections": 0}

    # --- subclass API -------------------------------------------------------------------------
    def to_object(self, sample: Any) -> Any:
        """One decoded sample -> what ``score_object`` takes. Default: a CPU numpy array."""
        return sample.detach().float().cpu().numpy() if isinstance(sample, torch.Tensor) else sample

    def score_object(self, obj: Any, cond: Any) -> float:
        raise NotImplementedError

    # --- execution ------------------------------------------------------------------------------
    def __getstate__(self):  # picklable for DDP spawn / checkpoint hparams
        state = self.__dict__.copy()
        state["_pool"], state["_lock"] = None, None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _executor(self) -> cf.ThreadPoolExecutor:
        if self._pool is None:
            self._pool = cf.ThreadPoolExecutor(self.max_workers, thread_name_prefix=f"reward-{self.name}")
        return self._pool

    def _attempt(self, obj: Any, cond: Any) -> float:
        fut = self._executor().submit(self.score_object, obj, cond)
        try:
            value = float(fut.result(timeout=self.timeout_s))
        except cf.TimeoutError:
            with self._lock:
                self.stats["timeouts"] += 1
            raise TimeoutError(f"{self.name}: call exceeded {self.timeout_s}s")
        if not np.isfinite(value):
            raise ValueError(f"{self.name}: non-finite score {value}")
        return value

    @property
    def breaker_open(self) -> bool:
        return time.monotonic() < self._open_until

    def _fail(self, err: BaseException | None, what: str) -> tuple[float, bool]:
        if self.on_failure == "raise":
            raise RewardError(f"reward {self.name} failed {what}: {err!r}") from err
        log.warning("%s: sample failed %s (%r); using on_failure=%s", self.name, what, err, self.on_failure)
        return float(self.on_failure), True

    def _score_with_retries(self, obj: Any, cond: Any) -> tuple[float, bool]:
        """(value, failed). Retries with exponential backoff; applies the failure policy."""
        if self.breaker_open:
            with self._lock:
                self.stats["breaker_rejections"] += 1
            return self._fail(RuntimeError(f"circuit breaker open for {self._open_until - time.monotonic():.1f}s more"),
                              "(circuit breaker open)")
        delay = self.backoff_s
        err: BaseException | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                with self._lock:
                    self.stats["retries"] += 1
                time.sleep(delay)
                delay *= 2
            try:
                value = self._attempt(obj, cond)
                with self._lock:
                    self._consecutive_failures = 0
                return value, False
            except Exception as e:  # noqa: BLE001 - every failure goes through the policy
                err = e
                log.debug("%s attempt %d failed: %r", self.name, attempt + 1, e)
        with self._lock:
            self.stats["failures"] += 1
            self._consecutive_failures += 1
            if self.breaker_threshold is not None and self._consecutive_failures >= self.breaker_threshold:
                if not self.breaker_open:
                    self.stats["breaker_opened"] += 1
                    log.warning("%s: %d failures in a row; circuit breaker open for %.0fs", self.name,
                                self._consecutive_failures, self.breaker_cooldown_s)
                self._open_until = time.monotonic() + self.breaker_cooldown_s
        return self._fail(err, f"after {self.retries + 1} attempts")

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
        # Each sample's retry loop runs in its own outer thread so that slow retries overlap.
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
        return RewardOutput(total, {self.name: total}, {"failed": sum(failed), **self.stats})
