"""Operator commands (``autoglm fleet|rollout|config``) over the control plane's REST API, and
``autoglm cloud serve|key``. The API address and key come from ``--url``/``--api-key`` or
``AUTOGLM_URL``/``AUTOGLM_API_KEY``."""

from __future__ import annotations

import ipaddress
import json
import math
import re
import time
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

import typer
from rich.progress import BarColumn, Progress, TextColumn
from rich.table import Table
from rich.text import Text

from cloud.cli.console import make_console, print_table
from edge_agent.serving.server import LogLevel
from shared.errors import AutoGLMError, ConfigError
from shared.ids import is_valid_name

console = make_console()
# Warnings: standard output stays what a script reads.
notices = make_console(stderr=True)

UrlOpt = Annotated[str, typer.Option("--url", envvar="AUTOGLM_URL", help="Control-plane URL.")]
KeyOpt = Annotated[
    str, typer.Option("--api-key", envvar="AUTOGLM_API_KEY", help="API key (operator or admin scope).")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="Control-plane YAML config.")]
KeyTenantOpt = Annotated[str, typer.Option("--tenant", help="Tenant the key acts for.")]

fleet_app = typer.Typer(help="Devices of the fleet (REST).", no_args_is_help=True)
rollout_app = typer.Typer(help="Staged rollouts with health gates (REST).", no_args_is_help=True)
config_app = typer.Typer(help="Push serving config to devices (REST).", no_args_is_help=True)

DEFAULT_URL = "http://127.0.0.1:8400"
# What a request waits for the control plane beyond what it asks the control plane to wait.
HTTP_TIMEOUT_S = 30.0
# The longest a command's reply is waited for (the API's own bound on wait_s).
MAX_COMMAND_WAIT_S = 60.0


class ApiError(AutoGLMError):
    """The control plane answered with an error, or something that is not its API answered."""


def finite(value: float | None) -> float | None:
    """Option callback: nan and inf are no number of seconds or fraction (and no JSON either)."""
    if value is not None and not math.isfinite(value):
        raise typer.BadParameter("must be a finite number")
    return value


def segment(value: str, what: str) -> str:
    """``value``, an id, as one path segment of a URL: an id with ``/``, ``?`` or ``..`` in it must
    not become another path (``rollout status ../devices`` read the device list)."""
    if not value:
        raise typer.BadParameter("must not be empty", param_hint=what)
    if not is_valid_name(value):
        raise typer.BadParameter(
            f"{value!r} is no id: ids are letters, digits, '.', '_' and '-', starting with a letter or digit",
            param_hint=what,
        )
    return quote(value, safe="")


def _check_key(key: str) -> str:
    key = key.strip()
    if not key:
        raise ConfigError("no API key: pass --api-key or set AUTOGLM_API_KEY")
    if not key.isascii() or not key.isprintable() or any(c.isspace() for c in key):
        # httpx refused it only as it sent the request ("cannot reach the control plane", or a
        # UnicodeEncodeError traceback), which blamed the network.
        raise ConfigError(
            "the API key holds spaces, control or non-ASCII characters, which no API key has: "
            "check --api-key or AUTOGLM_API_KEY"
        )
    return key


def _error_text(r: Any) -> str:
    """The control plane's error message, or a line saying what else answered (never a whole page)."""
    try:
        message = r.json()["error"]["message"]
        if isinstance(message, str):
            return message
    except (ValueError, KeyError, TypeError):
        pass
    kind = r.headers.get("content-type", "").split(";")[0]
    text = " ".join(r.text.split())
    if kind == "text/html" or not text:
        return f"{r.reason_phrase or 'error'} ({kind or 'no body'}: is --url the control plane's address?)"
    return text[:300] + (" …" if len(text) > 300 else "")


