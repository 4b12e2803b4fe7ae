"""The cloud fallback's circuit breaker: its state machine on a fake clock, and against a real
HTTP upstream the two ways a probe used to leave it half-open for good (issue 14): the probe
cancelled while it waits, and a 5xx whose body breaks off."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest
from aiohttp import web

from edge_agent.routing.breaker import CircuitBreaker
from edge_agent.routing.cloud import CloudFallback, CloudUnavailable
from edge_agent.serving.config import ServingConfig


def test_circuit_breaker_opens_probes_and_closes() -> None:
    now = [0.0]
    b = CircuitBreaker(threshold=2, reset_s=5, clock=lambda: now[0])
    assert b.allow() and b.state == "closed"
    b.failure()
    assert b.allow()
    b.failure()
    assert b.state == "open" and not b.allow() and b.retry_in() == 5
    now[0] = 5.0
    assert b.state == "half_open" and b.allow() and not b.allow()  # one probe at a time
    b.failure()
    assert b.state == "open" and not b.allow()
    now[0] = 10.0
    assert b.allow()
    b.success()
    assert b.state == "closed" and b.allow()


def test_an_abandoned_probe_lets_the_next_request_probe() -> None:
    now = [0.0]
    b = CircuitBreaker(threshold=1, reset_s=5, clock=lambda: now[0])
    b.failure()
    now[0] = 5.0
    assert b.allow() and not b.allow()
    b.abandon()
    assert b.state == "half_open" and b.allow()


def test_a_probe_that_never_reports_back_is_replaced_after_reset_s() -> None:
    now = [0.0]
    b = CircuitBreaker(threshold=1, reset_s=5, clock=lambda: now[0])
    b.failure()
    now[0] = 5.0
    assert b.allow()
    now[0] = 9.9
    assert not b.allow()
    now[0] = 10.0
    assert b.allow()


def test_abandon_outside_a_probe_changes_nothing() -> None:
    b = CircuitBreaker(threshold=2, reset_s=5, clock=lambda: 0.0)
    b.failure()
    b.abandon()
    assert b.state == "closed" and b.failures == 1


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@asynccontextmanager
async def upstream(handler: Handler) -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_post("/v1/completions", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    site = web.SockSite(runner, sock)
    await site.start()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    finally:
        await runner.cleanup()


def _fallback(url: str, breaker: CircuitBreaker, timeout_s: float = 10.0) -> CloudFallback:
    config = ServingConfig(cloud_url=url, cloud_timeout_s=timeout_s)
    return CloudFallback(
        lambda: config, api_key=None, allowed_urls=frozenset({url}), connect_timeout_s=2.0, breaker=breaker
    )


BODY = {"model": "m", "prompt": "x", "max_tokens": 1}


def test_a_probe_cancelled_while_waiting_leaves_the_breaker_usable() -> None:
    release = asyncio.Event()

    async def slow(request: web.Request) -> web.StreamResponse:
        await release.wait()
        return web.json_response({"choices": []})

    async def scenario() -> None:
        now = [0.0]
        breaker = CircuitBreaker(threshold=1, reset_s=5, clock=lambda: now[0])
        async with upstream(slow) as url:
            fallback = _fallback(url, breaker)
            try:
                breaker.failure()
                now[0] = 5.0  # half-open: the next request is the probe
                probe = asyncio.create_task(fallback.forward("/completions", BODY))
                await asyncio.sleep(0.2)
                probe.cancel()  # its client disconnected
                with pytest.raises(asyncio.CancelledError):
                    await probe
                release.set()
                response, parsed = await fallback.forward("/completions", BODY)
                assert response.status_code == 200 and parsed == {"choices": []}
                assert breaker.state == "closed"
            finally:
                await fallback.aclose()

    asyncio.run(scenario())


def test_a_5xx_whose_body_breaks_off_is_a_failure_and_not_a_stuck_probe() -> None:
    calls = [0]

    async def broken(request: web.Request) -> web.StreamResponse:
        calls[0] += 1
        if calls[0] > 1:
            return web.json_response({"choices": []})
        response = web.StreamResponse(status=502, headers={"content-length": "1000"})
        await response.prepare(request)
        await response.write(b"upstream is dy")
        assert request.transport is not None
        request.transport.close()  # 986 bytes short
        return response

    async def scenario() -> None:
        now = [0.0]
        breaker = CircuitBreaker(threshold=1, reset_s=5, clock=lambda: now[0])
        async with upstream(broken) as url:
            fallback = _fallback(url, breaker)
            try:
                breaker.failure()
                now[0] = 5.0
                with pytest.raises(CloudUnavailable, match="HTTP 502"):
                    await fallback.forward("/completions", BODY)
                assert breaker.state == "open"  # the failed probe re-opened it
                now[0] = 10.0
                response, _ = await fallback.forward("/completions", BODY)
                assert response.status_code == 200 and breaker.state == "closed"
            finally:
                await fallback.aclose()

    asyncio.run(scenario())


def test_cloud_timeout_s_limits_silence_not_a_stream_still_sending() -> None:
    """A stream that sends a piece every 0.3 s for 2.4 s arrives whole under a 1 s limit; one
    that then falls silent for longer ends with an error event that says it timed out."""

    async def streaming(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        for i in range(8):
            await response.write(f'data: {{"n": {i}}}\n\n'.encode())
            await asyncio.sleep(0.3)
        if request.query.get("stall"):
            await asyncio.sleep(3)
        await response.write(b"data: [DONE]\n\n")
        return response

    async def read(fallback: CloudFallback, path: str) -> bytes:
        response, _ = await fallback.forward(path, {**BODY, "stream": True})
        return b"".join([part async for part in response.body_iterator])  # type: ignore[attr-defined]

    async def scenario() -> None:
        breaker = CircuitBreaker(threshold=3, reset_s=5)
        async with upstream(streaming) as url:
            fallback = _fallback(url, breaker, timeout_s=1.0)
            try:
                whole = await read(fallback, "/completions")
                assert whole.count(b'"n":') == 8 and whole.endswith(b"data: [DONE]\n\n"), whole
                assert breaker.failures == 0 and fallback.stream_breaks == 0
                cut = await read(fallback, "/completions?stall=1")
                assert cut.count(b'"n":') == 8 and b"[DONE]" not in cut
                assert b"timed out" in cut and b"upstream_stream_broken" in cut, cut
                assert breaker.failures == 1 and fallback.stream_breaks == 1
            finally:
                await fallback.aclose()

    asyncio.run(scenario())
