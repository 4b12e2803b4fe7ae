"""The operator commands (``fleet``, ``rollout``, ``config``, ``cloud assign|key|serve``) against a
real control plane, as an operator and a script use them: one-line errors and the right exit
code for bad input, odd names and wrong addresses; whole ids in tables however narrow the output."""

from __future__ import annotations

import http.server
import subprocess
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from cloud.cli import ops
from cloud.mqtt.local_broker import LocalBroker
from cloud.plane.fleet import Fleet
from cloud.plane.store import make_engine
from cloud.processes import stop_process
from cloud.registry import ModelRegistry, RegistryEntry
from shared.messages import DeviceStatus
from shared.mqtt import BrokerSettings
from tests.services import CloudProcess, cli, start_cloud
from tests.test_cli import autoglm

LONG = "edge-node-eu-west-1a-rack-17-server-0000000000000000000000000"  # 61 characters


def failed(r: subprocess.CompletedProcess[str], code: int, *needles: str) -> None:
    """Exit ``code``, no traceback, and an error that says what it is about."""
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    for needle in needles:
        assert needle in r.stdout + r.stderr, (needle, r.stdout, r.stderr)


@dataclass
class Plane:
    cloud: CloudProcess
    tenant: str
    config: Path


@pytest.fixture(scope="module")
def plane(
    tmp_path_factory: pytest.TempPathFactory,
    broker: LocalBroker,
    registry: ModelRegistry,
    demo_package: RegistryEntry,
) -> Iterator[Plane]:
    """One control plane for the module (each start costs seconds): the tests read it, and
    their rollouts end or cover devices the others do not judge."""
    tmp = tmp_path_factory.mktemp("operator-cli")
    tenant = "t" + uuid.uuid4().hex[:12]
    url = f"sqlite:///{tmp / 'cloud.db'}"
    c = start_cloud(tmp, url, BrokerSettings(host=broker.host, port=broker.port), tenant, registry)
    engine = make_engine(url)
    fleet = Fleet(engine)
    # Two devices whose ids differ only at their ends, and one more.
    for device in (f"{LONG}1", f"{LONG}2", "mine"):
        fleet.record_status(tenant, DeviceStatus(device_id=device, state="online"))
    engine.dispose()
    try:
        yield Plane(c, tenant, tmp / "cloud.yaml")
    finally:
        stop_process(c.proc)


def test_tables_keep_whole_ids_and_text_is_never_markup(plane: Plane) -> None:
    cloud, tenant = plane.cloud, plane.tenant
    listed = cli(cloud, "fleet", "ls", columns=60)
    assert listed.returncode == 0, listed.stderr
    assert f"{LONG}1" in listed.stdout and f"{LONG}2" in listed.stdout, listed.stdout
    # A selector with a closing tag in it was a MarkupError traceback; one with "[b]" lost it.
    failed(cli(cloud, "fleet", "ls", "-l", "[/x]"), 1, "error:", "[/x]")
    failed(cli(cloud, "fleet", "ls", "-l", "a[b]=c"), 1, "a[b]=c")
    # A key named like a tag is listed (the table crashed for good once one existed).
    config = plane.config
    made = cli(
        cloud, "cloud", "key", "create", "-c", str(config), "--name", "[/x] [bold]k[/]", "--tenant", tenant
    )
    assert made.returncode == 0, made.stderr
    keys = cli(cloud, "cloud", "key", "ls", "-c", str(config), "--tenant", tenant, columns=40)
    assert keys.returncode == 0 and "[/x] [bold]k[/]" in keys.stdout, keys.stdout + keys.stderr


