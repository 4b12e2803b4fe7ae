"""The console's logic without a browser: sign-in sessions and CSRF, the fleet table's filters and
pages, telemetry series and charts, and the device history the fleet records."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import unquote

import pytest
from sqlalchemy import update
from sqlalchemy.engine import Engine

from cloud.console.charts import svg, telemetry_charts
from cloud.console.fleet_table import FleetQuery, fleet_page
from cloud.console.routes import _see
from cloud.console.sessions import ConsoleSessions
from cloud.plane.auth import ApiKeys
from cloud.plane.fleet import DeviceSummary, Fleet
from cloud.plane.store import console_sessions
from shared.errors import ContractError, Forbidden, Unauthorized
from shared.messages import DeviceStatus, ErrorInfo, ModelRef, Phase, ReportedState

NOW = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)


# -- sessions --------------------------------------------------------------------------------------
def test_operator_and_admin_keys_sign_in_inference_and_unknown_keys_do_not(plane_db: Engine) -> None:
    keys = ApiKeys(plane_db)
    sessions = ConsoleSessions(plane_db, keys, ttl_s=3600)
    _, admin = keys.create("acme", "a", "admin")
    _, operator = keys.create("acme", "o", "operator")
    _, inference = keys.create("acme", "i", "inference")
    for key in (admin, operator):
        token, session = sessions.sign_in(key)
        resolved = sessions.resolve(token)
        assert resolved is not None and resolved.principal.tenant == "acme"
        assert resolved.csrf_token == session.csrf_token
    with pytest.raises(Forbidden, match="operator or admin"):
        sessions.sign_in(inference)
    with pytest.raises(Unauthorized):
        sessions.sign_in("agk_000000000000_wrong")
    with pytest.raises(Unauthorized):
        sessions.sign_in("")
    assert sessions.resolve(None) is None and sessions.resolve("forged") is None


def test_csrf_is_per_session_and_compared_whole(plane_db: Engine) -> None:
    keys = ApiKeys(plane_db)
    sessions = ConsoleSessions(plane_db, keys, ttl_s=3600)
    _, key = keys.create("acme", "o", "operator")
    _, one = sessions.sign_in(key)
    _, two = sessions.sign_in(key)
    assert one.csrf_token != two.csrf_token
    assert one.csrf_ok(one.csrf_token)
    assert not one.csrf_ok(two.csrf_token)
    assert not one.csrf_ok(None) and not one.csrf_ok("") and not one.csrf_ok(one.csrf_token[:-1])
    assert not one.csrf_ok("é" * 43)  # any bytes a forged form sends: refused, not an error


def test_sign_out_revocation_and_expiry_end_a_session(plane_db: Engine) -> None:
    keys = ApiKeys(plane_db)
    sessions = ConsoleSessions(plane_db, keys, ttl_s=3600)
    key_id, key = keys.create("acme", "o", "operator")
    out, _ = sessions.sign_in(key)
    sessions.sign_out(out)
    assert sessions.resolve(out) is None
    expiring, _ = sessions.sign_in(key)
    with plane_db.begin() as conn:
        conn.execute(update(console_sessions).values(expires_at=datetime.now(UTC) - timedelta(seconds=1)))
    assert sessions.resolve(expiring) is None
    live, _ = sessions.sign_in(key)
    assert sessions.resolve(live) is not None
    keys.revoke("acme", key_id)
    assert sessions.resolve(live) is None  # the key behind it is checked on every request


def test_the_database_holds_no_usable_session_token(plane_db: Engine) -> None:
    keys = ApiKeys(plane_db)
    sessions = ConsoleSessions(plane_db, keys, ttl_s=3600)
    _, key = keys.create("acme", "o", "operator")
    token, _ = sessions.sign_in(key)
    with plane_db.connect() as conn:
        stored = [r.session_sha256 for r in conn.execute(console_sessions.select())]
    assert token not in stored and sessions.resolve(stored[0]) is None


# -- fleet table -----------------------------------------------------------------------------------
def _device(i: int, **over: object) -> DeviceSummary:
    base: dict[str, object] = {
        "device_id": f"dev-{i:04d}",
        "labels": {"site": "a" if i % 2 else "b"},
        "status": "online" if i % 3 else "offline",
        "last_seen": NOW - timedelta(seconds=i),
        "phase": "active",
        "active_model": "m:1",
        "reported_revision": 1,
        "desired_revision": 1,
        "progress": None,
        "last_error": None,
    }
    base.update(over)
    return DeviceSummary(**base)  # type: ignore[arg-type]


def test_fleet_query_refuses_bad_parameters_by_name() -> None:
    for params, name in (
        ({"sort": "secret"}, "sort"),
        ({"status": "sleeping"}, "status"),
        ({"page": "x"}, "page"),
        ({"per_page": "7"}, "per_page"),
    ):
        with pytest.raises(ContractError) as err:
            FleetQuery.parse(params)
        assert err.value.context["param"] == name
    with pytest.raises(ContractError):
        FleetQuery.parse({"selector": "a=b=c"})
    q = FleetQuery.parse(
        {"selector": "site=a", "status": "online", "sort": "last_seen", "order": "desc", "page": "2"}
    )
    assert (q.selector, q.status, q.sort, q.desc, q.page) == ("site=a", "online", "last_seen", True, 2)
    assert q.link(page=3) == "?selector=site%3Da&status=online&sort=last_seen&order=desc&page=3&per_page=50"


def test_fleet_page_filters_sorts_and_pages_a_thousand_devices() -> None:
    devices = [_device(i) for i in range(1000)]
    devices[7] = _device(7, phase="failed", last_error="load_failed: bad graph")
    devices[8] = _device(8, phase="fetching", progress=0.25)
    page = fleet_page(devices, FleetQuery.parse({"selector": "site=a", "status": "online", "per_page": "25"}))
    expected = [d for d in devices if d.labels["site"] == "a" and d.status == "online"]
    assert page.matched == len(expected) and page.total == 1000
    assert [d.device_id for d in page.rows] == [d.device_id for d in expected[:25]]
    assert page.pages == -(-len(expected) // 25) and page.first == 1
    last = fleet_page(devices, FleetQuery.parse({"page": "999"}))
    assert last.page == 20 and len(last.rows) == 50 and last.first == 951  # past the end: the last page
    newest_first = fleet_page(devices, FleetQuery.parse({"sort": "last_seen", "order": "desc"}))
    assert newest_first.rows[0].device_id == "dev-0000"
    assert fleet_page(devices, FleetQuery.parse({"q": "DEV-0999"})).rows[0].device_id == "dev-0999"
    assert [d.device_id for d in fleet_page(devices, FleetQuery.parse({"status": "failed"})).rows] == [
        "dev-0007"
    ]
    assert [d.device_id for d in fleet_page(devices, FleetQuery.parse({"status": "updating"})).rows] == [
        "dev-0008"
    ]
    assert page.counts == {"online": 666, "offline": 334, "failed": 1, "updating": 1}
    empty = fleet_page([], FleetQuery())
    assert empty.rows == [] and empty.pages == 1 and empty.first == 0


# -- telemetry charts ------------------------------------------------------------------------------
def test_telemetry_series_per_minute() -> None:
    rows = [
        (NOW - timedelta(seconds=30), "local", True, 100.0, 10),
        (NOW - timedelta(seconds=20), "local", True, 300.0, 20),
        (NOW - timedelta(seconds=10), "cloud", False, 50.0, 0),
        (NOW - timedelta(seconds=90), "local", True, 200.0, 6),
        (NOW - timedelta(hours=2), "local", True, 1.0, 1),  # outside the window
    ]
    charts = {c.title: c for c in telemetry_charts(rows, NOW, window_s=600, bucket_s=60)}
    requests = charts["Requests per minute"].series[0].values
    assert len(requests) == 10 and requests[-1] == 3 and requests[-2] == 1 and sum(requests) == 4
    assert charts["Tokens per second"].series[0].values[-1] == pytest.approx(30 / 60)
    errors = charts["Error rate"].series[0].values
    assert errors[-1] == pytest.approx(100 / 3) and errors[-2] == 0 and errors[0] is None
    p50, p95 = charts["Latency"].series
    assert (p50.values[-1], p95.values[-1]) == (300.0, 300.0) and p50.values[-2] == 200.0
    local, cloud = charts["Served local vs cloud"].series
    assert (local.values[-1], cloud.values[-1]) == (2, 1)


def test_a_chart_is_accessible_svg_and_survives_no_data() -> None:
    charts = telemetry_charts([], NOW)
    drawn = svg(charts[2])
    assert drawn.startswith("<svg") and 'role="img"' in drawn and "errors: no data" in drawn
    busy = telemetry_charts([(NOW - timedelta(seconds=5), "local", True, 80.0, 4)], NOW)
    assert "requests 1 /min" in svg(busy[0]) and "<polyline" in svg(busy[0])
    assert "<circle" in svg(busy[3])  # one latency sample: a dot, not a line
    assert "<script" not in svg(type(charts[0])("<script>", charts[0].series))


# -- device history --------------------------------------------------------------------------------
def _ref(version: str) -> ModelRef:
    return ModelRef(name="m", version=version, manifest_digest="sha256:" + "a" * 64, manifest_size=10)


def test_the_fleet_records_status_phase_and_model_changes_once(plane_db: Engine) -> None:
    fleet = Fleet(plane_db)
    fleet.record_status("t", DeviceStatus(device_id="d1", state="online"))
    fleet.record_status("t", DeviceStatus(device_id="d1", state="online"))  # no change, no event
    for phase in (Phase.FETCHING, Phase.FETCHING, Phase.ACTIVE):
        fleet.record_reported(
            "t",
            ReportedState(
                device_id="d1",
                revision=1,
                phase=phase,
                active_slot="a" if phase == Phase.ACTIVE else None,
                slots={"a": _ref("1")} if phase == Phase.ACTIVE else {},
            ),
        )
    fleet.record_reported(
        "t",
        ReportedState(
            device_id="d1",
            revision=2,
            phase=Phase.FAILED,
            active_slot="a",
            slots={"a": _ref("1")},
            last_error=ErrorInfo(code="load_failed", message="not an ONNX graph"),
        ),
    )
    fleet.record_status("t", DeviceStatus(device_id="d1", state="offline"))
    fleet.record_status("other", DeviceStatus(device_id="d1", state="online"))
    events = fleet.events("t", "d1")
    seen = [(e["kind"], e["old"], e["new"]) for e in reversed(events)]
    assert seen == [
        ("status", "unknown", "online"),
        ("phase", None, "fetching"),
        ("phase", "fetching", "active"),
        ("model", None, "m:1"),
        ("phase", "active", "failed"),
        ("status", "online", "offline"),
    ]
    assert events[1]["detail"] == "load_failed: not an ONNX graph"
    assert len(fleet.events("other", "d1")) == 1  # tenants apart
    assert fleet.events("t", "d1", limit=2) == events[:2]


# -- the key check the gateway makes on every request ----------------------------------------------
def test_verified_keys_are_remembered_briefly_and_revocation_ends_them(plane_db: Engine) -> None:
    import time

    here = ApiKeys(plane_db, verify_ttl_s=0.3)
    elsewhere = ApiKeys(plane_db, verify_ttl_s=0.3)  # another replica on the same database
    key_id, key = here.create("acme", "app", "inference")
    assert here.cached(key) == (False, None)
    principal = here.verify_and_remember(key)
    assert principal is not None and here.cached(key) == (True, principal)
    assert here.verify_and_remember("agk_x_y") is None and here.cached("agk_x_y") == (True, None)
    elsewhere.verify_and_remember(key)
    here.revoke("acme", key_id)
    assert here.cached(key) == (False, None)  # the replica that revoked forgets at once
    assert elsewhere.cached(key) == (True, principal)  # the others trust it at most verify_ttl_s
    time.sleep(0.35)
    assert elsewhere.cached(key) == (False, None) and elsewhere.verify_and_remember(key) is None


def test_a_check_that_read_a_key_before_its_revocation_is_not_remembered(plane_db: Engine) -> None:
    """A check in a worker thread reads the key, the key is revoked on this replica before the
    check stores its answer: the stale answer must not be trusted for another verify_ttl_s."""
    keys = ApiKeys(plane_db, verify_ttl_s=60)
    key_id, key = keys.create("acme", "app", "inference")
    read = keys.verify

    def read_then_revoked(k: str) -> Any:
        answer = read(k)
        assert keys.revoke("acme", key_id)  # lands between the read and the remembering
        return answer

    keys.verify = read_then_revoked  # type: ignore[method-assign]
    assert keys.verify_and_remember(key) is not None  # this request was checked before it
    keys.verify = read  # type: ignore[method-assign]
    assert keys.cached(key) == (False, None)
    assert keys.verify_and_remember(key) is None and keys.cached(key) == (True, None)


# -- notices ---------------------------------------------------------------------------------------
def test_a_notice_cookie_stays_under_the_4_kib_browsers_keep() -> None:
    for notice in ("\U0001f600" * 500, "é" * 3000, "a" * 5000, "ok"):
        header = _see("/ui/fleet", notice).headers["set-cookie"]
        assert len(header) < 4096
        value = unquote(header.split(";")[0].split("=", 1)[1])
        assert notice.startswith(value) and value  # a whole-character prefix, never empty
