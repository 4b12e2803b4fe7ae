"""Running one of our FastAPI apps as a process: the log format and uvicorn settings every
server command shares (`edge run`, `cloud serve`, `pool serve`)."""

from __future__ import annotations

import enum
import logging
import socket
from typing import Any

from shared.errors import ConfigError

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class LogLevel(enum.StrEnum):
    """The server commands' ``--log-level`` (a choice, so a typo is refused before anything starts)."""

    DEBUG = "DEBUG"
    INFO = "INFO"
    WARNING = "WARNING"
    ERROR = "ERROR"
    CRITICAL = "CRITICAL"


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format=LOG_FORMAT)


def listen(host: str, port: int) -> socket.socket:
    """The server's listening socket. Bound before the app starts: uvicorn binds only after the
    lifespan has started everything (a control plane's MQTT session and rollout driver, an agent's
    model), so a port in use was a page of log and exit 3 after all of that."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
        return socket.create_server((host, port), family=family)
    except OSError as exc:
        raise ConfigError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}", host=host, port=port
        ) from exc


def run_server(app: Any, host: str, port: int, log_level: str) -> None:
    """Serve ``app`` until interrupted; uvicorn picks uvloop and httptools when installed."""
    import uvicorn

    sock = listen(host, port)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level.lower(), access_log=False)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
