"""Cloud fallback for real: pool replicas (`autoglm pool serve`), the control plane's gateway, and
edge agents routing to it, each as its own process over real HTTP and real mosquitto."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import shutil
import signal
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from cloud.mqtt.local_broker import free_port
from cloud.plane.auth import ApiKeys
from cloud.plane.store import make_engine
from cloud.pool.engine import BatchEngine
from cloud.registry import ModelRegistry, RegistryEntry
from edge_agent.runtime.generator import GenerationParams, GenerationResult
from edge_agent.runtime.sampling import SamplingConfig
from edge_agent.runtime.text import Prompt
from shared.errors import RequestError
from shared.messages import DesiredState, Phase
from shared.mqtt import BrokerSettings
from shared.signing import SigningKey
from tests.conftest import DEVICE, CloudSide, EdgeProcess, provisioned_device, serving_edge
from tests.services import CloudProcess, Service, scrape_metrics, start_cloud, start_pool
from tests.test_deploy import adapter_series, dashboard_metrics


def _names(url: str) -> set[str]:
    """Metric names exposed at ``url`` (labels and _total/_bucket/... suffixes stripped)."""
    import re

    return {re.sub(r"_(total|bucket|count|sum|created)$", "", k.split("{")[0]) for k in scrape_metrics(url)}


# -- the engine, in process ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def engine(demo_source: Path) -> Iterator[BatchEngine]:
    eng = BatchEngine(demo_source, name="demo-glm", max_batch=4, queue_size=2, threads=1)
    eng.start()
    yield eng
    eng.close()


async def _run(eng: BatchEngine, prompt: str, max_tokens: int, **kw: Any) -> tuple[str, GenerationResult]:
    params = GenerationParams(max_tokens=max_tokens, sampling=SamplingConfig(temperature=0.0), **kw)
    pieces, result = [], None
    async for item in eng.submit(Prompt(prompt), params):
        if isinstance(item, GenerationResult):
            result = item
        else:
            pieces.append(item)
    assert result is not None
    return "".join(pieces), result


def test_continuous_batching_gives_each_request_its_batch_of_one_answer(engine: BatchEngine) -> None:
    prompts = [f"def f{i}(x):\n" + "    " * i for i in range(6)]

    async def scenario() -> None:
        alone = [await _run(engine, p, 10 + 7 * i) for i, p in enumerate(prompts)]
        steps_before = engine.stats.decode_steps

        async def late(i: int) -> tuple[str, GenerationResult]:
            await asyncio.sleep(0.005 * i)  # join a batch that is already decoding
            return await _run(engine, prompts[i], 10 + 7 * i)

        together = await asyncio.gather(*(late(i) for i in range(6)))
        for (text_a, res_a), (text_b, res_b) in zip(alone, together, strict=True):
            assert text_a == text_b == res_b.text
            assert res_a.completion_tokens == res_b.completion_tokens
            assert res_a.finish_reason == res_b.finish_reason
        # Six requests of up to 45 tokens, four at a time: far fewer steps than tokens.
        steps = engine.stats.decode_steps - steps_before
        assert steps < sum(r.completion_tokens for _, r in together) * 0.6

    asyncio.run(scenario())


def test_engine_stop_sequences_queue_limit_and_bad_prompts(engine: BatchEngine) -> None:
    async def scenario() -> None:
        text, _ = await _run(engine, "def main():\n", 40)
        stop = text[3:5]
        cut, result = await _run(engine, "def main():\n", 40, stop=(stop,))
        assert cut == text[: text.index(stop)] and result.finish_reason == "stop"

        # max_batch 4 + queue 2: the seventh concurrent request is refused at once.
        params = GenerationParams(max_tokens=200, sampling=SamplingConfig(temperature=0.0))
        streams = [engine.submit(Prompt("import os\n"), params) for _ in range(6)]
        with pytest.raises(RequestError) as full:
            engine.submit(Prompt("import os\n"), params)
        assert full.value.status == 429 and full.value.code == "queue_full"
        for s in streams:
            async for _ in s:
                pass
        with pytest.raises(RequestError) as long:
            engine.submit(Prompt("x " * 5000), params)
        assert long.value.code == "context_length_exceeded"

    asyncio.run(scenario())


def test_waiting_requests_whose_clients_left_give_their_places_back_at_once(engine: BatchEngine) -> None:
    """max_batch 4 + queue 2: with four generating and the two waiting clients gone, a newcomer
    is queued, not refused with 429, and the queue depth no longer counts the two."""
    params = GenerationParams(max_tokens=400, sampling=SamplingConfig(temperature=0.0))

    async def drain(stream: Any) -> None:
        async for _ in stream:
            pass

    async def scenario() -> None:
        running = [asyncio.create_task(drain(engine.submit(Prompt("import os\n"), params))) for _ in range(4)]
        waiting = [asyncio.create_task(drain(engine.submit(Prompt("import os\n"), params))) for _ in range(2)]
        await asyncio.sleep(0.05)
        for task in waiting:
            task.cancel()  # their clients disconnected
        await asyncio.gather(*waiting, return_exceptions=True)
        assert not any(t.done() for t in running)  # four still generating: no place freed by them
        assert engine.waiting == 0
        newcomer = asyncio.create_task(drain(engine.submit(Prompt("import os\n"), params)))
        await asyncio.gather(*running, newcomer)

    asyncio.run(scenario())


# -- pool + gateway as processes -------------------------------------------------------------------
@pytest.fixture(scope="module")
def pools(demo_source: Path) -> Iterator[list[Service]]:
    started = [start_pool(demo_source, max_batch=4), start_pool(demo_source, max_batch=4)]
    yield started
    for p in started:
        p.stop()


def _gateway(
    tmp: Path,
    broker: BrokerSettings,
    tenant: str,
    registry: ModelRegistry,
    pools: list[Service],
    **gateway: Any,
) -> tuple[CloudProcess, str, str]:
    """A control plane fronting ``pools`` plus one dead upstream; returns it, and inference keys
    of ``tenant`` and of another tenant."""
    dead = f"http://127.0.0.1:{free_port()}/v1"
    upstreams = [{"url": f"{p.url}/v1", "name": f"pool-{i}"} for i, p in enumerate(pools)]
    upstreams.append({"url": dead, "name": "dead"})
    db = f"sqlite:///{tmp / 'cloud.db'}"
    cloud = start_cloud(
        tmp,
        db,
        broker,
        tenant,
        registry,
        extra={"gateway": {"upstreams": upstreams, "health_interval_s": 0.5, **gateway}},
    )
    engine = make_engine(db)
    keys = ApiKeys(engine)
    _, mine = keys.create(tenant, "app", "inference")
    _, other = keys.create("other" + tenant, "app", "inference")
    engine.dispose()
    return cloud, mine, other


def test_gateway_openai_client_balancing_retry_on_a_killed_replica_and_rate_limits(
    tmp_path: Path,
    broker_settings: BrokerSettings,
    tenant: str,
    registry: ModelRegistry,
    demo_source: Path,
) -> None:
    # Two replicas of our own, and a third one this test kills under load.
    doomed = start_pool(demo_source, max_batch=2)
    replicas = [start_pool(demo_source, max_batch=4), doomed]
    cloud, key, other_key = _gateway(
        tmp_path,
        broker_settings,
        tenant,
        registry,
        replicas,
        rate_limit={"requests_per_s": 2.0, "burst": 100},
    )
    try:
        client = openai.OpenAI(base_url=f"{cloud.url}/v1", api_key=key, max_retries=0)
        assert [m.id for m in client.models.list().data] == ["demo-glm"]
        chat = client.chat.completions.create(
            model="demo-glm", messages=[{"role": "user", "content": "hi"}], max_tokens=8, temperature=0
        )
        assert chat.choices[0].message.content is not None and chat.usage is not None
        done = client.completions.create(
            model="demo-glm", prompt="def main():\n", max_tokens=8, temperature=0
        )
        pieces = [
            c.choices[0].text
            for c in client.completions.create(
                model="demo-glm", prompt="def main():\n", max_tokens=8, temperature=0, stream=True
            )
        ]
        assert "".join(pieces) == done.choices[0].text
        raw = httpx.post(
            f"{cloud.url}/v1/completions",
            json={"model": "demo-glm", "prompt": "x", "max_tokens": 2},
            headers={"authorization": f"Bearer {key}"},
            timeout=30,
        )
        assert raw.headers["x-autoglm-served-by"] == "cloud"
        assert raw.headers["x-autoglm-replica"] in {"pool-0", "pool-1"}

        state = cloud.ok("GET", "/v1/gateway")
        assert {r["name"]: r["up"] for r in state["replicas"]}["dead"] is False
        metrics = scrape_metrics(cloud.url)
        assert metrics['autoglm_cloud_gateway_replica_up{replica="dead"}'] == 0
        assert metrics['autoglm_cloud_gateway_replica_up{replica="pool-0"}'] == 1
        assert f'autoglm_cloud_devices{{status="online",tenant="{tenant}"}}' in metrics
        assert dashboard_metrics("autoglm_cloud_") <= _names(cloud.url)
        # The HPA's request rate (prometheus-adapter) reads a series this replica exposes.
        assert adapter_series("autoglm_cloud_") <= _names(cloud.url)
        assert metrics['autoglm_cloud_http_requests_total{kind="gateway"}'] >= 1
        assert "autoglm_cloud_device_messages_stored_total" in metrics
        assert metrics["autoglm_cloud_device_messages_failed_total"] == 0
        assert metrics["autoglm_cloud_rollout_drive_failures_total"] == 0
        assert metrics["autoglm_cloud_acks_dropped_total"] == 0
        assert "autoglm_cloud_acks_pending" in metrics

        # Load both replicas, then SIGKILL one while it holds requests: no plain request may be
        # lost (retried elsewhere), and no stream may end looking complete when it is not.
        def one(i: int) -> tuple[int, str]:
            r = httpx.post(
                f"{cloud.url}/v1/completions",
                json={"model": "demo-glm", "prompt": f"class C{i}:\n", "max_tokens": 300, "temperature": 0},
                headers={"authorization": f"Bearer {key}"},
                timeout=120,
            )
            return r.status_code, r.headers.get("x-autoglm-replica", "")

        def streamed(i: int) -> str:
            """'complete' (a finish_reason came) or 'cut' (the client raised); never anything else."""
            finish = None
            try:
                for chunk in client.completions.create(
                    model="demo-glm", prompt=f"def f{i}():\n", max_tokens=300, temperature=0, stream=True
                ):
                    finish = chunk.choices[0].finish_reason or finish
            except openai.APIError as exc:
                assert "broke off" in str(exc), exc  # noqa: PT017 (a thread's verdict, not a raises)
                return "cut"
            assert finish is not None, "a stream ended without a finish_reason and without an error"
            return "complete"

        # 48 streams as in the acceptance, beside 24 plain requests.
        with concurrent.futures.ThreadPoolExecutor(80) as pool:
            futures = [pool.submit(one, i) for i in range(24)]
            streams = [pool.submit(streamed, i) for i in range(48)]

            def doomed_busy() -> bool:
                views = {r["name"]: r for r in cloud.ok("GET", "/v1/gateway")["replicas"]}
                return views["pool-1"]["outstanding"] > 0

            cloud.wait(doomed_busy, 30, "the doomed replica to hold requests")
            doomed.kill()
            results = [f.result() for f in futures]
            ends = [f.result() for f in streams]
        assert [s for s, _ in results] == [200] * 24, results
        assert set(ends) <= {"complete", "cut"} and len(ends) == 48, ends
        assert cloud.ok("GET", "/v1/gateway")["stream_breaks"] == ends.count("cut"), ends
        state = cloud.ok("GET", "/v1/gateway")
        views = {r["name"]: r for r in state["replicas"]}
        assert views["pool-1"]["up"] is False and state["retries"] >= 1

        # The burst is spent: this tenant gets 429 with Retry-After; another tenant is unaffected.
        statuses = []
        for _ in range(300):
            r = httpx.post(
                f"{cloud.url}/v1/completions",
                json={"model": "demo-glm", "prompt": "x", "max_tokens": 1},
                headers={"authorization": f"Bearer {key}"},
                timeout=30,
            )
            statuses.append(r.status_code)
            if r.status_code == 429:
                assert r.json()["error"]["code"] == "rate_limited"
                assert int(r.headers["retry-after"]) >= 1
                break
        assert statuses[-1] == 429, statuses
        r = httpx.post(
            f"{cloud.url}/v1/completions",
            json={"model": "demo-glm", "prompt": "x", "max_tokens": 1},
            headers={"authorization": f"Bearer {other_key}"},
            timeout=30,
        )
        assert r.status_code == 200
        # An inference key cannot run the fleet.
        assert (
            httpx.get(
                f"{cloud.url}/v1/devices", headers={"authorization": f"Bearer {key}"}, timeout=10
            ).status_code
            == 403
        )
    finally:
        cloud.stop()
        for p in replicas:
            p.stop()


def test_pool_metrics_show_batching(pools: list[Service]) -> None:
    def one(i: int) -> int:
        return httpx.post(
            f"{pools[0].url}/v1/completions",
            json={"model": "demo-glm", "prompt": f"x{i}", "max_tokens": 40, "temperature": 0},
            timeout=60,
        ).status_code

    with concurrent.futures.ThreadPoolExecutor(8) as ex:
        assert list(ex.map(one, range(8))) == [200] * 8
    m = scrape_metrics(pools[0].url)
    assert m["autoglm_pool_requests_total"] >= 8
    assert m["autoglm_pool_tokens_total"] > m["autoglm_pool_decode_steps_total"]  # several per step
    assert m["autoglm_pool_time_to_first_token_seconds_count"] >= 8
    assert "autoglm_pool_queue_depth" in m and "autoglm_pool_batch_size" in m
    assert "autoglm_pool_tokens_per_second" in m
    assert dashboard_metrics("autoglm_pool_") <= _names(pools[0].url)  # the dashboard's queries are real
    assert adapter_series("autoglm_pool_") <= _names(pools[0].url)  # and the pool HPA's
    bad = httpx.post(f"{pools[0].url}/v1/completions", json={"model": "demo-glm"}, timeout=10)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "prompt"
    other = httpx.post(f"{pools[0].url}/v1/completions", json={"model": "nope", "prompt": "x"}, timeout=10)
    assert other.status_code == 404 and other.json()["error"]["code"] == "model_not_found"


# -- the edge router -----------------------------------------------------------------------------------
def test_edge_with_no_active_model_is_served_by_the_pool_and_says_so(
    tmp_path: Path,
    broker_settings: BrokerSettings,
    tenant: str,
    registry: ModelRegistry,
    demo_package: RegistryEntry,
    signing_key: SigningKey,
    pools: list[Service],
    edge_factory: Callable[..., EdgeProcess],
) -> None:
    cloud, key, _ = _gateway(tmp_path / "cloud", broker_settings, tenant, registry, pools)
    try:
        edge = edge_factory(
            device_id=DEVICE,
            tenant=tenant,
            broker=broker_settings,
            trusted=[signing_key.public.b64],
            extra={"router": {"cloud_url": f"{cloud.url}/v1"}, "fallback": {"api_key": key}},
        )
        edge.wait_http("/healthz")
        assert httpx.get(f"{edge.api}/readyz", timeout=5).status_code == 503  # nothing local yet

        r = httpx.post(
            f"{edge.api}/v1/chat/completions",
            json={"model": "demo-glm", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        assert r.headers["x-autoglm-served-by"] == "cloud"
        assert r.json()["object"] == "chat.completion"

        client = openai.OpenAI(base_url=f"{edge.api}/v1", api_key="unused", max_retries=0)
        streamed = client.completions.create(
            model="demo-glm", prompt="def main():\n", max_tokens=8, temperature=0, stream=True
        )
        text = "".join(c.choices[0].text for c in streamed)
        whole = client.completions.create(
            model="demo-glm", prompt="def main():\n", max_tokens=8, temperature=0
        )
        assert text == whole.choices[0].text

        m = scrape_metrics(edge.api)
        assert m["autoglm_edge_cloud_fallbacks_total"] >= 3
        assert (
            m['autoglm_edge_requests_total{endpoint="/v1/completions",served_by="cloud",status="200"}'] >= 2
        )

        # The cloud pushes local_only: now the device says plainly that it has nothing to serve.
        CloudSide(broker_settings, tenant, registry).drive(
            DesiredState(revision=1, config={"router": {"policy": "local_only"}}),
            lambda rep: rep.revision == 1,
        )
        r = httpx.post(f"{edge.api}/v1/completions", json={"model": "demo-glm", "prompt": "x"}, timeout=30)
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_not_ready"
        assert r.headers["x-autoglm-served-by"] == "none"

        # Now a local model, local_first again, one slot and no room to wait locally: while one
        # request generates here, the others are served by the pool rather than refused.
        CloudSide(broker_settings, tenant, registry).drive(
            DesiredState(
                revision=2,
                model=demo_package.ref,
                config={"router": {"policy": "local_first"}, "runtime": {"queue_size": 0, "parallel": 1}},
            ),
            lambda rep: rep.revision == 2 and rep.phase == Phase.ACTIVE,
        )
        edge.wait_ready()

        def one(i: int) -> tuple[int, str]:
            r = httpx.post(
                f"{edge.api}/v1/completions",
                json={"model": "demo-glm", "prompt": f"def f{i}():\n", "max_tokens": 200, "temperature": 0},
                timeout=120,
            )
            return r.status_code, r.headers["x-autoglm-served-by"]

        with concurrent.futures.ThreadPoolExecutor(4) as ex:
            results = list(ex.map(one, range(4)))
        assert all(status == 200 for status, _ in results), results
        assert {where for _, where in results} == {"local", "cloud"}, results
    finally:
        cloud.stop()


class _Blackhole:
    """A TCP port that accepts connections and never answers: the worst kind of unreachable cloud."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]

    def close(self) -> None:
        self.sock.close()


