"""Content-addressed blobs and their chunks: splitting, hashing, verification, storage.

A blob is cut into chunks of at most ``chunk_size`` bytes. Without ``ends`` every chunk but the
last is exactly ``chunk_size`` long. With ``ends`` (manifest v3) each of those fixed-size chunks is
also cut where the packager said (at the tensor boundaries of an ONNX weights file, issue 17): a
fine-tune that rewrites some tensors then changes exactly the chunks of those tensors, so a delta
update sends the changed bytes and not their neighbours.
"""

from __future__ import annotations

import bisect
import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, SerializerFunctionWrapHandler, model_serializer, model_validator

from shared.errors import IntegrityError, RegistryError
from shared.ids import Digest, Hex64, is_valid_digest
from shared.wire import WireModel

log = logging.getLogger(__name__)

DEFAULT_CHUNK_SIZE = 1024 * 1024
_READ_SIZE = 1024 * 1024


def sha256_hex(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def digest_of(data: bytes) -> str:
    return "sha256:" + sha256_hex(data)


class BlobRef(WireModel):
    """One blob: its digest, size, and the sha256 of each chunk in order."""

    digest: Digest
    size: Annotated[int, Field(strict=True, ge=0)]
    chunk_size: Annotated[int, Field(strict=True, gt=0, le=16 * 1024 * 1024)]
    # At least one: an empty blob has one empty chunk, so that it is asked for and checked too.
    chunks: Annotated[list[Hex64], Field(min_length=1)]
    # Where each chunk ends (the last one at ``size``), for chunks cut at chosen offsets, each no
    # longer than ``chunk_size``; None: fixed-size chunks. Left out of the JSON when None, so the
    # bytes (and signatures) of manifests made before it are unchanged.
    ends: list[Annotated[int, Field(strict=True, gt=0)]] | None = None

    @model_validator(mode="after")
    def _consistent_ends(self) -> BlobRef:
        if self.ends is None:
            return self
        if len(self.ends) != len(self.chunks):
            raise ValueError(f"{len(self.ends)} chunk ends for {len(self.chunks)} chunks")
        start = 0
        for end in self.ends:
            if not 0 < end - start <= self.chunk_size:
                raise ValueError(f"chunk ending at {end} is not 1..{self.chunk_size} bytes long")
            start = end
        if start != self.size:
            raise ValueError(f"the last chunk ends at {start}, not at the blob's size {self.size}")
        return self

    @model_serializer(mode="wrap")
    def _omit_fixed_ends(self, handler: SerializerFunctionWrapHandler) -> Any:
        data = handler(self)
        if isinstance(data, dict) and data.get("ends", 0) is None:
            del data["ends"]
        return data

    @property
    def chunk_count(self) -> int:
        return len(self.chunks)

    @property
    def cut(self) -> bool:
        """Chunks cut at chosen offsets (``ends``) rather than every ``chunk_size`` bytes."""
        return self.ends is not None

    def chunk_offset(self, index: int) -> int:
        if not 0 <= index < self.chunk_count:
            raise IntegrityError("chunk index out of range", digest=self.digest, chunk=index)
        if self.ends is None:
            return index * self.chunk_size
        return self.ends[index - 1] if index else 0

    def chunk_length(self, index: int) -> int:
        if not 0 <= index < self.chunk_count:
            raise IntegrityError("chunk index out of range", digest=self.digest, chunk=index)
        if self.ends is None:
            return min(self.chunk_size, self.size - index * self.chunk_size)
        return self.ends[index] - self.chunk_offset(index)

    def chunk_starting_at(self, offset: int) -> int | None:
        """The index of the chunk that starts at byte ``offset``; None where none does."""
        if self.ends is None:
            index, rest = divmod(offset, self.chunk_size)
            return index if rest == 0 and 0 <= index < self.chunk_count else None
        if offset == 0:
            return 0
        i = bisect.bisect_left(self.ends, offset)
        return i + 1 if i < len(self.ends) - 1 and self.ends[i] == offset else None

    def runs(self, indexes: Iterable[int]) -> list[tuple[int, int]]:
        """``[offset, length]`` byte ranges covering these chunks: runs of consecutive chunks, none
        across a multiple of the chunk size nor longer than it. How a device asks for a blob cut
        at its tensors: the pieces of one chunk-size cell in one message, so a first install takes
        the messages fixed chunks would, none larger."""
        ranges: list[tuple[int, int]] = []
        start = length = 0
        last = -2
        for i in sorted(indexes):
            n, offset = self.chunk_length(i), self.chunk_offset(i)
            if length and (i != last + 1 or offset % self.chunk_size == 0 or length + n > self.chunk_size):
                ranges.append((start, length))
                length = 0
            if not length:
                start = offset
            length += n
            last = i
        if length:
            ranges.append((start, length))
        return ranges

    def verify_chunk(self, index: int, data: bytes | memoryview) -> None:
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


def cut_layout(size: int, chunk_size: int, cuts: Iterable[int]) -> list[int] | None:
    """Chunk ends for a blob cut at ``cuts`` (byte offsets, e.g. where tensors start and end) and
    at every multiple of ``chunk_size``: each fixed-size chunk split where a tensor starts or ends
    inside it. A download asks for the pieces of one fixed-size chunk as one message, so a first
    install takes exactly the messages fixed chunks would, while a changed tensor is exactly its
    own pieces. None when that is just the fixed-size layout (or the blob is empty)."""
    if size == 0:
        return None
    points = {c for c in cuts if 0 < c < size}
    points.update(range(chunk_size, size, chunk_size))
    points.add(size)
    ends = sorted(points)
    return None if len(ends) == chunk_count_for(size, chunk_size) else ends


def describe_file(path: Path, chunk_size: int = DEFAULT_CHUNK_SIZE, cuts: Iterable[int] = ()) -> BlobRef:
    """Hash a file as one blob and as chunks, reading it once; ``cuts`` as in :func:`cut_layout`."""
    cut_at = list(cuts)
    if cut_at:
        ends = cut_layout(path.stat().st_size, chunk_size, cut_at)
        if ends is not None:
            return _describe_cut_file(path, chunk_size, ends)
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


def _describe_cut_file(path: Path, chunk_size: int, ends: list[int]) -> BlobRef:
    whole = hashlib.sha256()
    chunks: list[str] = []
    start = 0
    with path.open("rb") as fh:
        for end in ends:
            data = fh.read(end - start)
            if len(data) != end - start:
                raise IntegrityError("file shrank while being described", path=str(path))
            whole.update(data)
            chunks.append(sha256_hex(data))
            start = end
        if fh.read(1):
            raise IntegrityError("file grew while being described", path=str(path))
    return BlobRef(
        digest="sha256:" + whole.hexdigest(), size=start, chunk_size=chunk_size, chunks=chunks, ends=ends
    )


def describe_bytes(data: bytes, chunk_size: int = DEFAULT_CHUNK_SIZE, cuts: Iterable[int] = ()) -> BlobRef:
    cut_at = list(cuts)
    ends = cut_layout(len(data), chunk_size, cut_at) if cut_at else None
    if ends is not None:
        starts = [0, *ends[:-1]]
        return BlobRef(
            digest=digest_of(data),
            size=len(data),
            chunk_size=chunk_size,
            chunks=[sha256_hex(data[a:b]) for a, b in zip(starts, ends, strict=True)],
            ends=ends,
        )
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

    def _intact(self, dest: Path, digest: str, size: int) -> bool:
        """Whether the stored blob at ``dest`` is whole and unaltered. A damaged one (a bad disk,
        a hand edit) was kept as it was, and every later package that shared it shipped it: only
        the devices' own checks caught it, and packaging again could not repair it."""
        try:
            if dest.stat().st_size != size:
                return False
        except FileNotFoundError:
            return False
        if file_digest(dest) == digest:
            return True
        log.warning("blob %s in the store is damaged; it is written again", digest)
        return False

    def put_file(self, src: Path) -> str:
        """Copy a file in (verified), returning its digest; an intact existing blob is kept, a
        damaged one written again."""
        digest = file_digest(src)
        dest = self.path(digest)
        if self._intact(dest, digest, src.stat().st_size):
            os.utime(dest)  # in use again: not garbage to a collection running meanwhile
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
        if self._intact(dest, digest, len(data)):
            os.utime(dest)  # in use again: not garbage to a collection running meanwhile
        else:
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

    def read_range(self, digest: str, offset: int, length: int) -> bytes:
        size = self.size(digest)
        if offset < 0 or length < 0 or offset + length > size:
            raise RegistryError("byte range outside the blob", digest=digest, offset=offset, length=length)
        with self.path(digest).open("rb") as fh:
            fh.seek(offset)
            return fh.read(length)

    def remove(self, digest: str) -> None:
        self.path(digest).unlink(missing_ok=True)

    def files(self) -> Iterator[Path]:
        """Every file under the store: its blobs, and temporary ones (``.incoming.*``, a dot
        first) that a write interrupted left behind."""
        base = self.root / "sha256"
        if base.is_dir():
            for sub in sorted(base.iterdir()):
                yield from sorted(p for p in sub.iterdir() if p.is_file())

    def digests(self) -> Iterator[str]:
        for path in self.files():
            if not path.name.startswith("."):  # a temporary file, not a blob
                yield "sha256:" + path.name
