"""``autoglm edge …``: runs the edge agent (needs only the ``edge`` extra)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from shared.errors import ConfigError

app = typer.Typer(help="Run the edge agent on a device.", no_args_is_help=True)


@app.command("run")
def run(
    config: Annotated[
        Path,
        typer.Option("--config", "-c", help="Edge agent YAML config (see edge_agent/edge.example.yaml)."),
    ],
    log_level: Annotated[str, typer.Option(help="Python log level.")] = "INFO",
) -> None:
    """Serve the local OpenAI-compatible API and follow the cloud's desired state over MQTT."""
    import uvicorn

    from edge_agent.api.app import create_app
    from edge_agent.settings import EdgeSettings

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = EdgeSettings.load(config)
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    uvicorn.run(
        create_app(settings),
        host=settings.api.host,
        port=settings.api.port,
        log_level=log_level.lower(),
        access_log=False,
    )
