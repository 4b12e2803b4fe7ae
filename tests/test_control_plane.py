"""The control plane for real: `autoglm cloud serve` as a process, real mosquitto, several real
edge agents, staged rollouts over REST, on SQLite and on PostgreSQL."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from cloud.plane.auth import ApiKeys
from cloud.plane.fleet import Fleet, Selector
from cloud.plane.rollouts import RolloutDriver, Rollouts, RolloutSpec, assign_waves
from cloud.plane.store import MIGRATIONS, make_engine, migrate, schema_version
from cloud.processes import stop_process
from cloud.registry import ModelRegistry, RegistryEntry
from shared.errors import ContractError
from shared.messages import DeviceStatus
from shared.mqtt import BrokerSettings
from shared.signing import SigningKey
from tests.conftest import EdgeProcess
from tests.services import cli, scrape_metrics, start_cloud

PG_ADMIN = "postgresql+psycopg://root@127.0.0.1:5432/postgres"


@pytest.fixture
def database_url(postgres_url: str) -> str:
    """PostgreSQL, what fleets run. The same driver's decisions are unit-tested on SQLite
    (tests/test_rollouts.py), and SQLite control planes run end to end in tests/test_reliability.py
    and tests/test_fallback.py."""
    return postgres_url


def test_staged_rollouts_gates_rollback_pause_abort_and_offline_devices(
    database_url: str,
    tmp_path: Path,
    broker_settings: BrokerSettings,
    tenant: str,
    registry: ModelRegistry,
    signing_key: SigningKey,
    demo_package: RegistryEntry,
    demo_package_v2: RegistryEntry,
    broken_package: RegistryEntry,
    edge_factory: Callable[..., EdgeProcess],
) -> None:
    cloud = start_cloud(tmp_path, database_url, broker_settings, tenant, registry)
    try:
        names = [f"edge-{i}" for i in range(4)]
        edges = {
            n: edge_factory(
                device_id=n, tenant=tenant, broker=broker_settings, trusted=[signing_key.public.b64]
            )
            for n in names
        }
        # A device's row appears with its first message, which may be the Last Will of a first
        # connection that broke (then `offline` until it reconnects): wait for all four online.
        cloud.wait(
            lambda: [d["status"] for d in cloud.devices().values()] == ["online"] * 4,
            60,
            "four devices online",
        )
        for n in names:
            cloud.ok("PUT", f"/v1/devices/{n}/labels", {"labels": {"site": "lab"}})

        # 1. Three waves, all healthy.
        r = cloud.ok(
            "POST",
            "/v1/rollouts",
            {"model": "demo-glm:1", "selector": "site=lab", "waves": [25, 50, 100], "health_window_s": 1.0},
        )
        assert [w["devices"] for w in r["waves"]] == [1, 1, 2]
        done = cloud.wait_rollout(r["rollout_id"], ("completed",))
        assert all(d["state"] == "healthy" for d in done["devices"]), done
        watched = cli(cloud, "rollout", "status", r["rollout_id"], "--watch")
        assert watched.returncode == 0 and "completed" in watched.stdout and "wave 3 (100%)" in watched.stdout
        assert {d["active_model"] for d in cloud.devices().values()} == {"demo-glm:1"}
        metrics = scrape_metrics(cloud.url)
        assert metrics["autoglm_cloud_device_messages_stored_total"] >= 4  # a report from each device
        assert metrics["autoglm_cloud_rollout_drives_total"] >= 3  # one step per wave at least
        assert metrics["autoglm_cloud_rollout_drive_failures_total"] == 0
        assert (
            metrics["autoglm_cloud_device_messages_failed_total"]
            == metrics["autoglm_cloud_acks_dropped_total"]
            == 0
        )
        # A model a running rollout uses cannot be deleted; this one is finished, but v1 runs on devices.
        for e in edges.values():
            assert (
                httpx.post(
                    f"{e.api}/v1/completions", json={"model": "default", "prompt": "x", "max_tokens": 2}
                ).status_code
                == 200
            )

        # 2. A broken model halts in wave 1; that wave's device goes back to v1, the rest never move.
        r = cloud.ok(
            "POST",
            "/v1/rollouts",
            {
                "model": "demo-glm:broken",
                "waves": [25, 100],
                "failure_threshold": 0.0,
                "health_window_s": 1.0,
            },
        )
        halted = cloud.wait_rollout(r["rollout_id"], ("halted",))
        wave1 = [d for d in halted["devices"] if d["wave"] == 0]
        assert [d["state"] for d in wave1] == ["rolled_back"]
        assert "1 of 1 device(s) failed" in halted["message"]
        assert all(d["state"] == "pending" for d in halted["devices"] if d["wave"] == 1)
        first = wave1[0]["device_id"]
        cloud.wait(
            lambda: (
                cloud.devices()[first]["active_model"] == "demo-glm:1"
                and cloud.devices()[first]["phase"] == "active"
                and cloud.devices()[first]["reported_revision"] == cloud.devices()[first]["desired_revision"]
            ),
            60,
            "the wave-1 device back on v1",
        )
        assert {d["active_model"] for d in cloud.devices().values()} == {"demo-glm:1"}

        # 3. Pause stops progress, resume finishes, and a model in use cannot be deleted meanwhile.
        r = cloud.ok(
            "POST",
            "/v1/rollouts",
            {"model": "demo-glm:2", "waves": [50, 100], "health_window_s": 3.0, "max_concurrent": 1},
        )
        rid = r["rollout_id"]
        paused = cloud.ok("POST", f"/v1/rollouts/{rid}/pause")
        assert paused["state"] == "paused"
        assert cloud.api("DELETE", "/v1/models/demo-glm/2").status_code == 409
        before = cloud.rollout(rid)["devices"]
        time.sleep(2.0)
        assert cloud.rollout(rid)["devices"] == before  # nothing moves while paused
        assert cloud.api("POST", f"/v1/rollouts/{rid}/pause").status_code == 409  # already paused
        cloud.ok("POST", f"/v1/rollouts/{rid}/resume")
        cloud.wait_rollout(rid, ("completed",))
        assert {d["active_model"] for d in cloud.devices().values()} == {"demo-glm:2"}

        # 4. Abort: stops where it is; pending devices are never sent anything. (v1 is an older
        # release than v2: the operator says the downgrade is meant, or devices refuse it.)
        r = cloud.ok(
            "POST",
            "/v1/rollouts",
            {"model": "demo-glm:1", "waves": [25, 100], "health_window_s": 30.0, "allow_downgrade": True},
        )
        aborted = cloud.ok("POST", f"/v1/rollouts/{r['rollout_id']}/abort")
        assert aborted["state"] == "aborted"
        time.sleep(1.0)
        pending = [
            d["device_id"] for d in cloud.rollout(r["rollout_id"])["devices"] if d["state"] == "pending"
        ]
        assert len(pending) >= 3
        assert all(cloud.devices()[p]["active_model"] == "demo-glm:2" for p in pending)

        # 5. An agent offline during its wave is reported and skipped by the timeout policy.
        offline = names[-1]
        edges[offline].proc.kill()
        edges[offline].proc.wait(10)
        cloud.wait(lambda: cloud.devices()[offline]["status"] == "offline", 30, "the Last Will")
        r = cloud.ok(
            "POST",
            "/v1/rollouts",
            {
                "model": "demo-glm:1",
                "waves": [100],
                "health_window_s": 1.0,
                "wave_timeout_s": 8.0,
                "allow_downgrade": True,
            },
        )
        finished = cloud.wait_rollout(r["rollout_id"], ("completed",), timeout=120)
        states = {d["device_id"]: d for d in finished["devices"]}
        assert states[offline]["state"] == "timed_out" and "offline" in states[offline]["detail"]
        assert sum(1 for d in finished["devices"] if d["state"] == "healthy") == 3
        assert "1 timed out" in finished["message"]

        # 6. The offline device, back, takes its retained signed desired state (the authorized
        # downgrade); then an operator's `rollout rollback` reaches a device that was offline
        # when it was given, once it reconnects.
        def all_on(model: str) -> bool:
            devices = cloud.devices().values()
            return all(d["active_model"] == model and d["phase"] == "active" for d in devices)

        edges[offline] = edge_factory(
            device_id=offline, tenant=tenant, broker=broker_settings, trusted=[signing_key.public.b64]
        )
        cloud.wait(lambda: all_on("demo-glm:1"), 60, "the returning device on v1")
        r = cloud.ok("POST", "/v1/rollouts", {"model": "demo-glm:2", "waves": [100], "health_window_s": 1.0})
        cloud.wait_rollout(r["rollout_id"], ("completed",))
        edges[offline].proc.kill()
        edges[offline].proc.wait(10)
        cloud.wait(lambda: cloud.devices()[offline]["status"] == "offline", 30, "the Last Will")
        rolled = cli(cloud, "rollout", "rollback", r["rollout_id"])
        assert rolled.returncode == 0, rolled.stdout + rolled.stderr
        cloud.wait_rollout(r["rollout_id"], ("rolled_back",))
        online = [n for n in names if n != offline]
        cloud.wait(
            lambda: all(cloud.devices()[n]["active_model"] == "demo-glm:1" for n in online), 60, "rolled back"
        )
        assert cloud.devices()[offline]["active_model"] == "demo-glm:2"
        edges[offline] = edge_factory(
            device_id=offline, tenant=tenant, broker=broker_settings, trusted=[signing_key.public.b64]
        )
        cloud.wait(lambda: all_on("demo-glm:1"), 60, "the returning device rolled back too")
    finally:
        stop_process(cloud.proc)


def test_api_keys_scopes_and_tenants(
    tmp_path: Path,
    broker_settings: BrokerSettings,
    tenant: str,
    registry: ModelRegistry,
    demo_package: RegistryEntry,
) -> None:
    url = f"sqlite:///{tmp_path / 'cloud.db'}"
    cloud = start_cloud(tmp_path, url, broker_settings, tenant, registry)
    try:
        engine = make_engine(url)
        keys = ApiKeys(engine)
        _, other_tenant = keys.create("someone-else", "x", "admin")
        _, inference = keys.create(tenant, "app", "inference")
        _, operator = keys.create(tenant, "ops", "operator")
        fleet = Fleet(engine)
        fleet.record_status(tenant, DeviceStatus(device_id="mine", state="online"))
        fleet.record_status("someone-else", DeviceStatus(device_id="theirs", state="online"))

        assert cloud.api("GET", "/v1/devices", key="agk_nope_nope").status_code == 401
        assert httpx.get(f"{cloud.url}/v1/devices").status_code == 401
        r = cloud.api("GET", "/v1/devices", key=inference)
        assert r.status_code == 403 and r.json()["error"]["code"] == "insufficient_scope"
        assert [d["device_id"] for d in cloud.api("GET", "/v1/devices", key=operator).json()["devices"]] == [
            "mine"
        ]
        assert [
            d["device_id"] for d in cloud.api("GET", "/v1/devices", key=other_tenant).json()["devices"]
        ] == ["theirs"]
        # Tenant B sees none of tenant A's models, devices or rollouts.
        assert cloud.api("GET", "/v1/models", key=other_tenant).json()["models"] == []
        assert cloud.api("GET", "/v1/devices/mine", key=other_tenant).status_code == 404
        assert cloud.api("GET", "/v1/models/demo-glm/1", key=operator).json()["version"] == "1"
        assert cloud.api("DELETE", "/v1/models/demo-glm/1", key=operator).status_code == 403
        # Bad input is a 400 with the envelope, naming the problem.
        bad = cloud.api("POST", "/v1/config", {"config": {"runtime": {"queue_size": -3}}}, key=operator)
        assert bad.status_code == 400 and "runtime.queue_size" in bad.json()["error"]["message"]
        bad = cloud.api("POST", "/v1/rollouts", {"model": "demo-glm:1", "waves": [50, 40]}, key=operator)
        assert bad.status_code == 400 and "waves" in bad.json()["error"]["message"]
        assert cloud.api("POST", "/v1/rollouts", {"model": "nope:1"}, key=operator).status_code == 404

        # The operator CLI talks to the same API.
        listed = cli(cloud, "fleet", "ls", "--json", key=operator)
        assert listed.returncode == 0 and '"mine"' in listed.stdout and "theirs" not in listed.stdout
        good = tmp_path / "good.yaml"
        good.write_text("sampling:\n  temperature: 0.2\nruntime:\n  queue_size: 4\n")
        pushed = cli(cloud, "config", "push", str(good), key=operator)
        assert pushed.returncode == 0 and "1 device(s): mine" in pushed.stdout
        assert fleet.get(tenant, "mine").desired_config == {
            "sampling": {"temperature": 0.2},
            "runtime": {"queue_size": 4},
        }
        bad_file = tmp_path / "bad.yaml"
        bad_file.write_text("runtime:\n  threads: -1\n")
        refused = cli(cloud, "config", "push", str(bad_file), key=operator)
        assert refused.returncode == 1 and "runtime.threads" in refused.stderr
        assert cli(cloud, "fleet", "ls", key="agk_x_y").returncode == 1

        # Key lifecycle over REST (admins of the tenant only): create with an expiry, list
        # without secrets, revoke; a revoked key stops at once.
        assert cloud.api("GET", "/v1/keys", key=operator).status_code == 403
        made = cloud.api("POST", "/v1/keys", {"name": "ci", "scope": "operator", "expires_in_s": 3600})
        assert made.status_code == 201, made.text
        new = made.json()
        assert new["expires_at"] is not None and new["key"].startswith("agk_")
        assert cloud.api("GET", "/v1/devices", key=new["key"]).status_code == 200
        listed_keys = cloud.ok("GET", "/v1/keys")["keys"]
        assert new["key_id"] in {k["key_id"] for k in listed_keys}
        assert new["key"] not in json.dumps(listed_keys)
        theirs = cloud.api("GET", "/v1/keys", key=other_tenant).json()["keys"]
        assert [k["name"] for k in theirs] == ["x"]  # its own only
        assert cloud.api("DELETE", f"/v1/keys/{new['key_id']}", key=other_tenant).status_code == 404
        bad = cloud.api("POST", "/v1/keys", {"name": "x", "scope": "root"})
        assert bad.status_code == 400
        bad = cloud.api("POST", "/v1/keys", {"name": "x", "scope": "admin", "expires_in_s": -1})
        assert bad.status_code == 400
        assert cloud.ok("DELETE", f"/v1/keys/{new['key_id']}")["revoked"] is True
        assert cloud.api("GET", "/v1/devices", key=new["key"]).status_code == 401
        engine.dispose()
    finally:
        stop_process(cloud.proc)


def test_two_replicas_never_drive_one_rollout_at_once(postgres_url: str) -> None:
    """Two drivers with their own connection pools tick concurrently against one PostgreSQL."""
    engine_a, engine_b = make_engine(postgres_url), make_engine(postgres_url)
    migrate(engine_a)
    assert migrate(engine_b) == [] and schema_version(engine_b) == MIGRATIONS[-1][0]
    fleet = Fleet(engine_a)
    for i in range(20):
        fleet.record_status("t1", DeviceStatus(device_id=f"d{i:02d}", state="online"))
    from shared.messages import ModelRef

    model = ModelRef(name="m", version="2", manifest_digest="sha256:" + "a" * 64, manifest_size=100)
    rid = Rollouts(engine_a, fleet).create(
        "t1", RolloutSpec(model=model, waves=(50.0, 100.0), max_concurrent=5)
    )["rollout_id"]
    a = RolloutDriver(engine_a, Fleet(engine_a), owner="replica-a", lease_s=1.0)
    b = RolloutDriver(engine_b, Fleet(engine_b), owner="replica-b", lease_s=1.0)
    published: list[tuple[str, str, int]] = []
    stop = threading.Event()
    lock = threading.Lock()

    def run(driver: RolloutDriver, until: threading.Event) -> None:
        while not until.is_set():
            for p in driver.tick():
                with lock:
                    published.append((driver.owner, p.device_id, p.revision))
            time.sleep(0.01)

    stop_a = threading.Event()
    ta = threading.Thread(target=run, args=(a, stop_a))
    tb = threading.Thread(target=run, args=(b, stop))
    ta.start()
    deadline = time.monotonic() + 30
    while a.drives == 0 and time.monotonic() < deadline:  # A holds the lease first ...
        time.sleep(0.01)
    tb.start()  # ... while B ticks beside it and must not drive
    time.sleep(2.0)
    assert b.drives == 0, "B drove a rollout A holds"
    stop_a.set()  # replica A dies; its lease runs out and B takes over
    ta.join()
    time.sleep(2.0)
    stop.set()
    tb.join()

    assert a.drives > 0 and b.drives > 0, (a.drives, b.drives)
    # Five devices (max_concurrent) got the model, each exactly once, by one replica or the other.
    devices = [p[1] for p in published]
    assert len(devices) == len(set(devices)) == 5, published
    for d in set(devices):
        assert fleet.get("t1", d).desired_revision == 1
    shown = Rollouts(engine_a, fleet).show("t1", rid)
    assert shown["driver"] == "replica-b"
    engine_a.dispose()
    engine_b.dispose()


def test_two_control_plane_processes_on_one_postgresql_complete_a_rollout_once(
    postgres_url: str,
    tmp_path: Path,
    broker_settings: BrokerSettings,
    tenant: str,
    registry: ModelRegistry,
    signing_key: SigningKey,
    demo_package: RegistryEntry,
    edge_factory: Callable[..., EdgeProcess],
) -> None:
    a = start_cloud(tmp_path / "a", postgres_url, broker_settings, tenant, registry, replica_id="replica-a")
    b = start_cloud(
        tmp_path / "b", postgres_url, broker_settings, tenant, registry, replica_id="replica-b", key=a.key
    )
    try:
        names = [f"rep-{i}" for i in range(3)]
        for n in names:
            edge_factory(device_id=n, tenant=tenant, broker=broker_settings, trusted=[signing_key.public.b64])
        a.wait(lambda: len(b.devices()) == 3, 60, "three devices, seen through replica B")
        r = a.ok("POST", "/v1/rollouts", {"model": "demo-glm:1", "waves": [34, 100], "health_window_s": 1.0})
        done = b.wait_rollout(r["rollout_id"], ("completed",))
        assert all(d["state"] == "healthy" for d in done["devices"])
        devices = a.devices()
        # Each device was sent the model exactly once, whichever replica drove the rollout.
        assert {d["desired_revision"] for d in devices.values()} == {1}
        assert {d["active_model"] for d in devices.values()} == {"demo-glm:1"}
        assert done["driver"] in ("replica-a", "replica-b")
    finally:
        stop_process(a.proc)
        stop_process(b.proc)


def test_wave_assignment_and_selectors() -> None:
    ids = [f"dev-{i}" for i in range(10)]
    waves = assign_waves(ids, (10.0, 50.0, 100.0))
    assert sorted(waves.values()) == [0] + [1] * 4 + [2] * 5
    assert assign_waves(ids, (10.0, 50.0, 100.0)) == waves  # stable
    assert sorted(assign_waves(["a", "b"], (1.0, 2.0, 100.0)).values()) == [0, 1]
    sel = Selector.parse("zone=eu, tier!=canary,gpu")
    assert sel.matches({"zone": "eu", "gpu": "a100"})
    assert not sel.matches({"zone": "eu", "gpu": "a100", "tier": "canary"})
    assert not sel.matches({"zone": "us", "gpu": "x"})
    assert not sel.matches({"zone": "eu"})
    with pytest.raises(ContractError):
        Selector.parse("zone=")
    with pytest.raises(ContractError, match="last wave"):
        RolloutSpec(model=_ref(), waves=(10.0, 50.0)).validate()


def _ref() -> Any:
    from shared.messages import ModelRef

    return ModelRef(name="m", version="1", manifest_digest="sha256:" + "b" * 64, manifest_size=10)


@pytest.mark.timeout(400)
def test_a_fast_but_wrong_package_halts_on_the_quality_gate_and_a_good_one_passes(
    database_url: str,
    tmp_path: Path,
    broker_settings: BrokerSettings,
    tenant: str,
    registry: ModelRegistry,
    signing_key: SigningKey,
    demo_source: Path,
    demo_package: RegistryEntry,
    wrong_package: RegistryEntry,
    edge_factory: Callable[..., EdgeProcess],
) -> None:
    """Issue 18: weights perturbed (same graph shapes, same speed, no errors), the package carrying
    version 1's signed evaluation set. Wave 1 fails on the devices' evaluation alone, before any
    traffic, and its device ends on v1; a good package held to the same answers passes every wave."""
    from cloud.packaging.packager import ModelPackager, PackageOptions

    # Packaged after the wrong one, so it is a higher release than anything a device has seen.
    good = ModelPackager(registry, signing_key).package(
        demo_source,
        PackageOptions(name="demo-glm", version="good", eval_set=registry.eval_set("demo-glm", "1")),
    )
    cloud = start_cloud(tmp_path, database_url, broker_settings, tenant, registry)
    try:
        names = [f"edge-{i}" for i in range(3)]
        for n in names:
            edge_factory(device_id=n, tenant=tenant, broker=broker_settings, trusted=[signing_key.public.b64])
        cloud.wait(lambda: len(cloud.devices()) == 3, 60, "three devices to appear")
        r = cloud.ok("POST", "/v1/rollouts", {"model": "demo-glm:1", "waves": [100], "health_window_s": 0.5})
        cloud.wait_rollout(r["rollout_id"], ("completed",))

        r = cloud.ok(
            "POST",
            "/v1/rollouts",
            {"model": "demo-glm:wrong", "waves": [33, 100], "failure_threshold": 0.0, "health_window_s": 0.5},
        )
        halted = cloud.wait_rollout(r["rollout_id"], ("halted",))
        wave1 = [d for d in halted["devices"] if d["wave"] == 0]
        assert [d["state"] for d in wave1] == ["rolled_back"], halted
        assert "quality gate" in wave1[0]["detail"], wave1
        assert all(d["state"] == "pending" for d in halted["devices"] if d["wave"] == 1)
        first = wave1[0]["device_id"]
        cloud.wait(
            lambda: (
                cloud.devices()[first]["active_model"] == "demo-glm:1"
                and cloud.devices()[first]["phase"] == "active"
                and cloud.devices()[first]["reported_revision"] == cloud.devices()[first]["desired_revision"]
            ),
            60,
            "the wave-1 device back on v1",
        )
        assert {d["active_model"] for d in cloud.devices().values()} == {"demo-glm:1"}

        r = cloud.ok(
            "POST",
            "/v1/rollouts",
            {"model": f"{good.name}:{good.version}", "waves": [34, 100], "health_window_s": 0.5},
        )
        done = cloud.wait_rollout(r["rollout_id"], ("completed",))
        assert all(d["state"] == "healthy" for d in done["devices"]), done
        reports = {n: cloud.ok("GET", f"/v1/devices/{n}")["evaluation"] for n in names}
        assert {e["model"] for e in reports.values()} == {"demo-glm:good"}
        assert all(e["agreement"] >= e["expected"] - 0.05 for e in reports.values()), reports
    finally:
        cloud.stop()
