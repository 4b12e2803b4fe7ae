"""How CLI commands show progress to a person: steps with timings, and where each one happens."""

from __future__ import annotations

import time

from rich.console import Console

_COLOURS = {"cloud": "cyan", "edge": "magenta", "broker": "yellow", "app": "green"}


def where(place: str) -> str:
    """A coloured ``[place]`` prefix; the bracket is escaped so rich does not read it as markup."""
    colour = _COLOURS.get(place, "white")
    return f"[bold {colour}]\\[{place}][/]"


class ConsoleReporter:
    """A StepReporter that prints each step, then what it found and how long it took."""

    def __init__(self, console: Console, place: str = "cloud") -> None:
        self.console = console
        self.prefix = where(place)
        self._started = time.monotonic()

    def step(self, title: str) -> None:
        self._started = time.monotonic()
        self.console.print(f"{self.prefix} {title} …")

    def done(self, detail: str) -> None:
        took = time.monotonic() - self._started
        self.console.print(f"{self.prefix}   [green]✓[/] {detail} [dim]({took:.1f}s)[/]")