def call(
    url: str,
    key: str,
    method: str,
    path: str,
    body: dict[str, Any] | None = None,
    *,
    expect: str,
    timeout_s: float = HTTP_TIMEOUT_S,
) -> Any:
    """The control plane's JSON answer to ``method path``; ``expect`` is a field every answer of
    that endpoint has, so another server's JSON is an error, not a KeyError."""
    import httpx

    key = _check_key(key)
    try:
        r = httpx.request(
            method,
            f"{url.rstrip('/')}{path}",
            json=body,
            headers={"authorization": f"Bearer {key}"},
            timeout=timeout_s,
        )
    except httpx.InvalidURL as exc:
        raise ConfigError(
            f"{url!r} is not a URL this command can use ({exc}): check --url or AUTOGLM_URL"
        ) from exc
    except httpx.HTTPError as exc:
        raise ApiError(f"cannot reach the control plane at {url}: {exc}") from exc
    if r.status_code >= 400:
        raise ApiError(f"{r.status_code}: {_error_text(r)}")
    try:
        data = r.json()
    except ValueError:
        data = None
    if not isinstance(data, dict) or expect not in data:
        raise ApiError(
            f"{url} answered {method} {path.split('?')[0]} with {r.status_code} and "
            f"{'a body' if r.content else 'no body'} that is not the control plane's: "
            "is --url the control plane's address?"
        )
    return data


# -- fleet ---------------------------------------------------------------------------------------
@fleet_app.command("ls")
def fleet_ls(
    selector: Annotated[
        str, typer.Option("--selector", "-l", help="Label selector, e.g. zone=eu,tier!=canary.")
    ] = "",
    as_json: JsonOpt = False,
    url: UrlOpt = DEFAULT_URL,
    api_key: KeyOpt = "",
) -> None:
    """List devices with their status, model and update phase."""
    devices = call(url, api_key, "GET", f"/v1/devices?selector={quote(selector)}", expect="devices")[
        "devices"
    ]
    if as_json:
        console.print_json(json.dumps(devices))
        return
    table = Table("device", "status", "model", "phase", "revision", "labels", "last error")
    for d in devices:
        err = d.get("last_error") or {}
        table.add_row(
            d["device_id"],
            d["status"],
            d["active_model"] or "-",
            d["phase"] or "-",
            f"{d['reported_revision']}/{d['desired_revision']}",
            ",".join(f"{k}={v}" for k, v in sorted(d["labels"].items())),
            err.get("code", ""),
        )
    print_table(console, table)


@fleet_app.command("command")
def fleet_command(
    device_id: Annotated[str, typer.Argument(help="Device id.")],
    action: Annotated[
        str, typer.Argument(help="ping, reload or rollback (to the model in the standby slot).")
    ],
    wait: Annotated[
        float,
        typer.Option(
            "--wait",
            help="Seconds to wait for the reply, up to 60 (0: send and do not wait).",
            min=0,
            max=MAX_COMMAND_WAIT_S,
            callback=finite,
        ),
    ] = 10.0,
    url: UrlOpt = DEFAULT_URL,
    api_key: KeyOpt = "",
) -> None:
    """Send a device a one-shot command, signed by the control plane's control key. Exits 1 when
    the device answers that it failed, or gives no answer within --wait seconds (the command was
    sent: it may still be carried out)."""
    if action not in ("ping", "reload", "rollback"):
        raise typer.BadParameter("choose ping, reload or rollback", param_hint="ACTION")
    r = call(
        url,
        api_key,
        "POST",
        f"/v1/devices/{segment(device_id, 'DEVICE_ID')}/commands",
        {"action": action, "wait_s": wait},
        expect="status",
        # The control plane holds the request while it waits for the reply.
        timeout_s=wait + HTTP_TIMEOUT_S,
    )
    if r["status"] == "sent":
        if wait <= 0:
            console.print(f"{device_id}: {action} sent (request {r['request_id']})")
            return
        # A ping is a health check: a device that never answers must not pass as one that did.
        console.print(f"{device_id}: {action} sent (request {r['request_id']}); no reply within {wait:g} s")
        raise typer.Exit(1)
    console.print(f"{device_id}: {action} {'ok' if r['ok'] else 'FAILED'}: {r['detail']}")
    if not r["ok"]:
        raise typer.Exit(1)


