"""Running one of our FastAPI apps as a process: the log format and uvicorn settings every
server command shares (`edge run`, `cloud serve`, `pool serve`)."""

from __future__ import annotations

import enum
import logging
import socket
from typing import Any

from shared.errors import ConfigError

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

log = logging.getLogger(__name__)


class LogLevel(enum.StrEnum):
    """The server commands' ``--log-level`` (a choice, so a typo is refused before anything starts)."""

    DEBUG = "DEBUG"
    INFO = "INFO"
    WARNING = "WARNING"
    ERROR = "ERROR"
    CRITICAL = "CRITICAL"


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format=LOG_FORMAT)


def listen(host: str, port: int) -> list[socket.socket]:
    """The server's sockets, bound to every address ``host`` names ("" for all interfaces, as
    uvicorn took it) and not yet listening.

    Bound before the app starts: uvicorn binds only after the lifespan has started everything (a
    control plane's MQTT session and rollout driver, an agent's or a replica's model), so a port in
    use was a page of log and exit 3 after all of that. Not listening until uvicorn listens, after
    the lifespan: a server still starting refuses connections, as before (the gateway takes a
    refused connection for a replica that is down and tries another at once; a listening socket
    nobody serves would hold each request until its timeout)."""
    sockets: list[socket.socket] = []
    try:
        found = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        # Each address once (getaddrinfo may list one per protocol).
        for family, kind, proto, address in dict.fromkeys((f, k, p, a) for f, k, p, _, a in found):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                # "::" would take the IPv4 port too, and the 0.0.0.0 socket beside it then fail.
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
    except OSError as exc:  # a name that resolves to nothing, a port in use, one not ours to take
        for sock in sockets:
            sock.close()
        raise ConfigError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}", host=host, port=port
        ) from exc
    return sockets


def run_server(app: Any, host: str, port: int, log_level: str) -> None:
    """Serve ``app`` until interrupted; uvicorn picks uvloop and httptools when installed. Exits 3
    (uvicorn's code) when the app does not start."""
    import uvicorn

    class Server(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets=sockets)
            if self.started:
                # uvicorn names the address only for sockets it bound itself (port 0: the one picked).
                for sock in sockets or []:
                    address, bound = sock.getsockname()[:2]
                    shown = f"[{address}]" if sock.family == socket.AF_INET6 else address
                    log.info("serving on http://%s:%d (Ctrl-C stops)", shown, bound)

    sockets = listen(host, port)
    server = Server(uvicorn.Config(app, host=host, port=port, log_level=log_level.lower(), access_log=False))
    try:
        server.run(sockets=sockets)
    except KeyboardInterrupt:  # uvicorn raises it again after its graceful shutdown: a normal end
        pass
    finally:
        for sock in sockets:
            sock.close()
    if not server.started:
        raise SystemExit(3)