def test_offline_device_serves_locally_and_cloud_only_requests_fail_fast(
    broker_settings: BrokerSettings,
    tenant: str,
    demo_package: RegistryEntry,
    registry: ModelRegistry,
    signing_key: SigningKey,
    edge_factory: Callable[..., EdgeProcess],
) -> None:
    provisioned_device(
        edge_factory,
        broker=broker_settings,
        tenant=tenant,
        registry=registry,
        trusted=[signing_key.public.b64],
        model=demo_package,
    )

    # The same device again, with neither the broker nor the cloud reachable.
    hole = _Blackhole()
    try:
        edge = edge_factory(
            device_id=DEVICE,
            tenant=tenant,
            broker=BrokerSettings(host="127.0.0.1", port=free_port()),
            trusted=[signing_key.public.b64],
            extra={
                "router": {"cloud_url": f"http://127.0.0.1:{hole.port}/v1", "cloud_timeout_s": 1.0},
                "fallback": {"breaker_failures": 2, "breaker_reset_s": 300},
            },
        )
        edge.wait_ready(timeout=60)
        for _ in range(3):
            r = httpx.post(
                f"{edge.api}/v1/completions",
                json={"model": "demo-glm", "prompt": "import ", "max_tokens": 4, "temperature": 0},
                timeout=30,
            )
            assert r.status_code == 200 and r.headers["x-autoglm-served-by"] == "local"

        timings = []
        for _ in range(6):
            started = time.monotonic()
            r = httpx.post(
                f"{edge.api}/v1/completions",
                json={"model": "big-cloud-model", "prompt": "x", "max_tokens": 4},
                timeout=30,
            )
            timings.append(time.monotonic() - started)
            assert r.status_code == 503, r.text
            error = r.json()["error"]
            assert error["code"] == "cloud_unavailable" and "not served here" in error["message"]
            assert int(r.headers["retry-after"]) >= 1
        assert "circuit open" in error["message"]
        # Two timeouts open the circuit; after that, an answer without waiting for the cloud.
        assert all(t >= 0.9 for t in timings[:2]), timings
        assert max(timings[2:]) < 0.3, timings
        m = scrape_metrics(edge.api)
        assert m["autoglm_edge_cloud_breaker_open"] == 1
        assert m["autoglm_edge_online"] == 0
        # And local requests are still served at full speed.
        r = httpx.post(
            f"{edge.api}/v1/completions",
            json={"model": "demo-glm", "prompt": "import ", "max_tokens": 4, "temperature": 0},
            timeout=30,
        )
        assert r.status_code == 200 and r.headers["x-autoglm-served-by"] == "local"
    finally:
        hole.close()