@fleet_app.command("label")
def fleet_label(
    device_id: Annotated[str, typer.Argument(help="Device id.")],
    labels: Annotated[list[str], typer.Argument(help="key=value pairs; key= removes a label.")],
    url: UrlOpt = DEFAULT_URL,
    api_key: KeyOpt = "",
) -> None:
    """Set labels on a device (what rollout and config selectors match)."""
    parsed: dict[str, str] = {}
    for item in labels:
        key, sep, value = item.partition("=")
        if not sep:
            raise typer.BadParameter(f"{item!r} is not key=value", param_hint="LABELS")
        parsed[key] = value
    d = call(
        url,
        api_key,
        "PUT",
        f"/v1/devices/{segment(device_id, 'DEVICE_ID')}/labels",
        {"labels": parsed},
        expect="labels",
    )
    console.print(f"{d['device_id']}: " + ",".join(f"{k}={v}" for k, v in sorted(d["labels"].items())))


# -- credentials (local: where the fleet CA lives, not over REST) ---------------------------------
PkiOpt = Annotated[
    Path | None, typer.Option("--pki", help="Fleet CA folder [default: $AUTOGLM_HOME/fleet-pki].")
]


def _pki(path: Path | None) -> Any:
    from cloud.mqtt.pki import FleetPKI
    from cloud.paths import CloudPaths

    return FleetPKI(path or CloudPaths.from_env().fleet_pki)


@fleet_app.command("enroll")
def fleet_enroll(
    name: Annotated[str, typer.Argument(help="Device id (the certificate CN and MQTT username).")],
    tenant: Annotated[
        str | None, typer.Option("--tenant", help="The device's tenant [default: default].")
    ] = None,
    cloud: Annotated[
        bool, typer.Option("--cloud", help="Enroll a control-plane identity (all tenants' topics).")
    ] = False,
    out: Annotated[
        Path | None, typer.Option("--out", help="Folder for the key, certificate and CA certificate.")
    ] = None,
    pki: PkiOpt = None,
) -> None:
    """Issue per-device (or cloud) MQTT credentials signed by the fleet CA, and rewrite the broker
    ACL (also in each folder `fleet broker-config` wrote from this CA)."""
    import shutil

    if cloud and tenant is not None:
        raise typer.BadParameter(
            "a control-plane identity reaches every tenant: drop --tenant", param_hint="--tenant"
        )
    tenant = tenant or "default"
    if out is not None:
        # Before anything is issued: a --out that cannot be a folder must not leave an identity
        # saved and the ACL rewritten behind its error.
        out.mkdir(parents=True, exist_ok=True)
    fleet = _pki(pki)
    created = fleet.ensure_ca()
    if created:
        console.print(f"created the fleet CA in {fleet.root} (keep ca.key secret)")
    issued = fleet.enroll(name, role="cloud" if cloud else "device", tenant=None if cloud else tenant)
    if out is not None:
        for src in (issued.key, issued.cert, issued.ca):
            shutil.copy2(src, out / src.name)
        folder = out
    else:
        folder = issued.folder
    scope = "all tenants" if cloud else f"autoglm/v1/{tenant}/devices/{name}/# and the tenant's blobs"
    console.print(f"enrolled {name} ({scope}); credentials in {folder}")
    console.print(f"broker ACL rewritten: {fleet.acl_path}")
    for broker_dir in _broker_dirs(fleet):
        try:
            shutil.copy2(fleet.acl_path, broker_dir / "acl")
        except OSError as exc:  # the identity is issued: say where the ACL is stale, and go on
            notices.print(f"could not copy it to {broker_dir / 'acl'}: {exc.strerror or exc}", style="yellow")
        else:
            console.print(f"  and copied to {broker_dir / 'acl'}")
    console.print(
        "apply it: reload the broker (SIGHUP), or on Kubernetes re-create the broker's Secret from its "
        "folder and restart the broker (docs/deploy.md, step 3)"
    )
    console.print("broker section for its config:")
    console.print(
        f"  tls:\n    ca_file: {folder / 'ca.crt'}\n    cert_file: {folder / (name + '.crt')}\n"
        f"    key_file: {folder / (name + '.key')}"
    )


# Where `fleet broker-config` wrote a broker's folder from this CA, one per line: enrolling later
# rewrites the ACL there too (the folder is what the broker's Secret is made from; the CA's own
# copy alone left new devices out of the broker's ACL).
BROKER_DIRS = "broker-dirs"


