"""Token buckets: per-tenant request rate limits for the gateway, per-device byte budgets for the
blob server.

Buckets live in the replica's memory, so with N control-plane replicas behind a load balancer a
tenant gets up to N × the configured rate; size the limit for that (the replicas share nothing
on the hot path on purpose: no database round trip per inference request).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from shared.errors import RateLimited


@dataclass
class _Bucket:
    tokens: float
    updated: float


class TokenBuckets:
    """One bucket per key, refilled at ``rate_per_s`` up to ``burst``; thread-safe."""

    def __init__(self, rate_per_s: float, burst: float, clock: Callable[[], float] = time.monotonic) -> None:
        if rate_per_s <= 0 or burst < 1:
            raise ValueError("rate_per_s must be > 0 and burst ≥ 1")
        self.rate = rate_per_s
        self.burst = burst
        self.clock = clock
        self._buckets: dict[str, _Bucket] = {}
        self._lock = threading.Lock()
        self.refused = 0

    def take(self, key: str, amount: float = 1.0) -> float:
        """Take ``amount`` from ``key``'s bucket: 0.0 when taken, else the seconds until it could be."""
        now = self.clock()
        with self._lock:
            b = self._buckets.get(key)
            if b is None:
                b = self._buckets[key] = _Bucket(float(self.burst), now)
            b.tokens = min(float(self.burst), b.tokens + (now - b.updated) * self.rate)
            b.updated = now
            if b.tokens >= amount:
                b.tokens -= amount
                return 0.0
            self.refused += 1
            return (amount - b.tokens) / self.rate


class TenantRateLimiter:
    def __init__(self, rate_per_s: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.buckets = TokenBuckets(rate_per_s, burst, clock)

    @property
    def refused(self) -> int:
        return self.buckets.refused

    def check(self, tenant: str) -> None:
        """Take one request from the tenant's bucket; 429 with Retry-After when it is empty."""
        wait = self.buckets.take(tenant)
        if wait > 0:
            b = self.buckets
            raise RateLimited(
                f"tenant {tenant!r} is over its rate limit of {b.rate:g} requests/s (burst {b.burst:g})",
                retry_after_s=max(1, math.ceil(wait)),
            )
