"""How every server command (`edge run`, `cloud serve`, `pool serve`) takes its port: bound before
the app starts (a port in use is one line at once), listening only once the app has started (a
server still starting refuses connections), on every address its host names, and Ctrl-C is a
normal end."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest

from cloud.mqtt.local_broker import free_port

APP = textwrap.dedent(
    """
    import contextlib, sys, time
    from fastapi import FastAPI
    from edge_agent.serving.server import configure_logging, run_server

    @contextlib.asynccontextmanager
    async def lifespan(app):
        print("lifespan starting", flush=True)
        time.sleep(float(sys.argv[3]))  # a model loading
        if sys.argv[4] == "fail":
            raise RuntimeError("no model")
        yield

    app = FastAPI(lifespan=lifespan)

    @app.get("/ping")
    def ping():
        return {"ok": True}

    configure_logging("INFO")
    run_server(app, sys.argv[1], int(sys.argv[2]), "INFO")
    """
)


def start(
    tmp_path: Path, host: str, port: int, delay: float = 0.0, fail: bool = False
) -> subprocess.Popen[str]:
    script = tmp_path / "app.py"
    script.write_text(APP)
    return subprocess.Popen(
        [sys.executable, str(script), host, str(port), str(delay), "fail" if fail else "ok"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )


def refused(port: int, host: str = "127.0.0.1") -> bool:
    try:
        socket.create_connection((host, port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


def wait_serving(url: str, proc: subprocess.Popen[str], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[0]
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise AssertionError(f"{url} did not answer")


def test_a_starting_server_refuses_then_serves_and_ctrl_c_ends_it_cleanly(tmp_path: Path) -> None:
    port = free_port()
    proc = start(tmp_path, "127.0.0.1", port, delay=3.0)
    try:
        assert proc.stdout is not None
        seen = []
        while not seen or "lifespan starting" not in seen[-1]:
            seen.append(proc.stdout.readline())
            assert seen[-1], seen
        # The port is taken (bound), but connections are refused while the app starts.
        assert refused(port)
        wait_serving(f"http://127.0.0.1:{port}/ping", proc)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out
        out = "".join(seen) + out
        assert f"serving on http://127.0.0.1:{port}" in out
    finally:
        proc.kill()


def test_a_port_in_use_is_one_line_before_the_app_starts(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        proc = start(tmp_path, "127.0.0.1", port, delay=30.0)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert "lifespan starting" not in out  # refused before the (slow) start
    assert f"cannot listen on 127.0.0.1:{port}" in out


def test_an_app_that_fails_to_start_exits_3(tmp_path: Path) -> None:
    proc = start(tmp_path, "127.0.0.1", free_port(), fail=True)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 3, out


@pytest.mark.parametrize("host", ["", "localhost"])
def test_every_address_the_host_names_is_served(tmp_path: Path, host: str) -> None:
    port = free_port()
    proc = start(tmp_path, host, port)
    try:
        wait_serving(f"http://127.0.0.1:{port}/ping", proc)
        addresses = {a[4][0] for a in socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM)}
        if host == "":
            addresses = {"127.0.0.1"} | ({"::1"} if socket.has_ipv6 and _ipv6_loopback() else set())
        for address in addresses:
            shown = f"[{address}]" if ":" in address else address
            assert httpx.get(f"http://{shown}:{port}/ping", timeout=5).status_code == 200, address
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=30)


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False
