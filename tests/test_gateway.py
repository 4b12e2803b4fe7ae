"""The pool gateway in process against real HTTP upstreams (aiohttp servers on free ports):
replica choice by model and by load (the gateway's own count and the replicas' scraped gauges),
404s retried elsewhere, readiness, timeouts, and the outstanding count under cancellation. The gateway with real pool replicas as processes: tests/test_fallback.py."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
from aiohttp import web
from pydantic import ValidationError

from cloud.gateway.balancer import REPLICA_HEADER, PoolGateway, Replica
from cloud.gateway.load import AUTOGLM_POOL, VLLM, ReplicaLoad, parse_load, server_root
from cloud.settings import GatewaySettings
from shared.errors import RequestError
from tests.services import until

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@asynccontextmanager
async def replica(
    models: list[str], completions: Handler | None = None, host: str = "127.0.0.1", port: int = 0
) -> AsyncIterator[str]:
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
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    await web.SockSite(runner, sock).start()
    try:
        yield f"http://{host}:{sock.getsockname()[1]}/v1"
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


def test_a_discovered_upstream_is_a_replica_per_address_that_follows_the_lookup(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A headless Service: one name, an address per pod. Each is a replica of its own (a pod
    that fails is retried on another, not the whole pool marked down), and pods that come and
    go are followed at every health poll."""
    with pytest.raises(ValidationError, match="discover needs an http:// URL"):
        GatewaySettings.model_validate({"upstreams": [{"url": "https://pool.test/v1", "discover": True}]})
    with pytest.raises(ValidationError, match="out of range"):
        GatewaySettings.model_validate(
            {"upstreams": [{"url": "http://pool.test:99999/v1", "discover": True}]}
        )

    async def scenario() -> None:
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()
        loop = asyncio.get_running_loop()
        real = loop.getaddrinfo
        pods: list[str] | None = ["127.0.0.1", "127.0.0.2"]

        async def lookup(host: str, port_: int, **kwargs: Any) -> list[Any]:
            if host != "pool.test":
                return await real(host, port_, **kwargs)
            if pods is None:
                raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
            # Dual stack: each pod has an IPv6 address too; the IPv4 ones are the replicas.
            v6 = [
                (socket.AF_INET6, socket.SOCK_STREAM, 6, "", (f"fd00::{i + 1}", port_, 0, 0))
                for i in range(len(pods))
            ]
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port_)) for a in pods] + v6

        monkeypatch.setattr(loop, "getaddrinfo", lookup)
        upstream = {"url": f"http://pool.test:{port}/v1", "name": "pool", "discover": True}
        gateway = PoolGateway(GatewaySettings.model_validate({"upstreams": [upstream], "max_attempts": 2}))
        try:
            async with replica(["m"], host="127.0.0.2", port=port):
                async with replica(["m"], host="127.0.0.1", port=port):
                    await _poll_health(gateway)
                    assert [(r.name, r.up, r.models) for r in gateway.replicas] == [
                        ("pool@127.0.0.1", True, {"m"}),
                        ("pool@127.0.0.2", True, {"m"}),
                    ]
                    served = set()
                    for _ in range(4):
                        r = await gateway.forward("/completions", {"model": "m", "prompt": "x"})
                        served.add(r.headers[REPLICA_HEADER])
                        gateway.replicas[0].outstanding += 1  # the next goes to the other
                    for r in gateway.replicas:
                        r.outstanding = 0
                    assert served == {"pool@127.0.0.1", "pool@127.0.0.2"}
                # One pod gone before a poll noticed: its request is sent to the other pod.
                r = await gateway.forward("/completions", {"model": "m", "prompt": "x"})
                assert r.status_code == 200 and r.headers[REPLICA_HEADER] == "pool@127.0.0.2"
                assert [r.up for r in gateway.replicas] == [False, True] and gateway.retries <= 1
                pods = ["127.0.0.2"]
                await gateway.discover()
                assert [r.name for r in gateway.replicas] == ["pool@127.0.0.2"]
                kept = gateway.replicas[0]
                pods = None  # a failed lookup keeps what is known
                await gateway.discover()
                assert gateway.replicas == [kept]
                pods = ["127.0.0.2", "127.0.0.1"]
                await gateway.discover()
                assert [r.name for r in gateway.replicas] == ["pool@127.0.0.1", "pool@127.0.0.2"]
                assert gateway.replicas[1] is kept and kept.served >= 2
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


