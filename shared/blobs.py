"""Content-addressed blobs and fixed-size chunks: splitting, hashing, verification, storage."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

from pydantic import Field

from shared.errors import IntegrityError, RegistryError
from shared.ids import Digest, Hex64, is_valid_digest
from shared.wire import WireModel

DEFAULT_CHUNK_SIZE = 1024 * 1024
_READ_SIZE = 1024 * 1024


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def digest_of(data: bytes) -> str:
    return "sha256:" + sha256_hex(data)


class BlobRef(WireModel):
    """One blob: its digest, size, and the sha256 of each fixed-size chunk in order."""

    digest: Digest
    size: Annotated[int, Field(strict=True, ge=0)]
    chunk_size: Annotated[int, Field(strict=True, gt=0, le=16 * 1024 * 1024)]
    chunks: list[Hex64]

    @property
    def chunk_count(self) -> int:
        return len(self.chunks)

    def chunk_length(self, index: int) -> int:
        if not 0 <= index < self.chunk_count:
            raise IntegrityError("chunk index out of range", digest=self.digest, chunk=index)
        return min(self.chunk_size, self.size - index * self.chunk_size)

    def verify_chunk(self, index: int, data: bytes) -> None:
        """Raise IntegrityError unless ``data`` is exactly chunk ``index`` of this blob."""
        expected_len = self.chunk_length(index)
        if len(data) != expected_len:
            raise IntegrityError(
                f"chunk has {len(data)} bytes, expected {expected_len}", digest=self.digest, chunk=index
            )
        if sha256_hex(data) != self.chunks[index]:
            raise IntegrityError("chunk sha256 mismatch", digest=self.digest, chunk=index)


def chunk_count_for(size: int, chunk_size: int) -> int:
    # An empty blob still has one (empty) chunk so that it can be requested and acknowledged.
    return max(1, -(-size // chunk_size))


def describe_file(path: Path, chunk_size: int = DEFAULT_CHUNK_SIZE) -> BlobRef:
    """Hash a file as one blob and as chunks, reading it once."""
    whole = hashlib.sha256()
    chunks: list[str] = []
    size = 0
    with path.open("rb") as fh:
        while True:
            data = fh.read(chunk_size)
            if not data and chunks:
                break
            whole.update(data)
            chunks.append(sha256_hex(data))
            size += len(data)
            if len(data) < chunk_size:
                break
    return BlobRef(digest="sha256:" + whole.hexdigest(), size=size, chunk_size=chunk_size, chunks=chunks)


def describe_bytes(data: bytes, chunk_size: int = DEFAULT_CHUNK_SIZE) -> BlobRef:
    pieces = [data[i : i + chunk_size] for i in range(0, len(data), chunk_size)] or [b""]
    return BlobRef(
        digest=digest_of(data), size=len(data), chunk_size=chunk_size, chunks=[sha256_hex(p) for p in pieces]
    )


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(_READ_SIZE), b""):
            h.update(block)
    return "sha256:" + h.hexdigest()


def atomic_write(path: Path, data: bytes) -> None:
    """Write-then-rename, so a crash leaves either the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class BlobStore:
    """A folder of blobs named by digest (``sha256/ab/<hex>``); the same layout fits object storage."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, digest: str) -> Path:
        if not is_valid_digest(digest):
            raise RegistryError("invalid blob digest", digest=digest)
        hexpart = digest.split(":", 1)[1]
        return self.root / "sha256" / hexpart[:2] / hexpart

    def has(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def size(self, digest: str) -> int:
        try:
            return self.path(digest).stat().st_size
        except FileNotFoundError as exc:
            raise RegistryError("blob not in store", digest=digest) from exc

    def put_file(self, src: Path) -> str:
        """Copy a file in (verified), returning its digest; an existing blob is kept, not rewritten."""
        digest = file_digest(src)
        dest = self.path(digest)
        if dest.is_file():
            return digest
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".incoming.")
        os.close(fd)
        try:
            shutil.copyfile(src, tmp)
            if file_digest(Path(tmp)) != digest:
                raise IntegrityError("blob changed while being stored", digest=digest, path=str(src))
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return digest

    def put_bytes(self, data: bytes) -> str:
        digest = digest_of(data)
        dest = self.path(digest)
        if not dest.is_file():
            atomic_write(dest, data)
        return digest

    def read(self, digest: str) -> bytes:
        try:
            return self.path(digest).read_bytes()
        except FileNotFoundError as exc:
            raise RegistryError("blob not in store", digest=digest) from exc

    def read_chunk(self, digest: str, index: int, chunk_size: int) -> bytes:
        size = self.size(digest)
        if index < 0 or index >= chunk_count_for(size, chunk_size):
            raise RegistryError("chunk index out of range", digest=digest, chunk=index)
        with self.path(digest).open("rb") as fh:
            fh.seek(index * chunk_size)
            return fh.read(chunk_size)

    def remove(self, digest: str) -> None:
        self.path(digest).unlink(missing_ok=True)

    def digests(self) -> Iterator[str]:
        base = self.root / "sha256"
        if not base.is_dir():
            return
        for sub in sorted(base.iterdir()):
            for blob in sorted(sub.iterdir()):
                if not blob.name.startswith("."):
                    yield "sha256:" + blob.name
