"""Device credentials for real: a mosquitto started with the TLS + ACL config `autoglm fleet`
generates, clients holding certificates it issued (and some it did not)."""

from __future__ import annotations

import ssl
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties

from cloud.mqtt.local_broker import LocalBroker
from cloud.mqtt.pki import DEVICE_READS, DEVICE_WRITES, FleetPKI, Issued, broker_tls_lines
from shared.mqtt import BrokerSettings, TlsSettings
from shared.signing import SigningKey
from shared.topics import Topics
from tests.conftest import EdgeProcess
from tests.services import eventually

TENANT = "acme"
NOT_AUTHORIZED = 135  # MQTT v5 PUBACK reason codes below 0x80 are successes (16: no subscribers)


@dataclass
class Fleet:
    broker: LocalBroker
    pki: FleetPKI
    ids: dict[str, Issued]
    foreign: Issued  # same name as a device, signed by another CA


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    root = tmp_path_factory.mktemp("pki")
    pki = FleetPKI(root / "fleet")
    ids = {
        "dev-a": pki.enroll("dev-a", role="device", tenant=TENANT),
        "dev-b": pki.enroll("dev-b", role="device", tenant=TENANT),
        "autoglm-cloud": pki.enroll("autoglm-cloud", role="cloud", tenant=None),
    }
    foreign = FleetPKI(root / "other").enroll("dev-a", role="device", tenant=TENANT)
    server = pki.issue("broker", server_names=["127.0.0.1", "localhost"], out=root / "broker")
    broker = LocalBroker(security=broker_tls_lines(server.ca, server.cert, server.key, pki.acl_path))
    broker.start()
    yield Fleet(broker, pki, ids, foreign)
    broker.close()