def _broker_dirs(fleet: Any) -> list[Path]:
    try:
        lines = (fleet.root / BROKER_DIRS).read_text().splitlines()
    except FileNotFoundError:
        return []
    dirs = [Path(line) for line in dict.fromkeys(lines) if line.strip()]
    ca = fleet.ca_cert_path.read_bytes()

    def ours(d: Path) -> bool:
        # Still a broker of this CA: the folder may since have been written from another one.
        try:
            return (
                (d / "mosquitto.conf").is_file()
                and (d / "acl").is_file()
                and (d / "ca.crt").read_bytes() == ca
            )
        except OSError:
            return False

    return [d for d in dirs if ours(d)]


def _remember_broker_dir(fleet: Any, out: Path) -> None:
    known = {str(d) for d in _broker_dirs(fleet)} | {str(out.resolve())}
    (fleet.root / BROKER_DIRS).write_text("".join(f"{d}\n" for d in sorted(known)))


# Labels of letters, digits, '-' and '_' (compose and some clusters name services with it).
_HOST = re.compile(
    r"(?=.{1,253}$)(\*\.)?[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*\.?"
)


def _host_name(value: str, option: str) -> str:
    """A DNS name (a leading ``*.`` allowed) or an IP address: what a certificate's SAN and a
    mosquitto listener can hold."""
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        pass
    if not _HOST.fullmatch(value) or (option == "--bind" and value.startswith("*")):
        raise typer.BadParameter(f"{value!r} is neither a DNS name nor an IP address", param_hint=option)
    return value


@fleet_app.command("broker-config")
def fleet_broker_config(
    host: Annotated[list[str], typer.Option("--host", help="Broker DNS name or IP (repeatable).")],
    out: Annotated[Path, typer.Option("--out", help="Folder for mosquitto.conf, certificates and ACL.")],
    port: Annotated[int, typer.Option("--port", help="TLS listener port.", min=1, max=65535)] = 8883,
    bind: Annotated[
        str, typer.Option("--bind", help="Listen address, an IP or a host name [default: all interfaces].")
    ] = "",
    message_size_limit: Annotated[
        int,
        typer.Option(
            "--message-size-limit",
            help="Largest MQTT message in bytes: a few times the packages' chunk size (1 MiB by default); "
            "0: no limit but MQTT's own.",
            min=0,
            # MQTT's largest packet (a four-byte remaining length).
            max=268_435_455,
        ),
    ] = 4 * 1024 * 1024,
    pki: PkiOpt = None,
) -> None:
    """Write a TLS-only mosquitto config with the broker's certificate and the generated ACL."""
    import pwd
    import shutil

    from cloud.mqtt.pki import broker_tls_lines

    host = [_host_name(h, "--host") for h in host]
    if bind:
        bind = _host_name(bind, "--bind")
    fleet = _pki(pki)
    fleet.ensure_ca()
    if not fleet.acl_path.is_file():
        fleet.acl_path.write_text("")
    issued = fleet.issue("broker", server_names=host, out=out)
    shutil.copy2(fleet.acl_path, out / "acl")
    conf = [
        "per_listener_settings false",
        f"listener {port} {bind}".rstrip(),
        *broker_tls_lines(issued.ca.name, issued.cert.name, issued.key.name, "acl"),
        # Started as root, mosquitto switches to this user: the owner of these files, who can
        # read broker.key (mosquitto's own user could not).
        f"user {pwd.getpwuid(out.stat().st_uid).pw_name}",
        "persistence true",
        f"persistence_location {out.resolve()}/",
        # Saved once a minute, not after every change: telemetry and reported states are
        # delivered end to end (devices send them again until the control plane acknowledges
        # them stored), so a crash between saves delays them and loses none; saving after every
        # change rewrites the whole persistence file per message and does not scale to a fleet.
        "autosave_interval 60",
        # Bounded per client: a device that stops reading cannot make the broker hold an unbounded
        # backlog (missed chunks are asked for again).
        "max_queued_messages 10000",
        "max_queued_bytes 1073741824",
        f"message_size_limit {message_size_limit}",
        "persistent_client_expiration 7d",
        # Small packets (fetch requests, acknowledgements) go out at once, not after the peer's
        # 40 ms delayed ACK.
        "set_tcp_nodelay true",
        "",
    ]
    (out / "mosquitto.conf").write_text("\n".join(conf))
    _remember_broker_dir(fleet, out)
    console.print(f"wrote {out}/mosquitto.conf, broker.crt/key (for {', '.join(host)}), ca.crt and acl")
    console.print(f"start it there: cd {out} && mosquitto -c mosquitto.conf")


