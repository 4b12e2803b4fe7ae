"""How long packaging work tells a person what it is doing (the CLI draws it; tests record it)."""

from __future__ import annotations

import logging
from typing import Protocol

log = logging.getLogger(__name__)


class StepReporter(Protocol):
    def step(self, title: str) -> None: ...

    def done(self, detail: str) -> None: ...


class SilentReporter:
    """Steps go to the log only."""

    def step(self, title: str) -> None:
        log.info("%s", title)

    def done(self, detail: str) -> None:
        log.info("  %s", detail)
