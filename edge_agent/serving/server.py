"""Running one of our FastAPI apps as a process: the log format and uvicorn settings every
server command shares (`edge run`, `cloud serve`, `pool serve`)."""

from __future__ import annotations

import enum
import logging
from typing import Any

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


def run_server(app: Any, host: str, port: int, log_level: str) -> None:
    """Serve ``app`` until interrupted; uvicorn picks uvloop and httptools when installed."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level=log_level.lower(), access_log=False)