def test_a_model_whose_only_replica_is_down_is_a_503_not_the_others_404() -> None:
    async def scenario() -> None:
        async with replica(["alpha"]) as a, replica(["beta"]) as b:
            gateway = _gateway([a, b])
            try:
                await _poll_health(gateway)
                gateway.replicas[1].up = False  # beta's replica failed a request
                with pytest.raises(RequestError) as err:
                    await gateway.forward("/completions", {"model": "beta", "prompt": "x"})
                assert err.value.status == 503 and "pool-1 serves beta but is down" in err.value.message
                r = await gateway.forward("/completions", {"model": "gamma", "prompt": "x"})
                assert r.status_code == 404  # no replica serves gamma at all
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


def test_a_replicas_own_500_or_non_json_answer_is_a_502_that_keeps_its_text_in_the_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Neither retried (the same request may fail alike elsewhere) nor passed on: the client gets
    the OpenAI envelope and no word of the replica's internals."""
    hits: list[str] = []

    async def broken(request: web.Request) -> web.Response:
        body = await request.json()
        hits.append(body["prompt"])
        if body["prompt"] == "crash":
            return web.Response(status=500, text="internal kaboom with secret=upstream-internal")
        if body["prompt"] == "html":
            return web.Response(status=200, text="<html>not json", content_type="text/html")
        return web.json_response({"error": {"message": "bad prompt", "code": "invalid"}}, status=400)

    async def scenario() -> None:
        async with replica(["m"], broken) as a, replica(["m"], broken) as b:
            gateway = _gateway([a, b])
            try:
                for prompt, says in (
                    ("crash", "HTTP 500"),
                    ("html", "(text/html) that is not a JSON object"),
                ):
                    with pytest.raises(RequestError) as err:
                        await gateway.forward("/completions", {"model": "m", "prompt": prompt})
                    assert err.value.status == 502 and err.value.code == "upstream_error"
                    assert says in err.value.message and "secret" not in err.value.message
                # A 4xx is the replica's verdict on the request: passed on as it is.
                r = await gateway.forward("/completions", {"model": "m", "prompt": "4xx"})
                assert r.status_code == 400 and b"bad prompt" in r.body
                assert hits == ["crash", "html", "4xx"] and gateway.retries == 0
                assert gateway.upstream_errors == 2
                assert all(r.up and r.outstanding == 0 for r in gateway.replicas)
            finally:
                await gateway.aclose()

    with caplog.at_level("WARNING", logger="cloud.gateway.balancer"):
        asyncio.run(scenario())
    assert "secret=upstream-internal" in caplog.text


async def _play(response: Any) -> tuple[int, dict[str, str], bytes]:
    """An answer the gateway made, sent as uvicorn would send it to a client that stays."""
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        await asyncio.sleep(60)
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await response({"type": "http", "asgi": {"spec_version": "2.3"}}, receive, send)
    start = sent[0]
    headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in start["headers"]}
    return start["status"], headers, b"".join(m.get("body", b"") for m in sent[1:])