@dataclass
class Peer:
    """A paho MQTT v5 client over TLS, recording what it receives and its PUBACK reason codes."""

    client: paho.Client
    received: list[tuple[str, bytes]] = field(default_factory=list)
    acks: dict[int, int] = field(default_factory=dict)
    ack_event: threading.Condition = field(default_factory=threading.Condition)

    def publish(self, topic: str, payload: bytes) -> int:
        """QoS 1 publish; the broker's PUBACK reason code."""
        info = self.client.publish(topic, payload, qos=1)
        with self.ack_event:
            assert self.ack_event.wait_for(lambda: info.mid in self.acks, timeout=10), topic
            return self.acks[info.mid]

    def subscribe(self, topic: str) -> None:
        done = threading.Event()
        self.client.on_subscribe = lambda *_: done.set()
        self.client.subscribe(topic, qos=1)
        assert done.wait(10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def connect(
    fleet: Fleet | int, identity: Issued | None, *, ca: Path | None = None, client_id: str | None = None
) -> Peer:
    """Connect to the fleet's broker (or one on this port) with ``identity``'s certificate (None:
    no client certificate), trusting ``ca`` (default: the fleet CA); raises on refusal."""
    port = fleet if isinstance(fleet, int) else fleet.broker.port
    if ca is None:
        assert isinstance(fleet, Fleet)
        ca = fleet.pki.ca_cert_path
    tls = TlsSettings(
        ca_file=ca,
        cert_file=identity.cert if identity else None,
        key_file=identity.key if identity else None,
    )
    client = paho.Client(
        CallbackAPIVersion.VERSION2, client_id=client_id or f"t-{uuid.uuid4().hex[:8]}", protocol=paho.MQTTv5
    )
    client.tls_set_context(tls.context())
    peer = Peer(client)
    connected = threading.Event()
    failure: list[str] = []

    def on_connect(c: paho.Client, u: object, flags: object, rc: paho.ReasonCode, p: object) -> None:
        if rc.is_failure:
            failure.append(str(rc))
        connected.set()

    def on_publish(c: paho.Client, u: object, mid: int, rc: paho.ReasonCode, p: Properties) -> None:
        with peer.ack_event:
            peer.acks[mid] = rc.value
            peer.ack_event.notify_all()

    def on_message(c: paho.Client, u: object, msg: paho.MQTTMessage) -> None:
        peer.received.append((msg.topic, msg.payload))

    client.on_connect = on_connect
    client.on_publish = on_publish
    client.on_message = on_message
    client.connect("127.0.0.1", port, keepalive=30)
    client.loop_start()
    if not connected.wait(5) or failure:
        client.loop_stop()
        raise ConnectionRefusedError(failure[0] if failure else "no CONNACK")
    return peer


def _eventually(check: Callable[[], bool], timeout: float = 5.0) -> bool:
    eventually(check, timeout, "the broker to deliver", interval=0.05)
    return True


def test_a_device_reaches_only_its_own_topics_and_the_blobs(fleet: Fleet) -> None:
    t = Topics(TENANT)
    a, b, cloud = (connect(fleet, fleet.ids[n]) for n in ("dev-a", "dev-b", "autoglm-cloud"))
    try:
        # dev-a asks for dev-b's desired state too: granted, and never delivered.
        a.subscribe(t.device("dev-a", "desired"))
        a.subscribe(t.device("dev-b", "desired"))
        a.subscribe(f"{t.root}/blobs/#")
        b.subscribe(t.device("dev-b", "desired"))
        cloud.subscribe(f"{t.root}/devices/+/reported")

        assert cloud.publish(t.device("dev-a", "desired"), b"for a") < 0x80
        assert cloud.publish(t.device("dev-b", "desired"), b"for b") < 0x80
        chunk = f"{t.root}/blobs/sha256:{'1' * 64}/0"
        assert cloud.publish(chunk, b"chunk bytes") < 0x80
        assert b.publish(t.device("dev-b", "reported"), b"b reports") < 0x80
        assert a.publish(t.device("dev-a", "reported"), b"a reports") < 0x80

        assert _eventually(lambda: (chunk, b"chunk bytes") in a.received)
        assert _eventually(lambda: len(cloud.received) >= 2)
        assert (t.device("dev-a", "desired"), b"for a") in a.received
        assert not [m for m in a.received if "dev-b" in m[0]], a.received
        assert b.received == [(t.device("dev-b", "desired"), b"for b")]
        # The cloud identity reads every device's reports.
        assert {m[0] for m in cloud.received} == {
            t.device("dev-a", "reported"),
            t.device("dev-b", "reported"),
        }
    finally:
        for p in (a, b, cloud):
            p.close()

    # Publishing where it may not: MQTT v5 reason code 135 (mosquitto then drops the connection,
    # so each attempt gets a connection of its own).
    for topic in (
        t.device("dev-b", "reported"),
        t.device("dev-b", "status"),
        Topics("other-tenant").device("dev-a", "reported"),
        f"{t.root}/blobs/sha256:{'0' * 64}/0",
    ):
        intruder = connect(fleet, fleet.ids["dev-a"])
        try:
            assert intruder.publish(topic, b"forged") == NOT_AUTHORIZED, topic
        finally:
            intruder.close()


def test_a_device_cannot_take_over_another_devices_session(fleet: Fleet) -> None:
    """Item 3: the broker binds the client id to the certificate, so dev-a connecting again and
    again with client id ``dev-b`` never disconnects dev-b, which keeps receiving its orders."""
    t = Topics(TENANT)
    b = connect(fleet, fleet.ids["dev-b"], client_id="dev-b")
    cloud = connect(fleet, fleet.ids["autoglm-cloud"])
    try:
        b.subscribe(t.device("dev-b", "desired"))
        time.sleep(0.3)
        for i in range(5):
            thief = connect(fleet, fleet.ids["dev-a"], client_id="dev-b")
            thief.close()
            assert cloud.publish(t.device("dev-b", "desired"), f"order {i}".encode()) < 0x80
        assert _eventually(lambda: len(b.received) == 5)
        assert b.client.is_connected()
        assert [p for _, p in b.received] == [f"order {i}".encode() for i in range(5)]
    finally:
        b.close()
        cloud.close()


def test_clients_without_a_fleet_certificate_are_refused(fleet: Fleet) -> None:
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        connect(fleet, None).close()
    # A certificate for the same name, from another CA.
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        connect(fleet, fleet.foreign).close()
    # A client that does not trust the fleet CA refuses the broker (the broker cannot be faked).
    with pytest.raises(ssl.SSLError):
        connect(fleet, fleet.ids["dev-a"], ca=fleet.foreign.ca).close()


def test_enrolment_refuses_a_name_in_use_and_rewrites_the_acl(tmp_path: Path) -> None:
    from shared.errors import ConfigError

    pki = FleetPKI(tmp_path)
    pki.enroll("dev-1", role="device", tenant="t1")
    with pytest.raises(ConfigError, match="already enrolled"):
        pki.enroll("dev-1", role="device", tenant="t2")
    again = pki.enroll("dev-1", role="device", tenant="t1")  # a fresh certificate, same identity
    assert again.key.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "ca.key").stat().st_mode & 0o777 == 0o600
    acl = pki.acl_path.read_text()
    assert acl.count("user dev-1") == 1
    assert "topic read autoglm/v1/t1/devices/dev-1/desired" in acl
    assert "topic write autoglm/v1/t1/devices/dev-1/reported" in acl
    assert "topic read autoglm/v1/t1/blobs/#" in acl
    assert "readwrite" not in acl  # every line names one direction
    # The one topic a device both writes and reads: its own presence, to answer a late Last Will.
    assert "topic read autoglm/v1/t1/devices/dev-1/status" in acl
    assert "topic write autoglm/v1/t1/devices/dev-1/status" in acl


