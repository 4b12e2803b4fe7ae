"""The same model version at the edge and in the cloud: the pool artifact kept beside each package
(shared/pool_artifact.py), fetched and verified for a pool replica (cloud/pool/fetch.py) from a
real control plane over HTTP, and the gateway's choice of a version (cloud/gateway/balancer.py).
Pool replicas serving registry versions behind the gateway, with an edge falling back to them:
tests/test_fallback.py."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from cloud.gateway.balancer import PoolGateway, Replica, closest_version
from cloud.mqtt.local_broker import free_port
from cloud.plane.auth import ApiKeys
from cloud.plane.store import make_engine
from cloud.pool.fetch import ARTIFACT_FILE, RegistrySource, fetch_pool_model
from cloud.registry import ModelRegistry, RegistryEntry
from cloud.settings import GatewaySettings
from shared.errors import ConfigError, IntegrityError, PackagingError, RegistryError, SignatureError
from shared.manifest import TrustStore
from shared.mqtt import BrokerSettings
from shared.pool_artifact import SignedPoolArtifact, verify_pool_artifact
from shared.signing import SigningKey
from tests.conftest import EdgeProcess, serving_edge
from tests.services import CloudProcess, Service, scrape_metrics, start_cloud


# -- choosing a version ----------------------------------------------------------------------------
def test_closest_version_is_the_highest_below_else_the_lowest_above() -> None:
    assert closest_version("3", {"1", "2", "4"}) == "2"
    assert closest_version("10", {"9", "2", "11"}) == "9"  # numbers compare as numbers
    assert closest_version("1", {"2", "5"}) == "2"
    assert closest_version("1.10", {"1.9", "1.2", "2.0"}) == "1.9"
    assert closest_version("2024-06", {"2024-05", "2024-07"}) == "2024-05"
    assert closest_version("v2", {"v1", "beta"}) == "v1"
    assert closest_version("3", set()) is None
    # Whatever a client writes is compared, never a 500: digits int() refuses ("²", or more than
    # 4,300 of them) compare as text.
    assert closest_version("²", {"1", "2"}) == "2"
    assert closest_version("9" * 5000, {"1", "2"}) == "2"


def _gateway(*lists: frozenset[str] | None) -> PoolGateway:
    gw = PoolGateway(GatewaySettings())
    gw.replicas = [
        Replica(f"r{i}", f"http://127.0.0.1:{9000 + i}/v1", None, models=m) for i, m in enumerate(lists)
    ]
    return gw


def test_the_gateway_substitutes_a_version_only_when_no_replica_has_the_one_asked_for() -> None:
    v1 = frozenset({"demo-glm", "demo-glm:1"})
    v3 = frozenset({"demo-glm", "demo-glm:3"})
    other = frozenset({"big", "big:7"})
    gw = _gateway(v1, v3, other)
    assert gw.substitute("demo-glm:3") is None  # served as asked
    assert gw.substitute("demo-glm:2") == "demo-glm:1"
    assert gw.substitute("demo-glm:0") == "demo-glm:1"
    assert gw.substitute("demo-glm") is None  # no version asked: any replica of the name
    assert gw.substitute("small:1") is None  # no version of that name anywhere
    gw.replicas[0].up = False
    assert gw.substitute("demo-glm:2") == "demo-glm:3"  # what is up counts
    # Replicas that serve the name without a version: the bare name, when no version is listed.
    assert _gateway(frozenset({"demo-glm"}), other).substitute("demo-glm:2") == "demo-glm"
    assert _gateway(frozenset({"demo-glm"}), v3).substitute("demo-glm:2") == "demo-glm:3"
    # A replica whose list is not known yet may have the version: nothing is substituted.
    assert _gateway(v1, None).substitute("demo-glm:2") is None


# -- the artifact in the registry --------------------------------------------------------------------
def test_every_package_keeps_its_signed_full_precision_source(
    registry: ModelRegistry, demo_package: RegistryEntry, demo_source: Path, signing_key: SigningKey
) -> None:
    pool = registry.pool(demo_package.name, demo_package.version)
    artifact = verify_pool_artifact(pool.raw, TrustStore([signing_key.public]), expected_digest=pool.digest)
    assert artifact.package_digest == demo_package.digest
    assert (artifact.name, artifact.version) == (demo_package.name, demo_package.version)
    files = {f.path: f for f in artifact.files}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(files)
    # Byte for byte the source folder (full precision, not the quantized graph).
    for path, f in files.items():
        assert f.blob.digest == "sha256:" + hashlib.sha256((demo_source / path).read_bytes()).hexdigest()
        assert (
            registry.pool_file(demo_package.name, demo_package.version, path).read_bytes()
            == (demo_source / path).read_bytes()
        )
    assert registry.pool_digest(demo_package.name, demo_package.version) == pool.digest

    # Signed over its content: altered, it no longer verifies.
    tampered = SignedPoolArtifact.from_json(pool.raw)
    tampered = tampered.model_copy(
        update={"artifact": tampered.artifact.model_copy(update={"package_digest": "sha256:" + "0" * 64})}
    )
    with pytest.raises(SignatureError):
        verify_pool_artifact(tampered.to_json(), TrustStore([signing_key.public]))
    with pytest.raises(SignatureError, match="untrusted"):
        verify_pool_artifact(pool.raw, TrustStore([SigningKey.generate().public]))
    # Bound to its own package: it cannot be filed under another version.
    with pytest.raises(RegistryError, match="already has a pool artifact"):
        registry.publish_pool(SignedPoolArtifact.from_json(pool.raw))
    with pytest.raises(RegistryError, match="no such file"):
        registry.pool_file(demo_package.name, demo_package.version, "../blobs")


def test_deleting_a_version_frees_its_pool_files_unless_another_version_uses_them(
    tmp_path: Path, demo_source: Path, signing_key: SigningKey
) -> None:
    from cloud.packaging.packager import ModelPackager, PackageOptions

    registry = ModelRegistry(tmp_path / "registry")
    packager = ModelPackager(registry, signing_key)
    packager.package(demo_source, PackageOptions(name="m", version="1", quantize="none"))
    packager.package(demo_source, PackageOptions(name="m", version="2", quantize="int8", pool_artifact=False))
    with pytest.raises(RegistryError, match="no pool artifact"):
        registry.pool("m", "2")
    # Attached afterwards, from the model it was made from only.
    other = tmp_path / "other"
    shutil.copytree(demo_source, other)
    cfg = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**cfg, "architectures": ["SomethingElse"]}))
    with pytest.raises(PackagingError, match="SomethingElse"):
        packager.attach_source("m", "2", other)
    attached = packager.attach_source("m", "2", demo_source)
    assert registry.pool("m", "2").digest == attached.digest
    assert attached.artifact.package_digest == registry.get("m", "2").digest
    with pytest.raises(RegistryError, match="already has a pool artifact"):
        packager.attach_source("m", "2", demo_source)
    weights = next(f for f in registry.pool("m", "1").artifact.files if f.role == "weights")
    assert registry.blobs.has(weights.blob.digest)
    registry.delete("m", "1")
    assert registry.blobs.has(weights.blob.digest)  # version 2's pool artifact has it too
    registry.delete("m", "2")
    assert not registry.blobs.has(weights.blob.digest)
    assert registry.pool_digest("m", "1") is None
    with pytest.raises(RegistryError, match="model not found"):
        registry.pool("m", "1")


# -- fetched over HTTP by a pool replica ---------------------------------------------------------------
@pytest.fixture
def plane_and_pool_key(
    tmp_path_factory: pytest.TempPathFactory,
    broker_settings: BrokerSettings,
    tenant: str,
    registry: ModelRegistry,
    demo_package: RegistryEntry,
) -> Iterator[tuple[CloudProcess, str]]:
    """A control plane over the session's registry, and a key of scope pool."""
    tmp = tmp_path_factory.mktemp("plane")
    db = f"sqlite:///{tmp / 'cloud.db'}"
    cloud = start_cloud(tmp, db, broker_settings, tenant, registry)
    yield cloud, _key(db, tenant, "pool")
    cloud.stop()


