"""``autoglm pool serve``: one replica of the cloud GPU pool (needs the ``cloud`` extra: torch)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    help="The cloud inference pool (full-precision PyTorch, continuous batching).", no_args_is_help=True
)


@app.command("serve")
def serve(
    model: Annotated[Path, typer.Option("--model", help="Local Hugging Face causal-LM folder.")],
    name: Annotated[str | None, typer.Option(help="Model id clients use [default: the folder name].")] = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8500,
    device: Annotated[
        str, typer.Option(help="auto (CUDA bf16 when present, else CPU fp32), cpu or cuda.")
    ] = "auto",
    max_batch: Annotated[int, typer.Option(help="Sequences decoded together per step.")] = 32,
    queue_size: Annotated[
        int, typer.Option(help="Requests that may wait for the batch; more get 429.")
    ] = 256,
    threads: Annotated[int, typer.Option(help="torch CPU threads (0: torch's default).")] = 0,
    default_max_tokens: Annotated[int, typer.Option(help="max_tokens for requests that give none.")] = 128,
    api_key: Annotated[
        str | None, typer.Option(envvar="AUTOGLM_POOL_API_KEY", help="Require this Bearer key on /v1.")
    ] = None,
    max_body_bytes: Annotated[
        int, typer.Option(help="Larger request bodies are refused with 413 before they are read.")
    ] = 4 * 1024 * 1024,
    log_level: Annotated[str, typer.Option(help="Python log level.")] = "INFO",
) -> None:
    """Serve the OpenAI-compatible API (completions, chat, streaming) from a batching PyTorch engine."""
    from cloud.pool.server import create_app
    from cloud.pool.settings import PoolSettings
    from edge_agent.serving.server import configure_logging, run_server

    configure_logging(log_level)
    settings = PoolSettings.build(
        model_dir=model,
        name=name,
        host=host,
        port=port,
        device=device,
        max_batch=max_batch,
        queue_size=queue_size,
        threads=threads,
        default_max_tokens=default_max_tokens,
        api_key=api_key,
        max_body_bytes=max_body_bytes,
    )
    run_server(create_app(settings), settings.host, settings.port, log_level)
