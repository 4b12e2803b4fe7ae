"""``autoglm edge …``: runs the edge agent (needs only the ``edge`` extra)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from edge_agent.serving.server import LogLevel
from shared.errors import ConfigError

app = typer.Typer(help="Run the edge agent on a device.", no_args_is_help=True)


@app.command("run")
def run(
    config: Annotated[
        Path,
        typer.Option("--config", "-c", help="Edge agent YAML config (see edge_agent/edge.example.yaml)."),
    ],
    log_level: Annotated[
        LogLevel, typer.Option(help="Python log level.", case_sensitive=False)
    ] = LogLevel.INFO,
) -> None:
    """Serve the local OpenAI-compatible API and follow the cloud's desired state over MQTT."""
    from edge_agent.agent import preflight
    from edge_agent.api.app import create_app
    from edge_agent.serving.server import configure_logging, run_server
    from edge_agent.settings import EdgeSettings

    configure_logging(log_level.value)
    try:
        settings = EdgeSettings.load(config)
        preflight(settings)
        # The port is taken before the app starts: one in use is a ConfigError here too.
        run_server(create_app(settings), settings.api.host, settings.api.port, log_level.value)
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