def _key(db: str, tenant: str, scope: str) -> str:
    engine = make_engine(db)
    _, key = ApiKeys(engine).create(tenant, scope, scope)  # type: ignore[arg-type]
    engine.dispose()
    return key


def test_a_pool_replica_fetches_a_version_verifies_every_file_and_caches_by_digest(
    plane_and_pool_key: tuple[CloudProcess, str],
    demo_package: RegistryEntry,
    demo_source: Path,
    signing_key: SigningKey,
    tmp_path: Path,
) -> None:
    plane, pool_key = plane_and_pool_key
    # A pool key reads pool artifacts and nothing else.
    r = httpx.get(f"{plane.url}/v1/devices", headers={"authorization": f"Bearer {pool_key}"})
    assert r.status_code == 403, r.text
    source = RegistrySource.build(plane.url, pool_key, [signing_key.public.b64])
    ref = f"{demo_package.name}:{demo_package.version}"
    cache = tmp_path / "cache"
    first = fetch_pool_model(source, ref, cache)
    assert first.downloaded_bytes == first.artifact.total_size > 0
    for f in first.artifact.files:
        assert (first.folder / f.path).read_bytes() == (demo_source / f.path).read_bytes()
    assert (first.folder / ARTIFACT_FILE).is_file()
    # The API lists the artifact's digest beside the package.
    shown = plane.ok("GET", f"/v1/models/{demo_package.name}/{demo_package.version}")
    assert shown["pool_digest"] == first.digest

    # Again: nothing downloaded, same folder.
    again = fetch_pool_model(source, ref, cache)
    assert (again.downloaded_bytes, again.folder) == (0, first.folder)

    # Into a folder of one's own (vLLM's init container), from the cache: nothing downloaded.
    out = tmp_path / "models" / "current"
    placed = fetch_pool_model(source, ref, cache, out)
    assert placed.folder == out and placed.downloaded_bytes == 0
    assert (out / "model.safetensors").read_bytes() == (demo_source / "model.safetensors").read_bytes()

    # A partial download is resumed; a wrong one is thrown away, never loaded.
    fresh = tmp_path / "fresh"
    weights = next(f for f in first.artifact.files if f.path == "model.safetensors")
    blobs = fresh / "blobs"
    blobs.mkdir(parents=True)
    hex_digest = weights.blob.digest.removeprefix("sha256:")
    good = (demo_source / "model.safetensors").read_bytes()
    (blobs / f"{hex_digest}.part").write_bytes(good[: len(good) // 2])
    resumed = fetch_pool_model(source, ref, fresh)
    assert resumed.downloaded_bytes == first.artifact.total_size - len(good) // 2
    assert (resumed.folder / "model.safetensors").read_bytes() == good
    bad = tmp_path / "bad"
    (bad / "blobs").mkdir(parents=True)
    (bad / "blobs" / f"{hex_digest}.part").write_bytes(b"\0" * (len(good) // 2))
    with pytest.raises(IntegrityError, match=r"model\.safetensors"):
        fetch_pool_model(source, ref, bad)
    assert not (bad / "blobs" / f"{hex_digest}.part").exists()
    assert not (bad / "blobs" / hex_digest).exists()

    # Signed by a key the replica does not trust: refused before any file is fetched.
    stranger = RegistrySource.build(plane.url, plane.key, [SigningKey.generate().public.b64])
    with pytest.raises(SignatureError):
        fetch_pool_model(stranger, ref, tmp_path / "stranger")
    assert not (tmp_path / "stranger").exists()
    # Clear errors for a version without an artifact, a wrong key, a malformed reference.
    with pytest.raises(RegistryError, match="no pool artifact"):
        fetch_pool_model(source, f"{demo_package.name}:404", cache)
    with pytest.raises(ConfigError, match="refused the key"):
        fetch_pool_model(RegistrySource.build(plane.url, "agk_nope", [signing_key.public.b64]), ref, cache)
    with pytest.raises(ConfigError, match="NAME:VERSION"):
        fetch_pool_model(source, "demo-glm", cache)
    # Files are only those the artifact lists.
    r = httpx.get(
        f"{plane.url}/v1/models/{demo_package.name}/{demo_package.version}/pool/files/..%2Fmanifests",
        headers={"authorization": f"Bearer {plane.key}"},
    )
    assert r.status_code == 404


# -- pool replicas of registry versions behind the gateway, an edge falling back to them ---------------
def _registry_pool(plane: CloudProcess, key: str, ref: str, port: int, cache: Path, trusted: str) -> Service:
    """``autoglm pool serve --from-registry ref`` against the control plane's registry."""
    pool = Service(
        [
            sys.executable,
            "-m",
            "cloud.cli",
            "pool",
            "serve",
            "--from-registry",
            ref,
            "--registry-url",
            plane.url,
            "--trust",
            trusted,
            "--cache-dir",
            str(cache),
            "--port",
            str(port),
            "--max-batch",
            "4",
            "--threads",
            "1",
        ],
        f"http://127.0.0.1:{port}",
        env={"AUTOGLM_POOL_REGISTRY_KEY": key},
    )
    pool.wait_ready()
    return pool


def _chat(url: str, key: str, model: str, **headers: str) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/chat/completions",
        json={"model": model, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4},
        headers={**({"authorization": f"Bearer {key}"} if key else {}), **headers},
        timeout=60,
    )


def test_the_pool_serves_registry_versions_and_a_device_falls_back_to_its_own_version_or_the_closest(
    tmp_path: Path,
    broker_settings: BrokerSettings,
    tenant: str,
    registry: ModelRegistry,
    demo_package: RegistryEntry,
    demo_package_v2: RegistryEntry,
    signing_key: SigningKey,
    edge_factory: Callable[..., EdgeProcess],
) -> None:
    ports = {"1": free_port(), "2": free_port()}
    upstreams = [{"url": f"http://127.0.0.1:{p}/v1", "name": f"pool-v{v}"} for v, p in ports.items()]
    db = f"sqlite:///{tmp_path / 'cloud.db'}"
    plane = start_cloud(
        tmp_path / "cloud",
        db,
        broker_settings,
        tenant,
        registry,
        extra={"gateway": {"upstreams": upstreams, "health_interval_s": 0.3}},
    )
    inference, pool_key = _key(db, tenant, "inference"), _key(db, tenant, "pool")
    pools: list[Service] = []
    try:
        for version, entry in (("1", demo_package), ("2", demo_package_v2)):
            pool = _registry_pool(
                plane,
                pool_key,
                f"demo-glm:{version}",
                ports[version],
                tmp_path / "cache",
                signing_key.public.b64,
            )
            pools.append(pool)
            listed = httpx.get(f"{pool.url}/v1/models", timeout=5).json()["data"]
            digest = registry.pool_digest(entry.name, entry.version)
            assert [(m["id"], m["digest"]) for m in listed] == [
                (f"demo-glm:{version}", digest),
                ("demo-glm", digest),
            ]

        def learned() -> bool:
            views = plane.ok("GET", "/v1/gateway")["replicas"]
            return all(r["up"] and r["models"] for r in views)

        plane.wait(learned, 30, "the gateway to learn both replicas' models")

        # The gateway routes by version: each version only to the replica that has it.
        for version in ("1", "2"):
            for _ in range(3):
                r = _chat(plane.url, inference, f"demo-glm:{version}")
                assert r.status_code == 200, r.text
                assert r.headers["x-autoglm-replica"] == f"pool-v{version}"
                assert r.headers["x-autoglm-model"] == f"demo-glm:{version}"
                assert r.json()["model"] == f"demo-glm:{version}"

        # A bare name goes to either; the answer says which version made it.
        r = _chat(plane.url, inference, "demo-glm")
        assert r.status_code == 200 and r.headers["x-autoglm-model"] == r.json()["model"]
        assert r.headers["x-autoglm-model"] == f"demo-glm:{r.headers['x-autoglm-replica'][-1]}"
        # So does "default" (each replica's own model), as the README promises of every answer.
        r = _chat(plane.url, inference, "default")
        assert r.status_code == 200 and r.headers["x-autoglm-model"] == r.json()["model"]
        assert r.headers["x-autoglm-model"] == f"demo-glm:{r.headers['x-autoglm-replica'][-1]}"

        # A device running version 1 asks the cloud for version 1, whatever name the app used.
        edge = serving_edge(
            edge_factory,
            broker=broker_settings,
            tenant=tenant,
            registry=registry,
            trusted=[signing_key.public.b64],
            model=demo_package,
            extra={
                "router": {"cloud_url": f"{plane.url}/v1", "policy": "cloud_only"},
                "fallback": {"api_key": inference},
            },
        )
        for asked in ("demo-glm", "default", "demo-glm:1"):
            r = _chat(edge.api, "", asked)
            assert r.status_code == 200, r.text
            assert r.headers["x-autoglm-served-by"] == "cloud"
            assert r.headers["x-autoglm-model"] == "demo-glm:1"
            assert r.json()["model"] == "demo-glm:1"
        # A model the device does not run goes to the cloud as asked.
        r = _chat(edge.api, "", "demo-glm:2")
        assert r.status_code == 200 and r.headers["x-autoglm-model"] == "demo-glm:2"

        # Version 1 leaves the pool: the device's fallback gets the closest version, and says so.
        pools[0].stop()
        plane.wait(lambda: not plane.ok("GET", "/v1/gateway")["replicas"][0]["up"], 30, "pool-v1 marked down")
        r = _chat(edge.api, "", "demo-glm")
        assert r.status_code == 200, r.text
        assert r.headers["x-autoglm-model"] == "demo-glm:2"
        assert r.json()["model"] == "demo-glm:2"
        assert plane.ok("GET", "/v1/gateway")["version_substitutions"] == 1
        assert scrape_metrics(plane.url)["autoglm_cloud_gateway_version_substitutions_total"] == 1
        # The version the pool serves cannot be deleted from under it.
        gone = httpx.delete(
            f"{plane.url}/v1/models/demo-glm/2", headers={"authorization": f"Bearer {plane.key}"}, timeout=10
        )
        assert gone.status_code == 409 and "pool-v2" in gone.json()["error"]["message"], gone.text
        # An app that asked for version 1 by name gets version 1 or nothing: the replica that
        # serves it is down, so it is a 503 to retry, not another version.
        r = _chat(edge.api, "", "demo-glm:1")
        assert r.status_code == 503 and "pool-v1 serves demo-glm:1 but is down" in r.text, r.text
        # Without the device's leave, neither: a 503, not the other replica's 404 or its version.
        r = _chat(plane.url, inference, "demo-glm:1")
        assert r.status_code == 503 and "pool-v1 serves demo-glm:1 but is down" in r.text, r.text
        assert r.headers["retry-after"] == "2"
    finally:
        for pool in pools:
            pool.stop()
        plane.stop()