def test_bad_values_ids_and_addresses_are_one_line_errors(plane: Plane, tmp_path: Path) -> None:
    cloud = plane.cloud
    for option in ("--failure-threshold", "--wave-timeout", "--health-window", "--max-eval-drop"):
        failed(cli(cloud, "rollout", "create", "demo-glm:1", option, "nan"), 2, "finite")
    failed(cli(cloud, "rollout", "create", "demo-glm:1", "--waves", "inf,100"), 2, "--waves")
    failed(cli(cloud, "fleet", "command", "mine", "ping", "--wait", "inf"), 2)
    failed(cli(cloud, "fleet", "command", "mine", "ping", "--wait", "61"), 2)
    # An empty id, or one that is a path, is no other endpoint.
    failed(cli(cloud, "rollout", "status", ""), 2, "empty")
    failed(cli(cloud, "fleet", "label", "", "a=b"), 2, "empty")
    failed(cli(cloud, "rollout", "status", "../devices"), 2, "no id")
    failed(cli(cloud, "fleet", "command", "a?b", "ping"), 2, "no id")
    # Which half of a label is wrong.
    failed(cli(cloud, "fleet", "label", "mine", "k=v v"), 1, "value of label 'k'")
    # Addresses and keys that cannot work say so, without blaming the network.
    failed(cli(cloud, "fleet", "ls", AUTOGLM_URL="http://127.0.0.1:abc"), 1, "not a URL")
    failed(cli(cloud, "fleet", "ls", AUTOGLM_API_KEY=f"{cloud.key} x"), 1, "API key holds spaces")
    failed(cli(cloud, "fleet", "ls", AUTOGLM_API_KEY="agk_é"), 1, "API key")
    # Config files that are not UTF-8, empty or not a mapping.
    (tmp_path / "bin.yaml").write_bytes(b"\xff\xfe")
    failed(cli(cloud, "config", "push", str(tmp_path / "bin.yaml")), 2, "cannot read")
    (tmp_path / "empty.yaml").write_text("")
    failed(cli(cloud, "config", "push", str(tmp_path / "empty.yaml")), 2, "is empty")
    (tmp_path / "list.yaml").write_text("- a\n")
    failed(cli(cloud, "config", "push", str(tmp_path / "list.yaml")), 2, "not a mapping")


class _NotTheControlPlane(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body, kind = (b"<html><body>" + b"x" * 4000 + b"</body></html>", "text/html")
        if self.path.startswith("/json"):
            body, kind = (b'{"hello": "world"}', "application/json")
        self.send_response(200)
        self.send_header("content-type", kind)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def test_another_server_at_the_url_is_named_not_a_traceback(plane: Plane) -> None:
    cloud = plane.cloud
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NotTheControlPlane)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    other = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        for url in (other, f"{other}/json"):
            for cmd in (("fleet", "ls"), ("rollout", "ls"), ("rollout", "status", "r1")):
                r = cli(cloud, *cmd, AUTOGLM_URL=url)
                failed(r, 1, "not the control plane's")
                assert len(r.stderr) < 400, r.stderr  # a line, not the page
    finally:
        server.shutdown()


def test_exit_codes_tell_scripts_what_happened(plane: Plane) -> None:
    cloud = plane.cloud
    # A device that never answers is not a passed health check.
    silent = cli(cloud, "fleet", "command", "mine", "ping", "--wait", "1")
    failed(silent, 1, "no reply within 1 s")
    assert cli(cloud, "fleet", "command", "mine", "ping", "--wait", "0").returncode == 0
    # --watch ends 1 for a rollout that did not complete.
    created = cli(cloud, "rollout", "create", "demo-glm:1", "-l", "", "--waves", "100")
    assert created.returncode == 0, created.stderr
    rid = created.stdout.split()[1]
    assert cli(cloud, "rollout", "abort", rid).returncode == 0
    watched = cli(cloud, "rollout", "status", rid, "--watch")
    failed(watched, 1, "aborted")


def test_the_wait_for_a_reply_is_not_cut_by_the_http_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}

    def fake_call(url: str, key: str, method: str, path: str, body: Any = None, **kw: Any) -> Any:
        seen.update(kw, body=body)
        return {"status": "replied", "ok": True, "detail": "pong", "request_id": "r"}

    monkeypatch.setattr(ops, "call", fake_call)
    r = CliRunner().invoke(ops.fleet_app, ["command", "d1", "ping", "--wait", "45", "--api-key", "k"])
    assert r.exit_code == 0, r.output
    assert seen["body"]["wait_s"] == 45 and seen["timeout_s"] > 45 + 10


