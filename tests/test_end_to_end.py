"""The first end-to-end path: a packaged model reaches an edge agent process over real MQTT and is served."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Callable, Iterator

import httpx
import pytest

from cloud.registry import ModelRegistry, RegistryEntry
from shared.messages import DesiredState, ModelRef, Phase
from shared.mqtt import BrokerSettings
from shared.signing import SigningKey
from tests.conftest import DEVICE, CloudSide, EdgeProcess, provisioned_device, start_edge, wait_dropped
from tests.services import scrape_metrics


@pytest.fixture(scope="module")
def served(
    broker, demo_package: RegistryEntry, registry: ModelRegistry, signing_key: SigningKey, tmp_path_factory
) -> Iterator[tuple[EdgeProcess, CloudSide]]:  # type: ignore[no-untyped-def]
    tenant = "e2e" + uuid.uuid4().hex[:8]
    settings = BrokerSettings(host=broker.host, port=broker.port)
    edge = start_edge(
        tmp_path_factory.mktemp("e2e"),
        device_id=DEVICE,
        tenant=tenant,
        broker=settings,
        trusted=[signing_key.public.b64],
    )
    cloud = CloudSide(settings, tenant, registry)
    try:
        cloud.drive(
            DesiredState(revision=1, model=demo_package.ref),
            lambda r: r.phase == Phase.ACTIVE and r.revision == 1,
        )
        edge.wait_ready()
        yield edge, cloud
    finally:
        edge.stop()


def _complete(edge: EdgeProcess, **body: object) -> httpx.Response:
    payload = {"model": "demo-glm", "prompt": "def main():\n", "max_tokens": 12, "temperature": 0, **body}
    return httpx.post(f"{edge.api}/v1/completions", json=payload, timeout=60)


def test_model_travels_over_mqtt_and_is_served(
    served: tuple[EdgeProcess, CloudSide], demo_package: RegistryEntry
) -> None:
    edge, cloud = served
    phases = [r.phase for r in cloud.reports]
    walk = [Phase.FETCHING, Phase.VERIFYING, Phase.STAGED, Phase.SMOKE_TESTING, Phase.ACTIVE]
    assert [p for p in phases if p in walk][-5:] == walk, phases
    final = cloud.reports[-1]
    assert final.active_slot == "a" and final.slots["a"] == demo_package.ref
    assert final.capabilities.providers[-1] == "CPUExecutionProvider"

    r = _complete(edge)
    assert r.status_code == 200, r.text
    assert r.headers["x-autoglm-served-by"] == "local"
    body = r.json()
    assert body["object"] == "text_completion"
    assert body["model"] == "demo-glm:1"
    assert body["choices"][0]["text"]
    assert body["usage"]["completion_tokens"] > 0

    # Every blob of the manifest arrived over MQTT into the agent's cache, and nothing else was needed.
    agent = httpx.get(f"{edge.api}/v1/agent", timeout=5).json()
    assert agent["online"] is True
    assert agent["fetch"]["chunks_received"] >= sum(b.chunk_count for b in demo_package.manifest.blobs())
    cache = edge.data_dir / "blobs" / "sha256"
    for blob in demo_package.manifest.blobs():
        hexd = blob.digest.split(":")[1]
        assert (cache / hexd[:2] / hexd).stat().st_size == blob.size


def test_malformed_payloads_are_dropped_with_a_log_line_and_serving_goes_on(
    served: tuple[EdgeProcess, CloudSide],
) -> None:
    edge, cloud = served
    before = httpx.get(f"{edge.api}/v1/agent", timeout=5).json()["dropped_messages"]
    t = cloud.topics
    good = json.loads(DesiredState(revision=1).to_json())
    cloud.publish_raw(
        [
            (t.desired(DEVICE), b"{this is not json"),
            (t.desired(DEVICE), json.dumps({**good, "schema": "autoglm.mqtt/v99"}).encode()),
            (t.desired(DEVICE), json.dumps({**good, "revision": "many"}).encode()),
            (t.desired(DEVICE), b"\xff" * 300_000),
            (t.commands(DEVICE), b'{"schema": "autoglm.mqtt/v3", "kind": "command"}'),
        ]
    )
    assert wait_dropped(edge, before + 5) == before + 5
    log = edge.log_text()
    assert log.count("dropped malformed message") >= 5
    assert "unsupported schema 'autoglm.mqtt/v99'" in log
    assert "exceeds the 262144-byte limit" in log
    assert edge.proc.poll() is None
    r = _complete(edge)
    assert r.status_code == 200 and r.json()["choices"][0]["text"]


def test_manifest_from_an_untrusted_key_is_refused_and_the_old_model_keeps_serving(
    served: tuple[EdgeProcess, CloudSide], demo_package: RegistryEntry, registry: ModelRegistry
) -> None:
    from shared.manifest import SignedManifest

    edge, cloud = served
    forged = SignedManifest.sign(
        demo_package.manifest.model_copy(update={"version": "forged"}), SigningKey.generate()
    )
    data = forged.to_json()
    ref = ModelRef(name="demo-glm", version="forged", manifest_digest=forged.digest, manifest_size=len(data))
    # The cloud serves only what its registry lists; the forged manifest comes from an attacker on
    # the broker, who publishes it on its blob topic until the device has taken it.
    stop = threading.Event()

    def attacker() -> None:
        while not stop.wait(0.3):
            cloud.publish_raw([(cloud.topics.blob_chunk(forged.digest, 0), data)])

    thread = threading.Thread(target=attacker, daemon=True)
    thread.start()
    try:
        report = cloud.drive(DesiredState(revision=2, model=ref), lambda r: r.phase == Phase.FAILED)
    finally:
        stop.set()
        thread.join(5)
    assert report.last_error is not None and report.last_error.code == "signature_rejected"
    assert "untrusted key" in report.last_error.message
    assert report.active_slot == "a" and report.slots["a"] == demo_package.ref
    r = _complete(edge)
    assert r.status_code == 200 and r.json()["model"] == "demo-glm:1"


def test_streaming_returns_the_same_text_as_a_plain_request(served: tuple[EdgeProcess, CloudSide]) -> None:
    edge, _ = served
    plain = _complete(edge, max_tokens=20).json()["choices"][0]["text"]
    pieces: list[str] = []
    finish = None
    with httpx.stream(
        "POST",
        f"{edge.api}/v1/completions",
        json={
            "model": "demo-glm",
            "prompt": "def main():\n",
            "max_tokens": 20,
            "temperature": 0,
            "stream": True,
        },
        timeout=60,
    ) as r:
        assert r.status_code == 200
        assert r.headers["x-autoglm-served-by"] == "local"
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    for line in lines[:-1]:
        choice = json.loads(line[6:])["choices"][0]
        pieces.append(choice["text"])
        finish = choice.get("finish_reason") or finish
    assert "".join(pieces) == plain
    assert finish in ("length", "stop")


def test_openai_client_works_unchanged(served: tuple[EdgeProcess, CloudSide]) -> None:
    from openai import OpenAI

    edge, _ = served
    client = OpenAI(base_url=f"{edge.api}/v1", api_key="unused")
    out = client.completions.create(model="demo-glm", prompt="import ", max_tokens=8, temperature=0)
    assert out.choices[0].text
    assert out.usage is not None and out.usage.completion_tokens > 0
    assert [m.id for m in client.models.list().data] == ["demo-glm:1"]

    chat = client.chat.completions.create(
        model="demo-glm",
        messages=[{"role": "system", "content": "You write Python."}, {"role": "user", "content": "A loop:"}],
        max_tokens=12,
        temperature=0,
    )
    assert chat.object == "chat.completion"
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].finish_reason in ("stop", "length")
    assert chat.usage is not None and chat.usage.prompt_tokens > 5

    # Streaming through the client gives the same greedy text as the plain call, for chat and completions.
    pieces = client.chat.completions.create(
        model="demo-glm",
        messages=[{"role": "system", "content": "You write Python."}, {"role": "user", "content": "A loop:"}],
        max_tokens=12,
        temperature=0,
        stream=True,
    )
    chunks = list(pieces)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == chat.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == chat.choices[0].finish_reason

    plain = client.completions.create(model="demo-glm", prompt="import ", max_tokens=10, temperature=0)
    streamed = client.completions.create(
        model="demo-glm", prompt="import ", max_tokens=10, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == plain.choices[0].text


def test_models_show_the_digest_a_request_may_pin(
    served: tuple[EdgeProcess, CloudSide], demo_package: RegistryEntry
) -> None:
    edge, _ = served
    digest = demo_package.ref.manifest_digest
    cards = httpx.get(f"{edge.api}/v1/models", timeout=10).json()["data"]
    assert [(c["id"], c["digest"]) for c in cards] == [("demo-glm:1", digest)]
    assert _complete(edge, model=f"demo-glm@{digest}").status_code == 200
    assert _complete(edge, model=f"default@{digest}").status_code == 200
    other = "sha256:" + "0" * 64
    refused = _complete(edge, model=f"demo-glm@{other}")
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "conflict"
    assert f"demo-glm:1@{digest} (slot a)" in refused.json()["error"]["message"]
    assert _complete(edge, model=f"other-model@{digest}").status_code == 409
    bad = _complete(edge, model="demo-glm@latest")
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "model"


def test_chat_errors_use_the_envelope(served: tuple[EdgeProcess, CloudSide]) -> None:
    edge, _ = served
    url = f"{edge.api}/v1/chat/completions"
    r = httpx.post(url, json={"model": "demo-glm", "messages": []}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}]
    r = httpx.post(url, json={"model": "demo-glm", "messages": image}, timeout=30)
    assert r.status_code == 400 and "only text" in r.json()["error"]["message"]


def test_metrics_expose_requests_tokens_queue_model_phase_outbox_and_presence(
    served: tuple[EdgeProcess, CloudSide],
) -> None:
    edge, _ = served
    assert _complete(edge).status_code == 200
    samples = scrape_metrics(edge.api)
    assert (
        samples['autoglm_edge_requests_total{endpoint="/v1/completions",served_by="local",status="200"}'] >= 1
    )
    assert samples["autoglm_edge_completion_tokens_total"] > 0
    assert samples["autoglm_edge_decode_tokens_per_second"] > 0
    assert samples["autoglm_edge_queue_depth"] == 0
    assert samples["autoglm_edge_queue_capacity"] == 16
    assert samples['autoglm_edge_active_model{model="demo-glm:1",slot="a"}'] == 1
    phase = httpx.get(f"{edge.api}/v1/agent", timeout=10).json()["reported"]["phase"]
    assert samples[f'autoglm_edge_update_phase{{phase="{phase}"}}'] == 1
    assert sum(v for k, v in samples.items() if k.startswith("autoglm_edge_update_phase{")) == 1
    assert samples["autoglm_edge_online"] == 1
    assert "autoglm_edge_outbox_depth" in samples
    assert samples["autoglm_edge_outbox_delivered_total"] >= 1


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"prompt": None}, 400, "prompt"),
        ({"max_tokens": 0}, 400, "max_tokens"),
        ({"temperature": 5}, 400, "temperature"),
        ({"model": "other-model"}, 404, "model"),
        ({"prompt": "x " * 5000}, 400, "prompt"),
        ({"prompt": ["a", "b"]}, 400, "prompt"),
    ],
)
def test_bad_requests_get_the_openai_error_envelope(
    served: tuple[EdgeProcess, CloudSide],
    body: dict,
    status: int,
    param: str,  # type: ignore[type-arg]
) -> None:
    edge, _ = served
    r = _complete(edge, **body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"]
    assert err["param"] == param


def test_api_key_is_enforced_when_configured(
    broker_settings: BrokerSettings,
    tenant: str,
    signing_key: SigningKey,
    edge_factory: Callable[..., EdgeProcess],
) -> None:
    edge = edge_factory(
        device_id="dev-key",
        tenant=tenant,
        broker=broker_settings,
        trusted=[signing_key.public.b64],
        api_key="s3cret",
    )
    edge.wait_http("/healthz", timeout=60)
    denied = httpx.get(f"{edge.api}/v1/models", timeout=5)
    assert denied.status_code == 401 and denied.json()["error"]["type"] == "authentication_error"
    auth = {"Authorization": "Bearer s3cret"}
    ok = httpx.get(f"{edge.api}/v1/models", headers=auth, timeout=5)
    assert ok.status_code == 200 and ok.json()["data"] == []
    not_ready = httpx.post(
        f"{edge.api}/v1/completions", json={"model": "x", "prompt": "hi"}, headers=auth, timeout=5
    )
    assert not_ready.status_code == 503 and not_ready.json()["error"]["code"] == "model_not_ready"


def test_restarted_agent_serves_its_active_slot_with_no_broker(
    broker_settings: BrokerSettings,
    tenant: str,
    demo_package: RegistryEntry,
    registry: ModelRegistry,
    signing_key: SigningKey,
    edge_factory: Callable[..., EdgeProcess],
) -> None:
    first = provisioned_device(
        edge_factory,
        broker=broker_settings,
        tenant=tenant,
        registry=registry,
        trusted=[signing_key.public.b64],
        model=demo_package,
    )

    # Same device and data folder, but the broker is now a port nobody listens on.
    from cloud.mqtt.local_broker import free_port

    offline = BrokerSettings(host="127.0.0.1", port=free_port())
    again = edge_factory(device_id=DEVICE, tenant=tenant, broker=offline, trusted=[signing_key.public.b64])
    assert again.data_dir == first.data_dir
    assert again.wait_ready(timeout=60)["model"] == "demo-glm:1"
    r = httpx.post(
        f"{again.api}/v1/completions",
        json={"model": "demo-glm", "prompt": "import ", "max_tokens": 6, "temperature": 0},
        timeout=60,
    )
    assert r.status_code == 200 and r.json()["choices"][0]["text"]
    agent = httpx.get(f"{again.api}/v1/agent", timeout=5).json()
    assert agent["online"] is False
    assert agent["reported"]["phase"] == "active" and agent["reported"]["active_slot"] == "a"
    assert "unreachable" in again.log_text()
