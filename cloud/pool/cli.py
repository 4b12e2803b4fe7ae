"""``autoglm pool``: one replica of the cloud GPU pool (``serve`` needs the ``cloud`` extra: torch),
and ``fetch``, which puts a registry version's full-precision model in a folder (no torch: the
init container in front of vLLM runs it)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from edge_agent.serving.server import LogLevel

if TYPE_CHECKING:
    from cloud.pool.fetch import FetchedModel

app = typer.Typer(
    help="The cloud inference pool (full-precision PyTorch, continuous batching).", no_args_is_help=True
)

RegistryUrl = Annotated[
    str | None,
    typer.Option(
        "--registry-url", envvar="AUTOGLM_URL", help="The control plane whose registry holds the model."
    ),
]
RegistryKey = Annotated[
    str | None,
    typer.Option(
        "--registry-key",
        envvar="AUTOGLM_POOL_REGISTRY_KEY",
        help="A key of the model's tenant with scope pool (or operator), to read its registry.",
    ),
]
Trust = Annotated[
    list[str] | None,
    typer.Option(
        "--trust",
        envvar="AUTOGLM_TRUSTED_KEYS",
        help="Public key (base64) pool artifacts must be signed with; repeat for several.",
    ),
]
CacheDir = Annotated[
    Path,
    typer.Option("--cache-dir", help="Where fetched files are kept by digest."),
]
_DEFAULT_CACHE = Path.home() / ".cache" / "autoglm-pool"


def _fetch(
    ref: str, url: str | None, key: str | None, trust: list[str] | None, cache: Path, out: Path | None
) -> FetchedModel:
    from cloud.pool.fetch import RegistrySource, fetch_pool_model

    if url is None:
        raise typer.BadParameter("give the control plane's URL", param_hint="--registry-url")
    return fetch_pool_model(RegistrySource.build(url, key, trust or []), ref, cache, out)


@app.command("fetch")
def fetch(
    ref: Annotated[str, typer.Argument(help="NAME:VERSION in the registry.")],
    to: Annotated[
        Path | None, typer.Option("--to", help="The folder to fill [default: one under --cache-dir].")
    ] = None,
    registry_url: RegistryUrl = None,
    registry_key: RegistryKey = None,
    trust: Trust = None,
    cache_dir: CacheDir = _DEFAULT_CACHE,
) -> None:
    """Fetch a version's full-precision model (its signed pool artifact) and verify every file."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    fetched = _fetch(ref, registry_url, registry_key, trust, cache_dir, to)
    typer.echo(f"{fetched.artifact.ref} {fetched.digest} in {fetched.folder}")


@app.command("serve")
def serve(
    model: Annotated[
        Path | None, typer.Option("--model", help="Local Hugging Face causal-LM folder.")
    ] = None,
    from_registry: Annotated[
        str | None,
        typer.Option(
            "--from-registry",
            help="Serve this NAME:VERSION's pool artifact from the control plane's registry "
            "(instead of --model); clients may then ask for NAME or NAME:VERSION.",
        ),
    ] = None,
    name: Annotated[str | None, typer.Option(help="Model id clients use [default: the folder name].")] = None,
    version: Annotated[
        str | None, typer.Option(help="The version a --model folder holds (also served as NAME:VERSION).")
    ] = None,
    registry_url: RegistryUrl = None,
    registry_key: RegistryKey = None,
    trust: Trust = None,
    cache_dir: CacheDir = _DEFAULT_CACHE,
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
    log_level: Annotated[
        LogLevel, typer.Option(help="Python log level.", case_sensitive=False)
    ] = LogLevel.INFO,
) -> None:
    """Serve the OpenAI-compatible API (completions, chat, streaming) from a batching PyTorch engine."""
    from cloud.pool.server import create_app
    from cloud.pool.settings import PoolSettings
    from edge_agent.serving.server import configure_logging, run_server

    configure_logging(log_level.value)
    if (model is None) == (from_registry is None):
        raise typer.BadParameter("give either --model or --from-registry", param_hint="--model")
    digest = ""
    if from_registry is not None:
        fetched = _fetch(from_registry, registry_url, registry_key, trust, cache_dir, None)
        model, digest = fetched.folder, fetched.digest
        name, version = name or fetched.artifact.name, fetched.artifact.version
    settings = PoolSettings.build(
        model_dir=model,
        name=name,
        version=version,
        digest=digest,
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
    run_server(create_app(settings), settings.host, settings.port, log_level.value)