# -- rollouts ------------------------------------------------------------------------------------
def _waves(text: str) -> list[float]:
    try:
        waves = [float(w) for w in text.split(",") if w.strip()]
    except ValueError as exc:
        raise typer.BadParameter("waves are percentages like 10,50,100", param_hint="--waves") from exc
    if not all(math.isfinite(w) for w in waves):
        raise typer.BadParameter("waves are percentages like 10,50,100", param_hint="--waves")
    return waves


@rollout_app.command("create")
def rollout_create(
    model: Annotated[str, typer.Argument(help="name:version from the tenant's registry.")],
    selector: Annotated[
        str, typer.Option("--selector", "-l", help="Label selector (empty: all devices).")
    ] = "",
    waves: Annotated[str, typer.Option("--waves", help="Cumulative percentages.")] = "10,50,100",
    failure_threshold: Annotated[
        float, typer.Option(help="Fraction of a wave allowed to fail.", callback=finite)
    ] = 0.2,
    health_window: Annotated[
        float,
        typer.Option(
            "--health-window", help="Seconds of healthy telemetry after activation.", callback=finite
        ),
    ] = 60.0,
    wave_timeout: Annotated[
        float,
        typer.Option("--wave-timeout", help="Seconds before a silent device is skipped.", callback=finite),
    ] = 900.0,
    max_concurrent: Annotated[int, typer.Option(help="Devices downloading at once.")] = 100,
    min_samples: Annotated[
        int,
        typer.Option(
            "--min-samples", help="Requests a device must serve in its health window to be judged (0: any)."
        ),
    ] = 0,
    max_eval_drop: Annotated[
        float,
        typer.Option(
            "--max-eval-drop",
            help="Quality gate: a device whose agreement with the package's evaluation set falls more "
            "than this below the packager's figure fails (1: off).",
            callback=finite,
        ),
    ] = 0.05,
    allow_downgrade: Annotated[
        bool,
        typer.Option(
            "--allow-downgrade",
            help="MODEL may be an older release than devices run (they refuse it otherwise).",
        ),
    ] = False,
    url: UrlOpt = DEFAULT_URL,
    api_key: KeyOpt = "",
) -> None:
    """Start a staged rollout of MODEL to the devices the selector matches."""
    body = {
        "model": model,
        "selector": selector,
        "waves": _waves(waves),
        "failure_threshold": failure_threshold,
        "health_window_s": health_window,
        "wave_timeout_s": wave_timeout,
        "max_concurrent": max_concurrent,
        "min_samples": min_samples,
        "max_eval_drop": max_eval_drop,
        "allow_downgrade": allow_downgrade,
    }
    r = call(url, api_key, "POST", "/v1/rollouts", body, expect="rollout_id")
    console.print(
        f"rollout {r['rollout_id']} created: {len(r['devices'])} device(s), {len(r['waves'])} wave(s)"
    )


@rollout_app.command("ls")
def rollout_ls(as_json: JsonOpt = False, url: UrlOpt = DEFAULT_URL, api_key: KeyOpt = "") -> None:
    """List rollouts."""
    items = call(url, api_key, "GET", "/v1/rollouts?devices=false", expect="rollouts")["rollouts"]
    if as_json:
        console.print_json(json.dumps(items))
        return
    table = Table("rollout", "model", "state", "wave", "devices", "message")
    for r in items:
        model = f"{r['model']['name']}:{r['model']['version']}"
        table.add_row(
            r["rollout_id"],
            model,
            r["state"],
            f"{r['current_wave'] + 1}/{len(r['waves'])}",
            str(sum(w["devices"] for w in r["waves"])),
            r["message"],
        )
    print_table(console, table)


DONE_STATES = ("healthy", "failed", "timed_out", "rolled_back")
FINAL = ("completed", "halted", "aborted", "rolled_back")


