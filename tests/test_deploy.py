"""Deployment files checked against the real things: Kubernetes schemas, the CLI, the settings.

* every Kustomize base and overlay renders with ``kubectl kustomize``, and every object it
  renders validates (strictly: unknown fields fail) against the Kubernetes API schemas of a
  current release (Istio's resources against their CRD fields);
* every command an image or a container runs, and every ``autoglm`` command docs/deploy.md
  tells an operator to type, is accepted by the real CLI (subcommands and option names);
* every config file embedded in a ConfigMap, with the environment overrides its pods set,
  validates with the settings class of the process that reads it;
* the NetworkPolicies open exactly the flows manifests/base/network-policies.yaml lists.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from cloud.settings import ENV_PREFIX as CLOUD_ENV
from cloud.settings import CloudSettings
from edge_agent.settings import ENV_PREFIX as EDGE_ENV
from edge_agent.settings import EdgeSettings
from shared.config_env import apply_env

REPO = Path(__file__).resolve().parents[1]
K8S_VERSION = "1.34.0"
DOCKERFILES = sorted(REPO.glob("manifests/images/*.Dockerfile"))
# Every kustomization an operator may apply: the two bases and the overlays.
KUSTOMIZATIONS = [
    "manifests/base",
    "kubeedge",
    *sorted(str(p.parent.relative_to(REPO)) for p in REPO.glob("manifests/overlays/*/kustomization.yaml")),
]


def _kubectl() -> str:
    found = shutil.which("kubectl")
    if found is None:
        pytest.fail("kubectl (with Kustomize v5) is needed: bash .ci/bootstrap.sh installs it")
    return found


def render(kustomization: str) -> list[dict[str, Any]]:
    """``kubectl kustomize DIR``: the objects an operator's ``kubectl apply -k DIR`` creates."""
    r = subprocess.run(
        [_kubectl(), "kustomize", str(REPO / kustomization)], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, f"{kustomization}: {r.stderr}"
    return [d for d in yaml.safe_load_all(r.stdout) if d is not None]


RENDERED = {k: render(k) for k in KUSTOMIZATIONS}


def _documents() -> Iterator[tuple[str, dict[str, Any]]]:
    for k, docs in RENDERED.items():
        for doc in docs:
            yield f"{k}:{doc['kind']}/{doc['metadata']['name']}", doc


DOCUMENTS = list(_documents())


def test_there_is_something_to_check() -> None:
    assert set(KUSTOMIZATIONS) >= {
        "manifests/base",
        "kubeedge",
        "manifests/overlays/dev",
        "manifests/overlays/production",
        "manifests/overlays/istio",
        "manifests/overlays/arm64-edge",
        "manifests/overlays/autoglm-pool",
    }
    kinds = {doc["kind"] for _, doc in DOCUMENTS}
    assert {
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "DaemonSet",
        "NetworkPolicy",
        "PeerAuthentication",
        "DestinationRule",
        "Ingress",
    } <= kinds
    assert {p.name for p in DOCKERFILES} == {
        "cloud.Dockerfile",
        "pool.Dockerfile",
        "edge.Dockerfile",
        "edge-gpu.Dockerfile",
    }


def test_every_manifest_file_is_part_of_a_kustomization() -> None:
    """A YAML file no kustomization names would be shipped and never applied."""
    named: set[Path] = set()
    for k in [*REPO.glob("manifests/**/kustomization.yaml"), REPO / "kubeedge" / "kustomization.yaml"]:
        spec = yaml.safe_load(k.read_text())
        for entry in spec.get("resources", []) + [p["path"] for p in spec.get("patches", []) if "path" in p]:
            named.add((k.parent / entry).resolve())
    files = [*REPO.glob("manifests/**/*.yaml"), *REPO.glob("kubeedge/*.yaml")]
    orphans = [
        str(f.relative_to(REPO))
        for f in files
        if f.name not in ("kustomization.yaml", "skaffold.yaml") and f.resolve() not in named
    ]
    assert orphans == []


# Istio's resources are custom resources: the fields these manifests use, as Istio's CRDs define
# them (security.istio.io/v1 PeerAuthentication, networking.istio.io/v1 DestinationRule).
_MODES = {"UNSET", "DISABLE", "PERMISSIVE", "STRICT"}
_TLS_MODES = {"DISABLE", "SIMPLE", "MUTUAL", "ISTIO_MUTUAL"}


def _check_istio(doc: dict[str, Any]) -> None:
    assert set(doc) <= {"apiVersion", "kind", "metadata", "spec"}
    spec = doc["spec"]
    if doc["kind"] == "PeerAuthentication":
        assert doc["apiVersion"] == "security.istio.io/v1"
        assert set(spec) <= {"selector", "mtls", "portLevelMtls"}
        assert spec["mtls"]["mode"] in _MODES
        for port, mtls in spec.get("portLevelMtls", {}).items():
            assert 0 < int(port) < 65536 and mtls["mode"] in _MODES
        assert "portLevelMtls" not in spec or "selector" in spec, "port-level mTLS needs a workload selector"
    elif doc["kind"] == "DestinationRule":
        assert doc["apiVersion"] == "networking.istio.io/v1"
        assert set(spec) <= {"host", "trafficPolicy", "subsets", "exportTo"}
        assert spec["host"].endswith(".svc.cluster.local")
        assert set(spec["trafficPolicy"]) <= {"tls", "connectionPool", "loadBalancer", "outlierDetection"}
        assert spec["trafficPolicy"]["tls"]["mode"] in _TLS_MODES
    else:
        raise AssertionError(f"no schema for {doc['kind']}")


@pytest.mark.parametrize(("where", "doc"), DOCUMENTS, ids=[w for w, _ in DOCUMENTS])
def test_manifest_validates_against_the_kubernetes_schema(where: str, doc: dict[str, Any]) -> None:
    import kubernetes_validate

    if doc["apiVersion"].split("/")[0].endswith(".istio.io"):
        _check_istio(doc)
        return
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        pytest.fail(f"{where}: {exc.message} at {'.'.join(map(str, exc.path))}")


# -- commands ------------------------------------------------------------------------------------
def _cli_accepts(args: list[str]) -> None:
    """``autoglm ARGS --help`` exits 0: the subcommands exist and every option name is known."""
    r = subprocess.run(
        [sys.executable, "-m", "cloud.cli", *args, "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert r.returncode == 0, f"autoglm {shlex.join(args)}: {r.stderr or r.stdout}"


def _containers(docs: list[tuple[str, dict[str, Any]]] = DOCUMENTS) -> Iterator[tuple[str, dict[str, Any]]]:
    for where, doc in docs:
        spec = doc.get("spec", {}).get("template", {}).get("spec", {})
        for c in spec.get("initContainers", []) + spec.get("containers", []):
            yield f"{where}/{c['name']}", c


def _distinct_autoglm_containers() -> list[tuple[str, dict[str, Any]]]:
    """Containers of our images, one per distinct command line (overlays repeat the bases')."""
    seen: dict[str, tuple[str, dict[str, Any]]] = {}
    for w, c in _containers():
        if re.match(r"^([^/]+/)?autoglm/", c["image"]):
            seen.setdefault(json.dumps([c.get("command"), c.get("args")]), (w, c))
    return list(seen.values())


AUTOGLM_CONTAINERS = _distinct_autoglm_containers()


@pytest.mark.parametrize(("where", "container"), AUTOGLM_CONTAINERS, ids=[w for w, _ in AUTOGLM_CONTAINERS])
def test_container_commands_are_real_cli_commands(where: str, container: dict[str, Any]) -> None:
    assert "command" not in container, "keep the image's autoglm entrypoint"
    _cli_accepts(container["args"])


def _dockerfile_json(text: str, instruction: str) -> list[str]:
    match = re.search(rf"^{instruction}\s+(\[.*\])\s*$", text, re.MULTILINE)
    assert match, f"no exec-form {instruction}"
    value: list[str] = json.loads(match.group(1))
    return value


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_image_runs_a_real_command_as_a_non_root_user_with_a_health_check(dockerfile: Path) -> None:
    text = dockerfile.read_text()
    assert _dockerfile_json(text, "ENTRYPOINT") == ["autoglm"]
    _cli_accepts(_dockerfile_json(text, "CMD"))
    user = re.findall(r"^USER\s+(\S+)", text, re.MULTILINE)
    assert user and user[-1] not in {"root", "0"}
    assert re.search(r"^HEALTHCHECK .*--interval", text, re.MULTILINE)
    # Pinned base images and packages: a tag with a patch version, the tested constraints.
    # The base is a build argument (tests/test_images.py builds on a Debian base made here);
    # its default is a pinned public image.
    # (every stage: the edge image compiles its kernels in a build stage on the same base).
    froms = re.findall(r"^FROM\s+(\S+)", text, re.MULTILINE)
    assert froms and set(froms) == {"${BASE}"}
    base = re.search(r"^ARG BASE=(\S+)", text, re.MULTILINE)
    assert base and re.search(r":\d+\.\d+\.\d+", base.group(1)), base
    assert "-c /opt/autoglm/constraints.txt" in text
    for copied in re.findall(r"^COPY\s+(?!--from=)(\S+)", text, re.MULTILINE):
        assert (REPO / copied).exists(), copied


def test_deploy_guide_commands_exist() -> None:
    guide = (REPO / "docs" / "deploy.md").read_text()
    blocks = re.findall(r"```(?:bash|sh)\n(.*?)```", guide, re.DOTALL)
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            if line.startswith("autoglm "):
                commands.append(shlex.split(line.split(" #")[0])[1:])
    assert len(commands) >= 8, commands
    for args in commands:
        _command_exists(args)


def _command_exists(args: list[str]) -> None:
    """The subcommands and every option name exist (option values in a guide are placeholders)."""
    import typer

    from cloud.cli import app

    cmd: Any = typer.main.get_command(app)
    words = list(args)
    while hasattr(cmd, "commands") and words != ["--help"]:  # a group (typer vendors its click)
        assert words, f"autoglm {shlex.join(args)}: incomplete"
        sub = cmd.commands.get(words.pop(0))
        assert sub is not None, f"autoglm {shlex.join(args)}: no such command"
        cmd = sub
    known = {"--help", *(opt for param in cmd.params for opt in [*param.opts, *param.secondary_opts])}
    for w in words:
        if w.startswith("-"):
            assert w.split("=")[0] in known, f"autoglm {shlex.join(args)}: no option {w}"


# -- config keys -----------------------------------------------------------------------------------
def _configmap(docs: list[dict[str, Any]], name: str, key: str) -> dict[str, Any] | None:
    for doc in docs:
        if doc["kind"] == "ConfigMap" and doc["metadata"]["name"] == name:
            data: dict[str, Any] = yaml.safe_load(doc["data"][key])
            return data
    return None


def _env(docs: list[dict[str, Any]], prefix: str) -> dict[str, str]:
    """The overrides the pods set: literal values as written, the rest (from Secrets and the
    downward API) as a placeholder."""
    names = {}
    for _, c in _containers([("", d) for d in docs]):
        for e in c.get("env", []):
            if e["name"].startswith(prefix):
                names[e["name"]] = (
                    e["value"] if "value" in e and "$(" not in e["value"] else "placeholder-value"
                )
    return names


def _real_files(raw: dict[str, Any], tmp: Path) -> None:
    """TLS paths point into a pod; give the validator a CA, certificate and key it can load."""
    from cloud.mqtt.pki import FleetPKI

    tls = raw.get("broker", {}).get("tls")
    if tls:
        issued = FleetPKI(tmp / "pki").enroll("someone", role="cloud", tenant=None)
        files = {"ca_file": issued.ca, "cert_file": issued.cert, "key_file": issued.key}
        for key in tls:
            tls[key] = str(files[key])


CLOUD_RENDERS = [k for k, docs in RENDERED.items() if _configmap(docs, "autoglm-control-plane", "cloud.yaml")]
EDGE_RENDERS = [k for k, docs in RENDERED.items() if _configmap(docs, "autoglm-edge", "edge.yaml")]


@pytest.mark.parametrize("kustomization", CLOUD_RENDERS)
def test_control_plane_config_and_env_are_settings_keys(kustomization: str, tmp_path: Path) -> None:
    docs = RENDERED[kustomization]
    raw = _configmap(docs, "autoglm-control-plane", "cloud.yaml")
    assert raw is not None
    env = _env(docs, CLOUD_ENV)
    assert f"{CLOUD_ENV}DATABASE_URL" in env
    apply_env(raw, env, CLOUD_ENV)
    _real_files(raw, tmp_path)
    settings = CloudSettings.model_validate(raw)
    assert settings.gateway.upstreams and settings.broker.tls is not None
    # Each pool pod a replica of the gateway's own: a headless Service whose pods serve the port.
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    for upstream in settings.gateway.upstreams:
        assert upstream.discover, upstream
        host, port = urlsplit(upstream.url).hostname or "", urlsplit(upstream.url).port
        service = services[host.split(".")[0]]
        assert service["spec"]["clusterIP"] == "None"
        assert port in [p["port"] for p in service["spec"]["ports"]]
    assert f"{CLOUD_ENV}GATEWAY__UPSTREAMS__0__API_KEY" in env


@pytest.mark.parametrize("kustomization", EDGE_RENDERS)
def test_edge_config_and_env_are_settings_keys(kustomization: str, tmp_path: Path) -> None:
    docs = RENDERED[kustomization]
    raw = _configmap(docs, "autoglm-edge", "edge.yaml")
    assert raw is not None
    env = _env(docs, EDGE_ENV)
    assert {f"{EDGE_ENV}DEVICE_ID", f"{EDGE_ENV}FALLBACK__API_KEY"} <= set(env)
    apply_env(raw, env, EDGE_ENV)
    settings = EdgeSettings.from_mapping(raw)
    assert settings.device_id == "placeholder-value"
    assert str(settings.data_dir) == "/var/lib/autoglm"


def test_broker_configmap_has_the_generated_tls_and_acl_directives() -> None:
    from cloud.mqtt.pki import broker_tls_lines

    for _, doc in DOCUMENTS:
        if doc["kind"] == "ConfigMap" and doc["metadata"]["name"] == "autoglm-mosquitto":
            conf = doc["data"]["mosquitto.conf"].splitlines()
            break
    else:
        raise AssertionError("no broker ConfigMap")
    certs = "/mosquitto/certs"
    expected = broker_tls_lines(
        f"{certs}/ca.crt", f"{certs}/broker.crt", f"{certs}/broker.key", f"{certs}/acl"
    )
    assert set(expected) <= set(conf), set(expected) - set(conf)


def dashboard_metrics(prefix: str) -> set[str]:
    """Metric names (without _total/_bucket/_count) the Grafana dashboard queries, by prefix."""
    dash = json.loads((REPO / "manifests" / "base" / "grafana-dashboard.json").read_text())
    names: set[str] = set()
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            for name in re.findall(r"\b(autoglm_[a-z_]+)", target["expr"]):
                if name.startswith(prefix):
                    names.add(re.sub(r"_(total|bucket|count|sum)$", "", name))
    return names


def test_dashboard_is_valid_json_with_panels_for_fleet_and_pool() -> None:
    assert dashboard_metrics("autoglm_pool_") and dashboard_metrics("autoglm_cloud_")
    # The fleet as the devices report it: agents serve their /metrics on their nodes' 127.0.0.1,
    # out of a cloud Prometheus's reach.
    assert {"autoglm_cloud_fleet_requests", "autoglm_cloud_devices_by_phase"} <= dashboard_metrics(
        "autoglm_cloud_"
    )
    assert not dashboard_metrics("autoglm_edge_")


def adapter_series(prefix: str) -> set[str]:
    """Series the prometheus-adapter rules read (manifests/base/monitoring.yaml), by prefix;
    tests/test_fallback.py checks them against the live /metrics of a control plane and a pool."""
    config = _configmap(RENDERED["manifests/base"], "autoglm-prometheus-adapter", "config.yaml")
    assert config is not None
    names = {re.match(r"^([a-z_:]+)", rule["seriesQuery"].strip("'")).group(1) for rule in config["rules"]}  # type: ignore[union-attr]
    return {re.sub(r"_(total|bucket|count|sum)$", "", n) for n in names if n.startswith(prefix)}


def test_every_hpa_metric_has_an_adapter_rule() -> None:
    for k, docs in RENDERED.items():
        config = _configmap(docs, "autoglm-prometheus-adapter", "config.yaml")
        exposed = {rule["name"]["as"] for rule in config["rules"]} if config else set()
        for doc in docs:
            if doc["kind"] != "HorizontalPodAutoscaler":
                continue
            for metric in doc["spec"]["metrics"]:
                if metric["type"] == "Pods":
                    assert metric["pods"]["metric"]["name"] in exposed, f"{k}: {doc['metadata']['name']}"
    assert {"autoglm_cloud_http_requests", "autoglm_pool_queue_depth"} <= adapter_series("autoglm_")


# -- network policies ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Endpoint:
    """A pod (namespace and labels) or, with ``ip`` and no namespace, something outside the cluster."""

    name: str
    namespace: str | None
    labels: dict[str, str] = field(default_factory=dict, hash=False)
    ip: str = "10.244.0.1"


NAMESPACE_LABELS = {
    ns: {"kubernetes.io/metadata.name": ns}
    for ns in (
        "autoglm",
        "autoglm-edge",
        "kube-system",
        "monitoring",
        "ingress-nginx",
        "default",
        "istio-system",
    )
}


def _selects(selector: dict[str, Any] | None, labels: dict[str, str]) -> bool:
    if selector is None:
        return False
    for k, v in selector.get("matchLabels", {}).items():
        if labels.get(k) != v:
            return False
    for e in selector.get("matchExpressions", []):
        has, value = e["key"] in labels, labels.get(e["key"])
        op = e["operator"]
        if (
            (op == "In" and value not in e["values"])
            or (op == "NotIn" and value in e["values"])
            or (op == "Exists" and not has)
            or (op == "DoesNotExist" and has)
        ):
            return False
    return True


def _peer_matches(peer: dict[str, Any], policy_ns: str, other: Endpoint) -> bool:
    if "ipBlock" in peer:
        block = peer["ipBlock"]
        addr = ipaddress.ip_address(other.ip)
        return addr in ipaddress.ip_network(block["cidr"]) and not any(
            addr in ipaddress.ip_network(c) for c in block.get("except", [])
        )
    if other.namespace is None:
        return False  # pod and namespace selectors never match outside the cluster
    if "namespaceSelector" in peer:
        ns_ok = _selects(peer["namespaceSelector"], NAMESPACE_LABELS.get(other.namespace, {}))
    else:
        ns_ok = other.namespace == policy_ns
    pod_ok = "podSelector" not in peer or _selects(peer["podSelector"], other.labels)
    return ns_ok and pod_ok


def _port_matches(rule: dict[str, Any], port: int, protocol: str) -> bool:
    ports = rule.get("ports")
    return not ports or any(
        p.get("protocol", "TCP") == protocol and p.get("port") in (port, None) for p in ports
    )


def _side_allows(
    policies: list[dict[str, Any]], direction: str, me: Endpoint, other: Endpoint, port: int, protocol: str
) -> bool:
    """Whether the policies selecting ``me`` let this connection through in ``direction``."""
    if me.namespace is None:
        return True  # no policy governs what lies outside the cluster
    kind = "Ingress" if direction == "ingress" else "Egress"
    mine = [
        p
        for p in policies
        if p["metadata"]["namespace"] == me.namespace
        and kind in p["spec"].get("policyTypes", ["Ingress"])
        and _selects(p["spec"]["podSelector"], me.labels)
    ]
    if not mine:
        return True
    peers_key = "from" if direction == "ingress" else "to"
    for p in mine:
        for rule in p["spec"].get(direction, []):
            peers = rule.get(peers_key)
            if (
                not peers or any(_peer_matches(x, p["metadata"]["namespace"], other) for x in peers)
            ) and _port_matches(rule, port, protocol):
                return True
    return False


def open_flows(
    policies: list[dict[str, Any]], endpoints: list[Endpoint], ports: list[tuple[int, str]]
) -> set[tuple[str, str, int]]:
    """Every (source, destination, port) to or from the ``autoglm`` namespace the policies allow:
    egress of the source and ingress of the destination must both let it through."""
    out = set()
    for src in endpoints:
        for dst in endpoints:
            if src == dst or "autoglm" not in (src.namespace, dst.namespace):
                continue
            for port, protocol in ports:
                if _side_allows(policies, "egress", src, dst, port, protocol) and _side_allows(
                    policies, "ingress", dst, src, port, protocol
                ):
                    out.add((src.name, dst.name, port))
    return out


def _app(name: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": name}


CP = Endpoint("control-plane", "autoglm", _app("autoglm-control-plane"))
POOL = Endpoint("pool", "autoglm", _app("autoglm-pool"))
BROKER = Endpoint("broker", "autoglm", _app("autoglm-mosquitto"))
PG = Endpoint("postgresql", "autoglm", _app("autoglm-postgresql"))
DNS = Endpoint("dns", "kube-system", {"k8s-app": "kube-dns"})
PROMETHEUS = Endpoint("prometheus", "monitoring", _app("prometheus"))
INGRESS = Endpoint("ingress", "ingress-nginx", _app("ingress-nginx"))
EDGE_POD = Endpoint("edge-agent", "autoglm-edge", _app("autoglm-edge-agent"))
OTHER_POD = Endpoint("some-app", "default", _app("some-app"))
STRANGER_IN_NS = Endpoint("unlabelled-pod", "autoglm", {"app.kubernetes.io/name": "debug"})
DEVICE = Endpoint("device", None, ip="203.0.113.7")
MANAGED_DB = Endpoint("managed-db", None, ip="10.20.0.5")
ENDPOINTS = [
    CP,
    POOL,
    BROKER,
    PG,
    DNS,
    PROMETHEUS,
    INGRESS,
    EDGE_POD,
    OTHER_POD,
    STRANGER_IN_NS,
    DEVICE,
    MANAGED_DB,
]
PORTS = [
    (53, "UDP"),
    (1883, "TCP"),
    (5432, "TCP"),
    (8400, "TCP"),
    (8500, "TCP"),
    (8883, "TCP"),
    (15012, "TCP"),
    (15020, "TCP"),
]
IN_NAMESPACE = [CP, POOL, BROKER, PG, STRANGER_IN_NS]
OUTSIDE = [DNS, PROMETHEUS, INGRESS, EDGE_POD, OTHER_POD, DEVICE, MANAGED_DB]
# manifests/base/network-policies.yaml, as its header lists the flows.
EXPECTED = {
    *((p.name, "dns", 53) for p in IN_NAMESPACE),
    *((o.name, "broker", 8883) for o in OUTSIDE),
    ("control-plane", "broker", 8883),
    ("control-plane", "pool", 8500),
    ("pool", "control-plane", 8400),  # fetching its model version from the registry
    ("control-plane", "postgresql", 5432),
    ("ingress", "control-plane", 8400),
    ("prometheus", "control-plane", 8400),
    ("prometheus", "pool", 8500),
}


def _policies(kustomization: str) -> list[dict[str, Any]]:
    return [d for d in RENDERED[kustomization] if d["kind"] == "NetworkPolicy"]


def test_network_policies_open_exactly_the_listed_flows() -> None:
    flows = open_flows(_policies("manifests/base"), ENDPOINTS, PORTS)
    assert flows - EXPECTED == set(), "open but not listed"
    assert EXPECTED - flows == set(), "listed but closed"
    # What the list means, said plainly:
    assert not {f for f in flows if f[1] == "pool" and f[0] not in ("control-plane", "prometheus")}
    assert {f[0] for f in flows if f[1] == "postgresql"} == {"control-plane"}
    assert {(f[1], f[2]) for f in flows if f[0] in ("device", "edge-agent")} == {("broker", 8883)}


def test_the_pool_fetches_the_configmaps_version_before_it_serves() -> None:
    """vLLM serves what its init container fetched and verified: the ConfigMap's registry version,
    by both of its ids; in the mesh the sidecar runs first (native), so the fetch has mTLS."""
    for kustomization in ("manifests/base", "manifests/overlays/istio"):
        pool = next(
            d
            for d in RENDERED[kustomization]
            if d["kind"] == "Deployment" and d["metadata"]["name"] == "autoglm-pool"
        )
        spec = pool["spec"]["template"]["spec"]
        (fetch,) = spec["initContainers"]
        assert fetch["args"][:3] == ["pool", "fetch", "$(MODEL_NAME):$(MODEL_VERSION)"]
        assert {e["name"] for e in fetch["env"]} >= {
            "AUTOGLM_URL",
            "AUTOGLM_POOL_REGISTRY_KEY",
            "AUTOGLM_TRUSTED_KEYS",
        }
        (server,) = spec["containers"]
        names = server["args"][server["args"].index("--served-model-name") + 1 :][:2]
        assert names == ["$(MODEL_NAME):$(MODEL_VERSION)", "$(MODEL_NAME)"]
        assert {e["name"] for e in server["env"]} >= {"MODEL_NAME", "MODEL_VERSION"}
    annotations = pool["spec"]["template"]["metadata"]["annotations"]
    assert annotations["sidecar.istio.io/nativeSidecar"] == "true"


def test_overlays_keep_the_flows_and_add_only_their_own() -> None:
    production = open_flows(_policies("manifests/overlays/production"), ENDPOINTS, PORTS)
    assert production - EXPECTED == {("control-plane", "managed-db", 5432)}
    istiod = Endpoint("istiod", "istio-system", {"app": "istiod"})
    istio = open_flows(_policies("manifests/overlays/istio"), [*ENDPOINTS, istiod], PORTS)
    assert istio - production == {
        *((p.name, "istiod", 15012) for p in IN_NAMESPACE),
        ("istiod", "broker", 8883),
        ("prometheus", "control-plane", 15020),  # the sidecars' merged metrics
        ("prometheus", "pool", 15020),
    }
    assert open_flows(_policies("manifests/overlays/dev"), ENDPOINTS, PORTS) == EXPECTED


def test_the_evaluator_refuses_what_a_policy_does_not_open() -> None:
    """The evaluator itself: a default deny closes everything; a rule opens only its port."""
    deny = {
        "metadata": {"namespace": "autoglm"},
        "spec": {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]},
    }
    assert open_flows([deny], [CP, POOL, DEVICE], PORTS) == set()
    one = {
        "metadata": {"namespace": "autoglm"},
        "spec": {
            "podSelector": {"matchLabels": _app("autoglm-pool")},
            "policyTypes": ["Ingress"],
            "ingress": [
                {
                    "from": [{"podSelector": {"matchLabels": _app("autoglm-control-plane")}}],
                    "ports": [{"port": 8500}],
                }
            ],
        },
    }
    assert open_flows([one], [CP, POOL, OTHER_POD], [(8500, "TCP"), (8400, "TCP")]) == {
        ("control-plane", "pool", 8500),
        ("pool", "control-plane", 8500),
        ("pool", "control-plane", 8400),
        ("pool", "some-app", 8500),
        ("pool", "some-app", 8400),
        ("some-app", "control-plane", 8500),
        ("some-app", "control-plane", 8400),
        ("control-plane", "some-app", 8500),
        ("control-plane", "some-app", 8400),
    }


def test_the_dev_loop_builds_every_image_the_dev_overlay_runs() -> None:
    """manifests/skaffold.yaml: its artifacts are our Dockerfiles, the dev overlay it deploys
    renders, and every image of ours that overlay runs is one skaffold builds."""
    sk = yaml.safe_load((REPO / "manifests" / "skaffold.yaml").read_text())
    assert sk["apiVersion"].startswith("skaffold/v4") and sk["kind"] == "Config"
    built = {}
    for a in sk["build"]["artifacts"]:
        context = (REPO / "manifests" / a["context"]).resolve()
        assert context == REPO
        dockerfile = context / a["docker"]["dockerfile"]
        assert dockerfile in DOCKERFILES
        for arg in a["docker"].get("buildArgs", {}):
            assert re.search(rf"^ARG {arg}=", dockerfile.read_text(), re.MULTILINE), (dockerfile, arg)
        built[a["image"]] = dockerfile
    paths = sk["manifests"]["kustomize"]["paths"]
    assert [f"manifests/{p}" for p in paths] == ["manifests/overlays/dev"]
    ours = {
        c["image"].split(":")[0]
        for _, c in _containers([("", d) for d in RENDERED["manifests/overlays/dev"]])
    }
    assert {i for i in ours if i.startswith("autoglm/")} == set(built)
