"""The gateway's HTTP/1.1 client for its POSTs to pool replicas: keep-alive connections, the
answer parsed by httptools (uvicorn's parser), nothing else per request.

A general client (aiohttp, httpx) was the largest part of what the gateway spent on a request
after FastAPI's (issue 17): URL objects, header multidicts, tracing hooks, per-request timers. This
one writes the request in one ``write`` and hands back the status, the headers and the body as it
arrives; the health and load polls keep using aiohttp.

Failures come in two kinds, which the gateway treats differently (cloud/gateway/balancer.py):

* ``UpstreamBroken``: refused, reset, closed before the answer was whole, no connection within
  the connect timeout, or not HTTP: the replica is down (another may answer).
* ``UpstreamSlow``: connected, but no byte for ``read_timeout_s``: the replica is busy.

A connection goes back to the pool only after a whole answer on a connection both sides keep
open; anything else (a cancelled request, an answer not read to its end) closes it. A request on
a kept connection that the server closed meanwhile (its keep-alive timeout passed) is sent again
once on a new connection, when not a byte of an answer came back.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import lru_cache
from typing import cast
from urllib.parse import urlsplit

import httptools

# Bytes of an answer held for a client that reads slower than the replica writes; beyond them
# the replica is not read from (TCP pushes back on it) until the client catches up.
_HIGH_WATER = 1 << 20
# Idle connections kept per replica, and how long one may stay idle before it is closed.
MAX_IDLE = 256
IDLE_TIMEOUT_S = 30.0


class UpstreamBroken(ConnectionError):
    """The replica could not be reached, broke the connection, or did not answer in HTTP."""


class UpstreamSlow(TimeoutError):
    """The replica took the request and sent nothing for the read timeout."""


@dataclass(frozen=True)
class Origin:
    scheme: str
    host: str
    port: int

    @property
    def authority(self) -> str:
        default = 443 if self.scheme == "https" else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == default else f"{host}:{self.port}"


@lru_cache(maxsize=1024)
def split_url(url: str) -> tuple[Origin, str]:
    """(origin, request target) of an http(s) URL."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {url!r}")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return Origin(parts.scheme, parts.hostname, port), target


class _Connection(asyncio.Protocol):
    """One connection and the answer being read on it (one at a time: no pipelining)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self._parser = httptools.HttpResponseParser(self)
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.headers: dict[str, str] = {}
        self.headers_done = False
        self.complete = False
        self.keep_alive = False
        self.error: Exception | None = None
        self.received = False
        self._interim = False
        self._beyond = False
        self._body: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None

    # -- asyncio.Protocol ----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's is not an asyncio.Transport subclass, hence no isinstance).
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self.complete:
            # Bytes after a whole answer (none was asked for): not this answer's, and the
            # connection can no longer be trusted to start the next one cleanly.
            self._beyond_answer()
            return
        self.received = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(UpstreamBroken(f"not an HTTP answer: {exc}"))
            self.close()
        if self._beyond:
            self._beyond_answer()

    def _beyond_answer(self) -> None:
        self.keep_alive = False
        self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.complete:
            return
        if exc is None and self.headers_done and "content-length" not in self.headers and not self._chunked:
            # An answer delimited by the end of the connection (HTTP/1.0 style) ends here.
            self.complete = True
            self._wake()
            return
        why = f": {exc}" if exc else ""
        what = "in the middle of the answer" if self.received else "before answering"
        self._fail(UpstreamBroken(f"the replica closed the connection {what}{why}"))

    def pause_writing(self) -> None:  # the request is written in one piece; nothing to pause
        pass

    # -- httptools callbacks -------------------------------------------------------------------
    def on_message_begin(self) -> None:
        if self.complete:
            self._beyond = True  # a second answer in the same bytes: ignored, see data_received

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._beyond:
            return
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        if self._beyond:
            return
        status = self._parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            # An interim answer (100 Continue, 103 Early Hints): the real one follows on the
            # same connection; its end must not be taken for the answer's.
            self._interim = True
            self.headers = {}
            return
        self.status = status
        self.headers_done = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        if self._beyond:
            return
        self._body.append(body)
        self._buffered += len(body)
        if self._buffered > _HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self._beyond:
            return
        if self._interim:
            self._interim = False
            return
        # Asked now: the parser forgets it once the message is over.
        self.keep_alive = self._parser.should_keep_alive()
        self.complete = True
        self._wake()

    # -- the reading side ----------------------------------------------------------------------
    @property
    def _chunked(self) -> bool:
        return "chunked" in self.headers.get("transfer-encoding", "").lower()

    @property
    def reusable(self) -> bool:
        # Paused (a client that read slower than the replica wrote, then left): bytes may still
        # sit unread in the socket.
        return self.complete and self.keep_alive and not self.closed and not self._paused

    def _fail(self, error: Exception) -> None:
        if self.error is None:
            self.error = error
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def wait(self, timeout_s: float) -> None:
        """Until something new arrived (headers, body, the end, a failure)."""
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.timeout(timeout_s):
                await self._waiter
        except TimeoutError:
            raise UpstreamSlow(f"nothing from the replica for {timeout_s:g} s") from None
        finally:
            self._waiter = None

    def take(self) -> bytes:
        out = self._body.popleft() if len(self._body) == 1 else b"".join(self._body)
        self._body.clear()
        self._buffered = 0
        if self._paused and self.transport is not None and not self.closed:
            self._paused = False
            self.transport.resume_reading()
        return out

    @property
    def has_body(self) -> bool:
        return bool(self._body)

    def send(self, data: bytes) -> None:
        self._reset()
        self._parser = httptools.HttpResponseParser(self)
        assert self.transport is not None
        self.transport.write(data)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class UpstreamResponse:
    """An answer being read; ``release`` (or reading it to its end) gives the connection back."""

    def __init__(
        self, client: UpstreamClient, origin: Origin, conn: _Connection, read_timeout_s: float
    ) -> None:
        self._client = client
        self._origin = origin
        self._conn: _Connection | None = conn
        self._read_timeout_s = read_timeout_s
        self.status = conn.status
        self.headers = conn.headers

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives (chunked transfer decoded); UpstreamBroken or UpstreamSlow when
        it does not arrive whole."""
        conn = self._conn
        if conn is None:
            return
        while True:
            if conn.has_body:
                yield conn.take()
                continue
            if conn.complete:
                self.release()
                return
            if conn.error is not None:
                raise conn.error
            await conn.wait(self._read_timeout_s)

    async def read(self) -> bytes:
        return b"".join([chunk async for chunk in self.iter_chunks()])

    def release(self) -> None:
        """Done with the answer: its connection is kept when the answer was whole, else closed."""
        conn, self._conn = self._conn, None
        if conn is not None:
            self._client.give_back(self._origin, conn)


