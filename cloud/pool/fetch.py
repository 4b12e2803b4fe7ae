"""A registry version's full-precision model, fetched for a pool replica (``autoglm pool fetch``,
``autoglm pool serve --from-registry``; the init container in front of vLLM runs the former).

Nothing is loaded unverified: the pool artifact's signature is checked against the keys the
replica trusts (the keys its edge devices trust for packages), and every file against the digest
the artifact lists, while it downloads. Files are cached by digest (and hashed again when
reused), so a restarted replica, or a new version that shares a tokenizer with the old one,
fetches only what it lacks; a download cut off resumes where it stopped (HTTP Range), a few times
with backoff before giving up. Only httpx: this runs in the control-plane image too,
which has no torch.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import httpx

from shared.errors import ConfigError, IntegrityError, RegistryError
from shared.manifest import FileEntry, TrustStore
from shared.mqtt import ReconnectBackoff
from shared.pool_artifact import PoolArtifact, verify_pool_artifact
from shared.signing import PublicKey

log = logging.getLogger(__name__)

# The signed artifact as fetched, kept in the model folder (what was verified, for the curious).
ARTIFACT_FILE = "pool-artifact.json"
_CHUNK = 1024 * 1024
# Tries after a download broke off (each resumes where the last stopped), backing off to 30 s.
RETRIES = 5


@dataclass(frozen=True)
class RegistrySource:
    """Where the control plane's registry is and how to read it."""

    url: str
    api_key: str | None
    trusted: tuple[PublicKey, ...]
    timeout_s: float = 60.0

    @classmethod
    def build(cls, url: str, api_key: str | None, trusted: list[str]) -> RegistrySource:
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"the registry URL must be http(s)://…, got {url!r}")
        if not trusted:
            raise ConfigError("give the public key(s) pool artifacts must be signed with (--trust)")
        return cls(url.rstrip("/"), api_key, tuple(PublicKey.from_b64(k) for k in trusted))


@dataclass(frozen=True)
class FetchedModel:
    folder: Path
    artifact: PoolArtifact
    digest: str
    downloaded_bytes: int


def parse_ref(ref: str) -> tuple[str, str]:
    name, sep, version = ref.partition(":")
    if not sep or not name or not version:
        raise ConfigError(f"a registry model is NAME:VERSION, got {ref!r}")
    return name, version


def fetch_pool_model(source: RegistrySource, ref: str, cache: Path, out: Path | None = None) -> FetchedModel:
    """Fetch and verify ``ref``'s pool artifact; the folder holding its files (``out``, or one under
    ``cache/models``). A folder already holding this very artifact, every file intact, is kept."""
    name, version = parse_ref(ref)
    headers = {"authorization": f"Bearer {source.api_key}"} if source.api_key else {}
    base = f"{source.url}/v1/models/{quote(name, safe='')}/{quote(version, safe='')}/pool"
    with httpx.Client(headers=headers, timeout=source.timeout_s, follow_redirects=False) as client:
        raw = _get(client, base, ref).content
        artifact = verify_pool_artifact(raw, TrustStore(source.trusted))
        if (artifact.name, artifact.version) != (name, version):
            raise IntegrityError(f"asked for {ref}, the registry answered {artifact.ref}")
        digest = "sha256:" + hashlib.sha256(raw).hexdigest()
        folder = out or cache / "models" / name / f"{version}-{digest.removeprefix('sha256:')[:12]}"
        if _holds(folder, raw, artifact.files):
            log.info("%s (%s) is already here in %s", ref, digest, folder)
            return FetchedModel(folder, artifact, digest, 0)
        blobs = cache / "blobs"
        blobs.mkdir(parents=True, exist_ok=True)
        fetched = 0
        started = time.monotonic()
        for f in artifact.files:
            fetched += _fetch_with_retries(client, f"{base}/files/{quote(f.path)}", f, blobs)
        seconds = time.monotonic() - started
        log.info(
            "%s: %d files, %.1f MB fetched (%.1f MB cached) in %.1fs",
            ref,
            len(artifact.files),
            fetched / 1e6,
            (artifact.total_size - fetched) / 1e6,
            seconds,
        )
    _assemble(folder, artifact.files, blobs, raw)
    return FetchedModel(folder, artifact, digest, fetched)


def _get(client: httpx.Client, url: str, ref: str) -> httpx.Response:
    try:
        r = client.get(url)
    except httpx.HTTPError as exc:
        raise RegistryError(f"cannot reach the registry at {url}: {exc}") from exc
    if r.status_code == 200:
        return r
    detail = _detail(r)
    if r.status_code in (401, 403):
        raise ConfigError(f"the registry refused the key (HTTP {r.status_code}): {detail}")
    if r.status_code == 404:
        raise RegistryError(f"{ref} has no pool artifact in the registry: {detail}")
    raise RegistryError(f"the registry answered HTTP {r.status_code} for {ref}: {detail}")