def _print_status(r: dict[str, Any]) -> None:
    model = f"{r['model']['name']}:{r['model']['version']}"
    console.print(
        Text.assemble(f"rollout {r['rollout_id']}  {model}  ", (r["state"], "bold"), f"  {r['message']}")
    )
    for w in r["waves"]:
        states = ", ".join(f"{k} {v}" for k, v in sorted(w["states"].items()))
        console.print(f"  wave {w['index'] + 1} ({w['percent']:g}%): {w['devices']} device(s): {states}")


@rollout_app.command("status")
def rollout_status(
    rollout_id: Annotated[str, typer.Argument(help="Rollout id.")],
    watch: Annotated[
        bool,
        typer.Option(
            "--watch",
            "-w",
            help="Show wave progress bars until it ends; then exit 0 if it completed, 1 if it ended "
            "otherwise (halted, aborted, rolled back).",
        ),
    ] = False,
    as_json: JsonOpt = False,
    url: UrlOpt = DEFAULT_URL,
    api_key: KeyOpt = "",
) -> None:
    """Per-wave progress; --watch follows it with progress bars (a gate for scripts: see --watch)."""
    path = f"/v1/rollouts/{segment(rollout_id, 'ROLLOUT_ID')}"
    r = call(url, api_key, "GET", path, expect="waves")
    if as_json:
        console.print_json(json.dumps(r))
        return
    if not watch:
        _print_status(r)
        return
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} {task.fields[states]}"),
        console=console,
    ) as progress:
        tasks = [
            progress.add_task(
                f"wave {w['index'] + 1} ({w['percent']:g}%)", total=max(1, w["devices"]), states=""
            )
            for w in r["waves"]
        ]
        while True:
            for task, w in zip(tasks, r["waves"], strict=True):
                done = sum(n for s, n in w["states"].items() if s in DONE_STATES)
                states = ", ".join(f"{k} {v}" for k, v in sorted(w["states"].items()))
                progress.update(task, completed=done, states=states)
            if r["state"] in FINAL:
                break
            time.sleep(1.0)
            r = call(url, api_key, "GET", path, expect="waves")
    console.print(Text.assemble(f"rollout {rollout_id}: ", (r["state"], "bold"), f" {r['message']}"))
    if r["state"] != "completed":
        raise typer.Exit(1)


def _action(action: str) -> Any:
    def run(
        rollout_id: Annotated[str, typer.Argument(help="Rollout id.")],
        url: UrlOpt = DEFAULT_URL,
        api_key: KeyOpt = "",
    ) -> None:
        r = call(
            url, api_key, "POST", f"/v1/rollouts/{segment(rollout_id, 'ROLLOUT_ID')}/{action}", expect="waves"
        )
        _print_status(r)

    run.__doc__ = {
        "pause": "Pause: no device is sent anything more until resume.",
        "resume": "Resume a paused rollout.",
        "abort": "Abort: stop here; devices keep what they run now.",
        "rollback": "Send every device this rollout touched back to its previous model.",
    }[action]
    return run


for _name in ("pause", "resume", "abort", "rollback"):
    rollout_app.command(_name)(_action(_name))


