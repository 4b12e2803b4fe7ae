"""Whether the device is idle, so that batch work never delays an interactive request.

``InteractiveActivity`` is ASGI middleware that counts the OpenAI requests in flight on the local
API (a stream until its last byte) and remembers when the last one ended. The device is idle
when none is in flight, none waits in the model host's queue, and the last ended at least
``idle_s`` ago: an app that sends requests one after another keeps the device to itself.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from starlette.types import ASGIApp, Receive, Scope, Send

# The requests that use the local model.
INTERACTIVE_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})


class ActivityMeter:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.in_flight = 0
        self.last_ended = float("-inf")

    def started(self) -> None:
        self.in_flight += 1

    def ended(self) -> None:
        self.in_flight -= 1
        self.last_ended = self.clock()

    def quiet_for(self) -> float:
        """Seconds since the last interactive request ended (0 while one is in flight)."""
        if self.in_flight:
            return 0.0
        return self.clock() - self.last_ended


class InteractiveActivity:
    """ASGI middleware feeding an :class:`ActivityMeter`."""

    def __init__(self, app: ASGIApp, meter: ActivityMeter) -> None:
        self.app = app
        self.meter = meter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") not in INTERACTIVE_PATHS:
            await self.app(scope, receive, send)
            return
        self.meter.started()
        try:
            await self.app(scope, receive, send)
        finally:
            self.meter.ended()


class IdleSignal:
    def __init__(self, meter: ActivityMeter, waiting: Callable[[], int], idle_s: float) -> None:
        self.meter = meter
        self.waiting = waiting  # requests queued in the model host
        self.idle_s = idle_s

    def idle(self) -> bool:
        return self.waiting() == 0 and self.meter.quiet_for() >= self.idle_s

    def wait_s(self) -> float:
        """A fair guess at how long until the device may be idle (for the worker's sleep)."""
        if self.waiting() or self.meter.in_flight:
            return max(0.05, min(self.idle_s, 0.25))
        return max(0.0, self.idle_s - self.meter.quiet_for())
