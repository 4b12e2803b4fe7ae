"""Content-addressed blobs and chunks, and the registry built on them."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from cloud.registry import ModelRegistry
from shared.blobs import BlobStore, describe_bytes, describe_file
from shared.errors import IntegrityError, RegistryError
from shared.manifest import FileEntry, SignedManifest
from shared.signing import SigningKey
from tests.factories import make_manifest


def test_describe_file_matches_describe_bytes(tmp_path: Path) -> None:
    data = os.urandom(10_000)
    (tmp_path / "f").write_bytes(data)
    assert describe_file(tmp_path / "f", 4096) == describe_bytes(data, 4096)
    ref = describe_bytes(data, 4096)
    assert ref.chunk_count == 3
    assert [ref.chunk_length(i) for i in range(3)] == [4096, 4096, 10_000 - 8192]


def test_empty_file_has_one_empty_chunk(tmp_path: Path) -> None:
    (tmp_path / "e").write_bytes(b"")
    ref = describe_file(tmp_path / "e", 1024)
    assert ref.size == 0 and ref.chunk_count == 1
    ref.verify_chunk(0, b"")


def test_verify_chunk_catches_corruption_and_truncation() -> None:
    data = os.urandom(5000)
    ref = describe_bytes(data, 1024)
    ref.verify_chunk(2, data[2048:3072])
    bad = bytearray(data[2048:3072])
    bad[10] ^= 0xFF
    with pytest.raises(IntegrityError, match="sha256 mismatch"):
        ref.verify_chunk(2, bytes(bad))
    with pytest.raises(IntegrityError, match="expected 1024"):
        ref.verify_chunk(2, data[2048:3000])
    with pytest.raises(IntegrityError, match="out of range"):
        ref.verify_chunk(9, b"")


def test_blob_store_is_content_addressed_and_chunked(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "store")
    data = os.urandom(3000)
    (tmp_path / "src").write_bytes(data)
    digest = store.put_file(tmp_path / "src")
    assert digest == describe_bytes(data).digest
    assert store.put_bytes(data) == digest  # identical content: one blob
    assert store.read_chunk(digest, 1, 1024) == data[1024:2048]
    assert store.read_chunk(digest, 2, 1024) == data[2048:]
    with pytest.raises(RegistryError):
        store.read_chunk(digest, 3, 1024)
    with pytest.raises(RegistryError):
        store.path("sha256:../../etc")
    assert list(store.digests()) == [digest]


def test_a_damaged_blob_in_the_store_is_written_again_not_reused(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "blobs")
    data = os.urandom(5000)
    (tmp_path / "src").write_bytes(data)
    digest = store.put_file(tmp_path / "src")
    stored = store.path(digest)
    for damage in (b"\x00" + data[1:], data[:-1]):  # a flipped byte, a truncated file
        stored.write_bytes(damage)
        assert store.put_file(tmp_path / "src") == digest and stored.read_bytes() == data
        stored.write_bytes(damage)
        assert store.put_bytes(data) == digest and stored.read_bytes() == data


def _publish(reg: ModelRegistry, key: SigningKey, version: str, payloads: dict[str, bytes]) -> None:
    files = []
    for name, data in payloads.items():
        reg.blobs.put_bytes(data)
        files.append(
            FileEntry(
                path=name, role="graph" if name.endswith(".onnx") else "config", blob=describe_bytes(data)
            )
        )
    m = make_manifest(name="m", version=version, files=files)
    reg.publish(SignedManifest.sign(m, key))


def test_registry_shares_blobs_across_versions_and_collects_garbage(tmp_path: Path) -> None:
    reg = ModelRegistry(tmp_path / "reg")
    key = SigningKey.generate()
    shared_blob = os.urandom(2000)
    _publish(reg, key, "1", {"model.onnx": shared_blob, "config.json": b"{}"})
    _publish(reg, key, "2", {"model.onnx": shared_blob, "config.json": b'{"v":2}'})
    assert [e.version for e in reg.list()] == ["1", "2"]
    with pytest.raises(RegistryError, match="already exists"):
        _publish(reg, key, "1", {"model.onnx": b"other"})
    reg.delete("m", "1")
    assert reg.blobs.has(describe_bytes(shared_blob).digest)  # still used by version 2
    assert not reg.blobs.has(describe_bytes(b"{}").digest)
    with pytest.raises(RegistryError, match="not found"):
        reg.get("m", "1")


def test_a_damaged_or_moved_manifest_is_named_and_does_not_hide_the_others(tmp_path: Path) -> None:
    reg = ModelRegistry(tmp_path / "reg")
    key = SigningKey.generate()
    for version in ("1", "2", "3"):
        _publish(reg, key, version, {"model.onnx": version.encode()})
    stored = tmp_path / "reg" / "manifests" / "m"
    (stored / "1.json").write_bytes((stored / "1.json").read_bytes()[:40])  # truncated
    (stored / "3.json").write_bytes((stored / "2.json").read_bytes())  # version 2's, stored as 3
    with pytest.raises(RegistryError, match=r"manifests/m/1.json is damaged"):
        reg.get("m", "1")
    with pytest.raises(RegistryError, match=r"manifests/m/3.json names m:2"):
        reg.get("m", "3")
    assert [e.version for e in reg.list()] == ["2"]


def test_garbage_is_what_no_version_names_once_old_enough(tmp_path: Path) -> None:
    reg = ModelRegistry(tmp_path / "reg")
    key = SigningKey.generate()
    _publish(reg, key, "1", {"model.onnx": b"kept"})
    old, fresh = (
        reg.blobs.put_bytes(b"orphan, a failed package's"),
        reg.blobs.put_bytes(b"being packaged now"),
    )
    stale = reg.blobs.path(old).with_name(".incoming.abc")  # an interrupted write
    stale.write_bytes(b"half")
    hour_ago = time.time() - 3700
    for path in (reg.blobs.path(old), stale):
        os.utime(path, (hour_ago, hour_ago))
    assert reg.collect_garbage(3600) == (2, len(b"orphan, a failed package's") + 4)
    assert not reg.blobs.has(old) and reg.blobs.has(fresh) and not stale.exists()
    assert reg.get("m", "1").manifest.files[0].blob.digest == describe_bytes(b"kept").digest
    assert reg.blobs.has(describe_bytes(b"kept").digest) and reg.blobs.has(reg.get("m", "1").digest)
    # Storing a blob again marks it in use: an old orphan a new package shares is not collected.
    os.utime(reg.blobs.path(fresh), (hour_ago, hour_ago))
    reg.blobs.put_bytes(b"being packaged now")
    assert reg.collect_garbage(3600) == (0, 0) and reg.blobs.has(fresh)
    # A damaged manifest: what it names cannot be judged unused.
    path = tmp_path / "reg" / "manifests" / "m" / "1.json"
    path.write_bytes(path.read_bytes()[:30])
    with pytest.raises(RegistryError, match="damaged"):
        reg.collect_garbage(0)
    _publish(reg, key, "2", {"model.onnx": b"other"})
    with pytest.raises(RegistryError, match="damaged"):
        reg.delete("m", "2")  # it frees what no other version names: it cannot tell
    assert reg.get("m", "2").version == "2"  # refused before anything was removed


def test_registry_refuses_manifest_with_missing_blob(tmp_path: Path) -> None:
    reg = ModelRegistry(tmp_path / "reg")
    m = make_manifest(
        files=[FileEntry(path="model.onnx", role="graph", blob=describe_bytes(b"never stored"))]
    )
    with pytest.raises(RegistryError, match="not in the store"):
        reg.publish(SignedManifest.sign(m, SigningKey.generate()))