def test_edge_agent_connects_with_its_certificate(
    fleet: Fleet, edge_factory: Callable[..., EdgeProcess], signing_key: SigningKey
) -> None:
    dev = fleet.ids["dev-a"]
    tls = {"ca_file": str(dev.ca), "cert_file": str(dev.cert), "key_file": str(dev.key)}
    settings = BrokerSettings(host=fleet.broker.host, port=fleet.broker.port).model_dump()
    cloud = connect(fleet, fleet.ids["autoglm-cloud"])
    try:
        cloud.subscribe(f"{Topics(TENANT).root}/devices/dev-a/status")
        edge = edge_factory(
            device_id="dev-a",
            tenant=TENANT,
            broker=BrokerSettings.model_validate({**settings, "tls": tls}),
            trusted=[signing_key.public.b64],
        )
        edge.wait_http("/healthz")
        assert _eventually(lambda: httpx.get(f"{edge.api}/v1/agent", timeout=5).json()["online"], 30)
        assert _eventually(lambda: any(p.endswith(b"online") or b"online" in p for _, p in cloud.received))
    finally:
        cloud.close()


def test_cli_enrols_devices_and_writes_a_broker_config_that_mosquitto_runs(tmp_path: Path) -> None:
    import os
    import pwd
    import shutil
    import subprocess
    import sys

    from cloud.mqtt.local_broker import free_port
    from cloud.processes import stop_process

    def autoglm(*args: str) -> str:
        r = subprocess.run(
            [sys.executable, "-m", "cloud.cli", *args, "--pki", str(tmp_path / "pki")],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 0, r.stdout + r.stderr
        return r.stdout

    assert "created the fleet CA" in autoglm(
        "fleet", "enroll", "dev-x", "--tenant", TENANT, "--out", str(tmp_path / "x")
    )
    autoglm("fleet", "enroll", "dev-y", "--tenant", TENANT, "--out", str(tmp_path / "y"))
    autoglm("fleet", "enroll", "cloud-1", "--cloud", "--out", str(tmp_path / "c"))
    port = free_port()
    out = tmp_path / "broker"
    autoglm(
        "fleet",
        "broker-config",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--out",
        str(out),
    )
    conf = out / "mosquitto.conf"
    # It starts as printed, as root too (it switches to the files' owner, who can read the key).
    assert f"user {pwd.getpwuid(os.geteuid()).pw_name}" in conf.read_text()
    exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    proc = subprocess.Popen([exe, "-c", str(conf)], cwd=out, stderr=subprocess.PIPE)
    try:
        dev_x = Issued(
            "dev-x", tmp_path / "x", tmp_path / "x/dev-x.key", tmp_path / "x/dev-x.crt", tmp_path / "x/ca.crt"
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                peer = connect(port, dev_x, ca=out / "ca.crt")
                break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None, proc.stderr
                time.sleep(0.1)
        t = Topics(TENANT)
        cloud_id = Issued(
            "cloud-1",
            tmp_path / "c",
            tmp_path / "c/cloud-1.key",
            tmp_path / "c/cloud-1.crt",
            tmp_path / "c/ca.crt",
        )
        cloud = connect(port, cloud_id, ca=out / "ca.crt")
        try:
            cloud.subscribe(t.device("dev-x", "reported"))
            # Larger than message_size_limit (4 MiB): never delivered; then a small one is.
            peer.client.publish(t.device("dev-x", "reported"), b"x" * (5 * 1024 * 1024), qos=1)
            time.sleep(0.5)
            small = connect(port, dev_x, ca=out / "ca.crt")
            assert small.publish(t.device("dev-x", "reported"), b"{}") < 0x80
            assert _eventually(lambda: len(cloud.received) >= 1)
            assert [len(p) for _, p in cloud.received] == [2]
            small.close()
        finally:
            cloud.close()
            peer.close()
        # A device may not write what it is told (its desired state, its commands), anyone
        # else's topics, or made-up sub-topics of its own (retained junk).
        for topic in (
            t.device("dev-y", "reported"),
            t.device("dev-x", "desired"),
            t.device("dev-x", "commands"),
            f"{t.root}/devices/dev-x/junk",
        ):
            intruder = connect(port, dev_x, ca=out / "ca.crt")
            try:
                assert intruder.publish(topic, b"{}") == NOT_AUTHORIZED, topic
            finally:
                intruder.close()
    finally:
        stop_process(proc)


def test_kubeedge_bridge_carries_only_the_devices_topics(fleet: Fleet, tmp_path: Path) -> None:
    """kubeedge/mosquitto-bridge.yaml's broker, rendered as its init container does, bridged to
    the fleet broker with dev-a's certificate: what dev-a is told comes in, what it tells goes
    out, nothing else (its presence does not come back in)."""
    import shutil
    import subprocess

    import yaml

    from cloud.mqtt.local_broker import free_port
    from cloud.processes import stop_process
    from tests.conftest import REPO

    docs = list(yaml.safe_load_all((REPO / "kubeedge" / "mosquitto-bridge.yaml").read_text()))
    template = next(d for d in docs if d["kind"] == "ConfigMap")["data"]["mosquitto.conf.template"]
    creds = tmp_path / "credentials"
    creds.mkdir()
    dev = fleet.ids["dev-a"]
    shutil.copy(dev.ca, creds / "ca.crt")
    shutil.copy(dev.cert, creds / "device.crt")
    shutil.copy(dev.key, creds / "device.key")
    local_port = free_port()
    conf = (
        template.replace("__DEVICE__", "dev-a")
        .replace("__TENANT__", TENANT)
        .replace("__CLOUD_BROKER__", f"127.0.0.1:{fleet.broker.port}")
        # The pod's paths and port, moved into this test's sandbox:
        .replace("/etc/autoglm/credentials", str(creds))
        .replace("/mosquitto/data/", f"{tmp_path}/")
        .replace("listener 1883 127.0.0.1", f"listener {local_port} 127.0.0.1")
        .replace("log_dest stdout", f"log_dest file {tmp_path}/local.log")
    )
    (tmp_path / "mosquitto.conf").write_text(conf + "user root\n")
    exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    local = subprocess.Popen([exe, "-c", str(tmp_path / "mosquitto.conf")], stderr=subprocess.PIPE)
    t = Topics(TENANT)
    cloud = connect(fleet, fleet.ids["autoglm-cloud"])
    app = paho.Client(CallbackAPIVersion.VERSION2, client_id="agent-on-node", protocol=paho.MQTTv5)
    got: list[tuple[str, bytes]] = []
    app.on_message = lambda c, u, m: got.append((m.topic, m.payload))
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                app.connect("127.0.0.1", local_port)
                break
            except OSError:
                assert time.monotonic() < deadline and local.poll() is None, local.stderr
                time.sleep(0.1)
        app.loop_start()
        subscribed = threading.Event()
        app.on_subscribe = lambda *_: subscribed.set()
        app.subscribe("autoglm/#", qos=1)
        assert subscribed.wait(10)
        cloud.subscribe(f"{t.root}/devices/#")

        # Up: the agent's report reaches the cloud once the bridge is connected.
        assert _eventually(
            lambda: (
                app.publish(t.device("dev-a", "reported"), b"a reports", qos=1),
                any(p == b"a reports" for _, p in cloud.received),
            )[1],
            15,
        )
        app.publish(t.device("dev-b", "reported"), b"forged b", qos=1).wait_for_publish(5)
        # Every channel the device tells goes out (its bridge state is the bridge's own).
        outward = [c for c in DEVICE_WRITES if c != "bridge"]
        for c in outward:
            app.publish(t.device("dev-a", c), f"out on {c}".encode(), qos=1).wait_for_publish(5)
        # Down: what the device is told and the tenant's chunks come in; other devices' do not,
        # nor the cloud side's presence for dev-a (a will published there, say).
        assert cloud.publish(t.device("dev-b", "desired"), b"for b") < 0x80
        inward = [c for c in DEVICE_READS if c != "status"]
        for c in inward:
            assert cloud.publish(t.device("dev-a", c), f"in on {c}".encode()) < 0x80
        assert cloud.publish(t.device("dev-a", "status"), b"cloud-side status") < 0x80
        chunk = f"{t.root}/blobs/sha256:{'2' * 64}/0"
        assert cloud.publish(chunk, b"chunk") < 0x80
        assert _eventually(
            lambda: (
                (chunk, b"chunk") in got
                and all((t.device("dev-a", c), f"in on {c}".encode()) in got for c in inward)
            )
        )
        assert _eventually(
            lambda: all((t.device("dev-a", c), f"out on {c}".encode()) in cloud.received for c in outward)
        )
        time.sleep(0.5)
        # Each channel one way: what the device told reached it once (from its own broker), not
        # a second time back over the bridge.
        for c in outward:
            assert got.count((t.device("dev-a", c), f"out on {c}".encode())) == 1, (c, got)
        assert not [m for m in got if m[0] == t.device("dev-b", "desired")], got
        assert not [m for m in got if m[1] == b"cloud-side status"], got
        assert not [m for m in cloud.received if m[1] == b"forged b"], cloud.received
        # The bridge says it is up on the device's bridge topic, and down once the node's broker
        # is gone (the agent's own Last Will went with it).
        assert (t.bridge("dev-a"), b"1") in cloud.received
        local.kill()
        local.wait(10)
        assert _eventually(lambda: (t.bridge("dev-a"), b"0") in cloud.received, 30), cloud.received
    finally:
        app.loop_stop()
        app.disconnect()
        cloud.close()
        stop_process(local)