def _detail(r: httpx.Response) -> str:
    try:
        return str(r.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return r.text[:200]


class _Interrupted(RegistryError):
    """The download broke off: what arrived is kept, the next try resumes after it."""

    def __init__(self, message: str, received: int) -> None:
        super().__init__(message)
        self.received = received


def _fetch_with_retries(client: httpx.Client, url: str, f: FileEntry, blobs: Path) -> int:
    fetched = 0
    backoff = ReconnectBackoff(1.0, 30.0, jitter=True)
    for attempt in range(RETRIES + 1):
        try:
            return fetched + _fetch_file(client, url, f, blobs)
        except _Interrupted as exc:
            fetched += exc.received
            if attempt == RETRIES:
                raise
            delay = backoff.next_delay()
            log.warning("%s; resuming in %.1fs", exc, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def _fetch_file(client: httpx.Client, url: str, f: FileEntry, blobs: Path) -> int:
    """Bytes downloaded for ``f`` (0 when its blob is cached); IntegrityError for bytes that are
    not the ones the signed artifact lists, _Interrupted when the download broke off."""
    hex_digest = f.blob.digest.removeprefix("sha256:")
    final = blobs / hex_digest
    if final.is_file():
        # The cache is checked again, not trusted: a blob may have been damaged on disk.
        if final.stat().st_size == f.blob.size and _digest(final) == f.blob.digest:
            return 0
        log.warning("cached %s is damaged: fetching it again", f.path)
        final.unlink()
    part = blobs / f"{hex_digest}.part"
    have = part.stat().st_size if part.is_file() else 0
    if have > f.blob.size:
        part.unlink()
        have = 0
    hasher = _hasher(part) if have else hashlib.sha256()
    fetched = 0
    if have < f.blob.size:
        headers = {"range": f"bytes={have}-"} if have else {}
        try:
            with client.stream("GET", url, headers=headers) as r:
                if r.status_code == 206 and not r.headers.get("content-range", "").startswith(
                    f"bytes {have}-"
                ):
                    raise RegistryError(f"fetching {f.path}: the registry resumed at the wrong offset")
                if r.status_code == 200 and have:
                    # The server ignored the range: start again.
                    hasher, have = hashlib.sha256(), 0
                    part.unlink()
                elif r.status_code not in (200, 206):
                    raise RegistryError(f"fetching {f.path} answered HTTP {r.status_code}")
                with part.open("ab") as sink:
                    for block in r.iter_bytes(_CHUNK):
                        if have + fetched + len(block) > f.blob.size:
                            raise IntegrityError(f"{f.path} is longer than the signed artifact says")
                        sink.write(block)
                        hasher.update(block)
                        fetched += len(block)
        except httpx.HTTPError as exc:
            raise _Interrupted(
                f"fetching {f.path} broke off after {have + fetched} of {f.blob.size} bytes: {exc}",
                received=fetched,
            ) from exc
    actual = "sha256:" + hasher.hexdigest()
    if have + fetched != f.blob.size or actual != f.blob.digest:
        part.unlink(missing_ok=True)
        raise IntegrityError(
            f"{f.path} does not match the signed pool artifact", expected=f.blob.digest, actual=actual
        )
    os.replace(part, final)
    log.info("fetched %s (%.1f MB)", f.path, f.blob.size / 1e6)
    return fetched


def _hasher(path: Path) -> hashlib._Hash:
    hasher = hashlib.sha256()
    with path.open("rb") as stream:
        while block := stream.read(_CHUNK):
            hasher.update(block)
    return hasher


def _digest(path: Path) -> str:
    return "sha256:" + _hasher(path).hexdigest()


def _holds(folder: Path, raw: bytes, files: list[FileEntry]) -> bool:
    """The folder holds this artifact, and every file in it is still the signed bytes."""
    try:
        if (folder / ARTIFACT_FILE).read_bytes() != raw:
            return False
        return all(
            (folder / f.path).stat().st_size == f.blob.size and _digest(folder / f.path) == f.blob.digest
            for f in files
        )
    except OSError:
        return False


def _assemble(folder: Path, files: list[FileEntry], blobs: Path, raw: bytes) -> None:
    """The model folder. Made beside its place and moved in whole, or, when the place is an
    existing empty folder (a volume's mount point), filled in place with the artifact file
    written last: a folder with an artifact file is always complete."""
    if folder.exists() and any(folder.iterdir()):
        if not (folder / ARTIFACT_FILE).is_file():
            raise ConfigError(f"{folder} is not empty and holds no pool model: refusing to replace it")
        (folder / ARTIFACT_FILE).unlink()  # incomplete from here on
        for child in folder.iterdir():
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    if folder.is_dir():
        _place(folder, files, blobs, raw)
        return
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        _place(staging, files, blobs, raw)
        os.replace(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _place(folder: Path, files: list[FileEntry], blobs: Path, raw: bytes) -> None:
    for f in files:
        target = folder / f.path
        target.parent.mkdir(parents=True, exist_ok=True)
        blob = blobs / f.blob.digest.removeprefix("sha256:")
        # A link where the file system allows (a large model is not stored twice): were a
        # server to write into its folder, the cache's check on reuse would catch it.
        try:
            os.link(blob, target)
        except OSError:
            shutil.copyfile(blob, target)
    (folder / ARTIFACT_FILE).write_bytes(raw)
