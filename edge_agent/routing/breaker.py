"""A circuit breaker for the cloud fallback, so an unreachable cloud costs one fast answer, not a timeout.

::

    closed ──(failures in a row ≥ threshold)──► open ──(reset_s passed)──► half_open
      ▲                                          ▲                          │ one probe at a time
      └──────────────── probe succeeds ──────────┴──── probe fails ─────────┘

A probe that ends with no verdict (cancelled: its client left; or never reported back) must not
hold the half-open state forever, or every later cloud request would be refused until restart:
``abandon()`` frees it, and a probe older than ``reset_s`` is presumed lost and replaced.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Literal

BreakerState = Literal["closed", "open", "half_open"]


class CircuitBreaker:
    def __init__(
        self, threshold: int = 3, reset_s: float = 10.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if threshold < 1 or reset_s <= 0:
            raise ValueError("threshold must be ≥ 1 and reset_s > 0")
        self.threshold = threshold
        self.reset_s = reset_s
        self.clock = clock
        self.failures = 0  # in a row
        self.opened_at: float | None = None
        self._probe_since: float | None = None  # when the outstanding probe went out

    @property
    def _probing(self) -> bool:
        return self._probe_since is not None and self.clock() - self._probe_since < self.reset_s

    @property
    def state(self) -> BreakerState:
        if self.opened_at is None:
            return "closed"
        if self._probing or self.clock() - self.opened_at >= self.reset_s:
            return "half_open"
        return "open"

    def retry_in(self) -> float:
        """Seconds until the next probe may go out (0 when one may go now)."""
        if self.opened_at is None:
            return 0.0
        return max(0.0, self.reset_s - (self.clock() - self.opened_at))

    def allow(self) -> bool:
        """May a request go to the cloud now? In half-open state only the one probe may."""
        state = self.state
        if state == "closed":
            return True
        if state == "half_open" and not self._probing:
            self._probe_since = self.clock()
            return True
        return False

    def success(self) -> None:
        self.failures = 0
        self.opened_at = None
        self._probe_since = None

    def failure(self) -> None:
        self.failures += 1
        if self._probe_since is not None or self.failures >= self.threshold:
            self.opened_at = self.clock()
        self._probe_since = None

    def abandon(self) -> None:
        """A request allowed through ended with no verdict on the cloud (cancelled): if it was
        the probe, the next request probes instead."""
        self._probe_since = None