def test_assign_refuses_unknown_and_busy_devices(plane: Plane) -> None:
    cloud, tenant, config = plane.cloud, plane.tenant, str(plane.config)
    unknown = cli(cloud, "cloud", "assign", "nosuchdev", "demo-glm:1", "-c", config, "--tenant", tenant)
    failed(unknown, 1, "no such device", "--new")
    assert "nosuchdev" not in cli(cloud, "fleet", "ls", "--json").stdout
    new = cli(
        cloud, "cloud", "assign", "pre-provisioned", "demo-glm:1", "-c", config, "--tenant", tenant, "--new"
    )
    assert new.returncode == 0 and "[cloud] pre-provisioned → demo-glm:1" in new.stdout, (
        new.stdout + new.stderr
    )
    created = cli(cloud, "rollout", "create", "demo-glm:1", "-l", "", "--waves", "100")
    assert created.returncode == 0, created.stderr
    rid = created.stdout.split()[1]
    busy = cli(cloud, "cloud", "assign", "mine", "demo-glm:1", "-c", config, "--tenant", tenant)
    failed(busy, 1, f"rollout {rid}")
    assert cli(cloud, "rollout", "abort", rid).returncode == 0  # the module's other tests make their own
    # The same config's port is the running control plane's: refused before anything starts.
    second = cli(cloud, "cloud", "serve", "--config", config)
    failed(second, 1, "cannot listen on")


def test_broker_config_and_enroll_keep_the_broker_folder_true(tmp_path: Path) -> None:
    pki, broker = tmp_path / "pki", tmp_path / "broker"

    def cmd(*args: str) -> subprocess.CompletedProcess[str]:
        return autoglm("fleet", *args, home=tmp_path / "home", timeout=60)

    for bad in (
        ["--port", "70000"],
        ["--message-size-limit", "-1"],
        ["--bind", "not an ip"],
        ["--host", "bad host!"],
    ):
        args = ["broker-config", "--out", str(tmp_path / "bad"), "--pki", str(pki)]
        args += bad if bad[0] == "--host" else ["--host", "localhost", *bad]
        failed(cmd(*args), 2)
    # Names with '_' (compose services), a host name to bind, 0 for mosquitto's "no limit".
    made = cmd(
        *("broker-config", "--host", "localhost", "--host", "10.0.0.1", "--host", "my_broker"),
        *("--bind", "localhost", "--message-size-limit", "0", "--out", str(broker), "--pki", str(pki)),
    )
    assert made.returncode == 0, made.stderr
    assert "listener 8883 localhost" in (broker / "mosquitto.conf").read_text()
    # A device enrolled later reaches the broker's own ACL, not only the CA's copy.
    late = cmd("enroll", "dev-late", "--pki", str(pki))
    assert late.returncode == 0, late.stderr
    assert "dev-late" in (pki / "acl").read_text() and "dev-late" in (broker / "acl").read_text()
    failed(cmd("enroll", "cp-1", "--cloud", "--tenant", "t1", "--pki", str(pki)), 2, "--tenant")
    # An --out that cannot be a folder leaves no identity behind its error.
    (tmp_path / "a-file").write_text("")
    failed(cmd("enroll", "dev-x", "--pki", str(pki), "--out", str(tmp_path / "a-file")), 1)
    assert "dev-x" not in (pki / "acl").read_text()


def test_reading_a_registry_that_is_not_there_is_an_error(tmp_path: Path) -> None:
    home = tmp_path / "home"
    for args in (["model", "ls"], ["model", "gc"], ["model", "show", "a:1"]):
        failed(
            autoglm(*args, "--registry", str(tmp_path / "nope"), home=home, timeout=60), 1, "no registry at"
        )
    # The default registry not made yet is simply empty.
    r = autoglm("model", "ls", home=home, timeout=60)
    assert r.returncode == 0 and "No models" in r.stdout
