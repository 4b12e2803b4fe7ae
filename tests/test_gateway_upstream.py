"""The gateway's own HTTP/1.1 client (cloud/gateway/upstream.py) against real sockets: raw asyncio
servers that answer as real servers do and as broken ones do."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any

import pytest

from cloud.gateway.upstream import UpstreamBroken, UpstreamClient, UpstreamSlow, split_url

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
Run = Callable[[Coroutine[Any, Any, None]], None]


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Run:
    """Runs a test on asyncio's loop and on uvloop's (what uvicorn serves the gateway on)."""
    import uvloop

    factory = uvloop.new_event_loop if request.param == "uvloop" else None

    def go(coro: Coroutine[Any, Any, None]) -> None:
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(coro)

    return go


@asynccontextmanager
async def server(handler: Handler) -> AsyncIterator[tuple[str, list[int]]]:
    """A server on a free port; yields its base URL and the client ports it saw connect."""
    peers: list[int] = []

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peers.append(writer.get_extra_info("peername")[1])
        try:
            await handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    srv = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{srv.sockets[0].getsockname()[1]}/v1", peers
    finally:
        srv.close()


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    return head + await reader.readexactly(length)


def answer(body: bytes, *extra: str) -> bytes:
    head = ["HTTP/1.1 200 OK", "content-type: application/json", f"content-length: {len(body)}", *extra]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def client(read_timeout_s: float = 5.0) -> UpstreamClient:
    return UpstreamClient(connect_timeout_s=1.0, read_timeout_s=read_timeout_s)


def test_keep_alive_reuses_one_connection_and_sends_what_it_was_given(run: Run) -> None:
    seen: list[bytes] = []

    async def keep_answering(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            seen.append(await read_request(reader))
            writer.write(answer(b'{"ok": true}', "x-autoglm-model: m:1"))
            await writer.drain()

    async def main() -> None:
        async with server(keep_answering) as (url, peers):
            c = client()
            for _ in range(3):
                r = await c.post(f"{url}/completions", b'{"a": 1}', {"authorization": "Bearer k"})
                assert (r.status, await r.read()) == (200, b'{"ok": true}')
                assert r.headers["x-autoglm-model"] == "m:1"
            c.close()
            assert len(peers) == 1
        request = seen[0].decode()
        assert request.startswith("POST /v1/completions HTTP/1.1\r\n")
        assert "\r\nauthorization: Bearer k\r\n" in request and request.endswith('\r\n\r\n{"a": 1}')
        assert f"\r\nhost: {url.split('/')[2]}\r\n" in request

    run(main())


def test_a_kept_connection_the_server_closed_is_replaced_without_an_error(run: Run) -> None:
    async def one_answer_per_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(answer(b"{}"))  # says nothing of closing
        await writer.drain()
        await read_request(reader)  # the next request: closed unanswered (its keep-alive timeout)

    async def main() -> None:
        async with server(one_answer_per_connection) as (url, peers):
            c = client()
            for _ in range(3):
                r = await c.post(url, b"{}", {})
                assert (r.status, await r.read()) == (200, b"{}")
            # Requests 2 and 3 found their kept connection closed and went on a new one.
            assert len(peers) == 3
            c.close()

    run(main())


def test_a_chunked_stream_arrives_as_it_is_written(run: Run) -> None:
    release = asyncio.Event()

    async def stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
        )
        writer.write(b"7\r\ndata: 1\r\n")
        await writer.drain()
        await release.wait()
        writer.write(b"7\r\ndata: 2\r\n0\r\n\r\n")
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n7\r\ndata: 1\r\n")  # and no end
        await writer.drain()
        await reader.read()

    async def main() -> None:
        async with server(stream) as (url, peers):
            c = client()
            r = await c.post(url, b"{}", {})
            chunks = r.iter_chunks()
            assert await anext(chunks) == b"data: 1"  # before the server wrote the rest
            release.set()
            assert [c async for c in chunks] == [b"data: 2"]
            r2 = await c.post(url, b"{}", {})  # the connection was kept after the whole stream
            assert len(peers) == 1 and r2.status == 200
            r2.release()  # not whole: closed, not kept
            assert c._kept(split_url(url)[0]) is None
            c.close()

    run(main())


def test_silence_is_slow_and_a_cut_is_broken(run: Run) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await asyncio.sleep(5)

    async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(answer(b"0123456789")[:-4])  # promises 10 bytes, sends 6, closes

    async def gibberish(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"SSH-2.0-OpenSSH_9.2\r\n\r\n")

    async def main() -> None:
        async with server(silent) as (url, _):
            with pytest.raises(UpstreamSlow):
                await client(read_timeout_s=0.2).post(url, b"{}", {})
        async with server(cut) as (url, _):
            r = await client().post(url, b"{}", {})
            with pytest.raises(UpstreamBroken, match="in the middle of the answer"):
                await r.read()
        async with server(gibberish) as (url, _):
            with pytest.raises(UpstreamBroken, match="not an HTTP answer"):
                await client().post(url, b"{}", {})
        async with server(silent) as (url, _):
            pass
        with pytest.raises(UpstreamBroken, match="cannot connect"):
            await client().post(url, b"{}", {})  # nothing listens there any more

    run(main())


def test_an_answer_ended_by_closing_and_connection_close_are_not_kept(run: Run) -> None:
    async def http10(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\r\n{"whole": ')
        await writer.drain()
        writer.write(b"true}")

    async def closing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(answer(b"{}", "connection: close"))
        await asyncio.sleep(1)

    async def main() -> None:
        async with server(http10) as (url, _):
            r = await client().post(url, b"{}", {})
            assert await r.read() == b'{"whole": true}'
        async with server(closing) as (url, _):
            c = client()
            r = await c.post(url, b"{}", {})
            assert await r.read() == b"{}"
            assert c._kept(split_url(url)[0]) is None
            c.close()

    run(main())


def test_a_cancelled_request_closes_its_connection(run: Run) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await reader.read()  # until the client closes

    async def main() -> None:
        async with server(silent) as (url, peers):
            c = client()
            task = asyncio.create_task(c.post(url, b"{}", {}))
            await asyncio.sleep(0.2)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert c._kept(split_url(url)[0]) is None and len(peers) == 1

    run(main())


def test_an_interim_answer_is_not_taken_for_the_answer(run: Run) -> None:
    async def continue_first(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            await writer.drain()
            await asyncio.sleep(0.05)
            writer.write(answer(b'{"real": true}'))
            await writer.drain()

    async def main() -> None:
        async with server(continue_first) as (url, peers):
            c = client()
            for _ in range(2):  # and the kept connection is in step for the next request
                r = await c.post(url, b"{}", {})
                assert (r.status, await r.read()) == (200, b'{"real": true}')
            assert len(peers) == 1
            c.close()

    run(main())


def test_bytes_after_a_whole_answer_are_not_its_body_and_the_connection_is_not_kept(run: Run) -> None:
    """A replica that writes a second answer behind the first (in the same packet or later,
    unasked): the client gets the first answer's body alone, and the next request a fresh
    connection rather than one whose next answer may be anybody's."""
    later = asyncio.Event()

    async def two_answers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(answer(b'{"ok": 1}') + answer(b'{"evil": 1}'))
        await writer.drain()
        await read_request(reader)  # never comes: the client does not keep this connection
        writer.write(answer(b'{"evil": 2}'))

    async def then_unasked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(answer(b'{"ok": 2}'))
        await writer.drain()
        await later.wait()
        writer.write(answer(b'{"evil": 3}'))  # while the connection waits for its next request
        await writer.drain()
        await reader.read()

    async def main() -> None:
        for handler, body in ((two_answers, b'{"ok": 1}'), (then_unasked, b'{"ok": 2}')):
            async with server(handler) as (url, peers):
                c = client()
                r = await c.post(url, b"{}", {})
                assert r.status == 200 and await r.read() == body
                later.set()
                await asyncio.sleep(0.1)
                assert c._kept(split_url(url)[0]) is None
                c.close()
                assert len(peers) == 1

    run(main())


def test_urls_are_split_into_origin_and_target() -> None:
    origin, target = split_url("https://pool.example:8443/v1/chat/completions?x=1")
    assert (origin.scheme, origin.host, origin.port, origin.authority) == (
        "https",
        "pool.example",
        8443,
        "pool.example:8443",
    )
    assert target == "/v1/chat/completions?x=1"
    assert split_url("http://[::1]/v1")[0].authority == "[::1]"
    with pytest.raises(ValueError, match="not an http"):
        split_url("ftp://x/")
