"""The pool gateway in process against real HTTP upstreams (aiohttp servers on free ports):
replica choice by model, 404s retried elsewhere, timeouts, and the outstanding count under
cancellation. The gateway with real pool replicas as processes: tests/test_fallback.py."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
from aiohttp import web

from cloud.gateway.balancer import PoolGateway, Replica
from cloud.settings import GatewaySettings
from shared.errors import RequestError

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@asynccontextmanager
async def replica(models: list[str], completions: Handler | None = None) -> AsyncIterator[str]:
    """An OpenAI-compatible upstream listing ``models``; by default it answers which it is and
    404 for a model it does not serve, as vLLM and our pool do."""

    async def listing(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": m, "object": "model"} for m in models]})

    async def answer(request: web.Request) -> web.Response:
        body = await request.json()
        if body["model"] not in models:
            error = {"message": f"model {body['model']} not found", "code": "model_not_found"}
            return web.json_response({"error": error}, status=404)
        return web.json_response({"served": body["model"], "by": models})

    app = web.Application()
    app.router.add_get("/v1/models", listing)
    app.router.add_post("/v1/completions", completions or answer)
    runner = web.AppRunner(app)
    await runner.setup()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    await web.SockSite(runner, sock).start()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    finally:
        await runner.cleanup()


def _gateway(urls: list[str], **settings: Any) -> PoolGateway:
    return PoolGateway(GatewaySettings.model_validate({"upstreams": [{"url": u} for u in urls], **settings}))


async def _poll_health(gateway: PoolGateway) -> None:
    task = asyncio.create_task(gateway.run_health_checks())
    await asyncio.sleep(0.3)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def test_requests_go_to_the_replica_that_serves_their_model() -> None:
    async def scenario() -> None:
        async with replica(["alpha"]) as a, replica(["beta"]) as b:
            gateway = _gateway([a, b])
            try:
                await _poll_health(gateway)
                assert [r.models for r in gateway.replicas] == [{"alpha"}, {"beta"}]
                for _ in range(4):
                    for model in ("alpha", "beta"):
                        r = await gateway.forward("/completions", {"model": model, "prompt": "x"})
                        assert r.status_code == 200 and model.encode() in r.body
                assert gateway.retries == 0
            finally:
                await gateway.aclose()

    asyncio.run(scenario())


def test_a_404_is_retried_on_another_replica_before_models_are_known() -> None:
    async def scenario() -> None:
        async with replica(["alpha"]) as a, replica(["beta"]) as b:
            gateway = _gateway([a, b])  # no health poll yet: nobody's models are known
            try:
                served = []
                for _ in range(4):
                    r = await gateway.forward("/completions", {"model": "beta", "prompt": "x"})
                    served.append(r.status_code)
                assert served == [200] * 4
                assert all(r.up for r in gateway.replicas)  # a 404 is not a failure
            finally:
                await gateway.aclose()

    asyncio.run(scenario())


def test_a_model_no_replica_serves_is_a_404_from_the_pool() -> None:
    async def scenario() -> None:
        async with replica(["alpha"]) as a, replica(["beta"]) as b:
            gateway = _gateway([a, b])
            try:
                await _poll_health(gateway)
                r = await gateway.forward("/completions", {"model": "gamma", "prompt": "x"})
                assert r.status_code == 404 and b"model_not_found" in r.body
                assert all(r.up for r in gateway.replicas)
            finally:
                await gateway.aclose()

    asyncio.run(scenario())


def test_pick_prefers_listing_then_unknown_and_the_least_busy() -> None:
    gateway = _gateway(["http://127.0.0.1:1/v1", "http://127.0.0.1:2/v1", "http://127.0.0.1:3/v1"])
    a, b, c = gateway.replicas
    a.models, b.models, c.models = frozenset({"m"}), None, frozenset({"m"})
    a.outstanding, c.outstanding = 5, 1
    assert gateway._pick(set(), "m") is c
    assert gateway._pick({"pool-2"}, "m") is a
    assert gateway._pick({"pool-0", "pool-2"}, "m") is b
    c.up = False
    assert gateway._pick({"pool-0"}, "m") is b
    assert gateway._pick(set(), "other") is b  # unknown before those that list something else
    b.models = frozenset({"x"})
    picked = gateway._pick(set(), "other")
    assert isinstance(picked, Replica) and picked.name in {"pool-0", "pool-1"}


def test_a_request_cancelled_while_sending_releases_its_replica() -> None:
    started, release = asyncio.Event(), asyncio.Event()

    async def stuck(request: web.Request) -> web.Response:
        started.set()
        await release.wait()
        return web.json_response({})

    async def scenario() -> None:
        async with replica(["m"], stuck) as a:
            gateway = _gateway([a])
            try:
                task = asyncio.create_task(gateway.forward("/completions", {"model": "m", "prompt": "x"}))
                await asyncio.wait_for(started.wait(), 10)
                assert gateway.replicas[0].outstanding == 1
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
                assert gateway.replicas[0].outstanding == 0
            finally:
                release.set()
                await gateway.aclose()

    asyncio.run(scenario())


def test_gateway_answers_504_for_a_slow_replica_and_neither_retries_nor_marks_it_down() -> None:
    """A generation longer than request_timeout_s is the replica being busy, not dead."""
    hits: list[int] = []
    release = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        hits.append(1)
        await release.wait()
        return web.json_response({"choices": []})

    async def scenario() -> None:
        async with replica(["m"], slow) as a, replica(["m"], slow) as b:
            gateway = _gateway([a, b], request_timeout_s=0.3)
            try:
                started = time.monotonic()
                with pytest.raises(RequestError) as err:
                    await gateway.forward("/completions", {"model": "m", "prompt": "hi"})
                assert err.value.status == 504 and err.value.code == "pool_timeout"
                assert time.monotonic() - started < 1.5
                assert len(hits) == 1 and gateway.retries == 0 and gateway.timeouts == 1
                assert all(r.up and r.outstanding == 0 for r in gateway.replicas)
            finally:
                release.set()
                await gateway.aclose()

    asyncio.run(scenario())
