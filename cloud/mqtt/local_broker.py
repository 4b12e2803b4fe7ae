"""A private mosquitto started from a generated config (the demo and the tests use it).

Production uses a managed broker (manifests/); this exists so that a demo or a test never
touches a shared broker and can stop, restart or cut its own.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from cloud.processes import stop_process
from shared.errors import BrokerError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalBroker:
    """mosquitto on 127.0.0.1 with persistence and queue limits raised for model transfers."""

    def __init__(
        self,
        port: int | None = None,
        workdir: Path | None = None,
        security: list[str] | None = None,
        autosave_s: int | None = None,
        extra: list[str] | None = None,
    ) -> None:
        self.port = port or free_port()
        # None: save after every change, so a SIGKILLed broker keeps every queued message (what
        # the tests of broker crashes need); seconds: save periodically, as production brokers do.
        self.autosave_s = autosave_s
        # Listener directives (TLS, ACL: cloud.mqtt.pki.broker_tls_lines); None: anonymous plain TCP.
        self.security = security
        # More directives after the rest (a bridge to another broker: its ``connection`` section).
        self.extra = extra or []
        self._own_dir = workdir is None
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="autoglm-mosquitto-"))
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        return "127.0.0.1"

    @property
    def log_path(self) -> Path:
        return self.workdir / "mosquitto.log"

    def config_text(self) -> str:
        # FACTS.md: default max_queued_messages (1000) silently drops; autosave keeps queues across SIGKILL.
        return "\n".join(
            [
                "per_listener_settings false",
                f"listener {self.port} 127.0.0.1",
                *(self.security or ["allow_anonymous true"]),
                "persistence true",
                f"persistence_location {self.workdir}/",
                *(
                    ["autosave_interval 1", "autosave_on_changes true"]
                    if self.autosave_s is None
                    else [f"autosave_interval {self.autosave_s}"]
                ),
                "max_queued_messages 0",
                "max_queued_bytes 0",
                "max_inflight_messages 0",
                "message_size_limit 0",
                "max_keepalive 3600",
                # As in production: small packets at once, not after a 40 ms delayed ACK.
                "set_tcp_nodelay true",
                "persistent_client_expiration 7d",
                "user root",
                "log_dest file " + str(self.log_path),
                "log_type error",
                "log_type warning",
                "log_type notice",
                *self.extra,
                "",
            ]
        )

    def start(self, timeout: float = 10.0) -> LocalBroker:
        if self._proc is not None and self._proc.poll() is None:
            # Started already (``with LocalBroker() as b: b.start()``): a second process would
            # replace the first in ``_proc``, and the first outlive everything.
            return self
        exe = shutil.which("mosquitto") or (
            "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None
        )
        if exe is None:
            raise BrokerError("mosquitto is not installed (Debian: apt-get install mosquitto)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(self.config_text())
        self._proc = subprocess.Popen(
            [exe, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                err = self._proc.stderr.read().decode(errors="replace") if self._proc.stderr else ""
                raise BrokerError(f"mosquitto exited at start: {err.strip()}", port=self.port)
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise BrokerError("mosquitto did not open its port in time", port=self.port)

    def stop(self) -> None:
        if self._proc is not None:
            stop_process(self._proc, grace_s=5)
        self._proc = None

    def kill(self) -> None:
        """SIGKILL, as a crash would: nothing is saved on the way out."""
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait(10)
        self._proc = None

    def close(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> LocalBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
