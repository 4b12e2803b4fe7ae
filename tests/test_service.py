"""The control plane's process wiring (cloud/plane/service.py), in process: what an operator sees when
its background loop dies. The loops themselves are exercised with real processes in
tests/test_control_plane.py."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from fastapi.testclient import TestClient

from cloud.plane.app import create_app
from cloud.plane.service import ControlPlane
from cloud.settings import CloudSettings
from tests.services import control_key_file


def test_a_dead_control_loop_is_logged_with_its_reason_and_fails_readiness(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken_driver(self: ControlPlane) -> None:
        raise RuntimeError("the database went away")

    monkeypatch.setattr(ControlPlane, "drive_forever", broken_driver)
    settings = CloudSettings.model_validate(
        {
            "database_url": f"sqlite:///{tmp_path / 'cp.sqlite3'}",
            "registry_dir": str(tmp_path / "registries"),
            "broker": {"host": "127.0.0.1", "port": 9},  # nothing listens: the MQTT task just retries
            "control": {"key_file": str(control_key_file(tmp_path))},
        }
    )
    with caplog.at_level(logging.ERROR), TestClient(create_app(settings)) as client:
        r = client.get("/readyz")
        for _ in range(50):
            if r.status_code == 503:
                break
            time.sleep(0.05)
            r = client.get("/readyz")
        assert r.status_code == 503
        assert "the database went away" in r.json()["reason"]
    stopped = [rec for rec in caplog.records if "the control loop stopped" in rec.getMessage()]
    assert stopped and "the database went away" in stopped[0].getMessage()
    assert stopped[0].exc_info is not None


def test_a_control_plane_without_its_broker_stays_ready_and_says_so(tmp_path: Path) -> None:
    """The API, console and gateway work without the broker, which restarts after every
    enrolment: a 503 took every replica out of the Service at once."""
    settings = CloudSettings.model_validate(
        {
            "database_url": f"sqlite:///{tmp_path / 'cp.sqlite3'}",
            "registry_dir": str(tmp_path / "registries"),
            "broker": {"host": "127.0.0.1", "port": 9},  # nothing listens
            "control": {"key_file": str(control_key_file(tmp_path))},
        }
    )
    with TestClient(create_app(settings)) as client:
        r = client.get("/readyz")
        assert r.status_code == 200 and r.json()["ready"] and r.json()["broker_offline"] == ["default"]


def _isolated_plane(
    tmp_path: Path, scopes: tuple[str, ...], **overrides: Any
) -> tuple[CloudSettings, dict[str, str]]:
    """Settings of a control plane with no broker (its MQTT task keeps retrying) and a pool that
    cannot be reached, and a key per scope."""
    from cloud.plane.auth import ApiKeys, Scope
    from cloud.plane.store import make_engine, migrate

    db = overrides.pop("database_url", None) or f"sqlite:///{tmp_path / 'cp.sqlite3'}"
    engine = make_engine(db)
    migrate(engine)
    keys = {scope: ApiKeys(engine).create("default", scope, cast(Scope, scope))[1] for scope in scopes}
    engine.dispose()
    settings = CloudSettings.model_validate(
        {
            "database_url": db,
            "registry_dir": str(tmp_path / "registries"),
            "broker": {"host": "127.0.0.1", "port": 9},
            "control": {"key_file": str(control_key_file(tmp_path))},
            "gateway": {"upstreams": [{"url": "http://127.0.0.1:9/v1", "name": "nowhere"}]},
        }
        | overrides
    )
    return settings, keys


@pytest.fixture
def plane_client(tmp_path: Path) -> Iterator[tuple[TestClient, str]]:
    """The control-plane app in process (no broker: its MQTT task keeps retrying) and an admin key."""
    settings, keys = _isolated_plane(tmp_path, ("admin",))
    key = keys["admin"]
    with TestClient(create_app(settings)) as client:
        yield client, key


def test_openapi_lists_a_response_model_for_every_route(plane_client: tuple[TestClient, str]) -> None:
    client, _ = plane_client
    spec = client.get("/openapi.json").json()
    missing = []
    for path, methods in spec["paths"].items():
        for method, op in methods.items():
            ok = next(c for c in ("200", "201") if c in op["responses"])
            content = op["responses"][ok].get("content", {})
            schemas = [c.get("schema", {}) for c in content.values()]
            if not any(s.get("$ref") or s.get("type") for s in schemas):
                missing.append(f"{method.upper()} {path}")
    assert not missing, missing
    assert spec["paths"]["/v1/devices"]["get"]["responses"]["200"]["content"]["application/json"][
        "schema"
    ] == {"$ref": "#/components/schemas/DeviceList"}


def test_rest_answers_match_their_views(plane_client: tuple[TestClient, str]) -> None:
    client, key = plane_client
    auth = {"authorization": f"Bearer {key}"}
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/v1/devices", headers=auth).json() == {"devices": [], "next_after": None}
    assert client.get("/v1/rollouts", headers=auth).json() == {"rollouts": []}
    assert client.get("/v1/models", headers=auth).json() == {"object": "list", "data": [], "models": []}
    made = client.post("/v1/keys", json={"name": "ci", "scope": "inference"}, headers=auth)
    assert made.status_code == 201 and made.json()["key"].startswith("agk_")
    assert made.json()["scope"] == "inference" and made.json()["revoked"] is False
    inference = {"authorization": f"Bearer {made.json()['key']}"}
    assert client.get("/v1/models", headers=inference).json() == {"object": "list", "data": []}
    listed = client.get("/v1/keys", headers=auth).json()["keys"]
    assert {k["name"] for k in listed} == {"admin", "ci"}
    gone = client.delete(f"/v1/keys/{made.json()['key_id']}", headers=auth)
    assert gone.json() == {"key_id": made.json()["key_id"], "revoked": True}
    state = client.get("/v1/gateway", headers=auth).json()
    assert [r["name"] for r in state["replicas"]] == ["nowhere"] and state["retries"] == 0
    missing = client.get("/v1/devices/nobody", headers=auth)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


# Bodies the gateway refuses, as raw bytes: the gateway's own ASGI routes must answer each as
# FastAPI's declared routes do.
_BAD_BODIES: list[tuple[str, bytes]] = [
    ("/v1/chat/completions", b""),
    ("/v1/chat/completions", b"{not json"),
    ("/v1/chat/completions", b"[1, 2]"),
    ("/v1/chat/completions", b'{"model": "m"}'),
    (
        "/v1/chat/completions",
        b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": "10"}',
    ),
    ("/v1/chat/completions", b'{"model": "m", "messages": [{"role": "user", "content": "a \\ud800 b"}]}'),
    ("/v1/chat/completions", b'{"model": "m", "messages": [{"role": "wizard", "content": "hi"}]}'),
    ("/v1/completions", b'{"model": "m", "prompt": "hi", "stream": "yes"}'),
    ("/v1/completions", b'{"model": "m", "prompt": "hi", "logit_bias": {"abc": 1}}'),
    ("/v1/completions", b'{"model": "m", "prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}'),
    ("/v1/completions", b"\xff\xfe"),
    ("/v1/completions", b'{"model": "\xff"}'),
    ("/v1/completions", b"null"),
    ("/v1/completions", b"[" * 4000),  # nested past the parser's recursion limit (and under the 4 KiB cap)
    # Valid: the pool cannot be reached (503 with Retry-After).
    ("/v1/completions", b'{"model": "m", "prompt": "hi"}'),
    (
        "/v1/chat/completions",
        b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": true}',
    ),
]


def test_gateway_routes_answer_as_the_fastapi_routes_they_replace(tmp_path: Path) -> None:
    """cloud/plane/gateway_routes.py answers the gateway's paths before FastAPI's routing: every
    refusal (key, scope, body) must be the one the declared routes give."""
    from cloud.plane.gateway_routes import GatewayRoutes

    settings, keys = _isolated_plane(
        tmp_path,
        ("inference", "pool", "admin"),
        gateway={"upstreams": [{"url": "http://127.0.0.1:9/v1", "name": "nowhere"}], "max_attempts": 1},
        api={"max_body_bytes": 4096},
    )
    plain = create_app(settings)
    plain.user_middleware = [m for m in plain.user_middleware if m.cls is not GatewayRoutes]
    assert len(plain.user_middleware) == len(create_app(settings).user_middleware) - 1

    inference = {"authorization": f"Bearer {keys['inference']}", "content-type": "application/json"}
    requests: list[tuple[str, str, bytes | list[bytes], dict[str, str]]] = [
        ("POST", p, b, inference) for p, b in _BAD_BODIES
    ]
    big = b'{"model": "m", "prompt": "' + b"x" * 5000 + b'"}'
    requests += [
        # Past api.max_body_bytes: said by its length, or found while reading a chunked body.
        ("POST", "/v1/completions", big, inference),
        ("POST", "/v1/completions", [big[:3000], big[3000:]], inference),
        # Not sent as JSON: FastAPI does not read it as JSON (nor, then, do the gateway's routes).
        (
            "POST",
            "/v1/completions",
            b'{"model": "m", "prompt": "hi"}',
            {**inference, "content-type": "text/plain"},
        ),
        (
            "POST",
            "/v1/completions",
            b'{"model": "m", "prompt": "hi"}',
            {"authorization": inference["authorization"]},
        ),
        (
            "POST",
            "/v1/completions",
            b'{"model": "m"}',
            {**inference, "content-type": "application/x+json; charset=utf-8"},
        ),
        ("POST", "/v1/completions", b'{"model": "m", "prompt": "hi"}', {}),
        # Not JSON and no key: FastAPI refuses the body first.
        ("POST", "/v1/completions", b"{not json", {"content-type": "application/json"}),
        ("POST", "/v1/completions", b'{"model": "m"}', {"content-type": "application/json"}),
        ("POST", "/v1/completions", b'{"model": "m", "prompt": "hi"}', {"authorization": "Bearer agk_nope"}),
        ("POST", "/v1/completions", b'{"model": "m", "prompt": "hi"}', {"authorization": keys["inference"]}),
        ("POST", "/v1/chat/completions", b"{}", {"authorization": f"Bearer {keys['pool']}"}),
        ("POST", "/v1/chat/completions", b"{}", {"authorization": f"bearer {keys['admin']}"}),
        ("GET", "/v1/chat/completions", b"", {"authorization": f"Bearer {keys['admin']}"}),
    ]
    answers: list[list[tuple[int, object, str | None]]] = []
    for app in (create_app(settings), plain):
        with TestClient(app) as client:
            seen = []
            for method, path, body, headers in requests:
                content = iter(body) if isinstance(body, list) else body  # a list: sent chunked
                r = client.request(method, path, content=content, headers=headers)
                seen.append((r.status_code, r.json(), r.headers.get("retry-after")))
            answers.append(seen)
    ours, fastapi = answers
    for request, mine, theirs in zip(requests, ours, fastapi, strict=True):
        assert mine == theirs, request
    statuses = [status for status, _, _ in ours]
    assert statuses.count(400) == 19 and statuses.count(503) == 2 and statuses.count(413) == 2, statuses
    assert statuses[-8:] == [401, 400, 401, 401, 401, 403, 400, 405], statuses


def test_the_drivers_desired_states_do_not_wait_for_a_broker_that_is_down(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """With the session down, each state would wait 30 s for it (200 at a time: a 10,000-device
    wave held the driver for 25 minutes); the driver's are left for it to publish again."""
    import asyncio

    from cloud.plane.fleet import DesiredRecord

    settings = CloudSettings.model_validate(
        {
            "database_url": f"sqlite:///{tmp_path / 'cp.sqlite3'}",
            "registry_dir": str(tmp_path / "registries"),
            "broker": {"host": "127.0.0.1", "port": 9},
            "control": {"key_file": str(control_key_file(tmp_path))},
        }
    )
    plane = ControlPlane(settings)
    tenant = next(iter(plane.links))
    items = [DesiredRecord(tenant, f"d{i}", 1, None, {}, False) for i in range(1000)]
    try:
        with caplog.at_level(logging.WARNING):
            started = time.perf_counter()
            asyncio.run(plane.publish(items, wait_connected=False))
            assert time.perf_counter() - started < 5
        assert "1000 desired state(s) left for the driver" in caplog.text
    finally:
        plane.close()


