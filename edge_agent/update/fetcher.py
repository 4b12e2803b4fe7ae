"""ShardFetcher: pulls the chunks of a blob over MQTT into a partial file, verifying each one.

Resume needs no bookkeeping: after a restart each chunk of the partial file is re-hashed against
the manifest, so only chunks that are missing or damaged are asked for again. A chunk that
arrives corrupt is dropped and requested again on its own. Duplicates (normal after reconnects)
are ignored.

Chunks are asked for a window at a time (``chunks_per_request``), the next window as soon as half
of the last has landed, so the link does not idle for a round trip between windows.

Chunks are verified and written by one worker thread, not in the MQTT message loop: hashing and
writing a megabyte took the loop longer than receiving it, so the loop stood still while chunks
queued at the broker (issue 17; SHA-256 and file writes release the GIL, so both go on at once).

A blob with fixed-size chunks is asked for by chunk index, one MQTT message per chunk. A blob cut
at its tensor boundaries (manifest v3) has chunks of any length up to the chunk size, small ones
among them: it is asked for in byte ranges, each a run of whole missing chunks within one
chunk-size cell, so a first install takes the messages fixed chunks would (none larger), and each
chunk in a range is still checked against its own hash.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import shutil
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Protocol

from shared.blobs import BlobRef, BlobStore, chunk_count_for, file_digest, sha256_hex
from shared.errors import FetchError, IntegrityError, NoSpaceError
from shared.manifest import MANIFEST_CHUNK_SIZE
from shared.messages import MAX_CHUNKS_PER_BLOB_REQUEST, BlobRequest, FetchRequest, ModelRef

log = logging.getLogger(__name__)


class ChunkChannel(Protocol):
    """What the fetcher needs from the MQTT link."""

    async def subscribe_blob(self, digest: str) -> None: ...

    async def unsubscribe_blob(self, digest: str) -> None: ...

    async def send_fetch(self, request: FetchRequest) -> None: ...


@dataclass
class ChunkIndex:
    """Bytes already on this device that an update may copy instead of downloading."""

    # chunk sha256 → (file, offset, length) of identical bytes.
    by_hash: dict[str, tuple[Path, int, int]] = field(default_factory=dict)
    # blob digest → local files that are another version of the same file (the same path in a
    # slot): a chunk whose hash is not known is looked for at its own offset there. That finds the
    # unchanged tensors of a model whose earlier version was chunked differently (fixed-size
    # chunks before, tensor boundaries now), where no chunk hash is shared.
    same_place: dict[str, list[Path]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.by_hash or self.same_place)


def chunk_index(
    files: list[tuple[Path, BlobRef]], same_place: dict[str, list[Path]] | None = None
) -> ChunkIndex:
    """Where each chunk of these (verified, local) files lies: the source of delta updates."""
    index = ChunkIndex(same_place=dict(same_place or {}))
    for path, ref in files:
        for i, h in enumerate(ref.chunks):
            index.by_hash.setdefault(h, (path, ref.chunk_offset(i), ref.chunk_length(i)))
    return index


@dataclass
class FetchStats:
    chunks_received: int = 0
    # Chunks copied from a model already on the device instead of downloaded (delta updates).
    chunks_reused: int = 0
    bytes_reused: int = 0
    chunks_rejected: int = 0
    duplicates: int = 0
    # Messages that are no chunk or run of chunks of this device's layout (another chunking's).
    strays: int = 0
    bytes_received: int = 0
    # Every (digest, chunk) asked for, in order: lets tests see exactly what was re-requested.
    requested: list[tuple[str, int]] = field(default_factory=list)


class RateLimiter:
    """Paces fetch requests to an average of ``bytes_per_s``: each request reserves its transfer
    time, and the next one waits until the previous reservation has elapsed."""

    def __init__(self, bytes_per_s: int) -> None:
        self.bytes_per_s = bytes_per_s
        self._next_free = 0.0

    async def acquire(self, nbytes: int) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        start = max(now, self._next_free)
        self._next_free = start + nbytes / self.bytes_per_s
        if start > now:
            await asyncio.sleep(start - now)


class _Transfer:
    """One blob being assembled; ``ref`` is None for a manifest, whose chunks have no listed hashes."""

    def __init__(self, digest: str, size: int, chunk_size: int, ref: BlobRef | None, part: Path) -> None:
        self.digest = digest
        self.size = size
        self.chunk_size = chunk_size
        self.ref = ref
        self.count = ref.chunk_count if ref is not None else chunk_count_for(size, chunk_size)
        self.part = part
        self.have: set[int] = set()
        # Arrived and being verified and written by the writer thread.
        self.writing: set[int] = set()
        # The partial file, open while chunks arrive.
        self.fd: int | None = None
        self.rejected: set[int] = set()
        # How often each chunk arrived damaged: a chunk that always does fails the transfer.
        self.rejections: dict[int, int] = {}
        # A chunk that could not be written (a full disk) ends the transfer with this.
        self.error: OSError | None = None
        self.changed = asyncio.Event()

    @property
    def by_range(self) -> bool:
        """Chunks cut at chosen offsets are asked for as byte ranges, packed several to a message."""
        return self.ref is not None and self.ref.cut

    def offset(self, index: int) -> int:
        return self.ref.chunk_offset(index) if self.ref is not None else index * self.chunk_size

    def expected_length(self, index: int) -> int:
        if self.ref is not None:
            return self.ref.chunk_length(index) if self.size else 0
        return min(self.chunk_size, self.size - index * self.chunk_size) if self.size else 0

    def run_at(self, offset: int, length: int) -> list[int] | None:
        """The chunks that [offset, offset+length) is made of; None unless it is a run of whole ones."""
        if self.ref is not None:
            first = self.ref.chunk_starting_at(offset)
        else:
            index, rest = divmod(offset, self.chunk_size)
            first = index if rest == 0 and index < self.count else None
        if first is None:
            return None
        run: list[int] = []
        end, stop = offset, offset + length
        i = first
        while end < stop and i < self.count:
            run.append(i)
            end += self.expected_length(i)
            i += 1
        return run if end == stop and run else None

    def check(self, index: int, data: bytes | memoryview) -> None:
        """IntegrityError unless ``data`` can be chunk ``index``: its hash where known, else its length."""
        if self.ref is not None:
            self.ref.verify_chunk(index, data)
        elif len(data) != self.expected_length(index):
            raise IntegrityError(f"chunk has {len(data)} bytes", digest=self.digest, chunk=index)

    def missing(self) -> list[int]:
        return [i for i in range(self.count) if i not in self.have]


class ShardFetcher:
    def __init__(
        self,
        device_id: str,
        cache: BlobStore,
        partial_dir: Path,
        channel: ChunkChannel,
        *,
        chunks_per_request: int = 32,
        request_timeout_s: float = 10.0,
        max_attempts_without_progress: int = 10,
        max_bytes_per_s: int | None = None,
        max_chunk_rejections: int = 5,
    ) -> None:
        self.device_id = device_id
        self.cache = cache
        self.partial_dir = partial_dir
        self.channel = channel
        self.chunks_per_request = chunks_per_request
        self.request_timeout_s = request_timeout_s
        self.max_stalls = max_attempts_without_progress
        self.max_chunk_rejections = max_chunk_rejections
        self.limiter = RateLimiter(max_bytes_per_s) if max_bytes_per_s else None
        self.stats = FetchStats()
        self._active: dict[str, _Transfer] = {}
        # One thread: chunks of a transfer land in order of arrival, and at most one megabyte is
        # hashed at a time beside the loop.
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fetch-writer")
        partial_dir.mkdir(parents=True, exist_ok=True)

    # -- called by the link's message loop -------------------------------------------------
    def on_chunk(self, digest: str, index: int, data: bytes) -> None:
        """Chunk ``index`` of a blob with fixed-size chunks."""
        t = self._active.get(digest)
        if t is None or index >= t.count or t.fd is None:
            return
        if t.by_range or len(data) != t.expected_length(index):
            # Another chunking of the same blob (asked for by a device of an older package or
            # agent): not damage, and not this transfer's chunk ``index``.
            self.stats.strays += 1
            return
        self._take(t, [(index, data)])

    def on_range(self, digest: str, offset: int, data: bytes) -> None:
        """A run of whole chunks of ``digest`` starting at byte ``offset``."""
        t = self._active.get(digest)
        if t is None or t.fd is None:
            return
        run = t.run_at(offset, len(data))
        if run is None:
            self.stats.strays += 1
            return
        view = memoryview(data)
        pieces: list[tuple[int, bytes | memoryview]] = []
        at = 0
        for i in run:
            n = t.expected_length(i)
            pieces.append((i, view[at : at + n]))
            at += n
        self._take(t, pieces)

    def _take(self, t: _Transfer, pieces: list[tuple[int, bytes | memoryview]]) -> None:
        if t.fd is None:
            return
        fresh = []
        for index, data in pieces:
            if index in t.have or index in t.writing:
                self.stats.duplicates += 1
            else:
                fresh.append((index, data))
                t.writing.add(index)
        if not fresh:
            return
        done = self._writer.submit(_verify_and_write, t, t.fd, fresh)
        loop = asyncio.get_running_loop()
        given = [index for index, _ in fresh]

        def back_on_the_loop(f: Future[list[tuple[int, int, Exception | None]]]) -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed first (shutting down)
                loop.call_soon_threadsafe(self._written, t, given, f)

        done.add_done_callback(back_on_the_loop)

    def _written(
        self, t: _Transfer, given: list[int], done: Future[list[tuple[int, int, Exception | None]]]
    ) -> None:
        """Back on the loop: the writer thread's verdict on each chunk it was given."""
        t.changed.set()
        t.writing.difference_update(given)
        for index, size, exc in done.result():
            if isinstance(exc, IntegrityError):
                self.stats.chunks_rejected += 1
                log.warning("rejected chunk: %s; asking for it again", exc)
                t.rejected.add(index)
                t.rejections[index] = t.rejections.get(index, 0) + 1
            elif isinstance(exc, OSError):
                # The transfer, not the link's message loop, must hear of it.
                t.error = exc
            elif exc is not None:
                raise exc
            else:
                t.have.add(index)
                self.stats.chunks_received += 1
                self.stats.bytes_received += size

    # -- public API -------------------------------------------------------------------------
    def missing_bytes(self, blobs: list[BlobRef]) -> int:
        """Disk the missing blobs still need: what their partial files already hold (they are
        sparse, so the blocks written so far) counts as had, not as needed."""
        need = 0
        for b in blobs:
            if self.cache.has(b.digest):
                continue
            part = self._part_path(b.digest)
            try:
                held = min(part.stat().st_blocks * 512, b.size)
            except FileNotFoundError:
                held = 0
            need += b.size - held
        return need

    def prune_partials(self, keep: set[str]) -> int:
        """Remove partial files of blobs not in ``keep`` (targets given up on); returns how many.
        Their space is what a later update needs."""
        wanted = {self._part_path(d).name for d in keep | set(self._active)}
        removed = 0
        for part in self.partial_dir.glob("*.part"):
            if part.name not in wanted:
                part.unlink(missing_ok=True)
                removed += 1
        if removed:
            log.info("removed %d partial file(s) of abandoned downloads", removed)
        return removed

    def _part_path(self, digest: str) -> Path:
        return self.partial_dir / (digest.split(":", 1)[1] + ".part")

    async def fetch_blobs(self, blobs: list[BlobRef], reuse: ChunkIndex | None = None) -> None:
        """Fetch what the cache lacks; chunks found in ``reuse`` are copied locally, not downloaded."""
        need = self.missing_bytes(blobs)
        free = shutil.disk_usage(self.partial_dir).free
        if need > free:
            raise NoSpaceError(
                f"model needs {need} more bytes but only {free} are free on disk", device_id=self.device_id
            )
        for blob in blobs:
            if not self.cache.has(blob.digest):
                await self._fetch(blob.digest, blob.size, blob.chunk_size, blob, reuse)

    async def fetch_manifest(self, ref: ModelRef) -> bytes:
        if not self.cache.has(ref.manifest_digest):
            await self._fetch(ref.manifest_digest, ref.manifest_size, MANIFEST_CHUNK_SIZE, None)
        return self.cache.read(ref.manifest_digest)

    # -- internals --------------------------------------------------------------------------
    async def _fetch(
        self, digest: str, size: int, chunk_size: int, ref: BlobRef | None, reuse: ChunkIndex | None = None
    ) -> None:
        part = self._part_path(digest)
        t = _Transfer(digest, size, chunk_size, ref, part)
        # Re-hashing a large partial takes seconds: off the event loop, which serves requests.
        await asyncio.to_thread(self._resume, t)
        if reuse:
            await asyncio.to_thread(self._reuse_local, t, reuse)
        t.fd = os.open(part, os.O_RDWR)
        self._active[digest] = t
        try:
            await self.channel.subscribe_blob(digest)
        except BaseException:
            self._close(t)
            raise
        try:
            for attempt in range(3):
                await self._pull_missing(t)
                await self._settled(t)
                # Every chunk of a blob with listed hashes was checked against the signed manifest
                # as it arrived (or on resume, or when copied from the other slot): hashing the
                # whole again would only repeat that, on the path of every update (and the
                # reconciler checks each blob's digest before it installs a slot).
                actual = digest if t.ref is not None else await asyncio.to_thread(file_digest, part)
                if actual == digest:
                    dest = self.cache.path(digest)
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(part, dest)
                    return
                # Only possible without per-chunk hashes (a manifest): start that blob over.
                log.warning(
                    "assembled %s hashes to %s; fetching it again (attempt %d)", digest, actual, attempt + 1
                )
                t.have.clear()
            raise IntegrityError("assembled blob never matched its digest", digest=digest)
        finally:
            self._close(t)
            await self.channel.unsubscribe_blob(digest)

    async def _settled(self, t: _Transfer) -> None:
        """Until the writer thread is done with every chunk of ``t`` it was given."""
        while t.writing:
            t.changed.clear()
            await t.changed.wait()

    def _close(self, t: _Transfer) -> None:
        """No more chunks for ``t``; its file is closed after the writes queued before (one writer
        thread, in order), so none lands on a descriptor number already reused."""
        self._active.pop(t.digest, None)
        if t.fd is not None:
            self._writer.submit(os.close, t.fd)
            t.fd = None

    def _resume(self, t: _Transfer) -> None:
        if not t.part.exists():
            with t.part.open("wb") as fh:
                fh.truncate(t.size)
            return
        if t.part.stat().st_size != t.size:
            with t.part.open("r+b") as fh:
                fh.truncate(t.size)
        if t.ref is None:
            return
        with t.part.open("rb") as fh:
            for i in range(t.count):
                fh.seek(t.offset(i))
                if sha256_hex(fh.read(t.expected_length(i))) == t.ref.chunks[i]:
                    t.have.add(i)
        if t.have:
            log.info("resuming %s: %d of %d chunks already on disk", t.digest, len(t.have), t.count)

    def _reuse_local(self, t: _Transfer, reuse: ChunkIndex) -> None:
        """Copy chunks whose bytes we already hold (in the other slot) into the partial file: by
        hash, else at the same offset of another version of the same file."""
        if t.ref is None:
            return
        copied = 0
        places = reuse.same_place.get(t.digest, [])
        with contextlib.ExitStack() as files, t.part.open("r+b") as out:
            opened: dict[Path, BinaryIO | None] = {}

            def read(path: Path, offset: int, length: int) -> bytes | None:
                if path not in opened:
                    try:
                        opened[path] = files.enter_context(path.open("rb"))
                    except OSError:
                        opened[path] = None
                fh = opened[path]
                if fh is None:
                    return None
                fh.seek(offset)
                return fh.read(length)

            for i in t.missing():
                offset, length = t.offset(i), t.expected_length(i)
                candidates = [reuse.by_hash[t.ref.chunks[i]]] if t.ref.chunks[i] in reuse.by_hash else []
                candidates += [(path, offset, length) for path in places]
                for path, at, n in candidates:
                    try:
                        data = read(path, at, n)
                        if data is None:
                            continue
                        t.check(i, data)
                    except (OSError, IntegrityError):
                        continue  # a damaged, vanished or different local copy: try the next
                    out.seek(offset)
                    out.write(data)
                    t.have.add(i)
                    copied += len(data)
                    self.stats.chunks_reused += 1
                    break
        self.stats.bytes_reused += copied
        if copied:
            log.info(
                "%s: %d bytes reused from models on this device; %d chunk(s) to fetch",
                t.digest,
                copied,
                len(t.missing()),
            )

    async def _request(self, t: _Transfer, chunks: list[int]) -> None:
        if self.limiter is not None:
            await self.limiter.acquire(sum(t.expected_length(i) for i in chunks))
        if t.ref is not None and t.ref.cut:
            blob = BlobRequest(digest=t.digest, chunk_size=t.chunk_size, ranges=t.ref.runs(chunks))
        else:
            blob = BlobRequest(digest=t.digest, chunk_size=t.chunk_size, chunks=chunks)
        await self.channel.send_fetch(
            FetchRequest(device_id=self.device_id, request_id=uuid.uuid4().hex[:16], blobs=[blob])
        )
        self.stats.requested.extend((t.digest, i) for i in chunks)

    def _window(self, t: _Transfer, missing: list[int], per_request: int) -> set[int]:
        """The next chunks to ask for: up to ``per_request`` chunks' worth of bytes."""
        budget = per_request * t.chunk_size
        window: set[int] = set()
        for i in missing:
            if window and (budget <= 0 or len(window) >= MAX_CHUNKS_PER_BLOB_REQUEST):
                break
            window.add(i)
            budget -= max(1, t.expected_length(i))
        return window

    async def _pull_missing(self, t: _Transfer) -> None:
        loop = asyncio.get_running_loop()
        stalls = 0
        per_request = self.chunks_per_request
        if self.limiter is not None:
            # About one second of transfer per request, so a capped fetch flows instead of bursting.
            per_request = max(1, min(per_request, self.limiter.bytes_per_s // max(1, t.chunk_size)))
        # Asked for and not landed yet (cleared after a stall: lost on the way). Kept to the chunks
        # of at most 1.5 windows, so each arrival's pass costs that much, not the whole blob's.
        in_flight: set[int] = set()
        deadline = loop.time() + self.request_timeout_s
        while len(t.have) < t.count:
            in_flight = {i for i in in_flight if i not in t.have}
            # The next window goes out while the last one's second half is still arriving: asked
            # for only once the last had landed, every window began with the link idle for a round
            # trip and the cloud's first read (windows of 32 on loopback: one device at 0.66-0.70
            # of a raw MQTT stream's rate before, 0.69-0.76 after; bench/RESULTS.md). At most 1.5
            # windows are queued for the device.
            unasked = t.count - len(t.have) - len(in_flight)  # in_flight and have are disjoint
            if unasked and sum(t.expected_length(i) for i in in_flight) <= per_request * t.chunk_size // 2:
                fresh = [i for i in t.missing() if i not in in_flight]
                window = self._window(t, fresh, per_request)
                t.rejected.difference_update(window)
                await self._request(t, sorted(window))
                in_flight |= window
                deadline = loop.time() + self.request_timeout_s
                continue
            t.changed.clear()
            if t.error is not None:
                free = shutil.disk_usage(self.partial_dir).free
                if t.error.errno == errno.ENOSPC:
                    raise NoSpaceError(
                        f"disk full while writing {t.digest}: {free} bytes free, "
                        f"{sum(t.expected_length(i) for i in t.missing())} more needed",
                        device_id=self.device_id,
                    ) from t.error
                raise FetchError(f"cannot write {t.digest}: {t.error}", device_id=self.device_id)
            redo = sorted(in_flight & t.rejected)
            hopeless = [i for i in redo if t.rejections.get(i, 0) >= self.max_chunk_rejections]
            if hopeless:
                # The same chunk damaged again and again is not line noise: asking forever would
                # keep the cloud publishing it and this update from ever ending.
                raise IntegrityError(
                    f"chunk {hopeless[0]} arrived damaged {t.rejections[hopeless[0]]} times; giving up",
                    digest=t.digest,
                    device_id=self.device_id,
                )
            if redo:
                # Only the damaged chunks go out again; the rest is still in flight.
                t.rejected.difference_update(redo)
                await self._request(t, redo)
                deadline = loop.time() + self.request_timeout_s
            have_before = len(t.have)
            try:
                # asyncio.timeout, not wait_for: on 3.11, wait_for returns instead of raising when
                # it is cancelled as the event is set, and a newer revision's cancel of this
                # download was lost (tests/test_trust.py failed 1 run in many).
                async with asyncio.timeout(max(0.0, deadline - loop.time())):
                    await t.changed.wait()
            except TimeoutError:
                stalls += 1
                if stalls >= self.max_stalls:
                    raise FetchError(
                        f"no chunk arrived in {stalls} waits of {self.request_timeout_s}s",
                        digest=t.digest,
                        device_id=self.device_id,
                        missing=len(t.missing()),
                    ) from None
                log.info("fetch of %s stalled; asking again for %d chunk(s)", t.digest, len(in_flight))
                in_flight.clear()  # lost on the way: asked for again with the next window
                continue
            if len(t.have) > have_before:
                stalls = 0
                deadline = loop.time() + self.request_timeout_s


def _verify_and_write(
    t: _Transfer, fd: int, pieces: list[tuple[int, bytes | memoryview]]
) -> list[tuple[int, int, Exception | None]]:
    """On the writer thread: each piece checked as its chunk and, if it is, written; the verdicts."""
    verdicts: list[tuple[int, int, Exception | None]] = []
    for index, data in pieces:
        try:
            t.check(index, data)
            offset = t.offset(index)
            left = memoryview(data)
            while left:
                written = os.pwrite(fd, left, offset)
                left, offset = left[written:], offset + written
        except (IntegrityError, OSError) as exc:
            verdicts.append((index, len(data), exc))
        else:
            verdicts.append((index, len(data), None))
    return verdicts