def test_a_model_id_no_header_can_carry_is_left_out_and_every_answer_releases_its_replica() -> None:
    """A replica that answers any model name echoes the client's: a name outside printable ASCII
    (or too long) cannot be an answer header, so it is left out, not a 500 after the work was
    done, and a stream's connection and count still go back. Content types are case-blind."""

    async def answers(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if not body.get("stream"):
            return web.json_response({"choices": [{"text": "ok"}]})
        response = web.StreamResponse(headers={"Content-Type": "Text/Event-Stream; charset=utf-8"})
        await response.prepare(request)
        await response.write(b'data: {"choices": [{"text": "ok"}]}\n\n')
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def scenario() -> None:
        async with replica(["m"], answers) as a:  # answers any model (llama.cpp's server)
            gateway = _gateway([a])
            try:
                for model in ("\u6a21\u578b", "m\r\nx-injected: 1", "m" * 300, "m:1"):
                    for stream in (False, True):
                        r = await gateway.forward(
                            "/completions", {"model": model, "prompt": "hi", "stream": stream}
                        )
                        status, headers, body = await _play(r)
                        assert status == 200, (model, stream, body)
                        assert headers.get("x-autoglm-model") == (model if model == "m:1" else None)
                        assert "x-injected" not in headers
                        if stream:
                            assert body.endswith(b"data: [DONE]\n\n") and b"error" not in body
                        else:
                            assert body == b'{"choices": [{"text": "ok"}]}'
                assert all(r.up and r.outstanding == 0 for r in gateway.replicas)
                assert gateway.stream_breaks == 0
                # One connection for all eight: a stream read to [DONE] still ends its answer whole.
                assert [len(kept) for kept in gateway._upstream._idle.values()] == [1]
            finally:
                await gateway.aclose()

    asyncio.run(scenario())


def _writes_then_hangs(events: bytes, seconds: float) -> Handler:
    """A replica that streams ``events``, then holds its answer open for ``seconds``."""

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(events)
        await asyncio.sleep(seconds)
        return response

    return handler


def test_a_stream_that_stalls_mid_answer_ends_with_an_error_event_and_its_replica_stays_up() -> None:
    """Silent past request_timeout_s after its first event: busy, as a replica slow to start
    answering is (a 504 there), not down; the client learns the answer is incomplete."""

    async def scenario() -> None:
        async with replica(["m"], _writes_then_hangs(b'data: {"choices": [{"text": "o"}]}\n\n', 3)) as a:
            gateway = _gateway([a], request_timeout_s=0.3)
            try:
                r = await gateway.forward("/completions", {"model": "m", "prompt": "hi", "stream": True})
                status, _, body = await _play(r)
                assert status == 200 and body.startswith(b'data: {"choices"')
                assert b'"error"' in body and b"[DONE]" not in body
                assert gateway.stream_breaks == 1 and gateway.timeouts == 1
                assert all(r.up and r.outstanding == 0 for r in gateway.replicas)
            finally:
                await gateway.aclose()

    asyncio.run(scenario())


def test_a_stream_ends_at_done_even_when_the_replica_never_ends_its_answer() -> None:
    """Nothing after [DONE] is the client's: a replica that keeps its chunked body open after it
    does not hold the client until the read timeout."""

    never_ends = _writes_then_hangs(
        b'data: {"choices": [{"text": "o"}]}\n\ndata: [DONE]\n\ndata: {"late": 1}\n\n', 4
    )

    async def scenario() -> None:
        async with replica(["m"], never_ends) as a:
            gateway = _gateway([a], request_timeout_s=5)
            try:
                started = time.monotonic()
                r = await gateway.forward("/completions", {"model": "m", "prompt": "hi", "stream": True})
                status, _, body = await _play(r)
                assert time.monotonic() - started < 2
                assert status == 200 and body == b'data: {"choices": [{"text": "o"}]}\n\ndata: [DONE]\n\n'
                assert gateway.stream_breaks == 0
                assert all(r.up and r.outstanding == 0 for r in gateway.replicas)
                assert not any(gateway._upstream._idle.values())  # its answer never ended: closed
            finally:
                await gateway.aclose()

    asyncio.run(scenario())


def test_a_2xx_that_is_empty_cut_short_or_nested_too_deep_is_a_502() -> None:
    """Whatever its content type says, a 2xx must be a JSON object; a body the parser cannot
    take (nesting deeper than its recursion limit) is no answer either, not a 500."""
    bodies = {"empty": b"", "cut": b'{"choices": [{"text": "o', "deep": b"[" * 100_000 + b"]" * 100_000}

    async def odd(request: web.Request) -> web.Response:
        body = await request.json()
        return web.Response(body=bodies[body["prompt"]], content_type="application/json")

    async def scenario() -> None:
        async with replica(["m"], odd) as a:
            gateway = _gateway([a])
            try:
                for prompt in bodies:
                    with pytest.raises(RequestError) as err:
                        await gateway.forward("/completions", {"model": "m", "prompt": prompt})
                    assert err.value.status == 502 and err.value.code == "upstream_error", prompt
                assert all(r.up and r.outstanding == 0 for r in gateway.replicas)
            finally:
                await gateway.aclose()

    asyncio.run(scenario())


# -- load from the replicas' own gauges ------------------------------------------------------------
VLLM_METRICS = """# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="smollm2"} 2.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="smollm2"} 5.0
vllm:num_requests_waiting_by_reason{engine="0",model_name="smollm2",reason="capacity"} 99.0
vllm:num_requests_running{engine="1",model_name="smollm2"} 1.0
"""
POOL_METRICS = """# HELP autoglm_pool_queue_depth Requests waiting for a place in the batch.
# TYPE autoglm_pool_queue_depth gauge
autoglm_pool_queue_depth 3.0
# TYPE autoglm_pool_batch_size gauge
autoglm_pool_batch_size 4.0
"""


def test_load_is_read_from_vllm_and_pool_gauges() -> None:
    vllm = parse_load(VLLM_METRICS)
    assert vllm is not None and vllm.gauges is VLLM
    assert (vllm.waiting, vllm.running) == (5, 3)  # engines summed; a longer name is not the family
    pool = parse_load(POOL_METRICS, own_in_flight=2)
    assert pool is not None and pool.gauges is AUTOGLM_POOL
    assert (pool.waiting, pool.running, pool.others) == (3, 4, 5)
    mostly_ours = parse_load(POOL_METRICS, own_in_flight=9)  # some still on the wire
    assert mostly_ours is not None and mostly_ours.others == 0
    assert parse_load("# nothing known\nprocess_cpu_seconds_total 1.0\n") is None
    assert parse_load("autoglm_pool_queue_depth NaN\nautoglm_pool_batch_size 1\n") is None


def test_server_root_drops_the_openai_prefix() -> None:
    assert server_root("http://pool:8500/v1") == "http://pool:8500"
    assert server_root("http://pool:8500/v1/") == "http://pool:8500"
    assert server_root("https://gw.example/vllm-a/v1") == "https://gw.example/vllm-a"
    assert server_root("http://pool:8500") == "http://pool:8500"


def test_pick_counts_the_scraped_queue_beside_its_own_requests() -> None:
    gateway = _gateway(["http://127.0.0.1:1/v1", "http://127.0.0.1:2/v1"])
    vllm, pool = gateway.replicas
    vllm.models = pool.models = frozenset({"m"})
    # vLLM has a queue the gateway did not put there (another control-plane replica's).
    vllm.server, vllm.load = VLLM, ReplicaLoad(VLLM, waiting=4, running=2, own_at_scrape=0)
    assert gateway._pick(set(), "m") is pool
    pool.outstanding = 6
    assert gateway._pick(set(), "m") is vllm  # 6 each: the tie goes to the fewer of its own
    # The scrape already counted the gateway's own requests: they are not counted twice.
    vllm.outstanding = 2
    vllm.load = ReplicaLoad(VLLM, waiting=0, running=2, own_at_scrape=2)
    assert vllm.estimated_load == 2 and gateway._pick(set(), "m") is vllm
    view = vllm.view()
    assert (view["server"], view["waiting"], view["running"], view["load"]) == ("vllm", 0, 2, 2)


@asynccontextmanager
async def vllm_like(health: list[int], waiting: list[int]) -> AsyncIterator[str]:
    """An upstream shaped like vLLM: /v1/models, /health (status from ``health[0]``) and
    /metrics with its waiting gauge (``waiting[0]``)."""

    async def listing(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "m", "object": "model"}]})

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(status=health[0])

    async def metrics(request: web.Request) -> web.Response:
        assert request.headers.get("accept-encoding") == "identity"
        text = f'vllm:num_requests_waiting{{engine="0"}} {waiting[0]}\nvllm:num_requests_running 1\n'
        return web.Response(text=text)

    async def answer(request: web.Request) -> web.Response:
        return web.json_response({"by": "vllm"})

    app = web.Application()
    app.router.add_get("/v1/models", listing)
    app.router.add_get("/health", healthz)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/v1/completions", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    await web.SockSite(runner, sock).start()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    finally:
        await runner.cleanup()


