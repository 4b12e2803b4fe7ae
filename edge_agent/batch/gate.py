"""When the batch worker may try the cloud again: backoff with jitter while it cannot be reached.

::

    open ──(a round of requests found the cloud unavailable)──► backing off (delay doubles, ±50%)
      ▲                                                              │ delay passed, or the MQTT
      └───────────── a request got an answer ◄── one probe at a time ◄┘ link came back

While the cloud answers, the worker sends several requests at once; while it does not, one
probe per delay, so a long outage costs one failed connection per delay, not one per request.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from shared.mqtt import ReconnectBackoff


class CloudGate:
    def __init__(
        self,
        initial_s: float,
        max_s: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        jitter: bool = True,
    ) -> None:
        self.clock = clock
        self._backoff = ReconnectBackoff(initial_s, max_s, jitter=jitter)
        self._not_before = 0.0
        self.failures = 0  # rounds in a row that found the cloud unavailable

    @property
    def failing(self) -> bool:
        return self.failures > 0

    def wait_s(self) -> float:
        """Seconds until the next try may go (0: now)."""
        return max(0.0, self._not_before - self.clock())

    def ready(self) -> bool:
        return self.wait_s() == 0.0

    def failure(self, at_least_s: float = 0.0) -> float:
        """The cloud could not be reached: the next try waits the next delay (and at least
        ``at_least_s``, e.g. until the circuit breaker lets a probe through). Returns the wait."""
        self.failures += 1
        delay = max(self._backoff.next_delay(), at_least_s)
        self._not_before = self.clock() + delay
        return delay

    def success(self) -> None:
        self.failures = 0
        self._backoff.reset()
        self._not_before = 0.0

    def retry_now(self) -> None:
        """A sign the cloud may be back (the MQTT link reconnected): try at once, keeping the
        backoff's growth in case it is not."""
        self._not_before = 0.0