# Given a model's directory and more ``router`` settings: its pool replica, and the device.
EdgeBehindAPool = Callable[[Path, dict[str, Any]], tuple[Service, EdgeProcess]]


@pytest.fixture
def edge_behind_a_pool(
    tmp_path: Path,
    broker_settings: BrokerSettings,
    tenant: str,
    registry: ModelRegistry,
    demo_package_v2: RegistryEntry,
    signing_key: SigningKey,
    edge_factory: Callable[..., EdgeProcess],
) -> Iterator[EdgeBehindAPool]:
    """Starts a pool replica of a model, the control plane's gateway in front of it, and the
    device serving demo_package_v2 with that gateway as its cloud; stops the cloud side after."""
    started: list[tuple[CloudProcess, Service]] = []

    def start(source: Path, router: dict[str, Any]) -> tuple[Service, EdgeProcess]:
        pool = start_pool(source, max_batch=4)
        cloud, key, _ = _gateway(tmp_path / "cloud", broker_settings, tenant, registry, [pool])
        started.append((cloud, pool))
        edge = serving_edge(
            edge_factory,
            broker=broker_settings,
            tenant=tenant,
            registry=registry,
            trusted=[signing_key.public.b64],
            model=demo_package_v2,
            extra={"router": {"cloud_url": f"{cloud.url}/v1", **router}, "fallback": {"api_key": key}},
        )
        return pool, edge

    yield start
    for cloud, pool in started:
        cloud.stop()
        pool.stop()