class UpstreamClient:
    def __init__(
        self, *, connect_timeout_s: float, read_timeout_s: float, user_agent: str = "autoglm-gateway"
    ) -> None:
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self._user_agent = user_agent
        self._idle: dict[Origin, list[_Connection]] = {}
        self._tls: ssl.SSLContext | None = None

    async def post(self, url: str, payload: bytes, headers: dict[str, str]) -> UpstreamResponse:
        """POST ``payload``; returns once the answer's status and headers arrived."""
        origin, target = split_url(url)
        lines = [
            f"POST {target} HTTP/1.1",
            f"host: {origin.authority}",
            f"user-agent: {self._user_agent}",
            f"content-length: {len(payload)}",
            *(f"{k}: {v}" for k, v in headers.items()),
        ]
        request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + payload
        conn = self._kept(origin)
        if conn is not None:
            try:
                return await self._exchange(origin, conn, request)
            except UpstreamBroken:
                if conn.received:
                    raise
                # The server closed the kept connection as it sat idle: a new one is not stale.
        return await self._exchange(origin, await self._connect(origin), request)

    async def _exchange(self, origin: Origin, conn: _Connection, request: bytes) -> UpstreamResponse:
        try:
            conn.send(request)
            while not conn.headers_done:
                if conn.error is not None:
                    raise conn.error
                await conn.wait(self.read_timeout_s)
        except BaseException:
            conn.close()  # cancelled, slow or broken: the answer on it can no longer be read
            raise
        return UpstreamResponse(self, origin, conn, self.read_timeout_s)

    def _kept(self, origin: Origin) -> _Connection | None:
        idle = self._idle.get(origin)
        now = time.monotonic()
        while idle:
            conn = idle.pop()  # the most recently used: the least likely to have been closed
            if not conn.closed and now - conn.idle_since < IDLE_TIMEOUT_S:
                return conn
            conn.close()
        return None

    async def _connect(self, origin: Origin) -> _Connection:
        loop = asyncio.get_running_loop()
        tls = self._tls_context() if origin.scheme == "https" else None
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                _, conn = await loop.create_connection(
                    _Connection,
                    origin.host,
                    origin.port,
                    ssl=tls,
                    server_hostname=origin.host if tls else None,
                )
        except TimeoutError:
            raise UpstreamBroken(
                f"no connection to {origin.authority} within {self.connect_timeout_s:g} s"
            ) from None
        except (OSError, ssl.SSLError) as exc:
            raise UpstreamBroken(f"cannot connect to {origin.authority}: {exc}") from exc
        return conn

    def _tls_context(self) -> ssl.SSLContext:
        if self._tls is None:
            self._tls = ssl.create_default_context()
        return self._tls

    def give_back(self, origin: Origin, conn: _Connection) -> None:
        if not conn.reusable:
            conn.close()
            return
        idle = self._idle.setdefault(origin, [])
        if len(idle) >= MAX_IDLE:
            conn.close()
            return
        conn.idle_since = time.monotonic()
        idle.append(conn)

    def close(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()
