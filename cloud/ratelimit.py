"""Per-tenant request rate limits for the gateway: one token bucket per tenant.

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

from shared.errors import InferenceError


@dataclass
class _Bucket:
    tokens: float
    updated: float


class TenantRateLimiter:
    def __init__(self, rate_per_s: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        if rate_per_s <= 0 or burst < 1:
            raise ValueError("rate_per_s must be > 0 and burst ≥ 1")
        self.rate = rate_per_s
        self.burst = burst
        self.clock = clock
        self._buckets: dict[str, _Bucket] = {}
        self._lock = threading.Lock()
        self.refused = 0

    def check(self, tenant: str) -> None:
        """Take one request from the tenant's bucket; 429 with Retry-After when it is empty."""
        now = self.clock()
        with self._lock:
            b = self._buckets.get(tenant)
            if b is None:
                b = self._buckets[tenant] = _Bucket(float(self.burst), now)
            b.tokens = min(float(self.burst), b.tokens + (now - b.updated) * self.rate)
            b.updated = now
            if b.tokens >= 1.0:
                b.tokens -= 1.0
                return
            self.refused += 1
            wait = (1.0 - b.tokens) / self.rate
        raise InferenceError(
            f"tenant {tenant!r} is over its rate limit of {self.rate:g} requests/s (burst {self.burst})",
            status=429,
            code="rate_limited",
            retry_after_s=max(1, math.ceil(wait)),
        )