def _chat_stream(
    url: str,
    body: dict[str, Any],
    served_by: str,
    on_chunk: Callable[[list[dict[str, Any]]], None] = lambda chunks: None,
) -> tuple[list[dict[str, Any]], bool]:
    """The chunks of a chat streamed from ``url`` (``on_chunk`` hears of each as it comes, with
    those so far), and whether it ended with [DONE]; the answer's start said ``served_by``."""
    chunks: list[dict[str, Any]] = []
    done = False
    with httpx.stream("POST", url, json=body, timeout=120) as r:
        assert r.status_code == 200 and r.headers["x-autoglm-served-by"] == served_by
        for line in r.iter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                chunks.append(json.loads(line[6:]))
                on_chunk(chunks)
    return chunks, done


def test_a_cloud_stream_killed_mid_answer_is_finished_locally_token_for_token(
    demo_source: Path, edge_behind_a_pool: EdgeBehindAPool
) -> None:
    """Issue 18: the pool replica serving a cloud_first stream is SIGKILLed mid-answer; the
    client's stream goes on with the device's own (fp32) model from the cloud's last token and
    ends with [DONE], one stream: one id, one role, ``served_by: cloud→local`` at the end."""
    pool, edge = edge_behind_a_pool(demo_source, {"policy": "cloud_first"})
    chat = {
        "model": "demo-glm",
        "messages": [{"role": "user", "content": "def main():"}],
        "max_tokens": 400,
        "temperature": 0,
        "return_token_ids": True,
    }
    # The pool's own answer, unbroken, for the part before the break.
    reference = httpx.post(f"{pool.url}/v1/chat/completions", json=chat, timeout=120).json()
    assert len(reference["choices"][0]["token_ids"]) > 100

    def kill_at_the_eighth(chunks: list[dict[str, Any]]) -> None:
        assert "error" not in chunks[-1], chunks[-1]
        if len(chunks) == 8:
            # Frozen first, so that it cannot finish the answer while it is being killed.
            os.kill(pool.proc.pid, signal.SIGSTOP)
            pool.kill()

    chunks, done = _chat_stream(
        f"{edge.api}/v1/chat/completions", {**chat, "stream": True}, "cloud", kill_at_the_eighth
    )
    assert done
    assert {c["id"] for c in chunks} == {chunks[0]["id"]} and {c["model"] for c in chunks} == {"demo-glm"}
    assert [c for c in chunks if c["choices"] and c["choices"][0]["delta"].get("role")] == chunks[:1]
    assert chunks[-1]["served_by"] == "cloud→local"
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    ids = [i for c in chunks for i in c["choices"][0].get("token_ids") or []]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    # The break came mid-answer, and the device went on from the cloud's token ids.
    assert "continued locally from its token ids" in edge.log_text()
    m = scrape_metrics(edge.api)
    assert m["autoglm_edge_cloud_streams_resumed_total"] == 1

    # The device's own answer to the same chat, unbroken (the cloud is gone: cloud_first
    # serves it locally): the resumed stream is exactly it, and its start was the pool's.
    r = httpx.post(f"{edge.api}/v1/chat/completions", json=chat, timeout=120)
    assert r.status_code == 200 and r.headers["x-autoglm-served-by"] == "local"
    alone = r.json()["choices"][0]
    assert ids == alone["token_ids"] and text == alone["message"]["content"]
    assert ids[:8] == reference["choices"][0]["token_ids"][:8]


