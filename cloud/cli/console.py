"""How CLI commands show things to a person: steps with timings, where each one happens, and tables.

The commands' consoles read no markup (``markup=False``): what they print holds names, paths and
error messages that an operator or a device chose, and rich read ``[/x]`` in one as a closing tag
(a traceback) or dropped ``[b]`` from it silently. Styles are given as ``style=`` or as ``Text``;
this module's reporter writes its own markup and escapes what it is given."""

from __future__ import annotations

import time

from rich.console import Console
from rich.markup import escape
from rich.measure import Measurement
from rich.table import Table

_COLOURS = {"cloud": "cyan", "edge": "magenta", "broker": "yellow", "app": "green"}


def make_console(*, stderr: bool = False) -> Console:
    """A console that prints text as given (no markup, no highlighting)."""
    return Console(highlight=False, soft_wrap=True, markup=False, stderr=stderr)


def where(place: str) -> str:
    """A coloured ``[place]`` prefix (markup); the bracket is escaped so rich does not read it as a tag."""
    colour = _COLOURS.get(place, "white")
    return f"[bold {colour}]\\[{place}][/]"


def print_table(console: Console, table: Table) -> None:
    """``table`` at its natural width, however narrow the terminal or pipe: a device id cut to
    ``edge-node-…`` names no device (two such rows looked the same), and a script reading the
    table needs whole cells. A terminal narrower than the table wraps its lines, as kubectl's do."""
    natural = Measurement.get(console, console.options.update_width(1_000_000), table).maximum
    width = console.width
    console.width = max(width, natural)
    try:
        console.print(table)
    finally:
        console.width = width


class ConsoleReporter:
    """A StepReporter that prints each step, then what it found and how long it took."""

    def __init__(self, console: Console, place: str = "cloud") -> None:
        self.console = console
        self.prefix = where(place)
        self._started = time.monotonic()

    def step(self, title: str) -> None:
        self._started = time.monotonic()
        self.console.print(f"{self.prefix} {escape(title)} …", markup=True)

    def done(self, detail: str) -> None:
        took = time.monotonic() - self._started
        self.console.print(f"{self.prefix}   [green]✓[/] {escape(detail)} [dim]({took:.1f}s)[/]", markup=True)