def test_scraped_queue_steers_requests_and_readiness_takes_a_replica_out() -> None:
    health, waiting = [200], [6]

    async def scenario() -> None:
        async with vllm_like(health, waiting) as v, replica(["m"]) as p:
            gateway = _gateway([v, p], health_interval_s=0.05, load_interval_s=0.1)
            polls = asyncio.create_task(gateway.run_health_checks())
            try:
                vllm, other = gateway.replicas
                await until(
                    seconds=5.0,
                    interval=0.02,
                    condition=lambda: vllm.load is not None and other.models is not None,
                )
                assert vllm.server is VLLM and other.server is None and other.load is None
                assert vllm.view()["load"] == 7
                for _ in range(4):  # its queue outweighs the other's own requests
                    r = await gateway.forward("/completions", {"model": "m", "prompt": "x"})
                    assert r.headers[REPLICA_HEADER] == "pool-1"
                waiting[0] = 0
                await until(seconds=5.0, interval=0.02, condition=lambda: vllm.estimated_load == 1)
                health[0] = 503  # the engine died behind a live API server
                await until(seconds=5.0, interval=0.02, condition=lambda: not vllm.up)
                assert vllm.last_error == "/health answered HTTP 503"
                health[0] = 200
                await until(seconds=5.0, interval=0.02, condition=lambda: vllm.up)
            finally:
                polls.cancel()
                await asyncio.gather(polls, return_exceptions=True)
                await gateway.aclose()

    asyncio.run(scenario())


def test_load_interval_is_validated() -> None:
    with pytest.raises(ValidationError):
        GatewaySettings.model_validate({"load_interval_s": 0.01})
    assert GatewaySettings().load_interval_s == 1.0


def test_a_non_streaming_answer_is_cancelled_when_its_client_leaves() -> None:
    """The control plane's gateway routes: a client gone before its answer cancels the forward
    (which closes the upstream connection, and the pool cancels the generation: measured with a
    real pool, 500 tokens generated for nobody before, 63-123 after); one that stays gets it."""
    from edge_agent.serving.streaming import unless_the_client_leaves

    cancelled = asyncio.Event()

    async def generating() -> Any:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async def leaves() -> dict[str, Any]:
        await asyncio.sleep(0.05)
        return {"type": "http.disconnect"}

    async def stays() -> dict[str, Any]:
        await asyncio.sleep(60)
        return {"type": "http.disconnect"}

    async def ready() -> Any:
        return "the answer"

    async def scenario() -> None:
        assert await asyncio.wait_for(unless_the_client_leaves(generating(), leaves), 5) is None
        assert cancelled.is_set()
        assert await asyncio.wait_for(unless_the_client_leaves(ready(), stays), 5) == "the answer"

    asyncio.run(scenario())