def test_a_local_answer_that_fills_the_local_context_goes_on_in_the_cloud(
    tmp_path: Path, demo_source: Path, edge_behind_a_pool: EdgeBehindAPool
) -> None:
    """The other way round: the device's package holds 512 positions, the pool's model (the same
    weights, configured for 1,024) more; a local stream that reaches the local limit is continued
    by the pool (``continue_final_message``) as the same stream, ``served_by: local→cloud``."""
    longer = tmp_path / "longer"
    shutil.copytree(demo_source, longer)
    config = json.loads((longer / "config.json").read_text())
    config["max_position_embeddings"] = 1024
    (longer / "config.json").write_text(json.dumps(config))
    _, edge = edge_behind_a_pool(longer, {})
    question = "def main():\n" + "    x = compute(x)\n" * 54
    chat = {
        "model": "demo-glm",
        "messages": [{"role": "user", "content": question}],
        "temperature": 0,
        "max_tokens": 200,
    }
    # What the device says alone (not streamed: nothing goes on elsewhere): cut by its context.
    answer = httpx.post(
        f"{edge.api}/v1/chat/completions",
        json={k: v for k, v in chat.items() if k != "max_tokens"} | {"stream": False},
        timeout=120,
    )
    assert answer.headers["x-autoglm-served-by"] == "local"
    local = answer.json()
    assert local["choices"][0]["finish_reason"] == "length"
    room = local["usage"]["completion_tokens"]
    assert 0 < room < 128, local["usage"]

    body = {k: v for k, v in chat.items() if k != "max_tokens"} | {"stream": True}
    chunks, done = _chat_stream(f"{edge.api}/v1/chat/completions", body, "local")
    assert done and all("error" not in c for c in chunks), chunks[-3:]
    assert {c["id"] for c in chunks} == {chunks[0]["id"]}
    assert [c for c in chunks if c["choices"] and c["choices"][0]["delta"].get("role")] == chunks[:1]
    assert chunks[-1]["served_by"] == "local→cloud"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text.startswith(local["choices"][0]["message"]["content"])
    assert len(text) > len(local["choices"][0]["message"]["content"])
    assert scrape_metrics(edge.api)["autoglm_edge_cloud_overflows_total"] == 1