# -- config --------------------------------------------------------------------------------------
@config_app.command("push")
def config_push(
    file: Annotated[
        Path, typer.Argument(help="YAML or JSON file with the config (shared/edge_config.py schema).")
    ],
    selector: Annotated[
        str, typer.Option("--selector", "-l", help="Label selector (empty: all devices).")
    ] = "",
    url: UrlOpt = DEFAULT_URL,
    api_key: KeyOpt = "",
) -> None:
    """Validate a serving config here and push it to the devices the selector matches."""
    import yaml

    from shared.edge_config import EdgeConfig

    try:
        config = yaml.safe_load(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise typer.BadParameter(f"cannot read {file}: {exc}", param_hint="FILE") from exc
    if config is None:
        raise typer.BadParameter(
            f"{file} is empty: nothing to push ({{}} pushes the defaults)", param_hint="FILE"
        )
    if not isinstance(config, dict):
        raise typer.BadParameter(
            f"{file} holds a {type(config).__name__}, not a mapping of settings", param_hint="FILE"
        )
    EdgeConfig.parse(config)
    r = call(url, api_key, "POST", "/v1/config", {"selector": selector, "config": config}, expect="devices")
    console.print(f"config pushed to {len(r['devices'])} device(s): {', '.join(r['devices'])}")


# -- the service itself --------------------------------------------------------------------------
def register_cloud_commands(cloud_app: typer.Typer) -> None:
    @cloud_app.command("serve")
    def cloud_serve(
        config: ConfigOpt,
        log_level: Annotated[
            LogLevel, typer.Option(help="Python log level.", case_sensitive=False)
        ] = LogLevel.INFO,
    ) -> None:
        """Run the control plane: REST API, operator console (/ui), fleet tracking over MQTT, rollout driver."""
        from cloud.console import install as install_console
        from cloud.plane.app import create_app
        from cloud.plane.service import preflight
        from cloud.settings import CloudSettings
        from edge_agent.serving.server import configure_logging, run_server

        configure_logging(log_level.value)
        settings = CloudSettings.load(config)
        preflight(settings)
        app = create_app(settings)
        if settings.console.enabled:
            install_console(app)
        run_server(app, settings.api.host, settings.api.port, log_level.value)

    key_app = typer.Typer(
        help="API keys: create, list, revoke (directly in the database: the bootstrap path; "
        "admins can also use REST /v1/keys).",
        no_args_is_help=True,
    )
    cloud_app.add_typer(key_app, name="key")

    def _key_store(config: Path, tenant: str) -> Any:
        from cloud.plane.auth import ApiKeys
        from cloud.plane.store import make_engine, migrate
        from cloud.settings import CloudSettings

        settings = CloudSettings.load(config)
        if tenant not in settings.tenants:
            # A key for a tenant the control plane does not serve would open nothing today and
            # everything the day a tenant of that name is added.
            raise typer.BadParameter(
                f"tenant {tenant!r} is not in the config's tenants ({', '.join(settings.tenants)})",
                param_hint="--tenant",
            )
        engine = make_engine(settings.database_url)
        migrate(engine)
        return ApiKeys(engine)

    @key_app.command("create")
    def key_create(
        config: ConfigOpt,
        tenant: KeyTenantOpt = "default",
        scope: Annotated[
            str,
            typer.Option("--scope", help="admin, operator, inference, or pool (reads pool artifacts only)."),
        ] = "admin",
        name: Annotated[str, typer.Option("--name", help="What the key is for.")] = "cli",
        expires_in: Annotated[
            float | None,
            typer.Option("--expires-in", help="Seconds until the key stops working [default: never]."),
        ] = None,
    ) -> None:
        """Create an API key; it is printed once (the last line)."""
        from cloud.plane.auth import SCOPES

        if scope not in SCOPES:
            raise typer.BadParameter(f"choose one of {', '.join(SCOPES)}", param_hint="--scope")
        key_id, key = _key_store(config, tenant).create(tenant, name, scope, expires_in_s=expires_in)
        until = f", expires in {expires_in:.0f}s" if expires_in else ""
        console.print(f"key {key_id} ({scope}, tenant {tenant}{until}):")
        console.print(key)

    @key_app.command("ls")
    def key_ls(config: ConfigOpt, tenant: KeyTenantOpt = "default", as_json: JsonOpt = False) -> None:
        """List a tenant's keys (ids, names, scopes, expiry; never the secrets)."""
        keys = _key_store(config, tenant).list(tenant)
        if as_json:
            console.print_json(json.dumps(keys))
            return
        table = Table("key id", "name", "scope", "created", "expires", "state")
        for k in keys:
            state = "revoked" if k["revoked"] else "expired" if k["expired"] else "active"
            table.add_row(
                k["key_id"], k["name"], k["scope"], k["created_at"] or "-", k["expires_at"] or "never", state
            )
        print_table(console, table)

    @key_app.command("revoke")
    def key_revoke(
        key_id: Annotated[str, typer.Argument(help="The key id (the part after agk_).")],
        config: ConfigOpt,
        tenant: KeyTenantOpt = "default",
    ) -> None:
        """Revoke a key: it stops working on every replica within 2 s (their key caches)."""
        if not _key_store(config, tenant).revoke(tenant, key_id):
            console.print(f"no key {key_id} in tenant {tenant}", style="red")
            raise typer.Exit(1)
        console.print(f"key {key_id} revoked")