def test_an_operator_hears_when_the_broker_is_down_and_bad_input_stays_a_quick_400(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no broker: a command is answered 503 (it waited without end), a config push 503
    naming what was recorded but not published (it answered 200 and the config was lost). A
    selector made to backtrack is refused at once (32,000 characters held the event loop 9 s),
    a lone surrogate in a label is a 400 (its echo in the message made the error handler fail:
    a 500 and a dropped connection), and so is a label with a trailing newline."""
    import cloud.mqtt.control_link as control_link
    import cloud.plane.service as service
    from cloud.plane.fleet import Fleet
    from cloud.plane.store import make_engine
    from shared.errors import ModelInUse
    from shared.messages import DeviceStatus, ModelRef

    monkeypatch.setattr(control_link, "CONNECT_WAIT_S", 0.3)
    monkeypatch.setattr(service, "PUBLISH_TIMEOUT_S", 0.3)
    settings, keys = _isolated_plane(tmp_path, ("admin",))
    engine = make_engine(settings.database_url)
    fleet = Fleet(engine)
    fleet.record([("default", DeviceStatus(device_id=d, state="online")) for d in ("d0", "d1")])
    model = ModelRef(name="m", version="1", manifest_digest="sha256:" + "c" * 64, manifest_size=10)
    fleet.next_desired("default", "d1", model=model)
    auth = {"authorization": f"Bearer {keys['admin']}"}
    with TestClient(create_app(settings)) as client:
        r = client.post("/v1/devices/d0/commands", json={"action": "ping", "wait_s": 0}, headers=auth)
        assert r.status_code == 503 and r.json()["error"]["code"] == "broker_unavailable", r.text
        r = client.post("/v1/config", json={"selector": "", "config": {}}, headers=auth)
        assert r.status_code == 503 and "could not be published to 2" in r.json()["error"]["message"], r.text
        assert r.headers["retry-after"]
        started = time.monotonic()
        for selector in ("a" * 32_000 + "!", "a" * 3_000 + "!"):
            r = client.post("/v1/config", json={"selector": selector, "config": {}}, headers=auth)
            assert r.status_code == 400 and len(r.text) < 2_000, r.text[:300]
        r = client.get("/v1/devices", params={"selector": "a" * 4_000 + "!"}, headers=auth)
        assert r.status_code == 400
        assert time.monotonic() - started < 2
        for labels in ({"\ud800": "x"}, {"tier": "canary\n"}, {"site\n": "x"}):
            r = client.put(
                "/v1/devices/d0/labels",
                content=json.dumps({"labels": labels}),
                headers={**auth, "content-type": "application/json"},
            )
            assert r.status_code == 400, (labels, r.status_code, r.text)
        assert client.get("/healthz").status_code == 200  # the connection survived
        # A model a device is told to run cannot be deleted: one that restarts would fetch it.
        plane: ControlPlane = client.app.state.plane  # type: ignore[attr-defined]
        with pytest.raises(ModelInUse, match="d1"):
            plane.delete_model("default", "m", "1")
    engine.dispose()


def test_devices_come_in_pages_rollouts_without_their_device_lists_and_keys_are_named_sanely(
    tmp_path: Path,
) -> None:
    """A fleet is paged by device id (``limit``, ``after``, ``next_after``), selectors apply
    within pages; rollouts list with wave counts alone on ``?devices=false``; a key's name has
    no control characters and its lifetime is at least a second (1e-300 s made a dead key)."""
    from cloud.plane.fleet import Fleet
    from cloud.plane.rollouts.actions import Rollouts
    from cloud.plane.rollouts.spec import RolloutSpec
    from cloud.plane.store import make_engine
    from shared.messages import DeviceStatus, ModelRef

    settings, keys = _isolated_plane(tmp_path, ("admin",))
    engine = make_engine(settings.database_url)
    fleet = Fleet(engine)
    ids = [f"dev{i:02d}" for i in range(25)]
    fleet.record([("default", DeviceStatus(device_id=d, state="online")) for d in ids])
    for d in ids[::2]:
        fleet.set_labels("default", d, {"tier": "even"}, replace=False)
    model = ModelRef(name="m", version="1", manifest_digest="sha256:" + "c" * 64, manifest_size=10)
    made = Rollouts(engine, fleet).create("default", RolloutSpec(model=model, waves=(50.0, 100.0)))
    auth = {"authorization": f"Bearer {keys['admin']}"}
    with TestClient(create_app(settings)) as client:

        def pages(**params: object) -> list[list[str]]:
            out, after = [], ""
            while True:
                r = client.get("/v1/devices", params={**params, "after": after}, headers=auth)
                assert r.status_code == 200, r.text
                out.append([d["device_id"] for d in r.json()["devices"]])
                after = r.json()["next_after"]
                if after is None:
                    return out
                assert after == out[-1][-1]

        assert pages(limit=10) == [ids[:10], ids[10:20], ids[20:]]
        assert pages(limit=25) == [ids]
        assert pages(limit=5, selector="tier=even") == [ids[0:10:2], ids[10:20:2], ids[20:25:2]]
        everyone = client.get("/v1/devices", headers=auth).json()
        assert [d["device_id"] for d in everyone["devices"]] == ids and everyone["next_after"] is None
        for bad in ({"limit": 0}, {"limit": 10_001}, {"limit": "x"}, {"after": "a" * 65}):
            r = client.get("/v1/devices", params=bad, headers=auth)
            assert r.status_code == 400, (bad, r.text)

        full = client.get("/v1/rollouts", headers=auth).json()["rollouts"]
        brief = client.get("/v1/rollouts", params={"devices": "false"}, headers=auth).json()["rollouts"]
        assert [r["rollout_id"] for r in brief] == [made["rollout_id"]] == [r["rollout_id"] for r in full]
        assert len(full[0]["devices"]) == 25 and brief[0]["devices"] == []
        assert brief[0]["waves"] == full[0]["waves"]
        assert sum(w["devices"] for w in brief[0]["waves"]) == 25

        for body in (
            {"name": "ci\nadmin key rotated", "scope": "inference"},
            {"name": "tab\there", "scope": "inference"},
            {"name": "ci", "scope": "inference", "expires_in_s": 1e-300},
            {"name": "ci", "scope": "inference", "expires_in_s": 0.5},
        ):
            r = client.post("/v1/keys", json=body, headers=auth)
            assert r.status_code == 400, (body, r.text)
        r = client.post(
            "/v1/keys", json={"name": "ci é", "scope": "inference", "expires_in_s": 1}, headers=auth
        )
        assert r.status_code == 201, r.text
    engine.dispose()


@pytest.mark.e2e
def test_a_nul_in_an_id_key_or_device_message_is_refused_not_a_500_on_postgresql(
    tmp_path: Path, postgres_url: str
) -> None:
    """PostgreSQL refuses a NUL in text: "%00" in a device or rollout id, or in an API key at
    the console's sign-in (before any account), was a 500 with a traceback; a device's report
    whose error message held one failed its whole ingest batch, again each time it was sent."""
    from cloud.plane.fleet import Fleet
    from cloud.plane.store import make_engine
    from shared.messages import DeviceStatus, ReportedState, TelemetryBatch

    settings, keys = _isolated_plane(tmp_path, ("admin",), database_url=postgres_url)
    auth = {"authorization": f"Bearer {keys['admin']}"}
    engine = make_engine(postgres_url)
    fleet = Fleet(engine)
    # Also what the wire allows and INTEGER columns and UTF-8 did not: a revision past 2**31, a
    # token count past it, a lone surrogate in free text.
    report = ReportedState.from_json(
        b'{"schema": "autoglm.mqtt/v3", "kind": "reported", "device_id": "d0", "revision": 2147483653, '
        b'"phase": "failed", "last_error": {"code": "bad\\u0000", "message": "byte \\u0000 here\\ud800"}}'
    )
    telemetry = TelemetryBatch.from_json(
        b'{"schema": "autoglm.mqtt/v3", "kind": "telemetry", "device_id": "d0", "records": [{"id": "record-0001", '
        b'"at": "2026-12-07T12:00:00Z", "model": "m\\udfff", "served_by": "local", "prompt_tokens": '
        b'1099511627776, "completion_tokens": 1, "latency_ms": 2.0, "error": "x\\u0000"}]}'
    )
    fleet.record(
        [
            ("default", report),
            ("default", telemetry),
            ("default", DeviceStatus(device_id="d1", state="online")),
        ]
    )
    d0 = fleet.get("default", "d0")
    shown = d0.public()["last_error"]
    assert (shown["code"], shown["message"]) == ("bad\ufffd", "byte \ufffd here\ufffd")
    assert d0.reported_revision == 2147483653
    assert fleet.get("default", "d1").status == "online"  # stored in the same batch
    from cloud.console import install as install_console

    app = create_app(settings)
    install_console(app)
    with TestClient(app) as client:
        for method, path in (
            ("GET", "/v1/devices/%00"),
            ("GET", "/v1/devices/d%00"),
            ("GET", "/v1/rollouts/%00"),
            ("POST", "/v1/rollouts/%00/abort"),
            ("DELETE", "/v1/keys/%00"),
        ):
            r = client.request(method, path, headers=auth)
            assert r.status_code == 404, (method, path, r.status_code, r.text)
        r = client.get("/v1/devices", headers={"authorization": "Bearer agk_\x00\x00_secret"})
        assert r.status_code == 401, r.text
        r = client.put("/v1/devices/d%00/labels", json={"labels": {"a": "b"}}, headers=auth)
        assert r.status_code in (400, 404), r.text
        r = client.post("/v1/config", json={"selector": "", "config": {"x\u0000": 1}}, headers=auth)
        assert r.status_code == 400, r.text
        page = client.get("/ui/login")
        token = page.cookies["agc_login"]
        r = client.post(
            "/ui/login", data={"api_key": "agk_\x00_x", "login_token": token}, follow_redirects=False
        )
        assert r.status_code == 401 and "text/html" in r.headers["content-type"], r.text[:300]
        # A console address that is no page gets the console's 404 page; its files still load.
        r = client.get("/ui/no/such/<page>")
        assert r.status_code == 404 and "text/html" in r.headers["content-type"]
        assert "No page /ui/no/such/&lt;page&gt;" in r.text
        assert client.get("/ui/static/console.css").status_code == 200
        assert client.get("/ui/static/nothing.css").status_code == 404
        # Pages answer HEAD (uptime probes, link checkers) as they answer GET, without a body.
        head = client.head("/ui/login")
        assert head.status_code == 200 and "text/html" in head.headers["content-type"] and not head.content
        assert "set-cookie" not in head.headers  # an open sign-in form's token stays valid
        assert client.head("/ui/no/such/page").status_code == 404
    engine.dispose()
