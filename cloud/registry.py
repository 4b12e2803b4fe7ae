"""The model registry: a blob store plus signed manifests by name and version."""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from shared.blobs import BlobStore, atomic_write, digest_of
from shared.errors import ContractError, RegistryError
from shared.ids import is_valid_name
from shared.manifest import EvalSet, Manifest, SignedManifest
from shared.messages import ModelRef
from shared.pool_artifact import PoolArtifact, SignedPoolArtifact

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RegistryEntry:
    name: str
    version: str
    digest: str
    manifest_size: int
    signed: SignedManifest

    @property
    def manifest(self) -> Manifest:
        return self.signed.manifest

    @property
    def ref(self) -> ModelRef:
        return ModelRef(
            name=self.name,
            version=self.version,
            manifest_digest=self.digest,
            manifest_size=self.manifest_size,
        )


@dataclass(frozen=True)
class PoolEntry:
    """The full-precision source of a package, for the cloud pool (shared/pool_artifact.py)."""

    digest: str
    raw: bytes
    signed: SignedPoolArtifact

    @property
    def artifact(self) -> PoolArtifact:
        return self.signed.artifact


class ModelRegistry:
    """``root/blobs`` holds every blob by digest (signed manifests included); ``root/manifests``
    maps ``name/version.json`` to the signed manifest bytes, ``root/pool`` the same names to the
    signed pool artifacts (the full-precision source the package was made from)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs = BlobStore(root / "blobs")
        self._manifests = root / "manifests"
        self._pool = root / "pool"

    def _manifest_path(self, name: str, version: str) -> Path:
        if not is_valid_name(name) or not is_valid_name(version):
            raise RegistryError("invalid model name or version", name=name, version=version)
        return self._manifests / name / f"{version}.json"

    def _pool_path(self, name: str, version: str) -> Path:
        self._manifest_path(name, version)  # validates both
        return self._pool / name / f"{version}.json"

    def publish_pool(self, signed: SignedPoolArtifact) -> PoolEntry:
        """Store the pool artifact of a published package whose blobs are in the blob store."""
        a = signed.artifact
        package = self.get(a.name, a.version)
        if package.digest != a.package_digest:
            raise RegistryError(
                "the pool artifact names another package",
                name=a.name,
                version=a.version,
                package=package.digest,
                named=a.package_digest,
            )
        path = self._pool_path(a.name, a.version)
        if path.exists():
            raise RegistryError("this version already has a pool artifact", name=a.name, version=a.version)
        for f in a.files:
            if not self.blobs.has(f.blob.digest):
                raise RegistryError(
                    "pool artifact references a blob not in the store", digest=f.blob.digest, path=f.path
                )
        data = signed.to_json()
        atomic_write(path, data)
        return PoolEntry(digest_of(data), data, signed)

    def pool(self, name: str, version: str) -> PoolEntry:
        """The version's pool artifact; RegistryError when it has none (packaged without one, or
        before they existed)."""
        path = self._pool_path(name, version)
        try:
            data = path.read_bytes()
        except FileNotFoundError as exc:
            if not self.exists(name, version):
                raise RegistryError("model not found", name=name, version=version) from exc
            raise RegistryError("this version has no pool artifact", name=name, version=version) from exc
        return PoolEntry(digest_of(data), data, SignedPoolArtifact.from_json(data))

    def pool_digest(self, name: str, version: str) -> str | None:
        path = self._pool_path(name, version)
        return digest_of(path.read_bytes()) if path.is_file() else None

    def pool_file(self, name: str, version: str, path: str) -> Path:
        """Where one file of the version's pool artifact is stored."""
        for f in self.pool(name, version).artifact.files:
            if f.path == path:
                if not self.blobs.has(f.blob.digest):
                    raise RegistryError(
                        "the registry lost this file of the pool artifact",
                        name=name,
                        version=version,
                        path=path,
                    )
                return self.blobs.path(f.blob.digest)
        raise RegistryError("no such file in the pool artifact", name=name, version=version, path=path)

    def _pools(self) -> list[PoolArtifact]:
        if not self._pool.is_dir():
            return []
        return [SignedPoolArtifact.from_json(p.read_bytes()).artifact for p in self._pool.glob("*/*.json")]

    def publish(self, signed: SignedManifest) -> RegistryEntry:
        """Store a signed manifest whose blobs are already in the blob store."""
        m = signed.manifest
        path = self._manifest_path(m.name, m.version)
        if path.exists():
            raise RegistryError(
                "model version already exists; pick a new version", name=m.name, version=m.version
            )
        for f in m.files:
            if not self.blobs.has(f.blob.digest):
                raise RegistryError(
                    "manifest references a blob not in the store", digest=f.blob.digest, path=f.path
                )
        data = signed.to_json()
        self.blobs.put_bytes(data)
        atomic_write(path, data)
        return self._entry(data, path)

    def next_release(self, name: str) -> int:
        """The release number for a new version of ``name``: above every one issued, deleted
        versions included (a high-water mark is kept beside the manifests), so devices can refuse
        anything older than what they run (anti-rollback)."""
        self._manifest_path(name, "x")  # validates the name
        mark = self.root / "releases" / name
        try:
            issued = int(mark.read_text())
        except (FileNotFoundError, ValueError):
            issued = 0
        present = (self._manifests / name).glob("*.json") if (self._manifests / name).is_dir() else []
        for path in present:
            issued = max(issued, self._entry(path.read_bytes(), path).manifest.release_number)
        release = issued + 1
        atomic_write(mark, str(release).encode())
        return release

    def exists(self, name: str, version: str) -> bool:
        return self._manifest_path(name, version).is_file()

    def get(self, name: str, version: str) -> RegistryEntry:
        path = self._manifest_path(name, version)
        try:
            return self._entry(path.read_bytes(), path)
        except FileNotFoundError as exc:
            raise RegistryError("model not found", name=name, version=version) from exc

    def eval_set(self, name: str, version: str) -> EvalSet | None:
        """The evaluation set a version carries (None for packages made before there were any)."""
        entry = self.get(name, version)
        for f in entry.manifest.files:
            if f.role == "eval":
                try:
                    return EvalSet.model_validate_json(self.blobs.read(f.blob.digest))
                except ValueError as exc:
                    raise RegistryError(
                        f"the evaluation set is unreadable: {exc}", name=name, version=version
                    ) from exc
        return None

    def list(self) -> list[RegistryEntry]:
        if not self._manifests.is_dir():
            return []
        entries = []
        for p in self._manifest_files():
            try:
                entries.append(self._entry(p.read_bytes(), p))
            except RegistryError as exc:  # one damaged file must not hide every other version
                log.error("%s; left out of the list", exc.message)
        return entries

    def delete(self, name: str, version: str) -> int:
        """Remove a version and every blob no other version references; returns bytes freed."""
        entry = self.get(name, version)
        manifest_path = self._manifest_path(name, version)
        # Read before anything is removed: a damaged manifest elsewhere refuses the deletion.
        still_used = self._referenced(leaving_out=manifest_path)
        pool_path = self._pool_path(name, version)
        pool = SignedPoolArtifact.from_json(pool_path.read_bytes()).artifact if pool_path.is_file() else None
        manifest_path.unlink()
        pool_path.unlink(missing_ok=True)
        for folder in (self._manifests / name, self._pool / name):
            if folder.is_dir() and not any(folder.iterdir()):
                shutil.rmtree(folder)
        mine = {f.blob.digest for f in entry.manifest.files} | {entry.digest}
        if pool is not None:
            mine |= {f.blob.digest for f in pool.files}
        freed = 0
        for digest in mine:
            if digest not in still_used and self.blobs.has(digest):
                freed += self.blobs.size(digest)
                self.blobs.remove(digest)
        return freed

    def _manifest_files(self) -> tuple[Path, ...]:
        return tuple(sorted(self._manifests.glob("*/*.json")))

    def _referenced(self, leaving_out: Path | None = None) -> set[str]:
        """Every blob a stored manifest (itself included) or pool artifact names, but for the
        version stored at ``leaving_out`` and its pool artifact. Unlike :meth:`list`, a damaged
        manifest is an error here: what it names cannot be judged unused."""
        entries = [self._entry(p.read_bytes(), p) for p in self._manifest_files() if p != leaving_out]
        left_out = (leaving_out.parent.name, leaving_out.stem) if leaving_out is not None else None
        return (
            {f.blob.digest for e in entries for f in e.manifest.files}
            | {e.digest for e in entries}
            | {f.blob.digest for a in self._pools() if (a.name, a.version) != left_out for f in a.files}
        )

    def collect_garbage(self, min_age_s: float = 3600.0) -> tuple[int, int]:
        """Remove the blobs no manifest or pool artifact names (left by a package that failed or
        was interrupted after storing them), and the store's half-written temporary files, once
        older than ``min_age_s``: a package being made stores its blobs before its manifest.
        Returns (files removed, bytes freed)."""
        used = self._referenced()
        cutoff = time.time() - min_age_s
        removed = freed = 0
        for path in self.blobs.files():
            digest = "sha256:" + path.name
            if digest in used:
                continue
            try:
                st = path.stat()
                if st.st_mtime > cutoff:
                    continue
                path.unlink()
            except FileNotFoundError:
                continue
            removed += 1
            freed += st.st_size
        return removed, freed

    @staticmethod
    def _entry(data: bytes, path: Path) -> RegistryEntry:
        """The stored manifest at ``path`` (``manifests/NAME/VERSION.json``); RegistryError naming
        the file when it is unreadable or names another version than its place (a hand edit:
        listed under a version it is not stored as, and no longer what was signed)."""
        try:
            signed = SignedManifest.from_json(data)
        except ContractError as exc:
            raise RegistryError(f"the stored manifest {path} is damaged: {exc}") from exc
        m = signed.manifest
        if (m.name, m.version) != (path.parent.name, path.stem):
            raise RegistryError(
                f"the stored manifest {path} names {m.name}:{m.version}, not the version it is stored as"
            )
        return RegistryEntry(m.name, m.version, digest_of(data), len(data), signed)
