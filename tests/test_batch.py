"""The Batch API on a real edge agent process: a batch submitted with the ``openai`` client while the
broker and the cloud are unreachable, the agent killed in the middle, every result present exactly
once after the cloud is back; and bad input to the new endpoints answered with 4xx, never 500."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai

from cloud.mqtt.local_broker import LocalBroker, free_port
from cloud.registry import ModelRegistry, RegistryEntry
from shared.mqtt import BrokerSettings
from shared.signing import SigningKey
from tests.conftest import DEVICE, EdgeProcess, provisioned_device
from tests.services import Service, eventually, start_pool

REQUESTS = 50
# A model the device does not have: only the pool serves it.
CLOUD_MODEL = "cloud-glm"


def _request(i: int) -> dict[str, Any]:
    local = i % 2 == 0
    return {
        "custom_id": f"task-{i}",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {
            "model": "demo-glm" if local else CLOUD_MODEL,
            "messages": [{"role": "user", "content": f"def task_{i}():"}],
            "max_tokens": 12 if local else 2,
            "temperature": 0,
        },
    }


def _batch(client: openai.OpenAI, batch_id: str) -> Any:
    return client.batches.retrieve(batch_id)


def test_a_batch_waits_out_an_outage_and_a_restart_and_every_result_arrives_once(
    tmp_path: Path,
    private_broker: LocalBroker,
    tenant: str,
    registry: ModelRegistry,
    signing_key: SigningKey,
    demo_package: RegistryEntry,
    demo_source: Path,
    edge_factory: Callable[..., EdgeProcess],
) -> None:
    broker = BrokerSettings(
        host=private_broker.host, port=private_broker.port, reconnect_initial_s=0.2, reconnect_max_s=1.0
    )
    trusted = [signing_key.public.b64]
    provisioned_device(
        edge_factory, broker=broker, tenant=tenant, registry=registry, trusted=trusted, model=demo_package
    )

    # Offline: no broker, and the cloud's port chosen but nothing listening on it yet.
    started = time.monotonic()
    private_broker.stop()
    pool_port = free_port()
    start: dict[str, Any] = {
        "device_id": DEVICE,
        "tenant": tenant,
        "broker": broker,
        "trusted": trusted,
        "extra": {
            "router": {"cloud_url": f"http://127.0.0.1:{pool_port}/v1", "cloud_timeout_s": 30.0},
            "fallback": {"breaker_failures": 3, "breaker_reset_s": 0.5, "connect_timeout_s": 1.0},
            "batch": {"idle_s": 0.0, "cloud_retry_initial_s": 0.2, "cloud_retry_max_s": 1.0},
        },
    }
    edge = edge_factory(**start)
    edge.wait_ready(timeout=60)

    path = tmp_path / "batch.jsonl"
    path.write_text("".join(json.dumps(_request(i)) + "\n" for i in range(REQUESTS)))
    client = openai.OpenAI(base_url=f"{edge.api}/v1", api_key="unused", max_retries=0)
    with path.open("rb") as f:
        uploaded = client.files.create(file=f, purpose="batch")
    assert uploaded.purpose == "batch" and uploaded.bytes == path.stat().st_size
    batch = client.batches.create(
        input_file_id=uploaded.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"test": "outage"},
    )
    assert batch.status == "in_progress" and batch.request_counts is not None
    assert batch.request_counts.total == REQUESTS

    # Killed (SIGKILL, no goodbye) once some local requests are done and before all are.
    at_kill = eventually(
        lambda: (n := _batch(client, batch.id).request_counts.completed) >= 3 and n,
        60,
        "the first local results",
        interval=0.02,
    )
    edge.kill()
    assert at_kill < REQUESTS // 2, at_kill
    edge = edge_factory(**start)
    edge.wait_ready(timeout=60)
    client = openai.OpenAI(base_url=f"{edge.api}/v1", api_key="unused", max_retries=0)

    # The local half finishes while the broker and the cloud are still away; the other half waits.
    local_done = eventually(
        lambda: (b := _batch(client, batch.id)).request_counts.completed == REQUESTS // 2 and b,
        60,
        "the local half of the batch",
        context=lambda: edge.log_text()[-3000:],
    )
    assert local_done.status == "in_progress" and local_done.request_counts.failed == 0
    # The last request of the file, one for the cloud, may still be on its way to waiting_cloud.
    agent = eventually(
        lambda: (
            (a := httpx.get(f"{edge.api}/v1/agent", timeout=10).json())["batch"]["pending_local"] == 0 and a
        ),
        10,
        "every cloud request to wait for the cloud",
    )
    assert agent["online"] is False and agent["batch"]["waiting_cloud"] == REQUESTS // 2
    assert 0 < agent["batch"]["served"]["local"] <= REQUESTS // 2 - at_kill  # this process's share
    back = time.time()

    private_broker.start()
    pool: Service = start_pool(demo_source, name=CLOUD_MODEL, port=pool_port, max_batch=8)
    try:
        done = eventually(
            lambda: (b := _batch(client, batch.id)).status == "completed" and b,
            60,
            "the batch to complete",
            context=lambda: edge.log_text()[-3000:],
        )
    finally:
        pool.stop()
    assert done.request_counts.completed == REQUESTS and done.request_counts.failed == 0
    assert done.error_file_id is None and done.output_file_id is not None
    assert done.metadata == {"test": "outage"}

    text = client.files.content(done.output_file_id).text
    lines = [json.loads(x) for x in text.splitlines()]
    assert len(lines) == REQUESTS
    assert sorted(x["custom_id"] for x in lines) == sorted(f"task-{i}" for i in range(REQUESTS))
    for line in lines:
        i = int(line["custom_id"].split("-")[1])
        response = line["response"]
        assert response["status_code"] == 200 and line["error"] is None, line
        body = response["body"]
        assert body["object"] == "chat.completion" and body["choices"][0]["message"]["role"] == "assistant"
        if i % 2 == 0:
            assert response["served_by"] == "local" and body["model"] == "demo-glm:1"
            assert body["created"] <= back, "a local result was made after the cloud came back"
        else:
            assert response["served_by"] == "cloud" and body["model"] == CLOUD_MODEL
    print(f"{at_kill} done at the kill; {time.monotonic() - started:.1f}s from going offline to complete")
    assert "Traceback" not in edge.log_text()


def _completions(numbers: range) -> bytes:
    body = {"model": "demo-glm", "prompt": "x", "max_tokens": 2}
    lines = [
        {"custom_id": f"c{i}", "method": "POST", "url": "/v1/completions", "body": body} for i in numbers
    ]
    return "".join(json.dumps(x) + "\n" for x in lines).encode()


def _post_file(base: str, content: bytes, purpose: str = "batch", **kw: Any) -> httpx.Response:
    return httpx.post(
        f"{base}/v1/files",
        files={"file": ("in.jsonl", content, "application/jsonl")},
        data={"purpose": purpose},
        timeout=30,
        **kw,
    )


def _refused(r: httpx.Response, status: int, param: str | None = None, says: str = "") -> dict[str, Any]:
    assert r.status_code == status, (r.status_code, r.text)
    error: dict[str, Any] = r.json()["error"]
    assert error["message"] and says in error["message"], error
    if param is not None:
        assert error["param"] == param, error
    return error


def test_the_batch_endpoints_refuse_bad_input_with_4xx_and_cancel_what_cannot_run(
    broker_settings: BrokerSettings,
    tenant: str,
    signing_key: SigningKey,
    edge_factory: Callable[..., EdgeProcess],
) -> None:
    key = "batch-secret"
    # No model and no cloud: a batch here can only wait, which is what cancelling is for.
    edge = edge_factory(
        device_id="batch-api",
        tenant=tenant,
        broker=broker_settings,
        trusted=[signing_key.public.b64],
        api_key=key,
        extra={"batch": {"max_file_bytes": 4096, "max_lines": 10}},
    )
    edge.wait_http("/healthz", timeout=60)
    base = edge.api
    auth = {"authorization": f"Bearer {key}"}
    good = _completions(range(3))
    _refused(_post_file(base, good), 401)
    _refused(httpx.get(f"{base}/v1/batches", timeout=10), 401)
    _refused(_post_file(base, good, "fine-tune", headers=auth), 400, "purpose", "only 'batch'")
    _refused(_post_file(base, b"", headers=auth), 400, "file", "empty")
    _refused(_post_file(base, b"x" * 5000, headers=auth), 413, "file", "max_file_bytes")
    _refused(httpx.post(f"{base}/v1/files", data={"purpose": "batch"}, headers=auth, timeout=10), 400, "file")
    _refused(httpx.post(f"{base}/v1/files", json={"purpose": "batch"}, headers=auth, timeout=10), 400)
    two_files = [("file", ("a.jsonl", good)), ("file", ("b.jsonl", good))]
    _refused(
        httpx.post(f"{base}/v1/files", data={"purpose": "batch"}, files=two_files, headers=auth, timeout=10),
        400,
        "file",
        "more than one",
    )
    # Far over the cap: refused before it is read.
    _refused(_post_file(base, b"x" * (1 << 20), headers=auth), 413)

    client = openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0)
    uploaded = client.files.create(file=("in.jsonl", good), purpose="batch")
    assert client.files.retrieve(uploaded.id).filename == "in.jsonl"
    assert client.files.content(uploaded.id).content == good
    bad_lines = (
        good + b'{"custom_id": "c9", "method": "POST", "url": "/v1/completions", "body": {"model": "m"}}\n'
    )
    bad = client.files.create(file=("bad.jsonl", bad_lines), purpose="batch")
    too_many = client.files.create(file=("many.jsonl", _completions(range(11))), purpose="batch")

    def create(**body: Any) -> httpx.Response:
        fields = {"input_file_id": uploaded.id, "endpoint": "/v1/completions", "completion_window": "24h"}
        return httpx.post(f"{base}/v1/batches", json={**fields, **body}, headers=auth, timeout=30)

    _refused(create(input_file_id="file-nope"), 404, "input_file_id")
    _refused(create(input_file_id=7), 400, "input_file_id")
    _refused(create(endpoint="/v1/embeddings"), 400, "endpoint")
    _refused(create(endpoint="/v1/chat/completions"), 400, "input_file_id", "line 1: url '/v1/completions'")
    _refused(create(completion_window="1h"), 400, "completion_window")
    _refused(create(metadata={f"k{i}": "v" for i in range(17)}), 400, "metadata")
    _refused(create(metadata={"k": 1}), 400, "metadata")
    _refused(create(input_file_id=bad.id), 400, "input_file_id", "line 4: body.prompt")
    _refused(
        create(input_file_id=too_many.id), 400, "input_file_id", "line 11: the input file has more than 10"
    )
    _refused(
        httpx.post(
            f"{base}/v1/batches", content=b"{not json", headers={**auth, "content-type": "application/json"}
        ),
        400,
    )
    for method, path in [
        ("GET", "/v1/batches/batch_nope"),
        ("POST", "/v1/batches/batch_nope/cancel"),
        ("GET", "/v1/files/file-nope"),
        ("GET", "/v1/files/file-nope/content"),
        ("DELETE", "/v1/files/file-nope"),
    ]:
        _refused(httpx.request(method, f"{base}{path}", headers=auth, timeout=10), 404)
    _refused(httpx.get(f"{base}/v1/batches", params={"limit": 0}, headers=auth, timeout=10), 400, "limit")

    # A good batch that nothing here can serve waits; cancelled, it ends with an error line each.
    batch = client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/completions", completion_window="24h"
    )
    assert [b.id for b in client.batches.list(limit=5).data] == [batch.id]
    cancelled = client.batches.cancel(batch.id)
    assert cancelled.status == "cancelled" and cancelled.request_counts is not None
    assert cancelled.request_counts.failed == 3 and cancelled.error_file_id is not None
    errors = [json.loads(x) for x in client.files.content(cancelled.error_file_id).text.splitlines()]
    assert [(e["custom_id"], e["error"]["code"]) for e in errors] == [
        (f"c{i}", "batch_cancelled") for i in range(3)
    ]
    _refused(httpx.post(f"{base}/v1/batches/{batch.id}/cancel", headers=auth, timeout=10), 409)
    assert client.files.delete(uploaded.id).deleted
    assert uploaded.id not in {f.id for f in client.files.list().data}
    assert "Traceback" not in edge.log_text()
